"""MaskPro mask learning: update rate, the mask-update share of the time, and the replay's noise floor.

    python benchmarks/bench_maskpro.py [--arch ddpm-cifar10] [--device cpu] [--batch_size 4]
        [--accumulation 2] [--updates 3] [--spread_batches 16]

Randomly initialised weights in the chosen architecture (``ddpm-cifar10`` is the 35.7M-parameter
google/ddpm-cifar10-32 config), images from the embedded ``shapes`` set (evaluation split, so
deterministic). Initial masks: per-layer magnitude pruning, 2:4 and unstructured 50%.

1. Updates per second and where an update's time goes: forward passes (``accumulation`` batches of
   ``batch_size``) against the mask work (sampling, ``set_masks``, score, logits update). The mask
   work does not depend on the batch, so its share at the default configuration (batch 64,
   accumulation 16) follows from the measured forward time per image; both are printed.
2. The spread of ``L - L_baseline`` at the initial mask, per batch and per update window
   (``accumulation`` batches), with our replay (the same draws as the baseline: exactly 0) and with
   fresh timesteps and noise as in the original recipe; and, for scale, the spread of the same
   quantity for masks sampled from the initial logits (``--logits``), under the replay: the signal
   the fresh-draw noise would drown.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import sys
import time

import numpy as np
import torch

from maskdm.ddpm.data import shapes_dataset
from maskdm.ddpm.diffusion import batch_loss, draw_noise_and_timesteps
from maskdm.method.maskpro import (
    MaskTrainer,
    ReplayBatches,
    ReplaySpec,
    TrainConfig,
    compute_baseline_losses,
    make_policy,
    mask_generator,
    parse_pattern,
    replayed_loss,
    select_targets,
    top_entries,
)
from maskdm.masks import prunable_modules, set_masks
from maskdm.ddpm.models import build_unet, count_parameters, default_scheduler

DEFAULT_BATCH, DEFAULT_ACCUMULATION = 64, 16


def magnitude_masks(unet, pattern: str) -> dict[str, torch.Tensor]:
    nm = parse_pattern(pattern)
    masks = {}
    for name, module in prunable_modules(unet).items():
        w = module.weight.detach().abs()
        if nm is None:
            flat = w.reshape(1, -1)
            masks[name] = top_entries(flat, flat.numel() // 2, torch.zeros_like(flat, dtype=torch.bool)).reshape(w.shape)
        elif w[0].numel() % nm.m == 0:
            groups = w.reshape(-1, nm.m)
            masks[name] = top_entries(groups, nm.n, torch.zeros_like(groups, dtype=torch.bool)).reshape(w.shape)
        else:
            masks[name] = torch.ones_like(w, dtype=torch.bool)
    return masks


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_updates(dense, scheduler, batches, pattern, args) -> dict:
    unet = copy.deepcopy(dense)
    masks = magnitude_masks(unet, pattern)
    baseline = compute_baseline_losses(unet, scheduler, masks, batches, args.device, progress=False)
    policy = make_policy(pattern, masks, select_targets(masks, "all"), args.logits)
    config = TrainConfig(lr=1.0, epoch=0, max_step=args.updates + 1, accumulation=args.accumulation, seed=0)
    trainer = MaskTrainer(unet, masks, policy, lambda b: replayed_loss(unet, scheduler, batches, b, args.device), baseline, config)
    trainer.update()  # warm-up: first-call allocations and kernel selection
    sync(args.device)
    trainer.timings.forward_s = trainer.timings.mask_s = 0.0
    start = time.perf_counter()
    for _ in range(args.updates):
        trainer.update()
    sync(args.device)
    wall = time.perf_counter() - start
    images = args.updates * args.accumulation * args.batch_size
    mask_per_update = trainer.timings.mask_s / args.updates
    forward_per_image = trainer.timings.forward_s / images
    default_forward = forward_per_image * DEFAULT_BATCH * DEFAULT_ACCUMULATION
    return {
        "pattern": pattern,
        "trained_params": sum(v.numel() for v in policy.logits.values()),
        "updates_per_s": args.updates / wall,
        "forward_s_per_update": trainer.timings.forward_s / args.updates,
        "mask_s_per_update": mask_per_update,
        "mask_share": trainer.timings.mask_share,
        "mask_share_default": mask_per_update / (mask_per_update + default_forward),
        "default_updates_per_s": 1.0 / (mask_per_update + default_forward),
    }


@torch.no_grad()
def bench_spread(dense, scheduler, batches, args) -> dict:
    unet = copy.deepcopy(dense)
    masks = magnitude_masks(unet, "2:4")
    baseline = compute_baseline_losses(unet, scheduler, masks, batches, args.device, progress=False)
    replay = np.array([replayed_loss(unet, scheduler, batches, b, args.device) for b in range(len(batches))])
    torch.manual_seed(1234)
    fresh = []
    for b in range(len(batches)):
        images = batches.images(b).to(args.device)
        # The original recipe: new timesteps and noise from the global generator on every pass.
        draw = draw_noise_and_timesteps(int(torch.randint(0, 2**31, ())), 0, tuple(images.shape), scheduler.config.num_train_timesteps)
        fresh.append(float(batch_loss(unet, scheduler, images, draw)))
    fresh = np.array(fresh)

    policy = make_policy("2:4", masks, select_targets(masks, "all"), args.logits)
    sampled = []
    for b in range(len(batches)):
        set_masks(unet, policy.sample(mask_generator(0, b, args.device)))
        sampled.append(replayed_loss(unet, scheduler, batches, b, args.device))
    sampled = np.array(sampled)

    def windows(x: np.ndarray) -> np.ndarray:
        n = len(x) // args.accumulation * args.accumulation
        return x[:n].reshape(-1, args.accumulation).mean(1)

    return {
        "batches": len(batches),
        "replay_per_batch": float(np.std(replay - baseline)),
        "replay_max_abs": float(np.max(np.abs(replay - baseline))),
        "fresh_per_batch": float(np.std(fresh - baseline)),
        "fresh_per_window": float(np.std(windows(fresh - baseline))) if len(batches) >= 2 * args.accumulation else float("nan"),
        "signal_per_batch": float(np.std(sampled - baseline)),
        "signal_mean": float(np.mean(sampled - baseline)),
        "baseline_mean": float(np.mean(baseline)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ddpm-cifar10")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--spread_batches", type=int, default=16)
    parser.add_argument("--logits", type=float, default=5.0)
    parser.add_argument("--patterns", default="2:4,unstructured")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured

    torch.manual_seed(0)
    scheduler = default_scheduler()
    dense = build_unet(args.arch).to(args.device).eval()
    data = shapes_dataset("eval", resolution=dense.config.sample_size)
    # Just the batches the timed updates (and the warm-up) use: the baseline covers every batch.
    needed = args.accumulation * (args.updates + 1) * args.batch_size
    batches = ReplayBatches(data, ReplaySpec(needed, args.batch_size, 0, seed=0))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"# {args.arch} ({count_parameters(dense) / 1e6:.1f}M params), device {args.device} ({device_name}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"# batch_size {args.batch_size}, accumulation {args.accumulation}, {args.updates} timed updates after 1 warm-up\n")

    print("| pattern | trained params | updates/s | forward s/update | mask s/update | mask share | "
          f"mask share at batch {DEFAULT_BATCH} x acc {DEFAULT_ACCUMULATION} (derived) | updates/s there (derived) |")
    print("|---|---|---|---|---|---|---|---|")
    for pattern in args.patterns.split(","):
        r = bench_updates(dense, scheduler, batches, pattern, args)
        print(f"| {r['pattern']} | {r['trained_params'] / 1e6:.1f}M | {r['updates_per_s']:.3f} | {r['forward_s_per_update']:.3f} | "
              f"{r['mask_s_per_update']:.3f} | {r['mask_share']:.1%} | {r['mask_share_default']:.2%} | {r['default_updates_per_s']:.4f} |")

    spread_batches = ReplayBatches(data, ReplaySpec(args.spread_batches * args.batch_size, args.batch_size, 0, seed=0))
    s = bench_spread(dense, scheduler, spread_batches, args)
    print(f"\n# load average {os.getloadavg()[0]:.1f}")
    print(f"\nSpread of L - L_baseline at the initial 2:4 mask over {s['batches']} batches of {args.batch_size} "
          f"(mean baseline loss {s['baseline_mean']:.4f}):\n")
    print("| draws | std per batch | std per update window |")
    print("|---|---|---|")
    print(f"| replay (ours), initial mask | {s['replay_per_batch']:.3g} (max abs {s['replay_max_abs']:.3g}) | 0 |")
    print(f"| fresh draws (original recipe), initial mask | {s['fresh_per_batch']:.4f} | {s['fresh_per_window']:.4f} |")
    print(f"| replay, masks sampled at logits {args.logits:g} (the signal) | {s['signal_per_batch']:.4f} (mean {s['signal_mean']:+.4f}) | — |")


if __name__ == "__main__":
    main()
