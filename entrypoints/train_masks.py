"""train_masks: learn masks for the original dense weights by policy gradient (MaskPro).

Everything that fixes the minibatches (dataset, dataset_size, batch_size, max_batches, seed and
the sampling protocol) comes from the baseline run; a given value that contradicts it is an error.
Each update samples ``samples`` masks from the logits (drawn from ``mask_seed``, independent of
the subset's seed, so replicates of the masks share one baseline run), measures each on the same
``accumulation`` replayed batches and moves the logits against its advantage (see :mod:`maskdm.method.maskpro`). The
current final mask is scored on held-out images every ``eval_every`` updates.
``max_step`` counts updates and ``epoch`` passes over the subset; training stops at whichever comes
first (0 = no limit for that one).

The fast path (mixed_precision, channels_last, compile, and forward_batches batches per forward
pass) is the baseline run's too: ``auto`` takes it, another value is an error, because losses made
another way would differ from the baseline's in their last bits and the reward would compare
precisions rather than masks. An update's ``accumulation`` batches then go through the UNet in
``accumulation / forward_batches`` forward passes.
"""

from __future__ import annotations

import json
import logging
import time

import click
import numpy as np
import torch

from entrypoints.baseline_loss import FAST_PATH_TAG, LOSSES_FILE, MASKS_FILE, SUMMARY_FILE, device, replay_dataset
from entrypoints.common import boolean, choice, integer, number, optional, stage
from entrypoints.datasets import log_replay_batches, stage_dataset
from maskdm.dataset_inputs import HELDOUT, TRAINING
from maskdm.errors import MaskDMError
from maskdm.ddpm.fastpath import resolve_channels_last, resolve_compile, resolve_mixed_precision
from maskdm.method.mask_policy import INIT_CHOICES, magnitude_logits, make_policy, score_logits, select_targets
from maskdm.method.maskpro import (
    REWARD_BASELINES,
    MaskTrainer,
    TrainConfig,
    auto_eval_every,
    planned_updates,
    plot_layer_flips,
    plot_training_curves,
    save_logits,
)
from maskdm.masks import assert_sparse_as, bake_masks, check_masks_fit, load_masks, mask_sparsity, save_masks, set_masks
from maskdm.method.replay import (
    LEGACY_SETTINGS,
    ReplayBatches,
    ReplayedLosses,
    ReplaySpec,
    check_forward_batches,
    check_protocol,
    fast_path_of,
    heldout_batches,
    images_outside_subset,
    replay_model,
    resolve_from_baseline,
)
from maskdm.method.pruning import SCORES_FILE, load_scores
from maskdm.tracking import get_upstream

log = logging.getLogger(__name__)

#: heldout_size=auto takes this many images outside the subset (or as many as there are).
AUTO_HELDOUT = 512


def read_baseline(up) -> tuple[dict, np.ndarray]:
    summary = json.loads(up.download(SUMMARY_FILE).read_text())
    losses = np.load(up.download(LOSSES_FILE), allow_pickle=False)
    return summary, losses


@click.command("train_masks", help="Learn masks for the original dense weights by policy gradient (MaskPro).")
@click.option("--baseline_run_id", required=True, help="MLflow run ID of a baseline_loss run.")
@click.option("--lr", default="1.0", show_default=True, help="Learning rate of the logits (in units of the advantage's spread with normalize=true).")
@click.option("--epoch", default="2000", show_default=True, help="At most this many passes over the subset (0 = no limit).")
@click.option("--logits", default="5.0", show_default=True, help="init=constant: +logits where the initial mask keeps, -logits elsewhere.")
@click.option("--max_step", default="15000", show_default=True, help="At most this many updates (0 = no limit).")
@click.option("--accumulation", default="16", show_default=True, help="Batches per update.")
@click.option("--init", "init", default="constant", show_default=True, help="Initial logits: constant (+-logits), magnitude (|w| through temperature) or pruner (the prune run's recorded scores through temperature).")
@click.option("--temperature", default="0.05", show_default=True, help="init=magnitude/pruner: logit = log(score / threshold) / temperature.")
@click.option("--samples", default="1", show_default=True, help="Masks sampled and measured per update, on the same batches.")
@click.option("--reward_baseline", default="delta", show_default=True, help="delta (moving average of the reward) or loo (leave-one-out over the update's samples; samples >= 2).")
@click.option("--normalize", default="false", show_default=True, help="Divide advantages by a running estimate of their spread.")
@click.option("--heldout_size", default="auto", show_default=True, help="Training images outside the subset to score masks on (auto: up to 512, as many as there are; 0: no held-out scoring).")
@click.option("--eval_every", default="auto", show_default=True, help="Updates between held-out scores of the current final mask (auto: within 10 % of the forward passes; 0: before and after only).")
@click.option("--mask_seed", default="0", show_default=True,
              help="Seed of the mask sampling (which masks each update draws); the subset and its draws keep the baseline run's seed. main --seeds replicates through it.")
@click.option("--targets", default="", help="Layers to train: all or prefixes [default: the baseline run's].")
@click.option("--dataset", default="", help="[default: the baseline run's; another value is an error]")
@click.option("--dataset_size", default="", help="[default: the baseline run's; another value is an error]")
@click.option("--batch_size", default="", help="[default: the baseline run's; another value is an error]")
@click.option("--seed", default="", help="[default: the baseline run's; another value is an error]")
@click.option("--mixed_precision", default="auto", show_default=True, help="auto: the baseline run's (no, bf16 or fp16; another value is an error).")
@click.option("--channels_last", default="auto", show_default=True, help="auto: the baseline run's (true or false; another value is an error).")
@click.option("--compile", "compile_unet", default="auto", show_default=True, help="auto: the baseline run's (true or false; another value is an error).")
def command(
    baseline_run_id, lr, epoch, logits, max_step, accumulation, init, temperature, samples, reward_baseline, normalize,
    heldout_size, eval_every, mask_seed, targets, dataset, dataset_size, batch_size, seed, mixed_precision, channels_last, compile_unet,
) -> None:
    params = dict(
        baseline_run_id=baseline_run_id, lr=lr, epoch=epoch, logits=logits, max_step=max_step, accumulation=accumulation,
        init=init, temperature=temperature, samples=samples, reward_baseline=reward_baseline, normalize=normalize,
        heldout_size=heldout_size, eval_every=eval_every, mask_seed=mask_seed, targets=targets, dataset=dataset, dataset_size=dataset_size,
        batch_size=batch_size, seed=seed, mixed_precision=mixed_precision, channels_last=channels_last, compile=compile_unet,
    )
    with stage("train_masks", params) as run:
        config = TrainConfig(
            lr=number("lr", lr), epoch=integer("epoch", epoch, minimum=0), max_step=integer("max_step", max_step, minimum=0),
            accumulation=integer("accumulation", accumulation), seed=integer("mask_seed", mask_seed, minimum=0), samples=integer("samples", samples),
            reward_baseline=choice("reward_baseline", reward_baseline, REWARD_BASELINES), normalize=boolean("normalize", normalize),
        )
        init_kind = choice("init", init, INIT_CHOICES)
        magnitude, temp = number("logits", logits), number("temperature", temperature)
        if init_kind in ("magnitude", "pruner") and temp <= 0:
            raise MaskDMError(f"temperature must be positive, not '{temperature}'")
        # None = auto: up to AUTO_HELDOUT images outside the subset, none if fewer than a batch are left.
        heldout_images = None if str(heldout_size).strip().lower() == "auto" else integer("heldout_size", heldout_size, minimum=0)
        # None = auto: the smallest interval whose held-out scoring stays within 10 % of the forward passes.
        every = None if str(eval_every).strip().lower() == "auto" else integer("eval_every", eval_every, minimum=0)
        fast_given = given_fast_path(mixed_precision, channels_last, compile_unet)
        up = run.upstream(baseline_run_id, ["baseline_loss"], [SUMMARY_FILE, LOSSES_FILE], "baseline_run_id")
        summary, baseline = read_baseline(up)
        # A baseline made before the fast path existed ran in full precision, one batch per forward.
        summary = {**summary, "params": {**LEGACY_SETTINGS, **summary["params"]}}
        given = {k: optional(v) for k, v in dict(dataset=dataset, dataset_size=dataset_size, batch_size=batch_size, seed=seed).items()}
        replay = resolve_from_baseline(summary, {**given, **fast_given, "forward_batches": None})
        recorded = summary["params"]
        fast, group = fast_path_of(replay), int(replay["forward_batches"])
        check_forward_batches(group, len(baseline), config.accumulation)
        run.set_tags({FAST_PATH_TAG: fast.describe()})
        pattern = recorded["pattern"]
        target_spec = optional(targets) or recorded["targets"]
        run.log_params({"dataset": replay["dataset"], "pattern": pattern})

        masks_run = get_upstream(recorded["masks_run_id"], ["extract_masks"], MASKS_FILE, "the baseline run's masks run")
        masks = load_masks(masks_run.download(MASKS_FILE))
        names = select_targets(masks, target_spec)
        ddpm = run.load_lineage_model()
        check_masks_fit(ddpm.unet, masks)
        initial_logits = None
        if init_kind == "magnitude":
            modules = dict(ddpm.unet.named_modules())
            initial_logits = magnitude_logits({n: modules[n].weight for n in names}, masks, names, pattern, temp)
        elif init_kind == "pruner":
            initial_logits = pruner_logits(masks_run, masks, names, pattern, temp)
        policy = make_policy(pattern, masks, names, magnitude, logits=initial_logits)

        if int(ddpm.scheduler.config.num_train_timesteps) != int(recorded["num_train_timesteps"]):
            raise MaskDMError("the model's scheduler has another num_train_timesteps than the baseline run's: the draws would differ")
        spec = ReplaySpec(int(replay["dataset_size"]), int(replay["batch_size"]), int(recorded["max_batches"]), int(replay["seed"]))
        images = replay_dataset(ddpm, replay["dataset"], run)
        batches = ReplayBatches(images, spec)
        check_protocol(summary, batches, len(baseline))
        if heldout_images is None:
            left = images_outside_subset(len(images), spec)
            heldout_images = min(AUTO_HELDOUT, left) if left >= spec.batch_size else 0
            if not heldout_images:
                log.warning("no held-out scoring: only %d images lie outside the training subset", left)
        held = heldout_batches(images, spec, heldout_images) if heldout_images else None
        log_replay_batches(ddpm, replay["dataset"], batches, TRAINING, run)
        if held:
            log_replay_batches(ddpm, replay["dataset"], held, HELDOUT, run)

        held_images = len(held) * spec.batch_size if held else 0
        if every is None:
            update_images = config.accumulation * spec.batch_size * config.samples
            every = auto_eval_every(held_images, update_images, planned_updates(len(baseline), config))
        run.log_metrics({"heldout_images": held_images, "eval_every_updates": every})

        on = device()
        if recorded.get("device", on.type) != on.type:
            log.warning("the baseline ran on %s, this run on %s: the losses will not replay to the last bit", recorded["device"], on.type)
        unet = ddpm.unet.to(on)
        # The same model as the baseline's (masks, layout, compile: maskdm.method.replay.replay_model); masks
        # are swapped on ``unet``, whose buffers ``model`` reads.
        model = replay_model(unet, masks, fast)
        trainer = MaskTrainer(
            unet, masks, policy, ReplayedLosses(model, ddpm.scheduler, batches, on, fast, group), baseline, config,
            heldout_loss=ReplayedLosses(model, ddpm.scheduler, held, on, fast, group) if held else None,
            heldout_batches=len(held) if held else 0, eval_every=every,
        )
        log.info(
            "train_masks: %d layers, %d updates of %d sample(s) x %d batches of %d on %s (%s, %d batches per forward pass); "
            "held-out %d batches, scored every %s updates",
            len(policy.names), trainer.total_updates(), config.samples, config.accumulation, spec.batch_size, on,
            fast.describe(), group, len(held) if held else 0, trainer.eval_every or "-",
        )
        flip_charts = FlipCharts(run, trainer, masks, trainer.total_updates())

        def on_heldout(point) -> None:
            run.log_metrics({"heldout_loss": point.loss}, step=point.step)
            flip_charts.maybe(point.step)

        started = time.perf_counter()
        trainer.run(on_update=lambda m: run.log_metrics(m.as_metrics(), step=m.step), on_heldout=on_heldout)
        run.log_metrics({"train_wall_s": time.perf_counter() - started})
        flip_charts.maybe(trainer.state.updates, final=True)
        log.info("mask work %.1f%%, held-out scoring %.1f%% of the time (forward passes %.1f s, masks %.1f s, held-out %.1f s)",
                 100 * trainer.timings.mask_share, 100 * trainer.timings.heldout_share, trainer.timings.forward_s,
                 trainer.timings.mask_s, trainer.timings.heldout_s)

        learned = trainer.final_masks()
        if held:
            result = trainer.heldout_result()
            run.log_metrics(result.as_metrics())
            log.info("held-out loss: initial mask %.5f, final mask %.5f (improvement %.2e +- %.1e)",
                     *(result.as_metrics()[k] for k in ("heldout_loss_initial", "heldout_loss_final", "heldout_improvement", "heldout_improvement_se")))
        save_masks(learned, run.out / MASKS_FILE)
        save_logits(run.out / "logits.safetensors", policy, trainer.state, pattern, {"baseline_run_id": up.run_id, "targets": target_spec})
        if trainer.history:
            plot_training_curves(trainer.history, run.out / "training_curves.png", trainer.heldout_history)
        flips = sum(int((learned[k] != masks[k]).sum()) for k in masks) / sum(m.numel() for m in masks.values())
        run.log_metrics({"final_mask_flip_rate": flips, "final_sparsity": mask_sparsity(learned)})

        set_masks(unet, learned)
        unet.to(memory_format=torch.contiguous_format)  # saved weights are plain contiguous tensors
        bake_masks(unet)
        assert_sparse_as(unet, learned)
        run.log_model(ddpm, stage_dataset(ddpm, replay["dataset"], "eval", run=run), on)


def pruner_logits(masks_run, masks, names, pattern, temperature):
    """init=pruner: logits from the scores the prune run behind ``masks_run`` (extract_masks) recorded."""
    prune_run_id = masks_run.lineage.get("prune")
    if not prune_run_id:
        raise MaskDMError(f"init=pruner: masks run {masks_run.run_id} records no prune run (tag maskdm.upstream.prune)")
    prune_run = get_upstream(prune_run_id, ["prune"], None, "init=pruner: the masks' prune run")
    if not prune_run.has_artifact(SCORES_FILE):
        raise MaskDMError(
            f"init=pruner: prune run {prune_run_id} (pruner={prune_run.params.get('pruner', '?')}) recorded no {SCORES_FILE} "
            "(pruner=random has no scores; older runs recorded none): use init=constant or rerun prune"
        )
    scores, meta = load_scores(prune_run.download(SCORES_FILE))
    log.info("init=pruner: logits from prune run %s's %s scores (chosen per %s)", prune_run_id, meta.get("pruner"), meta["selection"])
    return score_logits(scores, masks, names, pattern, temperature, meta["selection"], meta.get("pruner", "the pruner"))


#: At most about this many layer-flip charts per run (one per held-out score, thinned out).
MAX_FLIP_CHARTS = 50
FLIP_CHART_KEY = "mask_flips"


class FlipCharts:
    """The per-layer flips of the final mask vs the initial one, logged as the image ``mask_flips``
    at held-out scoring steps (at most about :data:`MAX_FLIP_CHARTS`) and at the end, so the
    run page's slider shows where mask learning changes the network as it trains."""

    def __init__(self, run, trainer, initial, total_updates: int):
        self.run, self.trainer, self.initial = run, trainer, initial
        self.every = max(1, total_updates // MAX_FLIP_CHARTS)
        self.last: int | None = None

    def maybe(self, step: int, final: bool = False) -> None:
        if step == self.last or (not final and self.last is not None and step - self.last < self.every):
            return
        self.last = step
        path = self.run.out.parent / f"{self.run.out.name}-flips.png"  # not under out/: an image, not an artifact file
        plot_layer_flips(self.initial, self.trainer.final_masks(), path, step)
        self.run.log_image(path, FLIP_CHART_KEY, step)
        path.unlink(missing_ok=True)


def given_fast_path(mixed_precision: str, channels_last: str, compile_unet: str) -> dict[str, str | None]:
    """The fast-path options as the baseline records them (None = auto = the baseline's), checked before any work."""
    given: dict[str, str | None] = {"mixed_precision": None, "channels_last": None, "compile": None}
    if str(mixed_precision).strip().lower() != "auto":
        given["mixed_precision"] = resolve_mixed_precision(mixed_precision)
    if str(channels_last).strip().lower() != "auto":
        given["channels_last"] = "true" if resolve_channels_last(channels_last) else "false"
    if str(compile_unet).strip().lower() != "auto":
        given["compile"] = "true" if resolve_compile(compile_unet) else "false"
    return given
