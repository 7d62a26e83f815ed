"""Evaluation: FID (pytorch-fid, the shapes feature extractor, the FID protocol, streamed samples),
side-by-side speed measurement, and replicates to verdicts (mean, SE, paired differences)."""
