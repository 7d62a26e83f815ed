"""pretrain: train a DDPM from scratch; its defaults are the embedded demo model's configuration.

Several processes (``torchrun --nproc_per_node N -m entrypoints.cli pretrain ...`` or ``accelerate
launch``) train together; only the main process opens, logs and ends the one MLflow run
(:func:`entrypoints.common.distributed_stage`), as in ``finetune``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import torch

from entrypoints.common import PREVIEW_KEY, distributed_stage, save_preview
from entrypoints.finetune import drop_logged_checkpoints, log_checkpoint
from maskdm import dataset_inputs
from maskdm.ddpm.data import load_dataset
from maskdm.ddpm.models import DDPM, build_unet, count_parameters, default_scheduler
from maskdm.tracking import DEMO_TAG, MODEL_URI_TAG
from maskdm.ddpm.training import DEMO_PRETRAIN as DEMO
from maskdm.ddpm.training import TrainConfig, fast_path, train_ddpm


@click.command("pretrain", help="Train a DDPM from scratch (defaults: the embedded demo model).")
@click.option("--dataset", default=DEMO["dataset"], show_default=True, help="shapes, cifar10 or imagefolder:<path>.")
@click.option("--arch", default=DEMO["arch"], show_default=True, help="UNet preset: tiny, ddpm-cifar10, ddpm-64 or ddpm-256 (each at a resolution its levels can halve).")
@click.option("--resolution", type=int, default=DEMO["resolution"], show_default=True)
@click.option("--num_iters", type=int, default=DEMO["num_iters"], show_default=True, help="Optimizer steps.")
@click.option("--train_batch_size", type=int, default=DEMO["train_batch_size"], show_default=True)
@click.option("--learning_rate", type=float, default=DEMO["learning_rate"], show_default=True)
@click.option("--lr_warmup_steps", type=int, default=DEMO["lr_warmup_steps"], show_default=True)
@click.option("--lr_scheduler", default=DEMO["lr_scheduler"], show_default=True, help="diffusers get_scheduler name: cosine, constant_with_warmup, linear, ...")
@click.option("--beta_schedule", default=DEMO["beta_schedule"], show_default=True, help="Noise schedule saved with the model: squaredcos_cap_v2 (cosine) or linear (google/ddpm-cifar10-32's).")
@click.option("--ema_max_decay", type=float, default=DEMO["ema_max_decay"], show_default=True)
@click.option("--gradient_accumulation_steps", type=int, default=DEMO["gradient_accumulation_steps"], show_default=True)
@click.option("--save_model_steps", type=int, default=DEMO["save_model_steps"], show_default=True)
@click.option("--mixed_precision", default=DEMO["mixed_precision"], show_default=True, help="auto, no, bf16 or fp16.")
@click.option("--channels_last", default=DEMO["channels_last"], show_default=True, help="auto (on for CUDA), true or false.")
@click.option("--compile", "compile_", default=DEMO["compile"], show_default=True, help="auto (on for CUDA from batch 64), true or false: torch.compile the UNet's forward pass.")
@click.option("--seed", type=int, default=DEMO["seed"], show_default=True)
@click.option("--checkpoints_total_limit", type=int, default=DEMO["checkpoints_total_limit"], show_default=True,
              help="Checkpoints kept in the artifact store (oldest deleted; at least one complete is always kept).")
def command(**params) -> None:
    params["compile"] = params.pop("compile_")
    with distributed_stage("pretrain", params) as (state, run):
        is_demo = params == DEMO
        if run is not None:
            run.log_params({"model": "demo" if is_demo else f"runs:/{run.run_id}/model", "pruning_ratio": 0, "pruner": "none", "pattern": "dense"})
            run.set_tags({DEMO_TAG: str(is_demo).lower(), MODEL_URI_TAG: f"runs:/{run.run_id}/model"})

        # Model and settings first: a bad arch, schedule or setting fails before the data is built.
        ddpm = DDPM(build_unet(params["arch"], params["resolution"], seed=params["seed"]), default_scheduler(beta_schedule=params["beta_schedule"]))
        config = TrainConfig(**{k: params[k] for k in TrainConfig.__dataclass_fields__ if k in params})
        config.validate()
        if run is not None:
            fast = fast_path(config, state.device)
            # CPU float sums depend on how many threads split them: a run is reproducible bit for bit
            # given its seed and this thread count (docs/details/pretrain.md#determinism).
            run.log_params({"params_total": count_parameters(ddpm.unet), "torch_threads": torch.get_num_threads()})
            run.set_tags({"maskdm.num_processes": state.num_processes, "maskdm.fast_path": fast.describe()})
        dataset = load_dataset(params["dataset"], params["resolution"], split="train")
        if run is not None:
            dataset_inputs.log_dataset(params["dataset"], "train", dataset_inputs.TRAINING, params["resolution"], dataset)

        def on_checkpoint(path: Path, step: int, ema: DDPM) -> None:
            # As finetune does: bounded in the store (room first, so never more than the limit,
            # even mid-upload), and each with ema.json uploaded last, so a checkpoint is complete
            # exactly when it holds ema.json.
            limit = params["checkpoints_total_limit"]
            drop_logged_checkpoints(run, keep=max(limit - 1, 1))
            log_checkpoint(run, path)
            drop_logged_checkpoints(run, keep=limit)
            # The EMA model's samples at this step: the run page's slider shows the model learning.
            preview = path.parent / f"preview-{step}.png"
            save_preview(ema, preview)
            run.log_image(preview, PREVIEW_KEY, step)
            previewed.add(step)

        previewed: set[int] = set()
        with tempfile.TemporaryDirectory() as checkpoints:
            result = train_ddpm(
                ddpm, dataset, config, checkpoint_dir=Path(checkpoints),
                on_log=run.log_metrics if run else None, on_checkpoint=on_checkpoint if run else None,
            )
        if run is not None:
            run.log_metrics({"train_steps_per_s": result.steps_per_s})
            eval_set = load_dataset(params["dataset"], params["resolution"], split="eval")
            dataset_inputs.log_dataset(params["dataset"], "eval", dataset_inputs.EVALUATION, params["resolution"], eval_set)
            run.log_model(result.ddpm, eval_set)
            save_preview(result.ddpm, run.out / "preview.png")
            if result.steps not in previewed:
                run.log_image(run.out / "preview.png", PREVIEW_KEY, result.steps)
