"""sample: DDIM samples of a model run, for FID (``samples.npz``, ``grid.png``, optionally ``pngs/``).

Multi-GPU: launch the console script under ``accelerate launch`` (for example
``accelerate launch -m entrypoints.cli sample --model_run_id ...``). Each process makes its
contiguous block of image indices; the blocks are gathered in index order on the main process,
which alone opens, logs and ends the MLflow run. Image ``i`` depends on ``(seed, i)`` only, so the
result does not depend on the number of processes or on ``batch_size``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import click
import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from entrypoints.common import configure_logging, fail, stage
from maskdm.errors import MaskDMError
from maskdm.models import load_ddpm
from maskdm.sampling import (
    check_sampling_params,
    generate_uint8,
    make_run,
    prepare_unet,
    save_grid,
    save_pngs,
    shard_indices,
)
from maskdm.tracking import MODEL_STAGES, Upstream, get_upstream
from maskdm.training import resolve_mixed_precision

log = logging.getLogger(__name__)

GRID_IMAGES = 64


@dataclass
class Samples:
    images: np.ndarray | None  # uint8 NHWC, all images in index order on the main process, else None
    wall_s: float
    unet_calls: int  # UNet evaluations per image
    device: str
    mixed_precision: str


@click.command("sample", help="DDIM-sample a model run (for FID): samples.npz (uint8 NHWC), grid.png.")
@click.option("--model_run_id", required=True, help="MLflow run ID of any run with a model/ (pretrain, prune, train_masks, finetune).")
@click.option("--total_samples", type=int, default=50000, show_default=True, help="Images to make (at least 2).")
@click.option("--batch_size", type=int, default=256, show_default=True, help="Images per UNet call, per process.")
@click.option("--ddim_steps", type=int, default=100, show_default=True, help="DDIM steps S (at most the training steps T).")
@click.option("--skip_type", default="uniform", show_default=True, help="uniform (every T//S-th step) or quad.")
@click.option("--eta", type=float, default=0.0, show_default=True, help="0 = deterministic DDIM, 1 = DDPM-like noise.")
@click.option(
    "--clip_sample", type=click.BOOL, default=False, show_default=True,
    help="Clip the predicted x0 to [-1, 1] at every step (false: never, as the original DDIM code).",
)
@click.option("--seed", type=int, default=42, show_default=True, help="Image i is determined by (seed, i).")
@click.option("--save_png", type=click.BOOL, default=False, show_default=True, help="Also log pngs/<index>.png.")
@click.option("--mixed_precision", default="auto", show_default=True, help="auto (bf16 on CUDA, no on CPU), no, bf16 or fp16.")
@click.option("--compile", "compile_unet", type=click.BOOL, default=False, show_default=True, help="torch.compile the UNet.")
def command(**params) -> None:
    # Without CUDA, several processes (torchrun, accelerate launch --cpu) share the work over gloo.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    # The option is called compile (as in MLproject); the Python name avoids shadowing the builtin.
    params["compile"] = params.pop("compile_unet")
    if state.is_main_process:
        with stage("sample", params) as run:
            check_params(params)
            up = run.upstream(params["model_run_id"], MODEL_STAGES, "model", "model_run_id")
            samples = make_samples(up, params, state)
            run.set_tags({
                "maskdm.device": samples.device,
                "maskdm.num_processes": state.num_processes,
                "maskdm.mixed_precision": samples.mixed_precision,
            })
            write_outputs(run.out, samples.images, params)
            images_per_s = params["total_samples"] / samples.wall_s
            run.log_metrics({
                "images_per_s": images_per_s,
                "image_steps_per_s": images_per_s * samples.unet_calls,
                "sample_wall_s": samples.wall_s,
            })
    else:
        # Other processes only sample their block; they never touch the main process's run.
        configure_logging()
        try:
            check_params(params)
            make_samples(get_upstream(params["model_run_id"], MODEL_STAGES, "model", "model_run_id"), params, state)
        except MaskDMError as exc:
            fail(str(exc))


def check_params(params: dict) -> None:
    """What can be checked before the model is loaded (ddim_steps <= T is checked once it is)."""
    check_sampling_params(
        num_train_timesteps=None,
        steps=params["ddim_steps"],
        skip_type=params["skip_type"],
        eta=params["eta"],
        batch_size=params["batch_size"],
        total_samples=params["total_samples"],
        mixed_precision=resolve_mixed_precision(params["mixed_precision"]),
    )


def make_samples(up: Upstream, params: dict, state: PartialState) -> Samples:
    ddpm = load_ddpm(str(up.download("model")))
    mixed_precision = resolve_mixed_precision(params["mixed_precision"])
    run = make_run(
        ddpm.unet,
        ddpm.scheduler,
        steps=params["ddim_steps"],
        skip_type=params["skip_type"],
        eta=params["eta"],
        seed=params["seed"],
        # Always explicit: the stage never falls back on the model's scheduler config, whose
        # clip_sample is True for every DDPMScheduler-made model (docs/details/sample.md).
        clip_sample=params["clip_sample"],
        batch_size=params["batch_size"],
        device=state.device,
        mixed_precision=mixed_precision,
        # NHWC convolutions are faster on GPUs and on oneDNN CPUs alike (docs/details/sample.md).
        channels_last=True,
        compile=params["compile"],
    )
    indices = shard_indices(params["total_samples"], state.process_index, state.num_processes)
    model = prepare_unet(ddpm.unet, run)
    state.wait_for_everyone()
    start = time.perf_counter()
    shard = generate_uint8(model, run, indices, progress=state.is_main_process)
    images = gather_in_order(shard, state)
    wall_s = time.perf_counter() - start
    if state.is_main_process:
        log.info("%d images in %.1f s on %d process(es)", params["total_samples"], wall_s, state.num_processes)
    return Samples(images, wall_s, len(run.schedule.steps), str(state.device), mixed_precision)


def gather_in_order(shard: np.ndarray, state: PartialState) -> np.ndarray | None:
    """All processes' blocks concatenated in process (= index) order on the main process; None elsewhere."""
    if state.num_processes == 1:
        return shard
    gathered = [None] * state.num_processes if state.is_main_process else None
    torch.distributed.gather_object(shard, gathered, dst=0)
    return np.concatenate(gathered) if state.is_main_process else None


def write_outputs(out, images: np.ndarray, params: dict) -> None:
    np.savez(
        out / "samples.npz",
        images=images,
        indices=np.arange(len(images), dtype=np.int64),
        seed=np.int64(params["seed"]),
        ddim_steps=np.int64(params["ddim_steps"]),
        skip_type=np.str_(params["skip_type"]),
        eta=np.float64(params["eta"]),
        clip_sample=np.bool_(params["clip_sample"]),
    )
    save_grid(images[:GRID_IMAGES], out / "grid.png", nrow=8)
    if params["save_png"]:
        save_pngs(images, out / "pngs")
