"""DDIM sampling (Song et al., 2021) over the exact timestep sequences of the original DDIM code.

diffusers' ``DDIMScheduler`` only knows evenly spaced timesteps and derives the previous timestep
as ``t - T // S``, which is wrong for the ``quad`` sequence; so the update (eq. 12 of the paper,
with ``eta``) is done here over an explicit sequence, with the scheduler's own ``alphas_cumprod``,
``final_alpha_cumprod`` and ``prediction_type`` (built with ``DDIMScheduler.from_config`` from the
model's scheduler config, as ``DDIMPipeline`` does). Clipping the predicted x_0 is an explicit
choice (``clip_sample``); only ``clip_sample=None`` takes it from the scheduler config.

The fast path (:mod:`maskdm.ddpm.fastpath`: bf16 autocast of the UNet, channels_last, torch.compile) is
chosen with the same ``auto``/``true``/``false`` spellings as the training stages; the DDIM update
itself always runs in float32. On a trained model it matches the float32 path within
:data:`FAST_PATH_TOLERANCE` per image (docs/details/sample.md, "The fast path").

Reproducibility is per image: image ``i`` draws its initial noise, and then one noise tensor per
step when ``eta > 0``, from a CPU generator seeded by ``(seed, i)`` alone (the draws are moved
to the device afterwards). Image ``i`` is therefore the same whatever the batch size, the number
of processes or the device, up to floating-point rounding of the UNet.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image
from torch import nn
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from maskdm.ddpm import fastpath
from maskdm.ddpm.diffusion import batch_generator
from maskdm.errors import MaskDMError

log = logging.getLogger(__name__)

SKIP_TYPES = ("uniform", "quad")
#: The UNet's autocast dtype per ``mixed_precision`` choice; the DDIM update always runs in float32.
AUTOCAST_DTYPES = fastpath.AUTOCAST_DTYPES
MIXED_PRECISIONS = tuple(AUTOCAST_DTYPES)
#: Per image, the fast path (bf16 autocast, channels_last, compile) against float32 eager with the
#: same seeds: (largest absolute difference in [-1, 1] units, mean absolute difference in uint8
#: grey levels). bf16 keeps 8 bits of mantissa (0.4 % per UNet call) and deterministic DDIM carries
#: those errors to the end without averaging them out; the worst measured, the trained demo model
#: over 100 steps, was (0.155, 1.9), so the bound is about 1.6x and 2x that (docs/details/sample.md).
FAST_PATH_TOLERANCE = (0.25, 4.0)
#: ``clip_sample=True`` clamps the predicted x_0 to [-CLIP_RANGE, CLIP_RANGE]: the data range.
CLIP_RANGE = 1.0

#: A function of the step number (0 for the first, noisiest step) returning the eta noise of the
#: whole batch for that step.
NoiseFn = Callable[[int], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Timesteps and schedule


def check_steps(num_train_timesteps: int, steps: int, skip_type: str) -> None:
    if skip_type not in SKIP_TYPES:
        raise MaskDMError(f"unknown skip_type '{skip_type}': choose one of {', '.join(SKIP_TYPES)}")
    if not 1 <= steps <= num_train_timesteps:
        raise MaskDMError(
            f"ddim_steps must be between 1 and the model's {num_train_timesteps} training timesteps (got {steps})"
        )


def ddim_timesteps(num_train_timesteps: int, steps: int, skip_type: str) -> list[int]:
    """The ascending timestep sequence of the original DDIM code (``runners/diffusion.py``).

    ``uniform``: every ``T // S``-th step from 0, which has more than ``S`` entries when ``S`` does
    not divide ``T`` (as in the original). ``quad``: ``int(x ** 2)`` for ``x`` in
    ``linspace(0, sqrt(0.8 T), S)``, which repeats small timesteps when ``S`` is large (a repeated
    pair is an identity step, as in the original).
    """
    check_steps(num_train_timesteps, steps, skip_type)
    if skip_type == "uniform":
        return list(range(0, num_train_timesteps, num_train_timesteps // steps))
    return [int(s) for s in np.linspace(0, np.sqrt(num_train_timesteps * 0.8), steps) ** 2]


@dataclass(frozen=True)
class DDIMStep:
    """One update ``x_t -> x_next`` (eq. 12 of Song et al.) with its coefficients.

    The coefficients are float32 values computed in float32, in the order the original code and
    diffusers' ``DDIMScheduler.step`` compute them, so that the chain matches them to the bit where
    the timesteps agree (an untrained UNet amplifies a one-ulp difference to 1e-4 within 10 steps).
    """

    t: int
    t_next: int  # -1 for the last step, which lands on x_0
    sqrt_alpha: float  # sqrt(a_t), a = alphas_cumprod
    sqrt_one_minus_alpha: float  # sqrt(1 - a_t)
    sqrt_alpha_next: float  # sqrt(a_next); a_next = final_alpha_cumprod after the last step
    sigma: float  # eta * sqrt((1 - a_next) / (1 - a_t) * (1 - a_t / a_next))
    direction: float  # sqrt(1 - a_next - sigma^2), the weight of the predicted noise


@dataclass(frozen=True)
class DDIMSchedule:
    """What :func:`ddim_sample` needs: the steps (noisiest first) and how to read the model output."""

    steps: tuple[DDIMStep, ...]
    prediction_type: str = "epsilon"
    clip_sample_range: float | None = None  # None: the predicted x_0 is not clipped

    @property
    def timesteps(self) -> list[int]:
        """The timesteps the UNet sees, in sampling (descending) order."""
        return [s.t for s in self.steps]

    @property
    def uses_noise(self) -> bool:
        return any(s.sigma > 0 for s in self.steps)


def make_steps(
    timesteps: Sequence[int], alphas_cumprod: torch.Tensor, final_alpha_cumprod: float, eta: float
) -> tuple[DDIMStep, ...]:
    """The DDIM updates over an ascending ``timesteps`` sequence, as the original generalized_steps."""
    acp = alphas_cumprod.float()
    final = torch.tensor(float(final_alpha_cumprod), dtype=torch.float32)
    previous = [-1] + list(timesteps[:-1])
    steps = []
    for t, t_next in zip(reversed(list(timesteps)), reversed(previous)):
        alpha = acp[t]
        alpha_next = acp[t_next] if t_next >= 0 else final
        variance = ((1 - alpha_next) / (1 - alpha)) * (1 - alpha / alpha_next)
        sigma = eta * variance.clamp(min=0) ** 0.5
        # clamp(): a repeated timestep gives exactly zero, which rounding may push below it.
        direction = (1 - alpha_next - sigma**2).clamp(min=0) ** 0.5
        steps.append(
            DDIMStep(
                t=int(t),
                t_next=int(t_next),
                sqrt_alpha=float(alpha**0.5),
                sqrt_one_minus_alpha=float((1 - alpha) ** 0.5),
                sqrt_alpha_next=float(alpha_next**0.5),
                sigma=float(sigma),
                direction=float(direction),
            )
        )
    return tuple(steps)


def ddim_schedule(
    scheduler_config,
    steps: int,
    skip_type: str = "uniform",
    eta: float = 0.0,
    clip_sample: bool | None = None,
) -> DDIMSchedule:
    """The DDIM schedule of a model, from its scheduler (or scheduler config).

    ``clip_sample``: ``False`` never clips the predicted x_0, as the original DDIM code
    (``generalized_steps``); ``True`` clamps it to [-1, 1], the data range, whatever the config says;
    ``None`` follows the model's scheduler config (``clip_sample``, ``clip_sample_range``), which is
    what ``DDIMPipeline`` does (and clips for every ``DDPMScheduler`` made with its defaults).
    """
    check_eta(eta)
    config = getattr(scheduler_config, "config", scheduler_config)
    ddim = DDIMScheduler.from_config(config)
    if ddim.config.thresholding:
        raise MaskDMError("the model's scheduler uses dynamic thresholding, which DDIM sampling here does not support")
    if ddim.config.prediction_type not in ("epsilon", "sample", "v_prediction"):
        raise MaskDMError(f"unsupported prediction_type '{ddim.config.prediction_type}' in the model's scheduler")
    timesteps = ddim_timesteps(int(ddim.config.num_train_timesteps), steps, skip_type)
    if clip_sample is None:
        clip_range = float(ddim.config.clip_sample_range) if ddim.config.clip_sample else None
    else:
        clip_range = CLIP_RANGE if clip_sample else None
    return DDIMSchedule(
        steps=make_steps(timesteps, ddim.alphas_cumprod, float(ddim.final_alpha_cumprod), eta),
        prediction_type=ddim.config.prediction_type,
        clip_sample_range=clip_range,
    )


def check_eta(eta: float) -> None:
    # Beyond 1 the noise weight exceeds 1 - a_next and the direction term is undefined.
    if not 0.0 <= eta <= 1.0:
        raise MaskDMError(f"eta must be between 0 (DDIM) and 1 (DDPM-like), got {eta}")


def check_sampling_params(
    *,
    num_train_timesteps: int | None,
    steps: int,
    skip_type: str,
    eta: float,
    batch_size: int,
    total_samples: int | None = None,
    mixed_precision: str = "no",
) -> None:
    """All the checks of the ``sample`` stage, so that bad input fails before any work.

    ``num_train_timesteps=None`` (the model not loaded yet) checks only ``ddim_steps >= 1``.
    """
    if total_samples is not None and total_samples < 2:
        # FID needs a covariance, and a covariance needs two images.
        raise MaskDMError(f"total_samples must be at least 2, got {total_samples}")
    if batch_size < 1:
        raise MaskDMError(f"batch_size must be at least 1, got {batch_size}")
    if num_train_timesteps is None:
        if skip_type not in SKIP_TYPES:
            raise MaskDMError(f"unknown skip_type '{skip_type}': choose one of {', '.join(SKIP_TYPES)}")
        if steps < 1:
            raise MaskDMError(f"ddim_steps must be at least 1, got {steps}")
    else:
        check_steps(num_train_timesteps, steps, skip_type)
    check_eta(eta)
    check_mixed_precision(mixed_precision)


def check_mixed_precision(mixed_precision: str) -> None:
    """``auto`` (resolved by :func:`maskdm.ddpm.fastpath.resolve_mixed_precision`), ``no``, ``bf16`` or ``fp16``."""
    if mixed_precision not in fastpath.MIXED_PRECISION_CHOICES:
        choices = ", ".join(fastpath.MIXED_PRECISION_CHOICES)
        raise MaskDMError(f"unknown mixed_precision '{mixed_precision}': choose one of {choices}")


# --------------------------------------------------------------------------------------------
# The sampler


def predict_x0_and_eps(
    model_output: torch.Tensor, x: torch.Tensor, step: DDIMStep, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = step.sqrt_alpha, step.sqrt_one_minus_alpha
    if prediction_type == "epsilon":
        return (x - b * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (x - a * model_output) / b
    return a * x - b * model_output, a * model_output + b * x  # v_prediction


@torch.no_grad()
def ddim_sample(
    unet: nn.Module,
    x_T: torch.Tensor,
    schedule: DDIMSchedule,
    noise_fn: NoiseFn | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Run the DDIM chain from ``x_T``; returns x_0 as float32 (in [-1, 1] up to the model's error).

    ``noise_fn(k)`` gives the noise of step ``k`` (needed when ``eta > 0``; it is drawn at every step,
    as the original does, so the draws of later steps do not depend on which steps have zero sigma).
    The UNet runs under autocast when ``autocast_dtype`` is given; the update stays in float32.
    """
    if schedule.uses_noise and noise_fn is None:
        raise ValueError("eta > 0 needs a noise_fn")
    x = x_T.float()
    device_type = x.device.type
    # One timestep tensor per step, made before the loop: a Python int would make torch.compile
    # specialise (and recompile) on every value.
    t_batches = [torch.full((x.shape[0],), s.t, dtype=torch.long, device=x.device) for s in schedule.steps]
    for k, (step, t) in enumerate(zip(schedule.steps, t_batches)):
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            model_output = unet(x, t, return_dict=False)[0]
        x0, eps = predict_x0_and_eps(model_output.float(), x, step, schedule.prediction_type)
        if schedule.clip_sample_range is not None:
            x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
        x_next = step.sqrt_alpha_next * x0 + step.direction * eps
        if noise_fn is not None:
            noise = noise_fn(k)
            if step.sigma > 0:
                x_next = x_next + step.sigma * noise
        x = x_next
    return x


# --------------------------------------------------------------------------------------------
# Per-image noise and batching


def image_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of image ``index``: determined by ``(seed, index)`` alone."""
    return batch_generator(seed, index)


def draw_per_image(generators: Sequence[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """One ``shape`` draw from each image's generator, stacked (float32, CPU)."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])


def shard_indices(total: int, process_index: int, num_processes: int) -> range:
    """The contiguous block of image indices that one of ``num_processes`` processes makes.

    Blocks differ in size by at most one (the first ``total % num_processes`` get one more), and
    concatenated in process order they are ``range(total)``: the blocks accelerate's
    ``PartialState.split_between_processes(list(range(total)))`` gives, which the ``sample`` stage
    uses (tests/test_sample_fastpath.py checks the two agree).
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} out of range for {num_processes} processes")
    base, extra = divmod(total, num_processes)
    start = process_index * base + min(process_index, extra)
    return range(start, start + base + (process_index < extra))


@dataclass(frozen=True)
class SamplingRun:
    """How to run the sampler: everything except the model and which images (see :func:`make_run`)."""

    schedule: DDIMSchedule
    image_shape: tuple[int, int, int]  # (C, H, W) of what the UNet denoises (for a latent model: the latents)
    seed: int = 42
    batch_size: int = 256
    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None
    #: A latent model's :class:`maskdm.ddpm.latent.LatentCodec`: samples are decoded by it, batch by batch.
    codec: object | None = None

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images handed out: decoded, for a latent model."""
        return self.codec.image_shape(self.image_shape) if self.codec is not None else self.image_shape

    @property
    def fast_path(self) -> fastpath.FastPath:
        """The resolved choices, as the training stages spell them (``describe()`` is the run's tag)."""
        (mixed_precision,) = [name for name, dtype in AUTOCAST_DTYPES.items() if dtype == self.autocast_dtype]
        return fastpath.FastPath(mixed_precision, self.channels_last, self.compile)


def make_run(
    unet: nn.Module,
    scheduler_config,
    *,
    steps: int,
    skip_type: str = "uniform",
    eta: float = 0.0,
    seed: int = 42,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    mixed_precision: str = "no",
    channels_last: bool | str = False,
    compile: bool | str = False,
    compile_mode: str | None = None,
    clip_sample: bool | None = None,
    codec=None,
) -> SamplingRun:
    """Check the options and build the schedule; ``clip_sample`` as in :func:`ddim_schedule`.

    ``mixed_precision``, ``channels_last`` and ``compile`` also take ``auto`` (``true``/``false``
    for the two switches), resolved by :func:`maskdm.ddpm.fastpath.resolve` for ``device`` and for calls
    of ``batch_size`` images (``compile=auto`` compiles on CUDA from ``COMPILE_MIN_BATCH`` images).
    ``codec``: a latent model's autoencoder; the sampled latents are decoded to images.
    """
    config = getattr(scheduler_config, "config", scheduler_config)
    check_sampling_params(
        num_train_timesteps=int(config["num_train_timesteps"]),
        steps=steps,
        skip_type=skip_type,
        eta=eta,
        batch_size=batch_size,
        mixed_precision=mixed_precision,
    )
    fast = fastpath.resolve(mixed_precision, channels_last, compile, device=device, batch_size=int(batch_size))
    schedule = ddim_schedule(config, steps, skip_type, eta, clip_sample)
    log.info(
        "DDIM: %d %s steps from t=%d, eta=%g, %s, %s",
        len(schedule.steps),
        skip_type,
        schedule.timesteps[0],
        eta,
        "x0 not clipped" if schedule.clip_sample_range is None else f"x0 clipped to +-{schedule.clip_sample_range:g}",
        fast.describe(),
    )
    return SamplingRun(
        schedule=schedule,
        image_shape=image_shape(unet),
        seed=int(seed),
        batch_size=int(batch_size),
        device=torch.device(device),
        autocast_dtype=fast.autocast_dtype,
        channels_last=fast.channels_last,
        compile=fast.compile,
        compile_mode=compile_mode,
        codec=codec,
    )


def image_shape(unet: nn.Module) -> tuple[int, int, int]:
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    return int(unet.config.in_channels), int(height), int(width)


def prepare_unet(unet: nn.Module, run: SamplingRun) -> nn.Module:
    """Move ``unet`` (in place) to the run's device in eval mode, channels_last if asked; compile if asked."""
    unet.to(run.device).eval()
    if run.codec is not None:
        run.codec.to(run.device)
    # dynamic=False: every call sees the same shape (the last batch is padded, see sample_batch).
    return run.fast_path.prepare(unet, dynamic=False, mode=run.compile_mode)


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled or previous
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def sample_batch(model: nn.Module, run: SamplingRun, indices: Sequence[int]) -> torch.Tensor:
    """Images ``indices`` as a float32 CPU tensor NCHW in [-1, 1] (up to the model's error).

    ``model`` is the output of :func:`prepare_unet`.
    """
    generators = [image_generator(run.seed, i) for i in indices]
    # A compiled model sees only full batches, so the last one does not trigger a recompile.
    pad = run.batch_size - len(indices) if run.compile else 0
    x_T = _pad(draw_per_image(generators, run.image_shape), pad)
    noise_fn = None
    if run.schedule.uses_noise:

        def noise_fn(_: int) -> torch.Tensor:
            return _to_device(_pad(draw_per_image(generators, run.image_shape), pad), run)

    x0 = ddim_sample(model, _to_device(x_T, run), run.schedule, noise_fn, run.autocast_dtype)[: len(indices)]
    if run.codec is not None:
        # float32 and eager: the autoencoder is not part of the fast path (it runs once per image).
        x0 = run.codec.decode(x0.float().contiguous())
    return x0.float().contiguous().cpu()


def _pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    # Padding rows are zeros; every image is computed independently, so they affect no other image.
    return torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad > 0 else x


def _to_device(x: torch.Tensor, run: SamplingRun) -> torch.Tensor:
    if run.device.type == "cuda":
        x = x.pin_memory().to(run.device, non_blocking=True)
    else:
        x = x.to(run.device)
    return x.contiguous(memory_format=torch.channels_last) if run.channels_last else x


def iter_sample_batches(
    model: nn.Module, run: SamplingRun, indices: Sequence[int], progress: bool = False
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(batch_indices, float images)`` batch by batch, in the order of ``indices``."""
    indices = [int(i) for i in indices]
    with cudnn_benchmark(run.device.type == "cuda"), tqdm(
        total=len(indices), desc="sampling", unit="img", disable=not progress
    ) as bar:
        for start in range(0, len(indices), run.batch_size):
            batch = indices[start : start + run.batch_size]
            images = sample_batch(model, run, batch)
            bar.update(len(batch))
            yield batch, images


def sample_tensors(unet: nn.Module, run: SamplingRun, indices: Sequence[int], progress: bool = False) -> torch.Tensor:
    """Images ``indices`` as float32 NCHW in [-1, 1] (not clamped), in the order of ``indices``."""
    model = prepare_unet(unet, run)
    batches = [images for _, images in iter_sample_batches(model, run, indices, progress)]
    return torch.cat(batches) if batches else torch.empty((0, *run.output_shape))


def generate_uint8(
    model: nn.Module, run: SamplingRun, indices: Sequence[int], progress: bool = False
) -> np.ndarray:
    """Images ``indices`` as uint8 NHWC, converted batch by batch to keep memory at one byte a value.

    ``model`` is the output of :func:`prepare_unet` (prepared once, used for any number of calls).
    """
    channels, height, width = run.output_shape
    out = np.empty((len(indices), height, width, channels), dtype=np.uint8)
    filled = 0
    for batch, images in iter_sample_batches(model, run, indices, progress):
        out[filled : filled + len(batch)] = to_uint8(images)
        filled += len(batch)
    return out


def sample_images(
    unet: nn.Module,
    scheduler_config,
    indices: Sequence[int],
    *,
    steps: int,
    skip_type: str = "uniform",
    eta: float = 0.0,
    seed: int = 42,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    mixed_precision: str = "no",
    channels_last: bool | str = False,
    compile: bool | str = False,
    compile_mode: str | None = None,
    clip_sample: bool | None = None,
    progress: bool = False,
    codec=None,
) -> np.ndarray:
    """DDIM samples ``indices`` of ``unet`` as uint8 NHWC (image ``i`` depends on ``(seed, i)`` only).

    ``unet`` is moved to ``device`` and put in eval mode in place. ``mixed_precision`` ``bf16`` or
    ``fp16`` runs the UNet under autocast (the update stays float32). ``compile`` wraps the UNet in
    ``torch.compile`` and pads the last batch to ``batch_size``. The three also take ``auto``
    (:func:`make_run`); the defaults are the plain float32 eager path. ``codec``: a latent model's
    autoencoder (:attr:`maskdm.ddpm.models.DDPM.codec`); the images are then the decoded latents.
    """
    run = make_run(
        unet,
        scheduler_config,
        steps=steps,
        skip_type=skip_type,
        eta=eta,
        seed=seed,
        batch_size=batch_size,
        device=device,
        mixed_precision=mixed_precision,
        channels_last=channels_last,
        compile=compile,
        compile_mode=compile_mode,
        clip_sample=clip_sample,
        codec=codec,
    )
    return generate_uint8(prepare_unet(unet, run), run, indices, progress)


# --------------------------------------------------------------------------------------------
# Images out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float NCHW in [-1, 1] -> uint8 NHWC, rounded as diffusers' pipelines round."""
    scaled = (images.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255
    return scaled.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


#: Grids show each image at least this many pixels high and wide: a 16-pixel sample is a dot in
#: the MLflow UI's image viewer.
GRID_MIN_SIZE = 64


def grid_scale(height: int, width: int, min_size: int = GRID_MIN_SIZE) -> int:
    """The integer factor that makes an image of ``height`` x ``width`` at least ``min_size`` both ways."""
    return max(1, -(-int(min_size) // max(1, min(int(height), int(width)))))


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int = 8, min_size: int = GRID_MIN_SIZE) -> Path:
    """Save uint8 NHWC images as one PNG grid (``nrow`` images per row, 2-pixel padding).

    Images smaller than ``min_size`` are enlarged by an integer factor, nearest neighbour (each
    pixel a square block: nothing is smoothed or invented); the samples themselves are not changed.
    """
    if len(images) == 0:
        raise ValueError("no images to put in a grid")
    scale = grid_scale(images.shape[1], images.shape[2], min_size)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    grid = make_grid(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), nrow=nrow)
    path = Path(path)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def save_pngs(images: np.ndarray, folder: str | os.PathLike, indices: Sequence[int] | None = None) -> Path:
    """Save uint8 NHWC images one PNG each, named by image index (``000123.png``), for other tools."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    indices = range(len(images)) if indices is None else indices
    if len(indices) != len(images):
        raise ValueError(f"{len(indices)} indices for {len(images)} images")
    for index, image in zip(indices, images):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / f"{int(index):06d}.png")
    return folder
