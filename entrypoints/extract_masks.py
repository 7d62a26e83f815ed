"""extract_masks: the masks (True = kept) of a prune run, as safetensors.

The masks are the ones the prune run recorded (its ``masks.safetensors``), checked against its
model's weights: every pruned entry must be exactly zero, while a kept entry may be zero too. A
prune run without recorded masks (made before prune recorded them) falls back to the model's
nonzero pattern, with a warning: there a kept weight that is exactly zero counts as pruned.
"""

from __future__ import annotations

import json
import logging

import click
import torch

from entrypoints.common import stage
from maskdm.errors import MaskDMError
from maskdm.masks import MASKS_FILE, check_masks_match_weights, load_masks, mask_sparsity, masks_from_weights, save_masks
from maskdm.ddpm.models import load_ddpm

log = logging.getLogger(__name__)

#: Written by every prune run; names the layers pruning considered (see entrypoints/prune.py).
PRUNING_STATS = "pruning_stats.json"
#: Where the masks came from: the prune run's record, or (older runs) the model's zeros.
SOURCE_TAG = "maskdm.extracted_from"
RECORDED, ZEROS = "recorded_mask", "weight_zeros"


@click.command("extract_masks", help="Extract the binary masks (True = kept) of a prune run's model.")
@click.option("--prune_run_id", required=True, help="MLflow run ID of a prune run.")
def command(prune_run_id: str) -> None:
    with stage("extract_masks", {"prune_run_id": prune_run_id}) as run:
        up = run.upstream(prune_run_id, ["prune"], ["model", PRUNING_STATS], "prune_run_id")
        stats = json.loads(up.download(PRUNING_STATS).read_text())
        # The masked layers are the ones pruning considered, not every layer that has a zero in it.
        names = list(stats["layers"])
        ddpm = load_ddpm(str(up.download("model")))
        if up.has_artifact(MASKS_FILE):
            masks = recorded_masks(load_masks(up.download(MASKS_FILE)), names, ddpm.unet, up.run_id)
            source = RECORDED
        else:
            log.warning(
                "prune run %s recorded no %s (made before prune recorded its masks): deriving the masks "
                "from the model's zeros, so a kept weight that is exactly zero counts as pruned",
                up.run_id, MASKS_FILE,
            )
            masks = masks_from_weights(ddpm.unet, names)
            source = ZEROS
        save_masks(masks, run.out / MASKS_FILE)

        sparsity = mask_sparsity(masks)
        kept_zeros = kept_zero_count(ddpm.unet, masks)
        run.set_tags({SOURCE_TAG: source})
        lines = [
            f"prune run: {up.run_id}",
            f"source: {source}",
            f"layers: {len(masks)}",
            f"mask sparsity: {sparsity:.6f}",
            f"kept weights that are exactly zero: {kept_zeros}",
            "",
        ]
        lines += [f"{name}\t{tuple(m.shape)}\tkept {int(m.sum())}/{m.numel()}" for name, m in masks.items()]
        (run.out / "extraction_summary.txt").write_text("\n".join(lines) + "\n")
        run.log_metrics({"mask_layers": len(masks), "mask_sparsity": sparsity})


def recorded_masks(masks: dict[str, torch.Tensor], names: list[str], unet, run_id: str) -> dict[str, torch.Tensor]:
    """The prune run's recorded masks, in layer order, once they agree with its stats and its weights."""
    what = f"the masks recorded by prune run {run_id}"
    if set(masks) != set(names):
        extra, missing = sorted(set(masks) - set(names)), sorted(set(names) - set(masks))
        detail = (
            f"prunable layer '{missing[0]}' has no mask" if missing
            else f"layer '{extra[0]}' has a mask but is not a prunable layer there"
        )
        raise MaskDMError(f"{what} do not match its {PRUNING_STATS}: {detail}")
    ordered = {name: masks[name] for name in names}
    check_masks_match_weights(unet, ordered, what)
    return ordered


def kept_zero_count(unet, masks: dict[str, torch.Tensor]) -> int:
    """Kept weights whose value is exactly zero (the ones re-deriving masks from zeros would lose)."""
    modules = dict(unet.named_modules())
    return sum(int(((modules[name].weight.detach() == 0) & mask).sum()) for name, mask in masks.items())
