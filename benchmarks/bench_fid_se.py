"""What the fid stage's bootstrap standard error (``se_resamples``) adds to the stage, on a CPU.

Synthetic 2048-dimensional float32 features stand in for the samples' Inception pool3 features
(the SE never looks at images) and synthetic reference statistics for the dataset's. Times the
FID itself (``fid_from_stats``, as the stage computes it), the SE's one-off set-up and its
replicates, and sets the SE's cost against the stage's Inception pass for the same number of
images, at the rate measured in this process just before (``--inception_images`` 256x256 images
through pool3 at the CPU's batch of 50, planted random weights: speed does not depend on them), so
that the load of a shared machine falls on both; ``--images_per_s`` gives a rate instead.

Running fewer replicates than the stage's default (``--resamples 10``) and extrapolating is fair:
every replicate does the same work (the same number of rows, on average, and one eigvalsh).

    OMP_NUM_THREADS=1 python benchmarks/bench_fid_se.py --samples 50000 --resamples 10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

from maskdm.evaluation import fid

REPO = Path(__file__).resolve().parents[1]


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Resets the process's peak RSS (VmHWM) to its current RSS (Linux), which it returns, in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("VmRSS")


def inception_rate(count: int) -> float:
    """Images/s of the stage's Inception pass (pool3, batch 50, 256x256 uint8 in), timed after one warm-up batch."""
    sys.path.insert(0, str(REPO / "tests"))
    from inception_fixture import plant_inception_weights

    with tempfile.TemporaryDirectory() as home:
        weights = plant_inception_weights(Path(home))
        model = fid.load_inception(2048, weights)
    images = np.random.default_rng(1).integers(0, 256, (count + 50, 256, 256, 3), dtype=np.uint8)
    fid.inception_features(images[:50], model, batch_size=50)
    start = time.perf_counter()
    fid.inception_features(images[50:], model, batch_size=50)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--dims", type=int, default=2048)
    parser.add_argument("--resamples", type=int, default=10, help="replicates timed (the stage default is extrapolated to)")
    parser.add_argument("--stage_resamples", type=int, default=fid.DEFAULT_SE_RESAMPLES)
    parser.add_argument("--inception_images", type=int, default=100, help="images timed through Inception for its rate")
    parser.add_argument("--images_per_s", type=float, default=0.0, help="the stage's Inception rate, instead of measuring it")
    args = parser.parse_args()

    images_per_s = args.images_per_s or inception_rate(args.inception_images)
    rng = np.random.default_rng(0)
    # Features with a decaying spectrum, like pooled activations; the reference a shifted, rescaled copy.
    spectrum = (1.0 / np.sqrt(1 + np.arange(args.dims))).astype(np.float32)
    features = rng.standard_normal((args.samples, args.dims), dtype=np.float32) * spectrum
    mixing = np.linalg.qr(rng.standard_normal((args.dims, args.dims)))[0].astype(np.float32)
    features = features @ mixing
    ref_mu = rng.standard_normal(args.dims) * 0.01
    ref_sigma = (mixing * (spectrum.astype(np.float64) * 1.1) ** 2) @ mixing.T

    start = time.perf_counter()
    stats = fid.statistics(features)
    value = fid.fid_from_stats(*stats, ref_mu, ref_sigma)
    fid_s = time.perf_counter() - start

    # Set-up alone: a run with no replicate does the rotation and the all-rows moments.
    timings: list[float] = []
    real_tqdm = fid.tqdm

    def timed_tqdm(iterable, **kwargs):
        timings.append(time.perf_counter())  # set-up done: the replicates start
        yield from real_tqdm(iterable, **kwargs)

    rss_before = reset_peak_rss()
    start = time.perf_counter()
    with mock.patch.object(fid, "tqdm", timed_tqdm):
        fids = fid.bootstrap_fids(features, (ref_mu, ref_sigma), args.resamples, seed=0, overwrite=True)
    end = time.perf_counter()
    setup_s, per_replicate_s = timings[0] - start, (end - timings[0]) / args.resamples
    se_s = setup_s + per_replicate_s * args.stage_resamples
    inception_s = args.samples / images_per_s

    print(f"{args.samples} samples x {args.dims} dims; FID {value:.4f}, SE over {args.resamples} replicates {fid.bootstrap_se(fids):.4f}")
    print(f"FID from the features (statistics + Fréchet distance): {fid_s:.1f} s")
    print(f"SE set-up (centre, rotate, all-rows moments): {setup_s:.1f} s; per replicate {per_replicate_s:.2f} s")
    print(f"SE at se_resamples={args.stage_resamples}: {se_s:.0f} s")
    print(f"stage's Inception pass at {images_per_s:.2f} images/s: {inception_s:.0f} s; "
          f"SE / (stage + SE) = {se_s / (inception_s + fid_s + se_s):.1%}, SE / stage = {se_s / (inception_s + fid_s):.1%}")
    print(f"the features the stage keeps for it: {features.nbytes / 2**30:.2f} GiB; "
          f"the SE's peak memory over them: {(status_kib('VmHWM') - rss_before) / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
