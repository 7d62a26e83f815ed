"""First-order Taylor importance of every prunable weight, from replayed diffusion losses.

The ``taylor`` pruner of :mod:`maskdm.method.pruning` ranks weight ``w`` by ``|w * G|``, where ``G`` is the
gradient of the noise-prediction loss averaged over the samples counted (the first-order estimate
of how much the loss changes when ``w`` is set to 0). This is the weight-level version of the
importance Diff-Pruning (Fang et al., NeurIPS 2023) uses; what we took from it and what we chose:

* **Samples.** ``batches`` replayed minibatches of ``batch_size`` training images (evaluation
  transforms), with the timesteps and noise of :func:`maskdm.ddpm.diffusion.draw_noise_and_timesteps`
  seeded by ``(seed, b)``: the replay of :mod:`maskdm.method.replay`, so with the same dataset, seed and
  batch size these are exactly baseline_loss's first minibatches. Diff-Pruning instead takes one
  batch and runs it through every timestep 0..T-1 with one noise draw; the replay covers the
  timesteps by sampling, with the same images-noise pairs any later stage can reproduce.
* **Accumulation: ``|w * sum g|``, not ``sum |w * g|``.** Diff-Pruning calls ``backward`` once per
  timestep and scores the summed gradient (torch-pruning's ``TaylorImportance``, per element
  ``|w * grad|``), i.e. the first-order change of the *accumulated* loss. Gradients of opposite
  sign at different timesteps cancel: a weight that helps at some timesteps and hurts at others
  counts for its net effect. We do the same, divided by the number of chunks counted so that the
  score is ``|w * mean gradient|`` (the scale does not change any ranking).
* **Order and threshold.** Diff-Pruning counts timesteps from t=0 upward and stops once they stop
  being informative (its ``thr``). All samples are sorted by timestep, ascending (stable: ties keep
  replay order), and taken in chunks of ``batch_size``. After chunk ``k >= 2`` the relative change
  of the accumulated gradient, ``||G_k - G_{k-1}|| / ||G_{k-1}||`` (``G`` over all prunable
  weights together, ``||.||`` the L2 norm), is compared with ``threshold``; at or below it the
  accumulation stops, chunk ``k`` included. The change is measured as a vector rather than as
  ``| ||G_k|| - ||G_{k-1}|| |``: a chunk whose gradient is orthogonal to ``G`` leaves the norm
  unchanged but turns ``G`` and so the scores. (Diff-Pruning's code compares the loss with the
  largest loss so far, ``L_t < thr * L_max``; the issue asked for the gradient criterion.)
  ``threshold=0`` counts every sample, and then the result does not depend on the order (the
  model is in eval mode and has no batch statistics, so each sample's gradient does not depend
  on which chunk it is in): exactly the gradient of the replayed batches' mean loss, up to float
  rounding.

Gradients are taken with :func:`torch.autograd.grad` in float32, model in eval mode (no dropout),
and accumulated in float64; the model's ``.grad`` fields, training mode and ``requires_grad`` flags
are left as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from maskdm.ddpm.diffusion import NoiseDraw, batch_loss, draw_noise_and_timesteps
from maskdm.errors import MaskDMError
from maskdm.method.replay import ReplayBatches, ReplaySpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaylorConfig:
    """How the Taylor importance is measured. Validated on construction.

    batches:    replayed minibatches of training images (at most; fewer if the dataset is smaller).
    batch_size: images per minibatch, and samples per accumulation chunk.
    threshold:  stop once the accumulated gradient changes by at most this share (0 = count all).
    seed:       seeds the image subset and every batch's timesteps and noise (the replay's seed).
    """

    batches: int = 8
    batch_size: int = 32
    threshold: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batches", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MaskDMError(f"taylor_{name} must be an integer >= 1, not '{value}'")
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= float(threshold) < 1.0:
            raise MaskDMError(f"taylor_threshold must be a number in [0, 1) (0 = use every sample), not '{threshold}'")
        object.__setattr__(self, "threshold", float(threshold))

    def replay_spec(self) -> ReplaySpec:
        return ReplaySpec(dataset_size=self.batches * self.batch_size, batch_size=self.batch_size, max_batches=self.batches, seed=self.seed)


@dataclass
class TaylorResult:
    """Scores (float64, shaped like each weight) and what was counted to get them."""

    scores: dict[str, torch.Tensor]
    samples_used: int
    samples_total: int
    chunks_used: int
    chunks_total: int
    max_timestep_used: int
    #: ``||G_k - G_{k-1}|| / ||G_{k-1}||`` after each chunk k >= 2 that was counted.
    relative_changes: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {
            "taylor_samples_used": self.samples_used,
            "taylor_samples_total": self.samples_total,
            "taylor_chunks_used": self.chunks_used,
            "taylor_chunks_total": self.chunks_total,
            "taylor_max_timestep_used": self.max_timestep_used,
        }


@dataclass(frozen=True)
class ReplayedSamples:
    """Every sample of the replayed batches, sorted by timestep (ascending, stable)."""

    images: torch.Tensor  # (N, C, H, W)
    draw: NoiseDraw  # timesteps (N,), noise (N, C, H, W)


def replayed_samples(batches: ReplayBatches, num_train_timesteps: int) -> ReplayedSamples:
    images, timesteps, noise = [], [], []
    for b in range(len(batches)):
        batch = batches.images(b)
        draw = draw_noise_and_timesteps(batches.seed, b, tuple(batch.shape), num_train_timesteps, batches.stream)
        images.append(batch)
        timesteps.append(draw.timesteps)
        noise.append(draw.noise)
    all_timesteps = torch.cat(timesteps)
    order = torch.argsort(all_timesteps, stable=True)
    return ReplayedSamples(torch.cat(images)[order], NoiseDraw(all_timesteps[order], torch.cat(noise)[order]))


def relative_change(accumulated_norm: float, step_norm: float) -> float:
    """``||G_k - G_{k-1}|| / ||G_{k-1}||`` from the two norms; infinite when ``G_{k-1}`` is 0."""
    return float("inf") if accumulated_norm == 0.0 else step_norm / accumulated_norm


def taylor_scores(
    unet: nn.Module,
    scheduler,
    modules: Mapping[str, nn.Module],
    batches: ReplayBatches,
    threshold: float = 0.0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> TaylorResult:
    """``|w * mean gradient|`` for the ``weight`` of each of ``modules`` (see the module docstring).

    ``unet`` must already be on ``device``; ``modules`` are its layers by name (the prunable ones).
    """
    if not modules:
        raise MaskDMError("no layers to score")
    samples = replayed_samples(batches, int(scheduler.config.num_train_timesteps))
    chunk = batches.spec.batch_size
    total = samples.images.shape[0]
    starts = list(range(0, total, chunk))
    weights = [module.weight for module in modules.values()]
    flags = [w.requires_grad for w in weights]
    was_training = unet.training
    unet.eval()
    accumulated = [torch.zeros(w.shape, dtype=torch.float64, device=w.device) for w in weights]
    changes: list[float] = []
    used = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        for k, start in enumerate(tqdm(starts, desc="taylor importance", unit="chunk", disable=not progress)):
            images = samples.images[start : start + chunk].to(device)
            draw = NoiseDraw(samples.draw.timesteps[start : start + chunk], samples.draw.noise[start : start + chunk])
            loss = batch_loss(unet, scheduler, images, draw)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            # A layer the loss does not reach has gradient 0.
            step = [torch.zeros_like(acc) if g is None else g.to(torch.float64) for acc, g in zip(accumulated, grads)]
            # G_k - G_{k-1} is this chunk's gradient: its norm over ||G_{k-1}||, without copying G.
            change = relative_change(_norm(accumulated), _norm(step)) if threshold > 0 and k > 0 else None
            for acc, g in zip(accumulated, step):
                acc += g
            used = k + 1
            if change is not None:
                changes.append(change)
                if change <= threshold:
                    break
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
        unet.train(was_training)
    samples_used = min(used * chunk, total)
    scores = {
        name: (w.detach().to(torch.float64) * acc / used).abs().cpu()
        for (name, w), acc in zip(((n, m.weight) for n, m in modules.items()), accumulated)
    }
    result = TaylorResult(
        scores=scores, samples_used=samples_used, samples_total=total, chunks_used=used, chunks_total=len(starts),
        max_timestep_used=int(samples.draw.timesteps[samples_used - 1]), relative_changes=changes,
    )
    log.info(
        "taylor importance: %d of %d samples (%d of %d chunks), timesteps 0..%d",
        samples_used, total, used, len(starts), result.max_timestep_used,
    )
    return result


def _norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm of all ``tensors`` together, as one vector."""
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))


def taylor_batches(dataset, config: TaylorConfig) -> ReplayBatches:
    """The replayed minibatches the importance is measured on; one line if the dataset is too small."""
    if len(dataset) < config.batch_size:
        raise MaskDMError(
            f"the dataset holds {len(dataset)} images, fewer than one taylor batch of {config.batch_size}: lower taylor_batch_size"
        )
    return ReplayBatches(dataset, config.replay_spec())
