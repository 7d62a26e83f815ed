"""Project the wall time of the paper sweep from rates measured here, fast path against stock settings.

    python benchmarks/project_paper_sweep.py [--device cuda] [--steps 200] [--gpus 4] [--json out.json]
    python benchmarks/project_paper_sweep.py --device cpu --steps 2 ...   # a CPU smoke run (slow, see below)

Each heavy stage of the ``paper`` preset (:data:`maskdm.driver.PAPER`) is timed for ``--steps``
of its own unit with the library code the stage runs, on randomly initialised weights of the paper
architecture (``ddpm-cifar10``, the google/ddpm-cifar10-32 config), twice: with the fast path the
stages take by default (``auto``: bf16 autocast, channels_last, torch.compile on CUDA) and with the
stock settings (fp32, NCHW, eager). A setting that resolves to the same choices as stock on this
device (all of them on a CPU) is measured once and shown in both columns.

=================  ==================================================  ==============================
stage              one unit timed                                      count in the sweep
=================  ==================================================  ==============================
baseline_loss      one replayed batch of 64 (maskdm.method.replay, grouped    3 runs x 312 batches
                   ``forward_batches`` per forward on the fast path)
train_masks        one MaskPro update: 16 batches of 64, the masks     3 runs x 15,000 updates, plus
                   sampled and set (maskdm.method.maskpro.MaskTrainer)        the held-out scoring (auto)
finetune           one masked training step at batch 128               6 runs x 100,000 steps
                   (maskdm.ddpm.training.train_ddpm)                        (3 ratios x 2 arms)
sample             one image-step of DDIM at batch 256                 13 runs x 50,000 images x 100
                   (maskdm.ddpm.sampling.sample_images)                     steps
fid                one image through Inception (random weights: a      13 x 50,000 + the 50,000
                   speed, never a quality number; maskdm.evaluation.fid)          reference images once
=================  ==================================================  ==============================

prune and extract_masks take seconds and are left out. Counts come from the preset and the plan
(:func:`maskdm.driver.build_plan` with ``mask_training=both``); projected hours = count / rate.
``--gpus N`` also projects the sweep's independent branches (each ratio's masked chain, its plain
finetune, its pruned score, the dense score) spread over N devices, longest first.

On a CPU the paper's batch sizes make each unit take seconds to minutes: pass smaller
``--train_batch``, ``--mask_batch``/``--mask_accumulation``, ``--sample_batch`` and
``--fid_batch`` (rates are per image, update or step of the size timed, and the table says which
sizes were timed), or ``--arch tiny`` for a smoke test of the arithmetic only.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from maskdm.ddpm import fastpath
from maskdm.driver import build_plan, resolve_config
from maskdm.method.maskpro import (
    MaskTrainer,
    ReplayBatches,
    ReplayedLosses,
    ReplaySpec,
    TrainConfig as MaskConfig,
    auto_eval_every,
    auto_forward_batches,
    compute_baseline_losses,
    count_batches,
    heldout_scores,
    make_policy,
    planned_updates,
    replay_model,
    select_targets,
    top_entries,
)
from maskdm.masks import prunable_modules
from maskdm.ddpm.models import DDPM, build_unet, default_scheduler

#: The stock settings every stage had before the fast path: fp32, NCHW, eager.
STOCK = fastpath.FastPath()
#: train_masks scores this many held-out images with ``heldout_size=auto`` (entrypoints.train_masks.AUTO_HELDOUT).
AUTO_HELDOUT = 512
STAGES = ("baseline_loss", "train_masks", "finetune", "sample", "fid")


@dataclass
class StageRow:
    stage: str
    runs: int  # stage runs in the sweep
    units_per_run: float  # units (batches, updates, steps, image-steps, images) per run
    unit: str
    timed: str  # what one timed unit was, e.g. "batch 64"
    rate_fast: float  # units per second
    rate_stock: float
    fast: str  # the fast path's describe()
    stock: str
    extra_units_per_run: float = 0.0  # train_masks: held-out batches, timed at baseline_loss's rate
    extra_rate_fast: float = 0.0  # 0 = no extra units
    extra_rate_stock: float = 0.0

    @property
    def count(self) -> float:
        return self.runs * self.units_per_run

    def hours(self, which: str) -> float:
        rate = self.rate_fast if which == "fast" else self.rate_stock
        extra = self.extra_rate_fast if which == "fast" else self.extra_rate_stock
        seconds = self.count / rate
        if self.extra_units_per_run:
            seconds += self.runs * self.extra_units_per_run / extra
        return seconds / 3600.0

    def as_dict(self) -> dict:
        return {**asdict(self), "count": self.count, "hours_fast": self.hours("fast"), "hours_stock": self.hours("stock")}


@dataclass
class Sweep:
    """What the paper sweep does, from the preset and the plan."""

    runs: dict[str, int]
    baseline_batches: int
    mask_updates: int
    heldout_batches_per_run: int
    finetune_steps: int
    sample_images: int
    ddim_steps: int
    fid_images_per_run: int
    reference_images: int
    branches: dict[str, list[str]] = field(default_factory=dict)  # branch -> the stages it runs, in order


def paper_sweep() -> Sweep:
    config = resolve_config("paper", mask_training="both")
    plan = build_plan(config)
    runs = {s: sum(1 for step in plan if step.stage == s) for s in STAGES}
    p = config.stages
    base = p["baseline_loss"]
    batch = int(base["batch_size"])
    num_batches = count_batches(int(base["dataset_size"]), batch, int(base["max_batches"]))
    tm = p["train_masks"]
    mask_config = MaskConfig(epoch=int(tm["epoch"]), max_step=int(tm["max_step"]), accumulation=int(tm["accumulation"]))
    updates = planned_updates(num_batches, mask_config)
    held_batches = AUTO_HELDOUT // batch
    every = auto_eval_every(held_batches * batch, mask_config.accumulation * batch, updates)
    branches: dict[str, list[str]] = {}
    for step in plan:
        if step.stage in ("prune", "extract_masks", "pretrain"):
            continue
        if step.variant == "finetuned_no_mask_training":
            key = f"r={step.ratio:g} plain finetune"
        elif step.stage in ("baseline_loss", "train_masks") or step.variant in ("masked", "finetuned"):
            key = f"r={step.ratio:g} masked"
        else:
            key = f"r={step.ratio:g} {step.variant}" if step.ratio else "dense"
        branches.setdefault(key, []).append(step.stage)
    return Sweep(
        runs=runs, baseline_batches=num_batches, mask_updates=updates,
        heldout_batches_per_run=heldout_scores(every, updates) * held_batches,
        finetune_steps=int(p["finetune"]["num_iters"]), sample_images=int(p["sample"]["total_samples"]),
        ddim_steps=int(p["sample"]["ddim_steps"]), fid_images_per_run=int(p["sample"]["total_samples"]),
        reference_images=50000, branches=branches,
    )


# --- the timed units ---------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def half_masks(unet) -> dict[str, torch.Tensor]:
    """50% per-layer magnitude masks on every prunable layer (the shape of a paper ratio's masks)."""
    masks = {}
    for name, module in prunable_modules(unet).items():
        flat = module.weight.detach().abs().reshape(1, -1)
        masks[name] = top_entries(flat.cpu(), flat.numel() // 2, torch.zeros_like(flat.cpu(), dtype=torch.bool)).reshape(module.weight.shape)
    return masks


def random_images(n: int, resolution: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.rand(n, 3, resolution, resolution, generator=gen) * 2 - 1)


def fresh_ddpm(args) -> DDPM:
    torch.manual_seed(0)
    return DDPM(build_unet(args.arch, args.resolution), default_scheduler())


def time_baseline(args, fast: fastpath.FastPath, device: torch.device) -> tuple[float, str]:
    """Replayed batches per second, grouped as baseline_loss groups them for the paper's subset."""
    group = auto_forward_batches(args.paper_batches, args.mask_batch, fast)
    n = max(group, math.ceil(args.steps / group) * group)
    ddpm = fresh_ddpm(args)
    masks = half_masks(ddpm.unet)
    data = random_images((n + group) * args.mask_batch, args.resolution)
    unet = ddpm.unet.to(device)
    warm = ReplayBatches(data, ReplaySpec(group * args.mask_batch, args.mask_batch, 0, seed=1))
    compute_baseline_losses(unet, ddpm.scheduler, masks, warm, device, progress=False, fast=fast, group=group)  # compile, allocations
    batches = ReplayBatches(data, ReplaySpec(n * args.mask_batch, args.mask_batch, 0, seed=0))
    for b in range(len(batches)):
        batches.images(b)  # read into the cache: the stage reads its subset once, too
    sync(device)
    start = time.perf_counter()
    compute_baseline_losses(unet, ddpm.scheduler, masks, batches, device, progress=False, fast=fast, group=group)
    sync(device)
    return n / (time.perf_counter() - start), f"batch {args.mask_batch}, {group} per forward"


def time_train_masks(args, fast: fastpath.FastPath, device: torch.device) -> tuple[float, str]:
    """MaskPro updates per second at ``mask_batch`` x ``mask_accumulation`` (unstructured masks, the preset's)."""
    acc = args.mask_accumulation
    group = auto_forward_batches(args.paper_batches, args.mask_batch, fast)
    group = math.gcd(group, acc)
    ddpm = fresh_ddpm(args)
    masks = half_masks(ddpm.unet)
    num_batches = max(2 * acc, group)
    data = random_images(num_batches * args.mask_batch, args.resolution)
    batches = ReplayBatches(data, ReplaySpec(num_batches * args.mask_batch, args.mask_batch, 0, seed=0))
    unet = ddpm.unet.to(device)
    baseline = compute_baseline_losses(copy.deepcopy(unet), ddpm.scheduler, masks, batches, device, progress=False, fast=fast, group=group)
    model = replay_model(unet, masks, fast)
    policy = make_policy("unstructured", masks, select_targets(masks, "all"), 5.0)
    config = MaskConfig(lr=1.0, epoch=0, max_step=args.steps + args.warmup, accumulation=acc, seed=0)
    trainer = MaskTrainer(unet, masks, policy, ReplayedLosses(model, ddpm.scheduler, batches, device, fast, group), baseline, config)
    for _ in range(args.warmup):
        trainer.update()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.update()
    sync(device)
    return args.steps / (time.perf_counter() - start), f"{acc} x batch {args.mask_batch}, {group} per forward"


def time_finetune(args, fast: fastpath.FastPath, device: torch.device) -> tuple[float, str]:
    """Masked training steps per second at ``train_batch``, timed between two logging points after the warm-up."""
    from maskdm.ddpm.training import TrainConfig, train_ddpm

    ddpm = fresh_ddpm(args)
    masks = half_masks(ddpm.unet)
    every = max(1, args.warmup)
    total = every + max(every, math.ceil(args.steps / every) * every)
    marks: list[tuple[int, float]] = []
    config = TrainConfig(
        num_iters=total, train_batch_size=args.train_batch, learning_rate=2e-4, ema_max_decay=0.9999, dropout=0.1,
        save_model_steps=10**9, mixed_precision=fast.mixed_precision, channels_last=str(fast.channels_last).lower(),
        compile=str(fast.compile).lower(), log_every=every, seed=0,
    )
    data = random_images(max(args.train_batch * 4, 256), args.resolution)
    train_ddpm(ddpm, data, config, masks=masks, on_log=lambda metrics, step: marks.append((step, time.perf_counter())))
    (s0, t0), (s1, t1) = marks[0], marks[-1]
    return (s1 - s0) / (t1 - t0), f"batch {args.train_batch}"


def time_sample(args, fast: fastpath.FastPath, device: torch.device) -> tuple[float, str]:
    """DDIM image-steps per second at ``sample_batch`` (one warm-up batch first: compilation)."""
    from maskdm.ddpm.sampling import sample_images

    ddpm = fresh_ddpm(args)
    unet = half_masked(ddpm.unet)
    steps = args.sample_steps
    options = dict(steps=steps, batch_size=args.sample_batch, device=device, mixed_precision=fast.mixed_precision,
                   channels_last=fast.channels_last, compile=fast.compile)
    model = unet.to(device)
    sample_images(model, ddpm.scheduler.config, range(args.sample_batch), **options)
    batches = max(1, math.ceil(args.steps / steps))
    sync(device)
    start = time.perf_counter()
    # sample_images prepares the UNet again; a compiled wrapper of the same module reuses its compiled code.
    sample_images(model, ddpm.scheduler.config, range(batches * args.sample_batch), **options)
    sync(device)
    return batches * args.sample_batch * steps / (time.perf_counter() - start), f"batch {args.sample_batch}, {steps} steps"


def half_masked(unet):
    """The UNet with 50% of each prunable layer's weights zeroed (a pruned model: dense kernels all the same)."""
    with torch.no_grad():
        for name, mask in half_masks(unet).items():
            prunable_modules(unet)[name].weight.mul_(mask)
    return unet


def time_fid(args, device: torch.device) -> tuple[float, str]:
    """Inception images per second (random weights in pytorch-fid's architecture; fid has no fast-path switch)."""
    from maskdm.evaluation.fid import inception_features, load_inception

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from inception_fixture import random_inception_state_dict

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "inception.pth")
        torch.save(random_inception_state_dict(), path)
        model = load_inception(2048, weights=path, device=device)
    rng = np.random.default_rng(0)
    n = max(2, args.fid_batch)
    images = rng.integers(0, 256, size=(n, args.resolution, args.resolution, 3), dtype=np.uint8)
    inception_features(images, model, batch_size=args.fid_batch, device=device)  # warm-up
    reps = max(1, math.ceil(args.steps / 10))
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        inception_features(images, model, batch_size=args.fid_batch, device=device)
    sync(device)
    return reps * n / (time.perf_counter() - start), f"batch {args.fid_batch}"


# --- the projection ----------------------------------------------------------------------------


def measure(args, device: torch.device) -> list[StageRow]:
    sweep = paper_sweep()
    args.paper_batches = sweep.baseline_batches
    fast = {
        # compile=auto decides per call size; the stages' calls here are all above COMPILE_MIN_BATCH on the paper's sizes.
        s: fastpath.resolve(args.mixed_precision, args.channels_last, args.compile, device=device, batch_size=b)
        for s, b in (("baseline_loss", 8 * args.mask_batch), ("train_masks", 8 * args.mask_batch),
                     ("finetune", args.train_batch), ("sample", args.sample_batch))
    }
    timers = {"baseline_loss": time_baseline, "train_masks": time_train_masks, "finetune": time_finetune, "sample": time_sample}
    rates: dict[str, tuple[float, float, str]] = {}
    for stage in args.stages:
        if stage == "fid":
            rate, timed = time_fid(args, device)
            rates[stage] = (rate, rate, timed)
        else:
            stock_rate, timed = timers[stage](args, STOCK, device)
            fast_rate = stock_rate if fast[stage] == STOCK else timers[stage](args, fast[stage], device)[0]
            rates[stage] = (fast_rate, stock_rate, timed)
        print(f"# {stage}: {rates[stage][0]:.4g} fast, {rates[stage][1]:.4g} stock per s ({rates[stage][2]})", file=sys.stderr, flush=True)

    units = {
        "baseline_loss": (sweep.baseline_batches, "batch"),
        "train_masks": (sweep.mask_updates, "update"),
        "finetune": (sweep.finetune_steps, "step"),
        "sample": (sweep.sample_images * sweep.ddim_steps, "image-step"),
        "fid": (sweep.fid_images_per_run + sweep.reference_images / max(1, sweep.runs["fid"]), "image"),
    }
    # Images per timed unit against the paper's: a smaller batch (a CPU run) is scaled linearly in
    # images, which a GPU's rates are not; the table says so.
    paper = resolve_config("paper").stages
    timed_images = {"baseline_loss": (args.mask_batch, int(paper["baseline_loss"]["batch_size"])),
                    "train_masks": (args.mask_batch * args.mask_accumulation,
                                    int(paper["baseline_loss"]["batch_size"]) * int(paper["train_masks"]["accumulation"])),
                    "finetune": (args.train_batch, int(paper["finetune"]["train_batch_size"]))}
    for stage, (have, want) in timed_images.items():
        if stage in rates and have != want:
            fast_rate, stock_rate, timed = rates[stage]
            rates[stage] = (fast_rate * have / want, stock_rate * have / want, f"{timed}; scaled x{have}/{want} to the paper's size")
    rows = []
    for stage in args.stages:
        per_run, unit = units[stage]
        fast_rate, stock_rate, timed = rates[stage]
        row = StageRow(stage, sweep.runs[stage], per_run, unit, timed, fast_rate, stock_rate,
                       fast[stage].describe() if stage in fast else "fp32 (no switch)", STOCK.describe() if stage != "fid" else "fp32 (no switch)")
        if stage == "train_masks" and "baseline_loss" in rates:
            # The held-out scores of the final mask (heldout_size=auto, eval_every=auto), at baseline_loss's batch rate.
            row.extra_units_per_run = sweep.heldout_batches_per_run
            row.extra_rate_fast, row.extra_rate_stock = rates["baseline_loss"][0], rates["baseline_loss"][1]
        rows.append(row)
    return rows


def makespan(rows: list[StageRow], branches: dict[str, list[str]], gpus: int, which: str) -> float:
    """Hours for the sweep's branches on ``gpus`` devices at once, longest branch first (LPT)."""
    per_run = {r.stage: r.hours(which) / r.runs for r in rows}
    lengths = sorted((sum(per_run.get(s, 0.0) for s in stages) for stages in branches.values()), reverse=True)
    loads = [0.0] * max(1, gpus)
    for length in lengths:
        loads[loads.index(min(loads))] += length
    return max(loads)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def table(rows: list[StageRow], device: str, args, branches: dict[str, list[str]]) -> str:
    lines = [
        f"# paper sweep projected from rates measured on {device}, torch {torch.__version__}, arch {args.arch}",
        "",
        "| stage | runs | units per run | timed | fast path | rate fast (/s) | rate stock (/s) | hours fast | hours stock |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_run = f"{r.units_per_run:,.0f} {r.unit}{'es' if r.unit.endswith('ch') else 's'}" + (f" + {r.extra_units_per_run:,.0f} held-out batches" if r.extra_units_per_run else "")
        lines.append(f"| {r.stage} | {r.runs} | {per_run} | {r.timed} | {r.fast} | {r.rate_fast:.4g} | {r.rate_stock:.4g} | "
                     f"{r.hours('fast'):.2f} | {r.hours('stock'):.2f} |")
    total_fast, total_stock = sum(r.hours("fast") for r in rows), sum(r.hours("stock") for r in rows)
    lines.append(f"| **total** | | | | | | | **{total_fast:.2f}** | **{total_stock:.2f}** |")
    if args.gpus > 1:
        lines.append(f"| on {args.gpus} devices at once ({len(branches)} branches, longest first) | | | | | | | "
                     f"{makespan(rows, branches, args.gpus, 'fast'):.2f} | {makespan(rows, branches, args.gpus, 'stock'):.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="ddpm-cifar10")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="Units timed per stage [default: 200 on CUDA, 2 on the CPU].")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed units first (compilation) [default: 20 on CUDA, 1 on the CPU].")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--train_batch", type=int, default=128)
    parser.add_argument("--mask_batch", type=int, default=64)
    parser.add_argument("--mask_accumulation", type=int, default=16)
    parser.add_argument("--sample_batch", type=int, default=256)
    parser.add_argument("--sample_steps", type=int, default=100, help="DDIM steps per timed batch (the paper's 100).")
    parser.add_argument("--fid_batch", type=int, default=200)
    parser.add_argument("--mixed_precision", default="auto")
    parser.add_argument("--channels_last", default="auto")
    parser.add_argument("--compile", default="auto")
    parser.add_argument("--gpus", type=int, default=1, help="Also project the branches spread over this many devices.")
    parser.add_argument("--json", default="", help="Write the rows and totals here too.")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.steps = args.steps if args.steps is not None else (200 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (20 if cuda else 1)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    sweep = paper_sweep()
    started = time.perf_counter()
    rows = measure(args, device)
    name = device_name(device)
    print(table(rows, name, args, sweep.branches))
    load = os.getloadavg()[0]
    print(f"\n# measured in {time.perf_counter() - started:.0f} s; load average {load:.1f} on {os.cpu_count()} CPUs")
    result = {
        "device": name, "torch": torch.__version__, "arch": args.arch, "steps": args.steps, "warmup": args.warmup,
        "rows": [r.as_dict() for r in rows],
        "total_hours_fast": sum(r.hours("fast") for r in rows), "total_hours_stock": sum(r.hours("stock") for r in rows),
        "gpus": args.gpus,
        "makespan_hours_fast": makespan(rows, sweep.branches, args.gpus, "fast"),
        "makespan_hours_stock": makespan(rows, sweep.branches, args.gpus, "stock"),
        "branches": sweep.branches, "load_average": load,
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
