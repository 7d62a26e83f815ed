"""How long must the demo's finetune run to recover? The study behind docs/details/main.md#sizing-the-demos-finetune.

    python benchmarks/finetune_sizing.py --out sizing/ [--ratios 0.3,0.5,0.7] [--seeds 0,1,2]
        [--checkpoints 40,100,200,400] [--processes 2]

For each pruning ratio and replicate seed, the demo sweep's two finetuned arms, made in-process
with the library the stages use and the demo preset's settings (magnitude pruning, layer scope,
the demo's protect list):

* ``pruning mask``: finetune on extract_masks' masks (the magnitude mask);
* ``learned mask``: train_masks (the demo preset's settings, on the dense weights, logits from the
  magnitude scores), then finetune on its final masks.

Each arm is finetuned once for the largest ``--checkpoints`` value, with the demo preset's recipe
(batch 32, lr 2e-4 constant, EMA max decay 0.99, the model's own dropout: 0, seed = replicate), and
its EMA model is scored at every checkpoint. With a constant learning rate and no warm-up, the EMA
model at step k of a longer run is the model a k-step finetune ends with (same seed, same data
order), so one run measures every length.

Every model is scored the way the demo's fid stage scores it: ``fid_shapes`` of 512 DDIM samples
(10 uniform steps, eta 0, x0 not clipped: the sample stage's defaults; seed 42 + replicate, as
``main --seeds`` offsets it) against the shapes training set; and by the held-out loss on the report
half of the shapes EVAL split (as benchmarks/pruner_study.py). The pruned (magnitude, not finetuned)
model is scored with the same sampling seeds, and each finetuned arm is paired with it seed by seed:
``better`` when the mean paired difference is more than 2 SE below zero.

Writes ``results.json`` (every record; the run resumes from it), ``sizing.md`` and ``sizing.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pruner_study import (  # noqa: E402  (the study's own helpers: one way to prune, learn and score)
    BATCH, SUBSET, held_out_splits, heldout_loss, learn_masks, one_shot, prepare_reference, resolve_model,
)

from maskdm.evaluation.verdicts import mean_se_n, verdict  # noqa: E402

ARMS = ("pruned", "pruning mask", "learned mask")
SAMPLES, STEPS = 512, 10


def fid_shapes(unet, scheduler_config, seed: int, reference, classifier) -> float:
    from maskdm.evaluation.fid import fid_of_features
    from maskdm.ddpm.sampling import sample_images
    from maskdm.evaluation.shapes_features import shapes_features

    images = sample_images(copy.deepcopy(unet), scheduler_config, range(SAMPLES), steps=STEPS, seed=42 + seed,
                           batch_size=256, clip_sample=False)
    return float(fid_of_features(shapes_features(images, classifier), reference))


def run_job(job: dict) -> list[dict]:
    """One (ratio, arm, seed): its records, one per checkpoint (one for the pruned model)."""
    import torch

    torch.set_num_threads(1)
    from maskdm.ddpm.data import ArrayImageDataset, load_dataset
    from maskdm.ddpm.models import DDPM, load_ddpm
    from maskdm.method.replay import ReplayBatches, ReplaySpec
    from maskdm.evaluation.shapes_features import load_shapes_classifier
    from maskdm.ddpm.training import TrainConfig, train_ddpm

    start = time.perf_counter()
    ddpm = load_ddpm(job["model"])
    ddpm.unet.eval()
    ratio, seed, arm = job["ratio"], job["seed"], job["arm"]
    train_plain = load_dataset("shapes", ddpm.resolution, split="train", augment=False)
    _, held_report = held_out_splits(load_dataset("shapes", ddpm.resolution, split="eval", augment=False))
    reference = tuple(np.load(job["reference"])[k] for k in ("mu", "sigma"))
    classifier = load_shapes_classifier(job["classifier"])

    masks, pruned_unet, scores, selection = one_shot(ddpm, "magnitude", "unstructured", ratio, train_plain, seed, 64)
    base = {"ratio": ratio, "arm": arm, "seed": seed}
    if arm == "pruned":
        return [{**base, "iters": 0, "fid_shapes": fid_shapes(pruned_unet, ddpm.scheduler.config, seed, reference, classifier),
                 "heldout": heldout_loss(pruned_unet, ddpm.scheduler, masks, held_report), "wall_s": time.perf_counter() - start}]
    if arm == "learned mask":
        subset = ReplayBatches(train_plain, ReplaySpec(SUBSET, BATCH, 0, seed))
        masks = learn_masks(ddpm, masks, scores, selection, "unstructured", subset, seed)

    records = []
    checkpoints = sorted(job["checkpoints"])

    def score(path, step, ema_ddpm):
        if step in checkpoints:
            records.append({**base, "iters": step,
                            "fid_shapes": fid_shapes(ema_ddpm.unet, ema_ddpm.scheduler.config, seed, reference, classifier),
                            "heldout": heldout_loss(ema_ddpm.unet, ema_ddpm.scheduler, masks, held_report),
                            "wall_s": time.perf_counter() - start})

    train_set = ArrayImageDataset(train_plain.images, train_plain.labels, train=True, classes=train_plain.classes)
    every = int(np.gcd.reduce(checkpoints))
    config = TrainConfig(
        num_iters=checkpoints[-1], train_batch_size=32, learning_rate=2e-4, lr_warmup_steps=0, ema_max_decay=0.99,
        save_model_steps=every, checkpoints_total_limit=1, mixed_precision="no", channels_last="false", compile="false",
        seed=seed,
    )
    with tempfile.TemporaryDirectory(prefix="maskdm-sizing-") as work:
        # The dense weights under the masks (magnitude keeps them; MaskPro trained on them).
        train_ddpm(DDPM(copy.deepcopy(ddpm.unet), ddpm.scheduler), train_set, config, masks=masks,
                   checkpoint_dir=Path(work), on_checkpoint=score)
    return records


# --- statistics and output -------------------------------------------------------------------------


def cell(values: list[float], digits: int) -> str:
    mean, se, n = mean_se_n(values)
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def summarize(records: list[dict], ratios: list[float], checkpoints: list[int]) -> list[str]:
    lines = ["| ratio | finetune iterations | arm | fid_shapes | finetuned - pruned (paired) | verdict | held-out loss |",
             "|---|---|---|---|---|---|---|"]
    for ratio in ratios:
        pruned = {r["seed"]: r for r in records if r["ratio"] == ratio and r["arm"] == "pruned"}
        if pruned:
            lines.append(f"| {ratio} | 0 | pruned | {cell([r['fid_shapes'] for r in pruned.values()], 2)} | | | "
                         f"{cell([r['heldout'] for r in pruned.values()], 4)} |")
        for iters in checkpoints:
            for arm in ARMS[1:]:
                runs = sorted((r for r in records if r["ratio"] == ratio and r["arm"] == arm and r["iters"] == iters),
                              key=lambda r: r["seed"])
                if not runs:
                    continue
                diffs = [r["fid_shapes"] - pruned[r["seed"]]["fid_shapes"] for r in runs if r["seed"] in pruned]
                mean, se, n = mean_se_n(diffs)
                diff = f"{mean:+.2f} ± {se:.2f} (n={n})" if n > 1 else (f"{mean:+.2f} (n={n})" if n else "")
                lines.append(f"| {ratio} | {iters} | {arm} | {cell([r['fid_shapes'] for r in runs], 2)} | {diff} | "
                             f"{verdict(mean, se, n) if n else ''} | {cell([r['heldout'] for r in runs], 4)} |")
    return lines


def plot(records: list[dict], ratios: list[float], checkpoints: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(ratios), figsize=(4.6 * len(ratios), 3.8), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        pruned = [r["fid_shapes"] for r in records if r["ratio"] == ratio and r["arm"] == "pruned"]
        if pruned:
            mean, se, _ = mean_se_n(pruned)
            ax.axhspan(mean - (se if np.isfinite(se) else 0), mean + (se if np.isfinite(se) else 0), color="grey", alpha=0.25)
            ax.axhline(mean, color="grey", linestyle="--", label="pruned (no finetune)")
        for i, arm in enumerate(ARMS[1:]):
            cells = [mean_se_n([r["fid_shapes"] for r in records if r["ratio"] == ratio and r["arm"] == arm and r["iters"] == k])
                     for k in checkpoints]
            ax.errorbar(checkpoints, [c[0] for c in cells], yerr=[c[1] if np.isfinite(c[1]) else 0 for c in cells],
                        marker="o", capsize=3, label=f"finetuned, {arm}", color=f"C{i}")
        ax.set_xscale("log")
        ax.set_xticks(checkpoints, [str(k) for k in checkpoints])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("finetune iterations (batch 32)")
        ax.set_title(f"ratio {ratio}: fid_shapes, mean ± 1 SE over seeds", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fid_shapes (lower is better)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--ratios", default="0.3,0.5,0.7")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--checkpoints", default="40,100,200,400", help="finetune lengths scored (one run to the largest)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    checkpoints = sorted(int(k) for k in args.checkpoints.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model)
    from maskdm.ddpm.models import load_ddpm

    classifier, reference = prepare_reference(args.out, load_ddpm(model).resolution)
    results_path = args.out / "results.json"
    records = json.loads(results_path.read_text())["records"] if results_path.exists() else []
    done = {(r["ratio"], r["arm"], r["seed"]) for r in records}
    jobs = [dict(model=model, ratio=ratio, arm=arm, seed=seed, checkpoints=checkpoints, classifier=classifier, reference=reference)
            for ratio in ratios for seed in seeds for arm in ARMS if (ratio, arm, seed) not in done]
    started = time.perf_counter()
    with mp.get_context("spawn").Pool(args.processes) as pool:
        for made in pool.imap_unordered(run_job, jobs):
            records += made
            tmp = results_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"records": records, "checkpoints": checkpoints, "host_cpus": os.cpu_count()}, indent=1))
            tmp.replace(results_path)
            print(f"done {made[0]['ratio']} {made[0]['arm']} seed {made[0]['seed']} ({time.perf_counter() - started:.0f} s)", flush=True)
    lines = ["# Sizing the demo's finetune", "", f"`{' '.join(sys.argv)}`", "", *summarize(records, ratios, checkpoints)]
    (args.out / "sizing.md").write_text("\n".join(lines) + "\n")
    plot(records, ratios, checkpoints, args.out / "sizing.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
