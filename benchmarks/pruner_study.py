"""Which mask wins after recovery? The study behind docs/details/prune.md#the-study-which-mask-wins-after-recovery.

    python benchmarks/pruner_study.py --out study_pruners/ [--model demo] [--patterns 0.5,0.7,2:4]
        [--pruners magnitude,taylor,wanda,sparsegpt] [--seeds 0,1,2] [--finetune_iters 200] [--processes 2]

For every pattern and replicate seed it makes these arms of the demo model, in-process with the
library the stages use (no tracking store), and scores each one exactly the same way:

* one-shot pruners: ``magnitude``, ``taylor``, ``wanda``, ``sparsegpt`` (sparsegpt's kept weights
  are its reconstruction; the others keep the dense weights);
* ``maskpro<-magnitude``: ``train_masks`` (the demo preset's settings) on the dense weights, its
  logits started from the magnitude mask;
* ``maskpro<-best``: the same started from the best one-shot pruner of that pattern. "Best" is
  chosen on the SELECTION split (held-out loss before finetuning, mean over seeds) and every
  number reported comes from the REPORT split, so the choice is not scored on the data it was
  made on.

Each arm is then finetuned with the same recipe (``--finetune_iters`` at the demo preset's
learning rate and EMA; dropout: the model's own), and scored by

* held-out loss before and after finetuning: the mean denoising loss on the shapes EVAL split
  (2,000 images none of the models, the pretrained one included, was trained on), split in two
  halves (selection: images 0-999, report: 1000-1999), each batch with its own fixed timesteps and
  noise, the same for every arm (so arms are compared on identical draws);
* ``fid_shapes`` of ``--samples`` DDIM samples (10 uniform steps, eta 0, seed 42 + replicate)
  against the shapes training set, as the ``fid`` stage scores the demo, except that x0 is clipped
  (the scheduler's own ``clip_sample``; the sample stage's default is not to clip), so the values
  compare among the study's arms, not with a demo table's.

What a replicate seed changes: the calibration images and draws of the data-driven pruners
(taylor, wanda, sparsegpt), mask training's subset, draws and mask samples, the finetune's data
order and noise, and the sampler's starting noise. magnitude's mask does not depend on it.

Writes ``results.json`` (every record), ``study.md`` (mean +- SE over seeds and the paired
verdicts against magnitude: ``better``/``worse`` when the mean paired difference is more than 2 SE
from zero, else ``no difference at 2 SE``) and ``pruner_study.png``. Jobs run in ``--processes``
worker processes of one thread each.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from maskdm.evaluation.verdicts import mean_se_n as mean_se  # the report's own statistics
from maskdm.evaluation.verdicts import verdict

ONE_SHOT = ("magnitude", "taylor", "wanda", "sparsegpt")
PROTECT = "conv_in,conv_out,time_emb,class_emb"  # the demo preset's
#: train_masks as the demo preset runs it (maskdm/driver/presets.py DEMO).
MASKPRO = dict(lr=0.05, logits=5.0, max_step=150, accumulation=2, temperature=0.05, samples=1, reward_baseline="delta", normalize=True)
#: Calibration / mask-training subset (train split), as the demo's baseline_loss: 1,024 images in batches of 32.
SUBSET, BATCH = 1024, 32
HELDOUT_HALF = 1000


def parse_pattern(pattern: str) -> tuple[float, str]:
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        return 1 - n / m, pattern
    return float(pattern), "unstructured"


def held_out_splits(eval_set):
    """The selection and report halves of the shapes eval split, replayed with fixed draws."""
    from maskdm.method.replay import HELDOUT_STREAM, ReplayBatches, ReplaySpec

    def half(lo: int) -> ReplayBatches:
        indices = np.arange(lo, lo + HELDOUT_HALF)
        return ReplayBatches(eval_set, ReplaySpec(HELDOUT_HALF, BATCH, 0, 7919 + lo), indices=indices, stream=HELDOUT_STREAM)

    return half(0), half(HELDOUT_HALF)


def heldout_loss(unet, scheduler, masks, batches) -> float:
    from maskdm.method.replay import replay_model, replayed_loss

    model = replay_model(copy.deepcopy(unet), masks)
    return float(np.mean([replayed_loss(model, scheduler, batches, b) for b in range(len(batches))]))


def one_shot(ddpm, pruner: str, pattern: str, ratio: float, train_plain, seed: int, calib_samples: int):
    """(masks, unet, scores, selection): the pruner's masks, the UNet the arm finetunes from
    (sparsegpt: its reconstruction), and what it ranked by. Exactly the prune stage's call."""
    from maskdm.method.oneshot import CalibConfig
    from maskdm.method.pruners import run_pruner
    from maskdm.method.pruning import PruneConfig, apply_pruning
    from maskdm.method.taylor import TaylorConfig

    unet = copy.deepcopy(ddpm.unet).eval()
    config = PruneConfig(ratio=ratio, pattern=pattern, protect=PROTECT, pruner=pruner, seed=seed)
    outcome = run_pruner(unet, ddpm.scheduler, config, train_plain, TaylorConfig(seed=seed), CalibConfig(samples=calib_samples, seed=seed),
                         progress=False)
    apply_pruning(unet, outcome.result.masks)
    return outcome.result.masks, unet, outcome.scores, outcome.selection


def learn_masks(ddpm, masks, init_scores, selection: str, pattern: str, batches, seed: int):
    """train_masks on the dense weights from ``masks`` (logits from ``init_scores``); the learned final masks."""
    from maskdm.method.mask_policy import make_policy, score_logits, select_targets
    from maskdm.method.maskpro import MaskTrainer, TrainConfig
    from maskdm.method.replay import compute_baseline_losses, replayed_loss

    unet, scheduler = copy.deepcopy(ddpm.unet).eval(), ddpm.scheduler
    names = select_targets(masks, "all")
    logits = score_logits(init_scores, masks, names, pattern, MASKPRO["temperature"], selection)
    policy = make_policy(pattern, masks, names, MASKPRO["logits"], logits=logits)
    baseline = compute_baseline_losses(unet, scheduler, masks, batches, progress=False)
    config = TrainConfig(
        lr=MASKPRO["lr"], epoch=0, max_step=MASKPRO["max_step"], accumulation=MASKPRO["accumulation"], seed=seed,
        samples=MASKPRO["samples"], reward_baseline=MASKPRO["reward_baseline"], normalize=MASKPRO["normalize"],
    )
    trainer = MaskTrainer(unet, masks, policy, lambda b: replayed_loss(unet, scheduler, batches, b), baseline, config)
    trainer.run(progress=False)
    return trainer.final_masks()


def finetune_and_score(ddpm, unet, masks, job, held_report, train_set, reference, classifier) -> dict:
    from maskdm.evaluation.fid import fid_of_features
    from maskdm.ddpm.models import DDPM
    from maskdm.ddpm.sampling import sample_images
    from maskdm.evaluation.shapes_features import shapes_features
    from maskdm.ddpm.training import TrainConfig, train_ddpm

    seed = job["seed"]
    config = TrainConfig(
        num_iters=job["finetune_iters"], train_batch_size=32, learning_rate=2e-4, lr_warmup_steps=0, ema_max_decay=0.99,
        save_model_steps=job["finetune_iters"], mixed_precision="no", channels_last="false", compile="false", seed=seed,
    )
    with tempfile.TemporaryDirectory(prefix="maskdm-study-") as work:
        result = train_ddpm(DDPM(copy.deepcopy(unet), ddpm.scheduler), train_set, config, masks=masks, checkpoint_dir=Path(work))
    tuned = result.ddpm
    images = sample_images(copy.deepcopy(tuned.unet), tuned.scheduler.config, range(job["samples"]), steps=10, seed=42 + seed, batch_size=256)
    return {
        "heldout_finetuned": heldout_loss(tuned.unet, tuned.scheduler, masks, held_report),
        "fid_shapes_finetuned": fid_of_features(shapes_features(images, classifier), reference),
    }


def run_job(job: dict) -> dict:
    """One (pattern, arm, seed): make the arm's masks, score them, finetune, score again."""
    import torch

    torch.set_num_threads(1)
    from maskdm.ddpm.data import ArrayImageDataset, load_dataset
    from maskdm.ddpm.models import load_ddpm
    from maskdm.method.replay import ReplayBatches, ReplaySpec
    from maskdm.evaluation.shapes_features import load_shapes_classifier

    start, cpu = time.perf_counter(), time.process_time()
    ddpm = load_ddpm(job["model"])
    ddpm.unet.eval()
    ratio, pattern = parse_pattern(job["pattern"])
    seed, arm = job["seed"], job["arm"]
    train_plain = load_dataset("shapes", ddpm.resolution, split="train", augment=False)
    eval_set = load_dataset("shapes", ddpm.resolution, split="eval", augment=False)
    held_select, held_report = held_out_splits(eval_set)
    subset = ReplayBatches(train_plain, ReplaySpec(SUBSET, BATCH, 0, seed))

    if arm.startswith("maskpro<-"):
        source = job["init_pruner"]
        start_masks, _, scores, selection = one_shot(ddpm, source, pattern, ratio, train_plain, seed, job["calib_samples"])
        masks = learn_masks(ddpm, start_masks, scores, selection, pattern, subset, seed)
        unet = ddpm.unet  # MaskPro keeps the dense weights under its mask
        flips = sum(int((masks[k] != start_masks[k]).sum()) for k in masks) / sum(v.numel() for v in masks.values())
    else:
        masks, unet, _, _ = one_shot(ddpm, arm, pattern, ratio, train_plain, seed, job["calib_samples"])
        flips = 0.0
    record = {
        "pattern": job["pattern"], "arm": arm, "seed": seed, "init_pruner": job.get("init_pruner"),
        "heldout_select_pruned": heldout_loss(unet, ddpm.scheduler, masks, held_select),
        "heldout_pruned": heldout_loss(unet, ddpm.scheduler, masks, held_report),
        "flip_rate": flips,
    }
    reference = tuple(np.load(job["reference"])[k] for k in ("mu", "sigma"))
    classifier = load_shapes_classifier(job["classifier"])
    # The same rendered images with the training split's random flip, as finetune reads them.
    train_set = ArrayImageDataset(train_plain.images, train_plain.labels, train=True, classes=train_plain.classes)
    record.update(finetune_and_score(ddpm, unet, masks, job, held_report, train_set, reference, classifier))
    record["wall_s"], record["cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
    return record


# --- statistics and output -------------------------------------------------------------------------

METRICS = (
    ("heldout_pruned", "held-out loss, before finetune"),
    ("heldout_finetuned", "held-out loss, after finetune"),
    ("fid_shapes_finetuned", "fid_shapes, after finetune"),
)


def summarize(records: list[dict], patterns: list[str], arms: list[str]) -> tuple[list[dict], list[dict]]:
    rows, paired = [], []
    for pattern in patterns:
        base = {r["seed"]: r for r in records if r["pattern"] == pattern and r["arm"] == "magnitude"}
        for arm in arms:
            runs = sorted((r for r in records if r["pattern"] == pattern and r["arm"] == arm), key=lambda r: r["seed"])
            if not runs:
                continue
            row = {"pattern": pattern, "arm": arm, "init": runs[0].get("init_pruner") or ""}
            for key, _ in METRICS:
                row[key] = mean_se([r[key] for r in runs])
            rows.append(row)
            if arm == "magnitude":
                continue
            for key, label in METRICS:
                diffs = [r[key] - base[r["seed"]][key] for r in runs if r["seed"] in base]
                if not diffs:
                    continue
                m, se, n = mean_se(diffs)
                paired.append({"pattern": pattern, "arm": arm, "metric": label, "mean": m, "se": se, "n": n, "verdict": verdict(m, se, n)})
    return rows, paired


def _fmt(cell: tuple[float, float, int], digits: int) -> str:
    mean, se, _ = cell
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if np.isfinite(se) else f"{mean:.{digits}f}"


def write_table(rows, paired, header: str, path: Path) -> None:
    lines = [header, "", "Mean ± standard error over seeds (n per cell in the paired table).", "",
             "| pattern | arm | held-out loss, pruned | held-out loss, finetuned | fid_shapes, finetuned |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['arm']} | {_fmt(r['heldout_pruned'], 5)} | {_fmt(r['heldout_finetuned'], 5)} | "
                     f"{_fmt(r['fid_shapes_finetuned'], 2)} |")
    lines += ["", "Paired against magnitude, seed by seed (arm minus magnitude; negative = the arm is better):", "",
              "| pattern | arm | metric | mean difference | SE | n | verdict |", "|---|---|---|---|---|---|---|"]
    for p in paired:
        digits = 2 if p["metric"].startswith("fid") else 5
        lines.append(f"| {p['pattern']} | {p['arm']} | {p['metric']} | {p['mean']:+.{digits}f} | {p['se']:.{digits}f} | {p['n']} | {p['verdict']} |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows, patterns, arms, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.2 * len(METRICS), 4.2), squeeze=False)
    width = 0.8 / max(1, len(arms))
    for ax, (key, label) in zip(axes[0], METRICS):
        for i, arm in enumerate(arms):
            cells = [next((r[key] for r in rows if r["pattern"] == p and r["arm"] == arm), (np.nan, np.nan, 0)) for p in patterns]
            x = np.arange(len(patterns)) + (i - (len(arms) - 1) / 2) * width
            ax.bar(x, [c[0] for c in cells], width, yerr=[c[1] if np.isfinite(c[1]) else 0 for c in cells], capsize=2, label=arm, color=f"C{i}")
        ax.set_xticks(np.arange(len(patterns)), patterns)
        ax.set_title(f"{label}\n(mean ± 1 SE over seeds; lower is better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if key.startswith("fid"):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def prepare_reference(out: Path, resolution: int) -> tuple[str, str]:
    """The shapes classifier (as the fid stage trains it) and the training set's feature statistics."""
    from entrypoints.fid import CLASSIFIER_TRAINING
    from maskdm.ddpm.data import load_dataset
    from maskdm.evaluation.fid import dataset_images_uint8, statistics
    from maskdm.evaluation.shapes_features import save_shapes_classifier, shapes_features, train_shapes_classifier

    classifier_path, reference_path = out / "shapes_classifier.safetensors", out / "reference.npz"
    if not classifier_path.exists():
        save_shapes_classifier(train_shapes_classifier(load_dataset("shapes", split="train"), **CLASSIFIER_TRAINING), classifier_path)
    if not reference_path.exists():
        from maskdm.evaluation.shapes_features import load_shapes_classifier

        train = load_dataset("shapes", resolution, split="train", augment=False)
        mu, sigma = statistics(shapes_features(dataset_images_uint8(train), load_shapes_classifier(classifier_path)))
        np.savez(reference_path, mu=mu, sigma=sigma)
    return str(classifier_path), str(reference_path)


def resolve_model(ref: str) -> str:
    if ref != "demo":
        return ref
    from maskdm.ddpm.demo_model import DEMO_MODEL_DIR

    return str(DEMO_MODEL_DIR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo", help="a pipeline folder, or demo (the shipped demo model)")
    ap.add_argument("--patterns", default="0.5,0.7,2:4")
    ap.add_argument("--pruners", default=",".join(ONE_SHOT))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--finetune_iters", type=int, default=200)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--calib_samples", type=int, default=64, help="wanda/sparsegpt calibration images (the prune stage's default)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--replot", action="store_true", help="only redraw the table and plot from OUT/results.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    patterns = [p.strip() for p in args.patterns.split(",")]
    pruners = [p.strip() for p in args.pruners.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = pruners + ["maskpro<-magnitude", "maskpro<-best"]
    results = args.out / "results.json"
    header_path = args.out / "header.txt"
    if args.replot:
        records = json.loads(results.read_text())["records"]
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        model = resolve_model(args.model)
        from maskdm.ddpm.models import load_ddpm

        classifier, reference = prepare_reference(args.out, load_ddpm(model).resolution)
        common = dict(model=model, finetune_iters=args.finetune_iters, samples=args.samples, calib_samples=args.calib_samples, classifier=classifier, reference=reference)
        started, records = time.time(), []
        if results.exists():  # resume: a job already recorded is not run again
            records = json.loads(results.read_text())["records"]
        done = {(r["pattern"], r["arm"], r["seed"]) for r in records}

        def run(jobs):
            jobs = [j for j in jobs if (j["pattern"], j["arm"], j["seed"]) not in done]
            with mp.get_context("spawn").Pool(args.processes) as pool:
                for record in pool.imap_unordered(run_job, jobs):
                    records.append(record)
                    print(f"[{len(records)}] {record['pattern']} {record['arm']} seed {record['seed']}: held-out pruned "
                          f"{record['heldout_pruned']:.5f}, finetuned {record['heldout_finetuned']:.5f}, fid_shapes "
                          f"{record['fid_shapes_finetuned']:.2f} ({record['wall_s']:.0f} s)", flush=True)
                    results.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "records": records}, indent=1))

        best = {}
        # Pattern by pattern, so that a study stopped early has every arm of the patterns it reached.
        for p in patterns:
            first = [dict(common, pattern=p, arm=a, seed=s, init_pruner="magnitude" if a == "maskpro<-magnitude" else None)
                     for a in ["maskpro<-magnitude"] + pruners for s in seeds]  # the slow arm first: the workers finish together
            run(first)
            # Chosen on the selection split; reported on the report split.
            best[p] = min(pruners, key=lambda a: np.mean([r["heldout_select_pruned"] for r in records if r["pattern"] == p and r["arm"] == a]))
            run([dict(common, pattern=p, arm="maskpro<-best", init_pruner=best[p], seed=s) for s in seeds])
        elapsed = time.time() - started
        header_path.write_text(
            f"# Pruner study: {len(records)} runs, {sum(r['wall_s'] for r in records) / 60 / args.processes:.0f} min wall "
            f"(the last invocation: {elapsed / 60:.1f} min) on {os.cpu_count()} cores ({platform.machine()}), "
            f"{args.processes} worker(s) x 1 thread\n\n`python benchmarks/pruner_study.py {' '.join(sys.argv[1:])}`\n\n"
            f"Best one-shot pruner per pattern (selection split, held-out loss before finetune): "
            + ", ".join(f"{p}: {b}" for p, b in best.items())
            + f". Finetune: {args.finetune_iters} iterations at batch 32, lr 2e-4, EMA 0.99, the model's own dropout; "
            f"fid_shapes of {args.samples} samples."
        )
    rows, paired = summarize(records, patterns, arms)
    write_table(rows, paired, header_path.read_text() if header_path.exists() else "# Pruner study", args.out / "study.md")
    plot(rows, patterns, arms, args.out / "pruner_study.png")
    print((args.out / "study.md").read_text())


if __name__ == "__main__":
    main()
