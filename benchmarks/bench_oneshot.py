"""Seconds and peak memory of magnitude, wanda and sparsegpt pruning of a DDPM UNet on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/bench_oneshot.py [--arch ddpm-cifar10] [--samples 16] [--ratio 0.5]

Randomly initialised weights in the chosen architecture (``ddpm-cifar10`` is the 35.7M-parameter
google/ddpm-cifar10-32 config, built from its diffusers UNet2DModel config: no download), the
calibration images from the embedded ``shapes`` set at 32 px (a 64-image training split,
unflipped, made before the clock starts), then timed: the library path the ``prune`` stage takes
(calibration forward passes, scores or SparseGPT sweep, masks, zeroing; not the stage's stats,
checkpoint and preview, the same for every pruner). Each
case runs in a fresh process, so its peak resident memory (``ru_maxrss``) is its own; "model
only" is a process that builds the model and does nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

CASES = ("model only", "magnitude unstructured", "wanda unstructured", "sparsegpt unstructured", "sparsegpt 2:4")


def run_case(case: str, arch: str, samples: int, ratio: float, batch_size: int) -> dict:
    from maskdm.ddpm.data import shapes_dataset
    from maskdm.masks import prunable_modules
    from maskdm.ddpm.models import build_unet, default_scheduler
    from maskdm.method.oneshot import CalibConfig, calibration_batches, calibration_samples, sparsegpt_prune, wanda_scores
    from maskdm.method.pruning import PruneConfig, apply_pruning, compute_masks

    torch.manual_seed(0)
    unet, scheduler = build_unet(arch, resolution=32), default_scheduler()
    unet.eval()
    out = {"case": case}
    if case == "model only":
        return out
    pruner, pattern = case.split()
    nm_ratio = 0.5 if pattern == "2:4" else ratio
    config = PruneConfig(ratio=nm_ratio, pruner=pruner, pattern=pattern)
    calib = CalibConfig(samples=samples, batch_size=batch_size)
    # The calibration images outside the timed region: rendering the stage's 20,000-image shapes
    # split costs a minute on this machine, for every pruner that reads a dataset alike.
    images = shapes_dataset("train", resolution=32, size=max(samples, 64), augment=False)
    batch = calibration_samples(calibration_batches(images, calib), 1000, calib)
    start = time.perf_counter()
    modules = prunable_modules(unet, config.protect)
    if pruner == "magnitude":
        result = compute_masks(unet, config)
    else:
        if pruner == "wanda":
            result = compute_masks(unet, config, wanda_scores(unet, scheduler, modules, batch, calib.batch_size, progress=False))
        else:
            done = sparsegpt_prune(unet, scheduler, modules, batch, config, calib, progress=False)
            result = done.result
            out["hessian_passes"] = done.passes
    apply_pruning(unet, result.masks)
    out["seconds"] = time.perf_counter() - start
    kept = sum(int(m.sum()) for m in result.masks.values())
    total = sum(m.numel() for m in result.masks.values())
    out["sparsity"] = 1 - kept / total
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ddpm-cifar10")
    parser.add_argument("--samples", type=int, default=16, help="calibration images")
    parser.add_argument("--batch_size", type=int, default=8, help="calibration images per forward pass")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args()
    if args.case:
        result = run_case(args.case, args.arch, args.samples, args.ratio, args.batch_size)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps(result))
        return
    print(f"arch {args.arch}, {args.samples} calibration images (batches of {args.batch_size}), ratio {args.ratio:g}; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print("| case | seconds | peak RSS (MiB) | sparsity | Hessian passes |")
    print("|---|---|---|---|---|")
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--arch", args.arch, "--samples", str(args.samples),
               "--batch_size", str(args.batch_size), "--ratio", str(args.ratio)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(line)
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        sparsity = f"{r['sparsity']:.4f}" if "sparsity" in r else "-"
        print(f"| {case} | {seconds} | {r['peak_rss_mib']:.0f} | {sparsity} | {r.get('hessian_passes', '-')} |", flush=True)


if __name__ == "__main__":
    main()
