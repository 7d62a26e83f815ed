"""What every stage command shares: logging setup and the user-error boundary.

torch is imported inside the functions that use it: the driver (``maskdm main``) imports this module
and never needs torch, whose import costs it seconds of CPU per start.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from contextlib import contextmanager

import click

from maskdm.errors import MaskDMError
from maskdm.tracking import StageRun, stage_run


def configure_logging() -> None:
    # Download progress bars would otherwise stand between a user and the one error line.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # MLflow and diffusers are chatty at INFO; their warnings still show.
    for noisy in ("mlflow", "diffusers", "urllib3", "httpx", "alembic", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(message: str) -> None:
    """Print the one-line user error and exit non-zero."""
    click.echo(f"maskdm: error: {' '.join(str(message).split())}", err=True)
    sys.exit(1)


@contextmanager
def stage(name: str, params: Mapping[str, object]):
    """Run a stage body inside its MLflow run; a :class:`MaskDMError` becomes one line and a FAILED run.

    SIGTERM (a scheduler's stop, ``kill``, the launcher stopping the other processes of a job)
    ends the run as Ctrl-C does: KILLED, with none of its artifacts logged, instead of RUNNING for good.
    """
    configure_logging()
    previous = None
    # Only the main thread may set handlers; a stage that set its own (sample's, which ends a
    # multi-process job FAILED with its one line) keeps it.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with stage_run(name, params) as run:
            yield run
    except MaskDMError as exc:
        fail(str(exc))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def distributed_stage(name: str, params: Mapping[str, object]):
    """:func:`stage` for a command that may run as several processes (``torchrun``, ``accelerate launch``).

    Yields ``(state, run)``: accelerate's ``PartialState`` (the process group started, with
    :data:`maskdm.ddpm.training.COLLECTIVE_TIMEOUT`) and, on the main process only, the stage's one
    MLflow run (``None`` on the others, which never touch it). A :class:`MaskDMError` on any process
    is its one line and exit 1. When one process fails, the launcher stops the others with SIGTERM:
    the main process takes it as Ctrl-C, so its run ends KILLED instead of staying RUNNING (or
    FAILED, when its own collective failed first and it is already ending the run).
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from maskdm.ddpm.training import COLLECTIVE_TIMEOUT

    # Without CUDA, several processes (torchrun, accelerate launch --cpu) share the work over gloo.
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=COLLECTIVE_TIMEOUT)
    if state.is_main_process:
        with stage(name, params) as run:  # its SIGTERM handler ends the run KILLED, one process or several
            yield state, run
    else:
        configure_logging()
        try:
            yield state, None
        except MaskDMError as exc:
            fail(str(exc))


def _interrupt(signum, frame):
    # A rank already failing (its collective broke when a peer died) is ending its run as FAILED when
    # the launcher's SIGTERM comes: interrupting that would leave the run RUNNING, so it finishes.
    if sys.exc_info()[0] is not None:
        return
    raise KeyboardInterrupt


def optional(value: str | None) -> str | None:
    """MLproject parameters cannot be absent, so ``""`` (and ``none``) stand for "not given"."""
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    return str(value).strip()




def integer(name: str, value: str, minimum: int = 1) -> int:
    """An integer option, checked inside the run so a bad value fails it with one line."""
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise MaskDMError(f"{name} must be an integer >= {minimum}, not '{value}'")
    return number


def number(name: str, value: str) -> float:
    """A finite float option, checked inside the run."""
    try:
        parsed = float(str(value).strip())
    except ValueError:
        parsed = None
    if parsed is None or parsed != parsed or parsed in (float("inf"), float("-inf")):
        raise MaskDMError(f"{name} must be a number, not '{value}'")
    return parsed


def truth(value: object) -> bool | None:
    """``true``/``false`` (as MLproject spells them; also 1/0, yes/no, any case) as a bool; None otherwise."""
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    return None


def boolean(name: str, value: str) -> bool:
    """:func:`truth`, checked inside the run: anything else fails it with one line."""
    parsed = truth(value)
    if parsed is None:
        raise MaskDMError(f"{name} must be true or false, not '{value}'")
    return parsed


def choice(name: str, value: str, choices) -> str:
    """One of ``choices``, checked inside the run."""
    text = str(value).strip()
    if text not in choices:
        raise MaskDMError(f"{name} must be one of {', '.join(choices)}, not '{value}'")
    return text


#: The image key of the sample grids pretrain and finetune log at each checkpoint
#: (``mlflow.log_image`` with the step: the run page shows them with a slider over the steps).
PREVIEW_KEY = "preview"
#: Images in a model stage's preview grid (its ``preview_images`` option): 64 at 25 DDIM steps is a
#: second at the demo's 16x16 on a CPU, but 16 s at 64x64, once per grid.
PREVIEW_IMAGES = 64


def save_preview(ddpm, path, num_images: int = 64, ddim_steps: int = 25, seed: int = 0) -> None:
    """A fixed-seed DDIM sample grid: the quick look at a model that every model stage logs.

    ``quad`` spacing puts most of the 25 steps at low noise, where the details are drawn: for the
    demo model it looks like 100 uniform steps at the cost of 25 (docs/details/pretrain.md).
    """
    import torch

    from maskdm.ddpm.sampling import sample_images, save_grid

    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = sample_images(
        ddpm.unet, ddpm.scheduler.config, range(num_images), steps=ddim_steps, skip_type="quad", seed=seed,
        batch_size=num_images, device=device, codec=ddpm.codec,
        # Latents are not confined to [-1, 1]: clipping them (a DDPMScheduler's default) would
        # distort what is decoded. Pixel models keep their scheduler's choice, as before.
        clip_sample=False if ddpm.is_latent else None,
    )
    save_grid(images, path)


__all__ = ["PREVIEW_KEY", "StageRun", "boolean", "choice", "configure_logging", "distributed_stage", "fail", "integer", "number", "optional", "save_preview", "stage", "truth"]
