"""maskdm's FID against ``python -m pytorch_fid`` on the same images, side by side on a CPU.

Both run as fresh processes (imports, weight loading and all), on the same N shapes images (PNGs
for pytorch-fid, the same pixels as a uint8 array in memory for maskdm) against the same reference
statistics .npz, with the same Inception weights. Prints both FID values, their relative
difference, both wall and CPU times and the speed-up.

Without --torch-home the weights are random, planted in pytorch-fid's file format in a temporary
TORCH_HOME: the FID values then only show that the two agree, not anything about image quality.

    python benchmarks/bench_fid.py --images 200
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def run_timed(command: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(FID printed by the command, wall seconds, CPU seconds of the child and its workers)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return float(done.stdout.split("FID:")[-1]), wall, cpu


def ours_worker(samples: Path, reference: Path, dims: int, batch_size: int, device: str) -> None:
    """What the fid stage does: load the network, score the in-memory samples, compare with the reference."""
    sys.path.insert(0, str(REPO))
    from maskdm.evaluation import fid

    with np.load(samples) as f:
        images = f["images"]
    model = fid.load_inception(dims=dims, device=device)
    reference_stats = fid.load_reference_stats(reference, dims)
    value = fid.fid_of_features(fid.inception_features(images, model, batch_size, device), reference_stats)
    print("FID: ", value)


def prepare(folder: Path, count: int, dims: int, seed: int) -> tuple[Path, Path, Path]:
    """PNG folder and .npz of the same shapes images, and full-rank synthetic reference statistics."""
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from maskdm.ddpm.data import render_shapes
    from maskdm.evaluation.fid import save_stats, statistics

    images, _ = render_shapes(count, seed=seed)
    png = folder / "png"
    png.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(png / f"{i:06d}.png")
    samples = folder / "samples.npz"
    np.savez(samples, images=images)
    # Any fixed Gaussian serves for checking agreement; a full-rank one keeps sqrtm well posed.
    rng = np.random.default_rng(seed)
    reference = save_stats(folder / "reference.npz", *statistics(0.25 + 0.01 * rng.standard_normal((2 * dims, dims))))
    return png, samples, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--dims", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=200, help="maskdm's batch size (pytorch-fid keeps its default 50)")
    parser.add_argument("--torch-home", help="TORCH_HOME holding the real weights; default: plant random ones")
    parser.add_argument("--device", default="cpu", help="cpu (the benchmark of record) or cuda, for both tools")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["ours"], help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        ours_worker(args.samples, args.reference, args.dims, args.batch_size, args.device)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch_home = args.torch_home
        if torch_home is None:
            sys.path.insert(0, str(REPO / "tests"))
            from inception_fixture import plant_inception_weights

            torch_home = str(folder / "torch_home")
            plant_inception_weights(Path(torch_home))
        png, samples, reference = prepare(folder, args.images, args.dims, args.seed)
        env = {**os.environ, "TORCH_HOME": torch_home}
        theirs_cmd = [sys.executable, "-m", "pytorch_fid", str(png), str(reference), "--device", args.device, "--dims", str(args.dims)]
        ours_cmd = [sys.executable, __file__, "--worker", "ours", "--samples", str(samples), "--reference", str(reference)]
        ours_cmd += ["--dims", str(args.dims), "--batch-size", str(args.batch_size), "--device", args.device]

        print(f"{args.images} images 32x32, dims {args.dims}, device {args.device}, weights: {'TORCH_HOME=' + args.torch_home if args.torch_home else 'random (planted)'}")
        print(f"{'run':>4} {'tool':<12} {'FID':>14} {'wall s':>8} {'CPU s':>8}")
        for repeat in range(args.repeats):
            theirs = run_timed(theirs_cmd, env)
            ours = run_timed(ours_cmd, env)
            for name, (value, wall, cpu) in (("pytorch-fid", theirs), ("maskdm", ours)):
                print(f"{repeat:>4} {name:<12} {value:>14.6f} {wall:>8.1f} {cpu:>8.1f}")
            print(
                f"     relative difference {abs(ours[0] - theirs[0]) / abs(theirs[0]):.2e}; "
                f"speed-up wall {theirs[1] / ours[1]:.2f}x, CPU {theirs[2] / ours[2]:.2f}x"
            )


if __name__ == "__main__":
    main()
