"""Cached side runs (FID reference statistics, the shapes classifier): every process uses the one
that finished first, so two drivers that both had to make one end up scoring with the same."""

from __future__ import annotations

import time

from maskdm.tracking import cached_artifact, log_side_run


def test_the_first_finished_side_run_is_the_one_everybody_uses(tracking, tmp_path):
    files = []
    for name in ("first", "second"):
        path = tmp_path / name / "stats.txt"
        path.parent.mkdir()
        path.write_text(name)
        files.append(path)
    first = log_side_run("fid_reference", {"maskdm.test_key": "k"}, {}, {}, [files[0]])
    time.sleep(0.05)  # distinct end times
    second = log_side_run("fid_reference", {"maskdm.test_key": "k"}, {}, {}, [files[1]])
    run_id, path = cached_artifact("fid_reference", "maskdm.test_key", "k", "stats.txt")
    assert (run_id, path.read_text()) == (first, "first")
    assert second != first
    assert cached_artifact("fid_reference", "maskdm.test_key", "other", "stats.txt") is None
