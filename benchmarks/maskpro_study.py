"""Does mask learning beat the pruning mask on held-out data? The study behind docs/details/maskpro.md.

    python benchmarks/maskpro_study.py --model demo --out study/ [--configs NAME,...] [--seeds 0,1,2]
        [--patterns 0.5,0.7,2:4] [--updates 2000] [--processes 2]

For every pattern (magnitude pruning, layer scope, the demo's protect list: unstructured 0.5 and
0.7, and 2:4), every configuration and every seed, it runs :class:`maskdm.method.maskpro.MaskTrainer`
in-process on the ORIGINAL dense model, exactly as ``train_masks`` does, and scores the current
final mask on a held-out set every ``--eval_every`` updates: training images outside the replayed
subset, with timesteps and noise from a draw stream of their own (``maskdm.method.replay.heldout_batches``).
The seed changes the subset, its draws, the held-out set and the mask samples.

Writes ``results.json`` (every run, every curve), ``study.md`` (the table: held-out improvement of
the final over the pruning mask, mean and standard error over seeds, flip rate, wall time) and
``heldout_curves.png`` (held-out loss minus the pruning mask's, against updates, one line per
configuration, mean over seeds). Jobs run in ``--processes`` worker processes of one thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

#: The configurations the study compares (train_masks parameters).
CONFIGS = {
    # The recipe this project transcribes (MaskDM's: lr 1.0, logits 5.0).
    "recipe": dict(lr=1.0, logits=5.0),
    # Larger lr, smaller logits, as a new user would try first.
    "lr50_logits1": dict(lr=50.0, logits=1.0),
    # Option 1: initial logits from the magnitude score.
    "magnitude_init": dict(lr=1.0, init="magnitude", temperature=0.05),
    # Option 2 alone: advantage normalisation (lr in units of the advantage's spread), constant init.
    "constant_norm": dict(lr=0.05, logits=1.0, normalize=True),
    # Option 1 + 2.
    "magnitude_norm": dict(lr=0.05, init="magnitude", temperature=0.05, normalize=True),
    # Option 1 + 2 + 3: four samples per update with the leave-one-out baseline, at equal forward
    # passes (a quarter of the updates).
    "magnitude_norm_loo4": dict(lr=0.05, init="magnitude", temperature=0.05, normalize=True, samples=4, reward_baseline="loo"),
}

PROTECT = "conv_in,conv_out,time_emb,class_emb"  # the demo preset's


def run_job(job: dict) -> dict:
    """One (pattern, configuration, seed): train, score on the held-out set, return the record."""
    import torch

    torch.set_num_threads(1)
    from maskdm.ddpm.data import load_dataset
    from maskdm.method.mask_policy import magnitude_logits, make_policy, select_targets
    from maskdm.method.maskpro import MaskTrainer, TrainConfig
    from maskdm.ddpm.models import load_ddpm
    from maskdm.method.pruning import PruneConfig, compute_masks
    from maskdm.method.replay import ReplayBatches, ReplaySpec, compute_baseline_losses, heldout_batches, replayed_loss

    cfg, pattern, seed = dict(job["config"]), job["pattern"], job["seed"]
    ddpm = load_ddpm(job["model"])
    unet, scheduler = ddpm.unet.eval(), ddpm.scheduler
    ratio, nm = (0.5, pattern) if ":" in pattern else (float(pattern), "unstructured")
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        ratio = 1 - n / m
    masks = compute_masks(unet, PruneConfig(ratio=ratio, pattern=nm, protect=PROTECT)).masks
    names = select_targets(masks, "all")
    modules = dict(unet.named_modules())
    initial_logits = None
    if cfg.get("init", "constant") == "magnitude":
        initial_logits = magnitude_logits({k: modules[k].weight for k in names}, masks, names, nm, cfg["temperature"])
    policy = make_policy(nm, masks, names, cfg.get("logits", 5.0), logits=initial_logits)

    dataset = load_dataset(job["dataset"], ddpm.resolution, split="train", augment=False)
    spec = ReplaySpec(job["dataset_size"], job["batch_size"], 0, seed)
    batches = ReplayBatches(dataset, spec)
    held = heldout_batches(dataset, spec, job["heldout_size"])
    baseline = compute_baseline_losses(unet, scheduler, masks, batches, progress=False)
    samples = cfg.get("samples", 1)  # equal forward passes: a run of K samples per update gets 1/K of the updates
    config = TrainConfig(
        lr=cfg["lr"], epoch=0, max_step=job["updates"] // samples, accumulation=job["accumulation"], seed=seed,
        samples=cfg.get("samples", 1), reward_baseline=cfg.get("reward_baseline", "delta"), normalize=cfg.get("normalize", False),
    )
    trainer = MaskTrainer(
        unet, masks, policy, lambda b: replayed_loss(unet, scheduler, batches, b), baseline, config,
        heldout_loss=lambda b: replayed_loss(unet, scheduler, held, b), heldout_batches=len(held),
        eval_every=max(1, job["eval_every"] // samples),
    )
    start, cpu = time.perf_counter(), time.process_time()
    trainer.run(progress=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    result = trainer.heldout_result()
    final = trainer.final_masks()
    flips = sum(int((final[k] != masks[k]).sum()) for k in masks) / sum(v.numel() for v in masks.values())
    return {
        "pattern": pattern, "config": job["name"], "seed": seed, "params": cfg,
        "heldout_initial": float(result.initial.mean()), "heldout_final": float(result.final.mean()),
        "improvement": result.improvement, "improvement_se": result.improvement_se,
        "final_mask_flip_rate": flips, "wall_s": wall, "cpu_s": cpu, "updates": trainer.state.updates,
        "samples": config.samples,
        # x: mask samples measured so far (updates x samples), so runs of equal forward passes line up.
        "curve": [[p.step * config.samples, p.loss] for p in trainer.heldout_history],
        "train_improvement_last100": float(np.mean([h.improvement for h in trainer.history[-100:]])),
    }


def summarize(records: list[dict], configs: list[str], patterns: list[str]) -> list[dict]:
    rows = []
    for pattern in patterns:
        for name in configs:
            runs = [r for r in records if r["pattern"] == pattern and r["config"] == name]
            if not runs:
                continue
            imp = np.array([r["improvement"] for r in runs])
            se = float(np.std(imp, ddof=1) / math.sqrt(len(imp))) if len(imp) > 1 else float("nan")
            rows.append({
                "pattern": pattern, "config": name, "seeds": len(runs),
                "heldout_initial": float(np.mean([r["heldout_initial"] for r in runs])),
                "heldout_final": float(np.mean([r["heldout_final"] for r in runs])),
                "improvement": float(imp.mean()), "improvement_se": se,
                "z": float(imp.mean() / se) if se and se > 0 else float("nan"),
                "within_seed_z": [round(r["improvement"] / r["improvement_se"], 1) if r["improvement_se"] > 0 else None for r in runs],
                "flip_rate": float(np.mean([r["final_mask_flip_rate"] for r in runs])),
                "wall_s": float(np.mean([r["wall_s"] for r in runs])),
                "cpu_s": float(np.mean([r["cpu_s"] for r in runs])),
                "updates": runs[0]["updates"], "samples": runs[0]["samples"],
            })
    return rows


def write_table(rows: list[dict], header: str, path: Path) -> None:
    lines = [header, "",
             "| pattern | config | updates x samples | seeds | held-out loss, pruning mask | learned mask | improvement (mean +- SE over seeds) | z | per-seed z (paired over held-out batches) | final flip rate | CPU s / run | wall s / run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['pattern']} | {r['config']} | {r['updates']} x {r['samples']} | {r['seeds']} | {r['heldout_initial']:.5f} | "
            f"{r['heldout_final']:.5f} | {r['improvement']:+.2e} +- {r['improvement_se']:.1e} | {r['z']:.1f} | {r['within_seed_z']} | "
            f"{r['flip_rate']:.2e} | {r['cpu_s']:.0f} | {r['wall_s']:.0f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(records: list[dict], configs: list[str], patterns: list[str], path: Path) -> None:
    """Held-out loss relative to the pruning mask's (%), mean over seeds with a 2-SE band; a
    configuration that ends more than OFF_SCALE % worse is named in the legend but not drawn, so
    it does not flatten the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    off_scale = 25.0
    fig, axes = plt.subplots(1, len(patterns), figsize=(5.5 * len(patterns), 4.4), squeeze=False)
    for ax, pattern in zip(axes[0], patterns):
        for i, name in enumerate(configs):
            runs = [r for r in records if r["pattern"] == pattern and r["config"] == name]
            if not runs:
                continue
            steps = [s for s, _ in runs[0]["curve"]]
            rel = 100 * np.array([[loss / r["heldout_initial"] - 1 for _, loss in r["curve"]] for r in runs if len(r["curve"]) == len(steps)])
            mean = rel.mean(0)
            color = f"C{i}"
            if mean[-1] > off_scale:
                ax.plot([], [], color=color, label=f"{name} (off scale: {mean[-1]:+.0f} %)")
                continue
            ax.plot(steps, mean, marker=".", color=color, label=name)
            if len(rel) > 1:
                se = rel.std(0, ddof=1) / math.sqrt(len(rel))
                ax.fill_between(steps, mean - 2 * se, mean + 2 * se, color=color, alpha=0.15)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(f"{pattern}: held-out loss vs the pruning mask's")
        ax.set_xlabel("masks measured (updates x samples per update)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("change in % (lower is better; mean over seeds, 2 SE band)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def resolve_model(ref: str) -> str:
    if ref != "demo":
        return ref
    from maskdm.driver import find_demo_model
    from maskdm.tracking import get_upstream

    run_id = find_demo_model()
    if not run_id:
        sys.exit("maskdm: error: no demo model in this tracking store; run `maskdm pretrain` first or pass --model <folder>")
    return str(get_upstream(run_id, ["pretrain"], "model", "demo model").download("model"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo", help="a pipeline folder, or demo (the tracking store's demo model)")
    ap.add_argument("--dataset", default="shapes")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--patterns", default="0.5,0.7,2:4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--updates", type=int, default=200, help="updates of one sample; K samples per update get updates/K")
    ap.add_argument("--eval_every", type=int, default=40)
    ap.add_argument("--dataset_size", type=int, default=2048)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--accumulation", type=int, default=2)
    ap.add_argument("--heldout_size", type=int, default=512)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--replot", action="store_true", help="only redraw the table and plot from OUT/results.json")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads((args.out / "results.json").read_text())
        records = saved["records"]
        configs = [c for c in CONFIGS if any(r["config"] == c for r in records)]
        patterns = list(dict.fromkeys(r["pattern"] for r in records))
        plot(records, configs, sorted(patterns, key=lambda p: (":" in p, p)), args.out / "heldout_curves.png")
        return

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    model = resolve_model(args.model)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"maskdm: error: unknown configuration {unknown[0]}; known: {', '.join(CONFIGS)}")
    patterns = [p.strip() for p in args.patterns.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    common = dict(model=model, dataset=args.dataset, updates=args.updates, eval_every=args.eval_every,
                  dataset_size=args.dataset_size, batch_size=args.batch_size, accumulation=args.accumulation,
                  heldout_size=args.heldout_size)
    jobs = [dict(common, name=c, config=CONFIGS[c], pattern=p, seed=s) for p in patterns for c in configs for s in seeds]
    # The slow ones (several samples per update) first, so the pool's two workers finish together.
    jobs.sort(key=lambda j: -j["config"].get("samples", 1))
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    records = []
    with mp.get_context("spawn").Pool(args.processes) as pool:
        for i, record in enumerate(pool.imap_unordered(run_job, jobs), 1):
            records.append(record)
            print(f"[{i}/{len(jobs)}] {record['pattern']} {record['config']} seed {record['seed']}: improvement "
                  f"{record['improvement']:+.2e} +- {record['improvement_se']:.1e}, flips {record['final_mask_flip_rate']:.2e}, "
                  f"{record['wall_s']:.0f} s", flush=True)
            (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "records": records}, indent=1))
    elapsed = time.time() - started
    rows = summarize(records, configs, patterns)
    header = (
        f"# MaskPro study: {len(jobs)} runs in {elapsed / 60:.1f} min wall on {os.cpu_count()} cores ({platform.machine()}), "
        f"{args.processes} worker(s) x 1 thread\n\n`python benchmarks/maskpro_study.py {' '.join(sys.argv[1:])}`\n\n"
        f"Data: {args.dataset}, subset {args.dataset_size} images in batches of {args.batch_size}, {args.accumulation} batches "
        f"per update, {args.updates} updates; held-out: {args.heldout_size} training images outside the subset with their own "
        f"draws. Improvement = held-out loss of the pruning mask - of the learned final mask (positive = learned is better)."
    )
    write_table(rows, header, args.out / "study.md")
    plot(records, configs, patterns, args.out / "heldout_curves.png")
    print((args.out / "study.md").read_text())


if __name__ == "__main__":
    main()
