"""Prune-only comparison on the demo model: eval_loss right after pruning, no finetune.

The sweep (``maskdm main --pruner taylor|magnitude --mask_training false``) compares the pruners
at equal finetune; this script asks why the numbers come out as they do, in a few minutes, by
pruning the same demo model with

* ``magnitude``;
* ``taylor`` as the stage does it (``|w * mean g|`` over 8 x 32 replayed samples) and with 4x the
  samples (32 x 32), to see whether the ranking is limited by gradient noise;
* ``sum|w*g|``: the per-chunk absolute Taylor term, summed (the variant :mod:`maskdm.method.taylor`
  does not use; chunks of 32, 8 chunks), for the same reason.

Usage (a tracking store holding a demo model, e.g. after ``maskdm main``):

    MLFLOW_TRACKING_URI=sqlite:////work/taylor_store/mlflow.db python benchmarks/taylor_vs_magnitude.py

Prints one line per (pruner, ratio): layer scope, unstructured, the default ``protect``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import mlflow
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskdm.ddpm.data import load_dataset  # noqa: E402
from maskdm.ddpm.diffusion import NoiseDraw, batch_loss, eval_images, eval_loss  # noqa: E402
from maskdm.masks import prunable_modules  # noqa: E402
from maskdm.ddpm.models import load_ddpm  # noqa: E402
from maskdm.method.pruning import PruneConfig, prune  # noqa: E402
from maskdm.method.taylor import TaylorConfig, replayed_samples, taylor_batches, taylor_scores  # noqa: E402
from maskdm.tracking import demo_model_run_id  # noqa: E402

RATIOS = (0.3, 0.5, 0.7)


def abs_sum_scores(ddpm, dataset, config: TaylorConfig) -> dict[str, torch.Tensor]:
    """sum over chunks of |w * g_chunk| (replayed samples in timestep order, chunks of batch_size)."""
    modules = prunable_modules(ddpm.unet)
    weights = [m.weight for m in modules.values()]
    batches = taylor_batches(dataset, config)
    samples = replayed_samples(batches, int(ddpm.scheduler.config.num_train_timesteps))
    total = {name: torch.zeros(m.weight.shape, dtype=torch.float64) for name, m in modules.items()}
    ddpm.unet.eval()
    for start in range(0, samples.images.shape[0], config.batch_size):
        part = slice(start, start + config.batch_size)
        loss = batch_loss(ddpm.unet, ddpm.scheduler, samples.images[part], NoiseDraw(samples.draw.timesteps[part], samples.draw.noise[part]))
        grads = torch.autograd.grad(loss, weights)
        for (name, w), g in zip(zip(modules, weights), grads):
            total[name] += (w.detach().double() * g.double()).abs()
    return total


def main() -> None:
    torch.manual_seed(0)
    ddpm = load_ddpm(mlflow.artifacts.download_artifacts(run_id=demo_model_run_id(), artifact_path="model"))
    train = load_dataset("shapes", ddpm.resolution, split="train", augment=False)
    images = eval_images(load_dataset("shapes", ddpm.resolution, split="eval"))
    print(f"dense eval_loss {eval_loss(ddpm.unet, ddpm.scheduler, images):.5f}")
    modules = prunable_modules(ddpm.unet)
    scorings = {
        "magnitude": None,
        "taylor 8x32": taylor_scores(ddpm.unet, ddpm.scheduler, modules, taylor_batches(train, TaylorConfig(8, 32)), progress=False).scores,
        "taylor 32x32": taylor_scores(ddpm.unet, ddpm.scheduler, modules, taylor_batches(train, TaylorConfig(32, 32)), progress=False).scores,
        "sum|w*g| 8x32": abs_sum_scores(ddpm, train, TaylorConfig(8, 32)),
    }
    for label, scores in scorings.items():
        for ratio in RATIOS:
            model = copy.deepcopy(ddpm)
            pruner = "magnitude" if scores is None else "taylor"
            prune(model.unet, PruneConfig(ratio=ratio, pruner=pruner), scores)
            print(f"{label:>14}  ratio {ratio}  eval_loss {eval_loss(model.unet, model.scheduler, images):.5f}", flush=True)


if __name__ == "__main__":
    main()
