"""baseline_loss: the initial masks' loss on every replayed minibatch, the baseline train_masks needs.

The original dense model of the masks run's lineage (or ``original_model``) carries the extracted
masks as a parametrization. Batch ``b`` is a fixed slice of a fixed subset of the training images
(evaluation transforms: no random flip), noised with the timesteps and noise drawn from
``(seed, b)``: the same draw train_masks replays for batch ``b`` (see :mod:`maskdm.method.replay`).

Forward passes only, so the fast path is bf16 autocast, channels_last, torch.compile (each
``auto``: on for CUDA) and ``forward_batches`` replayed batches per forward pass (``auto``: up to
1,024 images on a fast path). All four change the losses in their last bits, so they are recorded
with the replay parameters and train_masks replays them exactly (tag ``maskdm.fast_path``).
"""

from __future__ import annotations

import json
import logging

import click
import numpy as np
import torch

from entrypoints.common import integer, optional, stage
from entrypoints.datasets import log_replay_batches, stage_dataset
from maskdm.dataset_inputs import TRAINING
from maskdm.errors import MaskDMError
from maskdm.ddpm.fastpath import resolve
from maskdm.method.mask_policy import parse_pattern, select_targets
from maskdm.method.replay import (
    ReplayBatches,
    ReplaySpec,
    auto_forward_batches,
    baseline_summary,
    check_forward_batches,
    compute_baseline_losses,
    replay_settings,
)
from maskdm.masks import check_masks_fit, load_masks

log = logging.getLogger(__name__)

#: The tag every heavy stage sets to its resolved fast path (:meth:`maskdm.ddpm.fastpath.FastPath.describe`).
FAST_PATH_TAG = "maskdm.fast_path"

MASKS_FILE = "masks.safetensors"
LOSSES_FILE = "baseline_losses.npy"
SUMMARY_FILE = "baseline_summary.json"


def replay_dataset(ddpm, name: str, run=None):
    """The training split without augmentation (the replay needs the same pixels every pass); a
    latent model's latents (:func:`entrypoints.datasets.stage_dataset`). Not logged as an input:
    the stage logs the batches it takes of it (:func:`entrypoints.datasets.log_replay_batches`)."""
    return stage_dataset(ddpm, name, "train", augment=False, run=run, context=None)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@click.command("baseline_loss", help="Loss of the original dense model x the extracted masks on every replayed minibatch.")
@click.option("--masks_run_id", required=True, help="MLflow run ID of an extract_masks run.")
@click.option("--original_model", default="", help="The original dense model [default: the masks run's lineage].")
@click.option("--dataset", default="", help="Dataset [default: the masks run's lineage].")
@click.option("--dataset_size", default="20000", show_default=True, help="Images in the fixed subset.")
@click.option("--batch_size", default="64", show_default=True, help="Images per batch.")
@click.option("--max_batches", default="0", show_default=True, help="At most this many batches (0 = no limit).")
@click.option("--targets", default="all", show_default=True, help="all, or comma-separated prefixes (down_blocks, up_blocks, mid_block) train_masks will train.")
@click.option("--seed", default="0", show_default=True, help="Seeds the subset and every batch's timesteps and noise.")
@click.option("--mixed_precision", default="auto", show_default=True, help="auto (bf16 on CUDA), no, bf16 or fp16: autocast of the UNet's forward passes.")
@click.option("--channels_last", default="auto", show_default=True, help="auto (on for CUDA), true or false.")
@click.option("--compile", "compile_unet", default="auto", show_default=True, help="torch.compile the UNet: auto (on for CUDA), true or false.")
@click.option("--forward_batches", default="auto", show_default=True, help="Replayed batches per forward pass: auto (up to 1,024 images on a fast path, else 1) or a divisor of the batch count.")
def command(masks_run_id, original_model, dataset, dataset_size, batch_size, max_batches, targets, seed,
            mixed_precision, channels_last, compile_unet, forward_batches) -> None:
    params = dict(
        masks_run_id=masks_run_id, original_model=original_model, dataset=dataset, dataset_size=dataset_size,
        batch_size=batch_size, max_batches=max_batches, targets=targets, seed=seed, mixed_precision=mixed_precision,
        channels_last=channels_last, compile=compile_unet, forward_batches=forward_batches,
    )
    with stage("baseline_loss", params) as run:
        spec = ReplaySpec(
            integer("dataset_size", dataset_size), integer("batch_size", batch_size),
            integer("max_batches", max_batches, minimum=0), integer("seed", seed, minimum=0),
        )
        on = device()
        fast, group = resolve_fast_path(mixed_precision, channels_last, compile_unet, forward_batches, spec, on)
        up = run.upstream(masks_run_id, ["extract_masks"], [MASKS_FILE], "masks_run_id")
        pattern = up.params.get("pattern") or "unstructured"
        parse_pattern(pattern)  # train_masks cannot train N > 4: say so now, not after the baseline
        masks = load_masks(up.download(MASKS_FILE))
        select_targets(masks, targets)
        dataset_name = optional(dataset) or up.params.get("dataset")
        if not dataset_name:
            raise MaskDMError("the masks run's lineage records no dataset; pass dataset explicitly")
        run.log_params({"dataset": dataset_name})

        ddpm = run.load_lineage_model(optional(original_model))
        check_masks_fit(ddpm.unet, masks)
        batches = ReplayBatches(replay_dataset(ddpm, dataset_name, run), spec)
        log_replay_batches(ddpm, dataset_name, batches, TRAINING, run)
        if group is None:
            group = auto_forward_batches(len(batches), spec.batch_size, fast)
        check_forward_batches(group, len(batches))
        fast = resolve(fast.mixed_precision, fast.channels_last, compile_unet, device=on, batch_size=group * spec.batch_size)
        run.set_tags({FAST_PATH_TAG: fast.describe()})
        log.info("baseline: %d batches of %d images on %s, %d per forward pass (%s)", len(batches), spec.batch_size, on, group, fast.describe())
        losses = compute_baseline_losses(ddpm.unet.to(on), ddpm.scheduler, masks, batches, on, fast=fast, group=group)

        np.save(run.out / LOSSES_FILE, losses)
        summary = baseline_summary(
            losses, batches, dataset=dataset_name, targets=targets, pattern=pattern,
            num_train_timesteps=int(ddpm.scheduler.config.num_train_timesteps), masks_run_id=up.run_id,
            device=on.type, **replay_settings(fast, group),
        )
        (run.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        run.log_metrics({"baseline_loss_mean": summary["mean"], "baseline_loss_std": summary["std"], "baseline_batches": len(losses)})


def resolve_fast_path(mixed_precision: str, channels_last: str, compile_unet: str, forward_batches: str, spec: ReplaySpec, on):
    """The options checked before any work: the fast path (compile as for one batch; resolved again
    once the group is known) and ``forward_batches`` (None = auto)."""
    fast = resolve(mixed_precision, channels_last, compile_unet, device=on, batch_size=spec.batch_size)
    group = None if str(forward_batches).strip().lower() == "auto" else integer("forward_batches", forward_batches)
    return fast, group
