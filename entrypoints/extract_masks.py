"""extract_masks: read a prune run's model and write its masks (True = kept) as safetensors."""

from __future__ import annotations

import json

import click

from entrypoints.common import stage
from maskdm.masks import mask_sparsity, masks_from_weights, save_masks
from maskdm.models import load_ddpm

#: Written by every prune run; names the layers pruning considered (see entrypoints/prune.py).
PRUNING_STATS = "pruning_stats.json"


@click.command("extract_masks", help="Extract the binary masks (True = kept) of a prune run's model.")
@click.option("--prune_run_id", required=True, help="MLflow run ID of a prune run.")
def command(prune_run_id: str) -> None:
    with stage("extract_masks", {"prune_run_id": prune_run_id}) as run:
        up = run.upstream(prune_run_id, ["prune"], ["model", PRUNING_STATS], "prune_run_id")
        stats = json.loads(up.download(PRUNING_STATS).read_text())
        ddpm = load_ddpm(str(up.download("model")))
        # The masked layers are the ones pruning considered, not every layer that has a zero in it.
        masks = masks_from_weights(ddpm.unet, list(stats["layers"]))
        save_masks(masks, run.out / "masks.safetensors")

        sparsity = mask_sparsity(masks)
        lines = [f"prune run: {up.run_id}", f"layers: {len(masks)}", f"mask sparsity: {sparsity:.6f}", ""]
        lines += [f"{name}\t{tuple(m.shape)}\tkept {int(m.sum())}/{m.numel()}" for name, m in masks.items()]
        (run.out / "extraction_summary.txt").write_text("\n".join(lines) + "\n")
        run.log_metrics({"mask_layers": len(masks), "mask_sparsity": sparsity})
