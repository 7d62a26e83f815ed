"""sample: DDIM samples of a model run, for FID (``samples.npz``, ``grid.png``, optionally ``pngs/``).

Multi-GPU: launch the console script under ``accelerate launch`` or ``torchrun`` (for example
``torchrun --standalone --nproc_per_node 2 -m entrypoints.cli sample --model_run_id ...``). Each
process makes its contiguous block of image indices (accelerate's ``split_between_processes``);
the main process writes its own block into ``samples.npz`` batch by batch, then each other block
in index order (:class:`SamplesWriter`), and alone opens, logs and ends the MLflow run. Image ``i`` depends on ``(seed, i)`` only, so the result does not depend on the number
of processes or on ``batch_size``.

A failure on one process ends the job: the failing process prints its one-line error and exits
non-zero; the launcher then stops the others with SIGTERM, which the main process turns into a
one-line error and a FAILED run (not a run left RUNNING); a peer that vanishes during a
collective is the same error, and a collective waits at most :data:`COLLECTIVE_TIMEOUT`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from datetime import timedelta

import click
import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from entrypoints.common import configure_logging, fail, stage
from maskdm.ddpm import fastpath
from maskdm.errors import MaskDMError
from maskdm.ddpm.models import load_ddpm
from maskdm.evaluation.npz_stream import NpzWriter
from maskdm.ddpm.sampling import (
    check_sampling_params,
    generate_uint8,
    iter_sample_batches,
    make_run,
    prepare_unet,
    save_grid,
    save_pngs,
    to_uint8,
)
from maskdm.tracking import MODEL_STAGES, Upstream, get_upstream

log = logging.getLogger(__name__)

GRID_IMAGES = 64
#: How long a collective (the start barrier, the gather) waits for a peer before raising, instead
#: of torch's 30 minutes for gloo. The processes start sampling together and make blocks that differ
#: by at most one image, so a wait beyond this is a lost or stuck peer, not a slow one (compilation,
#: which one process may finish later than another, takes well under a minute).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


class PeerLost(MaskDMError):
    """Another process of a multi-process job failed or vanished."""


@dataclass
class Samples:
    wall_s: float
    unet_calls: int  # UNet evaluations per image
    device: str
    mixed_precision: str
    fast_path: str  # FastPath.describe(): the maskdm.fast_path tag


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
@click.option(
    "--channels_last", default="true", show_default=True,
    help="true (NHWC on every device), auto (on CUDA only) or false.",
)
@click.option(
    "--compile", "compile_unet", default="auto", show_default=True,
    help=f"auto (torch.compile on CUDA from {fastpath.COMPILE_MIN_BATCH} images per UNet call), true or false.",
)
def command(**params) -> None:
    # Without CUDA, several processes (torchrun, accelerate launch --cpu) share the work over gloo.
    state = PartialState(
        cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available(), timeout=COLLECTIVE_TIMEOUT
    )
    # The option is called compile (as in MLproject); the Python name avoids shadowing the builtin.
    params["compile"] = params.pop("compile_unet")
    if state.num_processes > 1:
        # The launcher stops the other processes with SIGTERM when one fails; ending as an error
        # (instead of dying on the signal) lets the main process mark its run FAILED.
        signal.signal(signal.SIGTERM, _stopped)
    if state.is_main_process:
        with stage("sample", params) as run:
            check_params(params)
            up = run.upstream(params["model_run_id"], MODEL_STAGES, "model", "model_run_id")
            with SamplesWriter(run.out, params) as writer:
                samples = make_samples(up, params, state, writer)
            run.set_tags({
                "maskdm.device": samples.device,
                "maskdm.num_processes": state.num_processes,
                "maskdm.mixed_precision": samples.mixed_precision,
                "maskdm.fast_path": samples.fast_path,
            })
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


def _stopped(signum, frame) -> None:
    raise PeerLost(
        f"stopped by {signal.Signals(signum).name}: another process of this job failed "
        "(see its error line or the launcher's report) or the job was cancelled"
    )


def check_params(params: dict) -> None:
    """What can be checked before the model is loaded (ddim_steps <= T is checked once it is)."""
    check_sampling_params(
        num_train_timesteps=None,
        steps=params["ddim_steps"],
        skip_type=params["skip_type"],
        eta=params["eta"],
        batch_size=params["batch_size"],
        total_samples=params["total_samples"],
        mixed_precision=params["mixed_precision"],
    )
    # The fast-path choices are checked here too, before any download (the device does not matter).
    fastpath.resolve(params["mixed_precision"], params["channels_last"], params["compile"], device="cpu")


def make_samples(up: Upstream, params: dict, state: PartialState, writer: "SamplesWriter | None" = None) -> Samples:
    """Sample this process's block; the main process hands every block to ``writer`` in index order."""
    ddpm = load_ddpm(str(up.download("model")))
    # Blocks as accelerate splits them (contiguous, sizes differing by at most one, in process
    # order); split_between_processes slices lists, not ranges.
    with state.split_between_processes(list(range(params["total_samples"]))) as indices:
        pass
    # compile=auto judges by the images one UNet call sees: a block smaller than batch_size is one
    # call of that many (the padding to batch_size is only for the compiled path's last batch).
    call_batch = max(1, min(params["batch_size"], len(indices)))
    choices = (params["mixed_precision"], params["channels_last"], params["compile"])
    fast = fastpath.resolve(*choices, device=state.device, batch_size=call_batch)
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
        batch_size=call_batch,
        device=state.device,
        mixed_precision=fast.mixed_precision,
        channels_last=fast.channels_last,
        compile=fast.compile,
        codec=ddpm.codec,
    )
    model = prepare_unet(ddpm.unet, run)
    collective(state.wait_for_everyone)
    span = f"images {indices[0]}..{indices[-1]}" if indices else "no images"
    rank, size = state.process_index, state.num_processes
    log.info("process %d of %d (pid %d): %s, %s", rank, size, os.getpid(), span, fast.describe())
    start = time.perf_counter()
    if state.is_main_process:
        # Written batch by batch as made, then the other processes' blocks one at a time: the main
        # process never holds more than one block besides the batch being written.
        for _, images in iter_sample_batches(model, run, indices, progress=True):
            writer.write(to_uint8(images))
        for rank in range(1, state.num_processes):
            writer.write(collective(receive_block, rank))
    else:
        collective(send_block, generate_uint8(model, run, indices))
    wall_s = time.perf_counter() - start
    if state.is_main_process:
        log.info("%d images in %.1f s on %d process(es)", params["total_samples"], wall_s, state.num_processes)
    return Samples(wall_s, len(run.schedule.steps), str(state.device), fast.mixed_precision, fast.describe())


def collective(fn, *args):
    """``fn(*args)``, a collective: a peer lost during it (the socket closed, the timeout) is one error line."""
    try:
        return fn(*args)
    except RuntimeError as exc:  # gloo's and NCCL's errors (torch.distributed.DistError) are RuntimeErrors
        raise PeerLost(f"another process of this job failed or vanished during a collective ({exc})") from exc


def send_block(block: np.ndarray) -> None:
    """Send this process's block to the main process alone.

    Point to point rather than accelerate's ``gather_object``, which all-gathers: every process would
    hold every image (50,000 LSUN images at 256 px are 9.8 GB) where only the main process, which
    writes ``samples.npz``, needs them, and it takes them one block at a time.
    """
    torch.distributed.send_object_list([block], dst=0)


def receive_block(rank: int) -> np.ndarray:
    received = [None]
    torch.distributed.recv_object_list(received, src=rank)
    return received[0]


class SamplesWriter:
    """``samples.npz`` (images streamed in as made, then the settings), ``grid.png`` and optionally ``pngs/``.

    The archive is finished under its real name only when every image is in it
    (:class:`maskdm.evaluation.npz_stream.NpzWriter`): a failed run leaves no ``samples.npz`` to be scored.
    """

    def __init__(self, out, params: dict):
        self.out, self.params = Path(out), params
        self.total = params["total_samples"]
        self.npz: NpzWriter | None = None
        self.grid: list[np.ndarray] = []
        self.written = 0

    def write(self, images: np.ndarray) -> None:
        if self.npz is None:
            self.npz = NpzWriter(self.out / "samples.npz")
            self.npz.open_array("images", (self.total, *images.shape[1:]), np.uint8)
        self.npz.write_rows(images)
        if self.written < GRID_IMAGES:
            self.grid.append(images[: GRID_IMAGES - self.written])
        if self.params["save_png"]:
            save_pngs(images, self.out / "pngs", range(self.written, self.written + len(images)))
        self.written += len(images)

    def __enter__(self) -> "SamplesWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.npz is None:
            if self.npz is not None:
                self.npz.abort()
            return
        params = self.params
        self.npz.add("indices", np.arange(self.written, dtype=np.int64))
        for key, value in (
            ("seed", np.int64(params["seed"])), ("ddim_steps", np.int64(params["ddim_steps"])),
            ("skip_type", np.str_(params["skip_type"])), ("eta", np.float64(params["eta"])),
            ("clip_sample", np.bool_(params["clip_sample"])),
        ):
            self.npz.add(key, value)
        self.npz.close()
        save_grid(np.concatenate(self.grid), self.out / "grid.png", nrow=8)
