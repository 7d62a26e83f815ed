"""Peak resident memory of baseline_loss, train_masks, sample and fid on a large image folder.

Issue #12's question: is memory bounded by the batch, not by the dataset? This makes an image
folder of N generated images (the embedded shapes rendered at the resolution asked, PNG), a small
random UNet at that resolution, and runs prune -> extract_masks -> baseline_loss -> train_masks ->
sample -> fid on them as separate `maskdm <stage>` processes in a fresh store; each stage's peak
RSS is read from the kernel's accounting of that process alone (``os.wait4``: ``ru_maxrss``, its
largest resident set, children not included — the stages start none), by a small launcher
process (see :data:`LAUNCHER`: started from this one, the reading would include this one's peak).

    python benchmarks/bench_memory.py --images 20000 --resolution 256          # the issue's setting
    python benchmarks/bench_memory.py --images 2000 --resolution 256 --out /tmp/mem   # quicker

The whole dataset is read by baseline_loss (``dataset_size`` = N, every batch) and by fid (its
reference statistics); ``sample`` makes ``--samples`` images (default N). The UNet is deliberately
tiny (two levels of 4 channels, no resnet in the down path, no attention): memory, not speed or
quality, is measured. diffusers' default mid-block attention would sit at 128x128 here: 16,384
tokens, a 16,384^2 score matrix per image, minutes per batch on a CPU and memory no real 256-pixel
model has (theirs attend at 16x16 or 32x32). Goal: under 3 GB each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000, help="images in the folder (and baseline_loss's dataset_size)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--samples", type=int, default=None, help="images sample makes [default: --images]")
    p.add_argument("--batch_size", type=int, default=64, help="baseline_loss / train_masks batch size")
    p.add_argument("--max_step", type=int, default=4, help="train_masks updates (each reads accumulation x batch_size images)")
    p.add_argument("--fid_dims", type=int, default=64, help="Inception block for fid (64: its cheap first block; memory of the streaming is the same)")
    p.add_argument("--plant_inception", action="store_true", help="offline: random Inception weights in pytorch-fid's format (memory only)")
    p.add_argument("--out", default=None, help="folder for the store, the images and the results [default: a temporary one]")
    return p.parse_args()


def make_folder(folder: Path, count: int, resolution: int, chunk: int = 500) -> None:
    from PIL import Image

    from maskdm.ddpm.data import render_shapes

    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, count, chunk):
        images, _ = render_shapes(min(chunk, count - start), seed=start, resolution=resolution)
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{start + i:06d}.png", compress_level=1)


def make_model(folder: Path, resolution: int) -> Path:
    from diffusers import UNet2DModel

    from maskdm.ddpm.models import DDPM, default_scheduler, save_ddpm

    # add_attention=False: the mid block would otherwise attend over (resolution / 2)^2 tokens (module docstring).
    unet = UNet2DModel(
        sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=0,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
        add_attention=False,
    )
    return save_ddpm(DDPM(unet, default_scheduler()), folder)


#: Started by this (large) process, a stage would report at least this process's own peak: Linux
#: carries the high-water RSS of the memory a process exec()s from into its ``ru_maxrss``
#: (measured: ``python -c pass`` read 2.03 GB under a parent that had touched 2 GB, 14 MB under
#: a small one). So a small launcher, started fresh, starts the stage and reads its ``wait4``.
LAUNCHER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"exit": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}, f)
"""


def run_stage(stage: str, args: list[str], env: dict, log: Path) -> tuple[float, float]:
    """Run ``maskdm <stage> ...``; return (peak RSS in GB, wall seconds). Fails loudly on a failed stage."""
    result = log.with_suffix(".rusage.json")
    start = time.perf_counter()
    with log.open("w") as out:
        command = [sys.executable, "-m", "entrypoints.cli", stage, *args]
        subprocess.run([sys.executable, "-c", LAUNCHER, str(result), *command], cwd=REPO, env=env, stdout=out, stderr=out, check=True)
    wall = time.perf_counter() - start
    usage = json.loads(result.read_text())
    if usage["exit"] != 0:
        raise SystemExit(f"{stage} failed; its log: {log}")
    return usage["maxrss_kib"] / 1024**2, wall  # ru_maxrss is in KiB on Linux


def newest_run(stage: str) -> str:
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`maskdm.stage` = '{stage}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return runs[0].info.run_id


def main() -> None:
    args = parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="maskdm-memory-"))
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    # The runs' artifacts (samples.npz alone is N x 3 x resolution^2 bytes) go under --out too: a
    # sqlite store's default experiment would put them in ./mlruns of the stages' working directory,
    # the repository.
    import mlflow

    found = mlflow.get_experiment_by_name("bench_memory")
    experiment = found.experiment_id if found else mlflow.create_experiment(
        "bench_memory", artifact_location=(out / "artifacts").resolve().as_uri())
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_ID": str(experiment),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    if args.plant_inception:
        # Offline: random weights in pytorch-fid's format (as the tests do). Memory does not depend on
        # the weights' values; the FID printed is then meaningless and is not reported.
        sys.path.insert(0, str(REPO / "tests"))
        from inception_fixture import plant_inception_weights

        plant_inception_weights(out / "torch_home")
        env["TORCH_HOME"] = str(out / "torch_home")
    folder = out / "images"
    print(f"making {args.images} images at {args.resolution}x{args.resolution} in {folder} ...", flush=True)
    make_folder(folder, args.images, args.resolution)
    model = make_model(out / "model", args.resolution)
    dataset = f"imagefolder:{folder}"
    samples = args.samples or args.images

    results = {}

    def stage(name: str, *options: str) -> str:
        peak, wall = run_stage(name, list(options), env, out / f"{name}.log")
        results[name] = {"peak_rss_gb": round(peak, 3), "wall_s": round(wall, 1)}
        print(f"{name:14s} peak RSS {peak:6.2f} GB   wall {wall:7.1f} s", flush=True)
        return newest_run(name)

    prune = stage("prune", "--model", str(model), "--dataset", dataset, "--pruning_ratio", "0.5")
    masks = stage("extract_masks", "--prune_run_id", prune)
    baseline = stage("baseline_loss", "--masks_run_id", masks, "--dataset_size", str(args.images),
                     "--batch_size", str(args.batch_size), "--max_batches", "0")
    trained = stage("train_masks", "--baseline_run_id", baseline, "--max_step", str(args.max_step), "--accumulation", "2",
                    "--heldout_size", "0")
    sample = stage("sample", "--model_run_id", trained, "--total_samples", str(samples), "--batch_size", "64",
                   "--ddim_steps", "1")
    stage("fid", "--sample_run_id", sample, "--reference", dataset, "--dims", str(args.fid_dims))

    report = {"images": args.images, "resolution": args.resolution, "samples": samples,
              "uint8_dataset_gb": round(args.images * 3 * args.resolution**2 / 1024**3, 2), "stages": results}
    (out / "memory.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
