"""Prune-only comparison on the demo model: held-out eval_loss right after magnitude, wanda and sparsegpt.

Usage (a tracking store holding a demo model, e.g. after ``maskdm pretrain``):

    MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db OMP_NUM_THREADS=1 python benchmarks/oneshot_vs_magnitude.py [--ratios 0.5] [--calib_samples 64]

The library path of the ``prune`` stage (layer scope, unstructured, the default ``protect``,
seed 0, calibration on the shapes training split as the stage does), then ``eval_loss`` on the
eval protocol's held-out images (the first 256 of the evaluation split): no finetune.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import mlflow
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskdm.ddpm.data import load_dataset  # noqa: E402
from maskdm.ddpm.diffusion import eval_images, eval_loss  # noqa: E402
from maskdm.masks import prunable_modules  # noqa: E402
from maskdm.ddpm.models import load_ddpm  # noqa: E402
from maskdm.method.oneshot import CalibConfig, calibration_batches, calibration_samples, sparsegpt_prune, wanda_scores  # noqa: E402
from maskdm.method.pruning import PruneConfig, prune  # noqa: E402
from maskdm.tracking import demo_model_run_id  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.5")
    parser.add_argument("--calib_samples", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    ddpm = load_ddpm(mlflow.artifacts.download_artifacts(run_id=demo_model_run_id(), artifact_path="model"))
    train = load_dataset("shapes", ddpm.resolution, split="train", augment=False)
    images = eval_images(load_dataset("shapes", ddpm.resolution, split="eval"))
    print(f"dense eval_loss {eval_loss(ddpm.unet, ddpm.scheduler, images):.5f}", flush=True)
    calib = CalibConfig(samples=args.calib_samples)
    samples = calibration_samples(calibration_batches(train, calib), int(ddpm.scheduler.config.num_train_timesteps), calib)
    for ratio in (float(r) for r in args.ratios.split(",")):
        for pruner in ("magnitude", "wanda", "sparsegpt"):
            model = copy.deepcopy(ddpm)
            config = PruneConfig(ratio=ratio, pruner=pruner)
            modules = prunable_modules(model.unet, config.protect)
            if pruner == "sparsegpt":
                sparsegpt_prune(model.unet, model.scheduler, modules, samples, config, calib, progress=False)
            else:
                scores = wanda_scores(model.unet, model.scheduler, modules, samples, calib.batch_size, progress=False) if pruner == "wanda" else None
                prune(model.unet, config, scores)
            print(f"{pruner:>10}  ratio {ratio}  calib {args.calib_samples}  eval_loss {eval_loss(model.unet, model.scheduler, images):.5f}", flush=True)


if __name__ == "__main__":
    main()
