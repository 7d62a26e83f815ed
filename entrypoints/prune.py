"""prune: zero weights of a DDPM (magnitude/random, unstructured or N:M, per layer or global)."""

from __future__ import annotations

import logging

import click

from entrypoints.common import optional, save_preview, stage
from maskdm.data import load_dataset
from maskdm.masks import DEFAULT_PROTECT, MASKS_FILE, save_masks
from maskdm.pruning import PruneConfig, prune, pruning_stats, summarize, write_stats

log = logging.getLogger(__name__)

#: The dataset eval_loss is measured on when neither the option nor the model's lineage names one.
FALLBACK_DATASET = "cifar10"


@click.command("prune", help="Prune a DDPM's Conv2d/Linear weights; pruning_ratio 0 gives the dense reference.")
@click.option("--model", default="demo", show_default=True, help="Hub id, local folder, run ID, runs:/<id>/model or demo.")
@click.option("--dataset", default=None, help="Dataset for eval_loss [default: the model's lineage, else cifar10].")
@click.option("--pruning_ratio", default="0.3", show_default=True, help="Share of prunable weights to zero, in [0, 1).")
@click.option("--pruner", default="magnitude", show_default=True, help="magnitude or random.")
@click.option("--pattern", default="unstructured", show_default=True, help="unstructured or N:M (e.g. 2:4).")
@click.option("--scope", default="layer", show_default=True, help="layer (each layer to the ratio) or global.")
@click.option("--protect", default=",".join(DEFAULT_PROTECT), show_default=True, help="Name substrings of layers left dense.")
@click.option("--seed", default="0", show_default=True, help="Seed of the random pruner and the preview.")
def command(**params) -> None:
    with stage("prune", params) as run:
        # Validate everything before loading anything.
        config = PruneConfig(
            ratio=params["pruning_ratio"], pruner=params["pruner"], pattern=params["pattern"],
            scope=params["scope"], protect=params["protect"], seed=params["seed"],
        )
        ddpm = run.resolve_model(params["model"])
        dataset = optional(params["dataset"]) or run.param("dataset") or FALLBACK_DATASET
        run.log_params({"dataset": dataset, "pruning_ratio": config.ratio, "pruner": config.pruner, "pattern": config.pattern})
        eval_split = load_dataset(dataset, ddpm.resolution, split="eval")  # fails here, before any work

        result = prune(ddpm.unet, config)
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
