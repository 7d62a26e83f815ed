"""The DDPM noise-prediction loss, its reproducible random draws, and the eval_loss protocol.

Every loss this project reports goes through :func:`batch_loss`. Where two stages must see the
same minibatch (baseline_loss and train_masks), the timesteps and noise for batch ``b`` come from
:func:`draw_noise_and_timesteps` seeded by ``(seed, b)``: one function, so the two cannot drift
apart. Draws are made on the CPU and then moved, so they do not depend on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maskdm.ddpm.fastpath import FastPath

#: The eval_loss protocol shared by every model-writing stage, so values compare across runs:
#: the first EVAL_SIZE images of the dataset's evaluation split (deterministic transforms), in
#: batches of EVAL_BATCH_SIZE, with timesteps and noise drawn from ``(EVAL_SEED, batch index)``.
EVAL_SIZE = 256
EVAL_BATCH_SIZE = 64
EVAL_SEED = 20240917


def batch_generator(seed: int, batch_index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator determined by ``(seed, batch_index)`` alone, or by ``(seed, batch_index,
    stream)``: a nonzero ``stream`` gives draws independent of stream 0's for the same seed."""
    entropy = [int(seed), int(batch_index)] + ([int(stream)] if stream else [])
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] % (2**63 - 1)))


@dataclass(frozen=True)
class NoiseDraw:
    timesteps: torch.Tensor  # (B,) int64
    noise: torch.Tensor  # (B, C, H, W) float32

    def to(self, device: torch.device | str) -> "NoiseDraw":
        return NoiseDraw(self.timesteps.to(device), self.noise.to(device))


def draw_noise_and_timesteps(
    seed: int, batch_index: int, shape: tuple[int, ...], num_train_timesteps: int, stream: int = 0
) -> NoiseDraw:
    """The timesteps and noise for batch ``batch_index`` of a replayable pass seeded by ``seed``
    (on draw stream ``stream``, see :func:`batch_generator`)."""
    gen = batch_generator(seed, batch_index, stream)
    timesteps = torch.randint(0, num_train_timesteps, (shape[0],), generator=gen, dtype=torch.int64)
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    return NoiseDraw(timesteps, noise)


def predict_noise(unet: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    return unet(noisy, timesteps).sample


def batch_loss(
    unet: nn.Module,
    scheduler,
    clean: torch.Tensor,
    draw: NoiseDraw,
    reduction: str = "mean",
    fast: FastPath | None = None,
) -> torch.Tensor:
    """Noise-prediction MSE of ``unet`` on ``clean`` images in [-1, 1] under ``draw``.

    ``reduction="none"`` returns one loss per image (mean over pixels). ``fast`` (a
    :class:`maskdm.ddpm.fastpath.FastPath`) runs the UNet alone under its autocast, on input in its
    memory format; noising and the loss stay float32.
    """
    draw = draw.to(clean.device)
    noisy = scheduler.add_noise(clean, draw.noise, draw.timesteps)
    if fast is None:
        pred = predict_noise(unet, noisy, draw.timesteps)
    else:
        with fast.autocast(clean.device):
            pred = predict_noise(unet, fast.to_memory_format(noisy), draw.timesteps)
    per_image = F.mse_loss(pred.float(), draw.noise, reduction="none").mean(dim=tuple(range(1, clean.ndim)))
    return per_image if reduction == "none" else per_image.mean()


@torch.no_grad()
def replay_losses(
    unet: nn.Module,
    scheduler,
    batches,
    seed: int,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Mean loss of each batch of an iterable of image tensors, batch ``b`` drawn from ``(seed, b)``."""
    losses = []
    for b, images in enumerate(batches):
        images = images.to(device)
        draw = draw_noise_and_timesteps(seed, b, tuple(images.shape), scheduler.config.num_train_timesteps)
        losses.append(float(batch_loss(unet, scheduler, images, draw)))
    return losses


def eval_images(dataset, size: int = EVAL_SIZE) -> torch.Tensor:
    """The first ``size`` images of an evaluation-split dataset, stacked (the fixed held-out set)."""
    n = min(size, len(dataset))
    return torch.stack([_image(dataset[i]) for i in range(n)])


def _image(item) -> torch.Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


@torch.no_grad()
def eval_loss(unet: nn.Module, scheduler, images: torch.Tensor, device: torch.device | str = "cpu") -> float:
    """The eval_loss protocol: mean noise-prediction MSE over ``images`` (see EVAL_* above)."""
    was_training = unet.training
    unet.eval()
    batches = images.split(EVAL_BATCH_SIZE)
    losses = replay_losses(unet, scheduler, batches, EVAL_SEED, device)
    unet.train(was_training)
    sizes = [len(b) for b in batches]
    return float(np.average(losses, weights=sizes))
