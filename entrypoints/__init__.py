"""Thin click commands, one per stage: parse, open the run, call the library, log."""
