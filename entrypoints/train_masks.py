"""train_masks: learn masks for the original dense weights by policy gradient (MaskPro).

Everything that fixes the minibatches (dataset, dataset_size, batch_size, max_batches, seed and
the sampling protocol) comes from the baseline run; a given value that contradicts it is an error.
Each update samples one mask from the logits, measures it on ``accumulation`` replayed batches and
moves the logits against the reward ``loss - baseline_loss`` (see :mod:`maskdm.maskpro`).
``max_step`` counts updates and ``epoch`` passes over the subset; training stops at whichever comes
first (0 = no limit for that one).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import click
import numpy as np

from entrypoints.baseline_loss import LOSSES_FILE, MASKS_FILE, SUMMARY_FILE, device, integer, replay_dataset
from entrypoints.common import optional, stage
from maskdm.errors import MaskDMError
from maskdm.maskpro import (
    MaskTrainer,
    ReplayBatches,
    ReplaySpec,
    TrainConfig,
    check_protocol,
    make_policy,
    plot_training_curves,
    replayed_loss,
    resolve_from_baseline,
    save_logits,
    select_targets,
)
from maskdm.masks import assert_sparse_as, bake_masks, check_masks_fit, load_masks, mask_sparsity, save_masks, set_masks
from maskdm.tracking import get_upstream

log = logging.getLogger(__name__)


def number(name: str, value: str) -> float:
    try:
        return float(str(value).strip())
    except ValueError:
        raise MaskDMError(f"{name} must be a number, not '{value}'") from None


def read_baseline(up) -> tuple[dict, np.ndarray]:
    summary = json.loads(up.download(SUMMARY_FILE).read_text())
    losses = np.load(up.download(LOSSES_FILE), allow_pickle=False)
    return summary, losses


@click.command("train_masks", help="Learn masks for the original dense weights by policy gradient (MaskPro).")
@click.option("--baseline_run_id", required=True, help="MLflow run ID of a baseline_loss run.")
@click.option("--lr", default="1.0", show_default=True, help="Learning rate of the logits.")
@click.option("--epoch", default="2000", show_default=True, help="At most this many passes over the subset (0 = no limit).")
@click.option("--logits", default="5.0", show_default=True, help="Initial logit magnitude: +logits where the initial mask keeps, -logits elsewhere.")
@click.option("--max_step", default="15000", show_default=True, help="At most this many updates (0 = no limit).")
@click.option("--accumulation", default="16", show_default=True, help="Batches per update.")
@click.option("--targets", default="", help="Layers to train: all or prefixes [default: the baseline run's].")
@click.option("--dataset", default="", help="[default: the baseline run's; another value is an error]")
@click.option("--dataset_size", default="", help="[default: the baseline run's; another value is an error]")
@click.option("--batch_size", default="", help="[default: the baseline run's; another value is an error]")
@click.option("--seed", default="", help="[default: the baseline run's; another value is an error]")
def command(baseline_run_id, lr, epoch, logits, max_step, accumulation, targets, dataset, dataset_size, batch_size, seed) -> None:
    params = dict(
        baseline_run_id=baseline_run_id, lr=lr, epoch=epoch, logits=logits, max_step=max_step, accumulation=accumulation,
        targets=targets, dataset=dataset, dataset_size=dataset_size, batch_size=batch_size, seed=seed,
    )
    with stage("train_masks", params) as run:
        config = TrainConfig(
            lr=number("lr", lr), epoch=integer("epoch", epoch, minimum=0), max_step=integer("max_step", max_step, minimum=0),
            accumulation=integer("accumulation", accumulation), seed=0,
        )
        magnitude = number("logits", logits)
        up = run.upstream(baseline_run_id, ["baseline_loss"], [SUMMARY_FILE, LOSSES_FILE], "baseline_run_id")
        summary, baseline = read_baseline(up)
        given = {k: optional(v) for k, v in dict(dataset=dataset, dataset_size=dataset_size, batch_size=batch_size, seed=seed).items()}
        replay = resolve_from_baseline(summary, given)
        recorded = summary["params"]
        config = dataclasses.replace(config, seed=int(replay["seed"]))
        pattern = recorded["pattern"]
        target_spec = optional(targets) or recorded["targets"]
        run.log_params({"dataset": replay["dataset"], "pattern": pattern})

        masks_run = get_upstream(recorded["masks_run_id"], ["extract_masks"], MASKS_FILE, "the baseline run's masks run")
        masks = load_masks(masks_run.download(MASKS_FILE))
        policy = make_policy(pattern, masks, select_targets(masks, target_spec), magnitude)

        ddpm = run.load_lineage_model()
        check_masks_fit(ddpm.unet, masks)
        if int(ddpm.scheduler.config.num_train_timesteps) != int(recorded["num_train_timesteps"]):
            raise MaskDMError("the model's scheduler has another num_train_timesteps than the baseline run's: the draws would differ")
        spec = ReplaySpec(int(replay["dataset_size"]), int(replay["batch_size"]), int(recorded["max_batches"]), int(replay["seed"]))
        batches = ReplayBatches(replay_dataset(replay["dataset"], ddpm.resolution), spec)
        check_protocol(summary, batches, len(baseline))

        on = device()
        unet = ddpm.unet.to(on)
        trainer = MaskTrainer(unet, masks, policy, lambda b: replayed_loss(unet, ddpm.scheduler, batches, b, on), baseline, config)
        log.info(
            "train_masks: %d layers, %d updates of %d batches of %d on %s",
            len(policy.names), trainer.total_updates(), config.accumulation, spec.batch_size, on,
        )
        trainer.run(on_update=lambda m: run.log_metrics(m.as_metrics(), step=m.step))
        log.info("mask work %.1f%% of the time (forward passes %.1f s, masks %.1f s)",
                 100 * trainer.timings.mask_share, trainer.timings.forward_s, trainer.timings.mask_s)

        learned = trainer.final_masks()
        save_masks(learned, run.out / MASKS_FILE)
        save_logits(run.out / "logits.safetensors", policy, trainer.state, pattern, {"baseline_run_id": up.run_id, "targets": target_spec})
        if trainer.history:
            plot_training_curves(trainer.history, run.out / "training_curves.png")
        flips = sum(int((learned[k] != masks[k]).sum()) for k in masks) / sum(m.numel() for m in masks.values())
        run.log_metrics({"final_mask_flip_rate": flips, "final_sparsity": mask_sparsity(learned)})

        set_masks(unet, learned)
        bake_masks(unet)
        assert_sparse_as(unet, learned)
        run.log_model(ddpm, replay["dataset"], on)
