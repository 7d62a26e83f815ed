"""prune: zero weights of a DDPM (magnitude/random/taylor/wanda/sparsegpt, unstructured or N:M, per layer or global).

``taylor`` ranks weights by their first-order Taylor importance on replayed training minibatches
(:mod:`maskdm.method.taylor`); ``wanda`` and ``sparsegpt`` look at each layer's inputs on replayed
calibration images (:mod:`maskdm.method.oneshot`), and ``sparsegpt`` also changes the kept weights
(``model/`` holds them). These need a dataset: the option, else the model's lineage. They do not
fall back to cifar10 as eval_loss does: importance measured on another dataset than the model's
would prune by the wrong data without a word.

Every pruner but ``random`` records what it ranked by in ``scores.safetensors`` (train_masks
``init=pruner`` starts its logits from it).
"""

from __future__ import annotations

import logging

import click
import torch

from entrypoints.common import PREVIEW_IMAGES, integer, number, optional, save_preview, stage
from entrypoints.datasets import log_replay_batches, stage_dataset
from maskdm.dataset_inputs import CALIBRATION
from maskdm.errors import MaskDMError
from maskdm.masks import DEFAULT_PROTECT, MASKS_FILE, save_masks
from maskdm.method.oneshot import CalibConfig
from maskdm.method.pruners import DATA_PRUNERS, run_pruner
from maskdm.method.pruning import (
    SCORES_FILE,
    PruneConfig,
    apply_pruning,
    pruning_stats,
    save_scores,
    summarize,
    write_stats,
)
from maskdm.method.taylor import TaylorConfig

log = logging.getLogger(__name__)

#: The dataset eval_loss is measured on when neither the option nor the model's lineage names one.
FALLBACK_DATASET = "cifar10"


@click.command("prune", help="Prune a DDPM's Conv2d/Linear weights; pruning_ratio 0 gives the dense reference.")
@click.option("--model", default="demo", show_default=True, help="Hub id, local folder, run ID, runs:/<id>/model or demo.")
@click.option("--dataset", default=None, help="Dataset for eval_loss [default: the model's lineage, else cifar10].")
@click.option("--pruning_ratio", default="0.3", show_default=True, help="Share of prunable weights to zero, in [0, 1).")
@click.option("--pruner", default="magnitude", show_default=True, help="magnitude, random, taylor, wanda or sparsegpt (the last three need a dataset).")
@click.option("--pattern", default="unstructured", show_default=True, help="unstructured or N:M (e.g. 2:4).")
@click.option("--scope", default="layer", show_default=True, help="layer (each layer to the ratio) or global.")
@click.option("--protect", default=",".join(DEFAULT_PROTECT), show_default=True, help="Name substrings of layers left dense.")
@click.option("--seed", default="0", show_default=True, help="Seed of the random pruner, taylor's replayed batches and the preview.")
@click.option("--preview_images", default=str(PREVIEW_IMAGES), show_default=True, help="Images in preview.png, the pruned model's sample grid.")
@click.option("--taylor_batches", default="8", show_default=True, help="taylor: replayed training minibatches the importance is measured on.")
@click.option("--taylor_batch_size", default="32", show_default=True, help="taylor: images per minibatch.")
@click.option("--taylor_threshold", default="0", show_default=True, help="taylor: stop once the accumulated gradient changes by at most this share (0 = use every sample).")
@click.option("--calib_samples", default="64", show_default=True, help="wanda/sparsegpt: training images their layer inputs are collected on.")
@click.option("--calib_timesteps", default="1", show_default=True, help="wanda/sparsegpt: draws of (timestep, noise) per image; 1 = the replay's own draw.")
@click.option("--calib_batch_size", default="16", show_default=True, help="wanda/sparsegpt: images per forward pass (memory only).")
@click.option("--calib_weighting", default="uniform", show_default=True, help="wanda/sparsegpt: uniform, or logdecrease (noisier timesteps count more, OBS-Diff style).")
@click.option("--sparsegpt_damp", default="0.01", show_default=True, help="sparsegpt: damping, a share of the Hessian's mean diagonal (> 0).")
@click.option("--sparsegpt_blocksize", default="128", show_default=True, help="sparsegpt: columns per block (the unstructured mask is chosen per row within a block).")
def command(**params) -> None:
    with stage("prune", params) as run:
        # Validate everything before loading anything.
        config = PruneConfig(
            ratio=params["pruning_ratio"], pruner=params["pruner"], pattern=params["pattern"],
            scope=params["scope"], protect=params["protect"], seed=params["seed"],
        )
        preview_images = integer("preview_images", params["preview_images"])
        taylor = TaylorConfig(
            batches=integer("taylor_batches", params["taylor_batches"]),
            batch_size=integer("taylor_batch_size", params["taylor_batch_size"]),
            threshold=number("taylor_threshold", params["taylor_threshold"]), seed=config.seed,
        )
        calib = CalibConfig(
            samples=integer("calib_samples", params["calib_samples"]), timesteps=integer("calib_timesteps", params["calib_timesteps"]),
            batch_size=integer("calib_batch_size", params["calib_batch_size"]), weighting=params["calib_weighting"],
            damp=number("sparsegpt_damp", params["sparsegpt_damp"]),
            blocksize=integer("sparsegpt_blocksize", params["sparsegpt_blocksize"]), seed=config.seed,
        )
        if config.pruner == "sparsegpt" and config.nm is not None and calib.blocksize % config.nm[1]:
            raise MaskDMError(f"sparsegpt_blocksize={calib.blocksize} is not a multiple of M={config.nm[1]} of pattern {config.pattern}")
        ddpm = run.resolve_model(params["model"])
        named_dataset = optional(params["dataset"]) or run.param("dataset")
        if config.pruner in DATA_PRUNERS and not named_dataset:
            raise MaskDMError(
                f"pruner={config.pruner} measures importance on training images, but no dataset is given and the model's lineage "
                "records none: pass dataset (e.g. --dataset shapes)"
            )
        dataset = named_dataset or FALLBACK_DATASET
        run.log_params({
            "dataset": dataset, "pruning_ratio": config.ratio, "pruner": config.pruner, "pattern": config.pattern,
            "taylor_batches": taylor.batches, "taylor_batch_size": taylor.batch_size, "taylor_threshold": taylor.threshold,
            **calib.to_dict(),
        })
        eval_split = stage_dataset(ddpm, dataset, "eval", run=run)  # fails here, before any work

        train_images = None
        if config.pruner in DATA_PRUNERS:
            # The training split without augmentation: the replay needs the same pixels every pass.
            # Logged as the replayed batches the pruner measured on, not as the whole split.
            train_images = stage_dataset(ddpm, dataset, "train", augment=False, run=run, context=None)
        on = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        outcome = run_pruner(ddpm.unet, ddpm.scheduler, config, train_images, taylor, calib, on)
        result, recorded, calibration = outcome.result, outcome.scores, outcome.calibration
        if outcome.metrics:
            run.log_metrics(outcome.metrics)
        if outcome.batches is not None:
            log_replay_batches(ddpm, dataset, outcome.batches, CALIBRATION, run)
        apply_pruning(ddpm.unet, result.masks)
        stats = pruning_stats(ddpm.unet, result)
        if calibration is not None:
            stats["calibration"] = calibration
        log.info(summarize(stats))
        write_stats(stats, run.out / "pruning_stats.json")
        # The exact masks applied (True = kept): extract_masks reads them rather than re-deriving them
        # from zeros, which would count a kept weight that happens to be 0 as pruned.
        save_masks(result.masks, run.out / MASKS_FILE)
        if recorded is not None:
            save_scores(recorded, run.out / SCORES_FILE, config.pruner, outcome.selection)
        run.log_metrics({
            "sparsity": stats["sparsity"],
            "params_total": stats["params_total"],
            "params_nonzero": stats["params_nonzero"],
            "compression_ratio": stats["compression_ratio"],
            "compact_checkpoint_bytes": stats["compact_checkpoint_bytes"],
            "dense_checkpoint_bytes": stats["dense_checkpoint_bytes"],
        })
        run.log_model(ddpm, eval_split)
        save_preview(ddpm, run.out / "preview.png", num_images=preview_images, seed=config.seed)
