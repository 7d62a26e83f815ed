"""prune: zero weights of a DDPM (magnitude/random/taylor, unstructured or N:M, per layer or global).

``taylor`` ranks weights by their first-order Taylor importance on replayed training minibatches
(:mod:`maskdm.taylor`), so it needs a dataset: the option, else the model's lineage. It does not
fall back to cifar10 as eval_loss does: importance measured on another dataset than the model's
would prune by the wrong data without a word.
"""

from __future__ import annotations

import logging

import click
import torch

from entrypoints.common import integer, number, optional, save_preview, stage
from entrypoints.datasets import log_replay_batches, stage_dataset
from maskdm.dataset_inputs import CALIBRATION
from maskdm.errors import MaskDMError
from maskdm.masks import DEFAULT_PROTECT, MASKS_FILE, prunable_modules, save_masks
from maskdm.pruning import PruneConfig, prune, pruning_stats, summarize, write_stats
from maskdm.taylor import TaylorConfig, taylor_batches, taylor_scores

log = logging.getLogger(__name__)

#: The dataset eval_loss is measured on when neither the option nor the model's lineage names one.
FALLBACK_DATASET = "cifar10"


@click.command("prune", help="Prune a DDPM's Conv2d/Linear weights; pruning_ratio 0 gives the dense reference.")
@click.option("--model", default="demo", show_default=True, help="Hub id, local folder, run ID, runs:/<id>/model or demo.")
@click.option("--dataset", default=None, help="Dataset for eval_loss [default: the model's lineage, else cifar10].")
@click.option("--pruning_ratio", default="0.3", show_default=True, help="Share of prunable weights to zero, in [0, 1).")
@click.option("--pruner", default="magnitude", show_default=True, help="magnitude, random or taylor (needs a dataset).")
@click.option("--pattern", default="unstructured", show_default=True, help="unstructured or N:M (e.g. 2:4).")
@click.option("--scope", default="layer", show_default=True, help="layer (each layer to the ratio) or global.")
@click.option("--protect", default=",".join(DEFAULT_PROTECT), show_default=True, help="Name substrings of layers left dense.")
@click.option("--seed", default="0", show_default=True, help="Seed of the random pruner, taylor's replayed batches and the preview.")
@click.option("--taylor_batches", default="8", show_default=True, help="taylor: replayed training minibatches the importance is measured on.")
@click.option("--taylor_batch_size", default="32", show_default=True, help="taylor: images per minibatch.")
@click.option("--taylor_threshold", default="0", show_default=True, help="taylor: stop once the accumulated gradient changes by at most this share (0 = use every sample).")
def command(**params) -> None:
    with stage("prune", params) as run:
        # Validate everything before loading anything.
        config = PruneConfig(
            ratio=params["pruning_ratio"], pruner=params["pruner"], pattern=params["pattern"],
            scope=params["scope"], protect=params["protect"], seed=params["seed"],
        )
        taylor = TaylorConfig(
            batches=integer("taylor_batches", params["taylor_batches"]),
            batch_size=integer("taylor_batch_size", params["taylor_batch_size"]),
            threshold=number("taylor_threshold", params["taylor_threshold"]), seed=config.seed,
        )
        ddpm = run.resolve_model(params["model"])
        named_dataset = optional(params["dataset"]) or run.param("dataset")
        if config.pruner == "taylor" and not named_dataset:
            raise MaskDMError(
                "pruner=taylor measures importance on training images, but no dataset is given and the model's lineage "
                "records none: pass dataset (e.g. --dataset shapes)"
            )
        dataset = named_dataset or FALLBACK_DATASET
        run.log_params({
            "dataset": dataset, "pruning_ratio": config.ratio, "pruner": config.pruner, "pattern": config.pattern,
            "taylor_batches": taylor.batches, "taylor_batch_size": taylor.batch_size, "taylor_threshold": taylor.threshold,
        })
        eval_split = stage_dataset(ddpm, dataset, "eval", run=run)  # fails here, before any work

        scores = None
        if config.pruner == "taylor" and prunable_modules(ddpm.unet, config.protect):  # none: prune says "nothing to prune"
            # The training split without augmentation: the replay needs the same pixels every pass.
            batches = taylor_batches(stage_dataset(ddpm, dataset, "train", augment=False, run=run, context=None), taylor)
            log_replay_batches(ddpm, dataset, batches, CALIBRATION, run)
            on = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            importance = taylor_scores(
                ddpm.unet.to(on), ddpm.scheduler, prunable_modules(ddpm.unet, config.protect), batches, taylor.threshold, on,
            )
            ddpm.unet.to("cpu")
            scores = importance.scores
            run.log_metrics(importance.metrics())

        result = prune(ddpm.unet, config, scores)
        stats = pruning_stats(ddpm.unet, result)
        log.info(summarize(stats))
        write_stats(stats, run.out / "pruning_stats.json")
        # The exact masks applied (True = kept): extract_masks reads them rather than re-deriving them
        # from zeros, which would count a kept weight that happens to be 0 as pruned.
        save_masks(result.masks, run.out / MASKS_FILE)
        run.log_metrics({
            "sparsity": stats["sparsity"],
            "params_total": stats["params_total"],
            "params_nonzero": stats["params_nonzero"],
            "compression_ratio": stats["compression_ratio"],
            "compact_checkpoint_bytes": stats["compact_checkpoint_bytes"],
            "dense_checkpoint_bytes": stats["dense_checkpoint_bytes"],
        })
        run.log_model(ddpm, eval_split)
        save_preview(ddpm, run.out / "preview.png", seed=config.seed)
