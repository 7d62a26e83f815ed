"""Training steps/s: our ``train_ddpm`` (dense, and masked at 50% as finetune runs it) against a plain loop.

The plain loop is what one writes without our trainer: the same UNet, batch, data loader, AdamW
and noise-prediction MSE; no accelerate, EMA, lr scheduler, gradient clipping or progress bar
(under ``--mixed_precision bf16`` it runs the forward in ``torch.autocast``). Ours is
``train_ddpm`` exactly as pretrain/finetune call it, minus checkpoints.

Each measurement builds a fresh model (same seed), runs ``--warmup`` steps, then times
``--steps`` optimizer steps (ours: between two ``on_log`` calls; both sides synchronise there).
Variants run interleaved in each repeat (plain, ours, ours masked, ...) so that load from other
processes on a shared machine hits all of them; medians over ``--repeats`` are reported.

    python benchmarks/bench_train.py --threads 1                       # CPU, tiny arch, batch 32
    python benchmarks/bench_train.py --device cuda --arch ddpm-cifar10 --batch 128 --mixed_precision no,bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskdm.ddpm.data import shapes_dataset  # noqa: E402
from maskdm.masks import DEFAULT_PROTECT, mask_sparsity, prunable_modules  # noqa: E402
from maskdm.ddpm.models import DDPM, build_unet, default_scheduler  # noqa: E402
from maskdm.ddpm.training import TrainConfig, train_ddpm  # noqa: E402

LEARNING_RATE = 2e-4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--arch", default="tiny", choices=["tiny", "ddpm-cifar10"])
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (must divide --steps)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mixed_precision", default="no", help="comma-separated: no, bf16 (each runs plain, ours, ours masked)")
    p.add_argument("--sparsity", type=float, default=0.5, help="share of masked weights in the masked variant")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    return p.parse_args()


def make_ddpm(args) -> DDPM:
    torch.manual_seed(0)
    return DDPM(build_unet(args.arch, args.resolution), default_scheduler())


def random_masks(ddpm: DDPM, sparsity: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {n: torch.rand(m.weight.shape, generator=gen) >= sparsity for n, m in prunable_modules(ddpm.unet, DEFAULT_PROTECT).items()}


def plain_loop(args, dataset, mixed_precision: str) -> float:
    """Steps/s of the loop one writes by hand."""
    device = torch.device(args.device)
    ddpm = make_ddpm(args)
    unet, scheduler = ddpm.unet.to(device).train(), ddpm.scheduler
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")

    def batches():
        while True:
            for images, _ in loader:
                yield images.to(device, non_blocking=True)

    stream = batches()

    def step() -> torch.Tensor:
        clean = next(stream)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=device)
        with autocast:
            pred = unet(scheduler.add_noise(clean, noise, timesteps), timesteps).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    float(step().detach())  # synchronise before the clock starts (one extra untimed step)
    start = time.perf_counter()
    for _ in range(args.steps - 1):
        step()
    float(step().detach())
    return args.steps / (time.perf_counter() - start)


def ours(args, dataset, mixed_precision: str, masks: bool) -> float:
    """Steps/s of train_ddpm between its on_log calls at step warmup and warmup + steps."""
    # Benchmark only: one process measures several precisions, which accelerate's process-wide
    # state otherwise refuses (a training run never switches precision).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    ddpm = make_ddpm(args)
    config = TrainConfig(
        num_iters=args.warmup + args.steps, train_batch_size=args.batch, learning_rate=LEARNING_RATE,
        mixed_precision=mixed_precision, log_every=args.warmup,
    )
    stamps: dict[int, float] = {}
    train_ddpm(
        ddpm, dataset, config, masks=random_masks(ddpm, args.sparsity) if masks else None,
        on_log=lambda metrics, step: stamps.setdefault(step, time.perf_counter()),
    )
    return args.steps / (stamps[args.warmup + args.steps] - stamps[args.warmup])


def main() -> None:
    args = parse_args()
    if args.steps % args.warmup:
        raise SystemExit("--warmup must divide --steps (ours is timed between on_log calls)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # our trainer on the CPU even where CUDA exists
    precisions = [p.strip() for p in args.mixed_precision.split(",") if p.strip()]
    dataset = shapes_dataset("train", args.resolution, size=max(1024, 4 * args.batch))
    masks_sparsity = mask_sparsity(random_masks(make_ddpm(args), args.sparsity))

    variants = [(f"{kind}[{mp}]", kind, mp) for mp in precisions for kind in ("plain", "ours", "ours_masked")]
    rates: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for repeat in range(args.repeats):
        # Rotate the order each repeat, so no variant always runs first after a change in load.
        for name, kind, mp in variants[repeat % len(variants):] + variants[: repeat % len(variants)]:
            rate = plain_loop(args, dataset, mp) if kind == "plain" else ours(args, dataset, mp, kind == "ours_masked")
            rates[name].append(rate)
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {rate:.3f} steps/s", file=sys.stderr, flush=True)

    medians = {name: statistics.median(r) for name, r in rates.items()}
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "arch": args.arch, "resolution": args.resolution, "batch": args.batch, "steps": args.steps,
        "warmup": args.warmup, "repeats": args.repeats, "mask_sparsity": round(masks_sparsity, 4),
        "steps_per_s_median": {k: round(v, 3) for k, v in medians.items()},
        "steps_per_s_all": {k: [round(x, 3) for x in v] for k, v in rates.items()},
        "ratio_to_plain": {
            name: round(medians[name] / medians[f"plain[{mp}]"], 3) for name, kind, mp in variants if kind != "plain"
        },
    }
    if len(precisions) > 1 and "no" in precisions:
        result["ratio_to_fp32"] = {
            name: round(medians[name] / medians[f"{kind}[no]"], 3) for name, kind, mp in variants if mp != "no"
        }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
