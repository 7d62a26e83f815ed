"""Wanda and SparseGPT: one-shot pruners that look at each layer's inputs on calibration data.

Both see a prunable layer as a matmul ``Y = W X``: ``W`` its weight viewed as ``(out, in * kh * kw)``
and ``X`` its input columns, one per token (a Linear's input rows; a convolution's unfolded input,
:func:`torch.nn.functional.unfold` with the layer's kernel, stride, padding and dilation).

* **Calibration** (:func:`calibration_samples`). ``calib_samples`` training images (evaluation
  transforms, the replay's seeded subset of :mod:`maskdm.method.replay`) with the replay's own timesteps
  and noise (:func:`maskdm.ddpm.diffusion.draw_noise_and_timesteps` seeded by ``(seed, 0)``);
  ``calib_timesteps = K > 1`` adds K-1 more draws of timesteps and noise for the same images (draw
  streams of their own), so each image is seen at K timesteps. Forward hooks record every
  prunable layer's input; the model runs in eval mode under ``torch.no_grad``, on the dense model:
  every layer's statistics come from the unpruned model (the LLM papers prune block by block and
  feed the pruned blocks' outputs on; a UNet's skip connections make that order ill-defined, and
  this way the result does not depend on how layers are grouped in passes).
* **Weighting** (``calib_weighting``). ``uniform``: every sample counts the same. ``logdecrease``
  (after OBS-Diff's timestep-aware Hessian, our own form): a sample at timestep ``t`` counts
  ``log(2 + t) / log(1 + T)``, normalised to mean 1 over the samples: the noisier steps, which
  come first in sampling and whose errors the later steps inherit, count more, decreasing
  logarithmically towards t = 0.
* **Statistics.** Wanda needs per layer the weighted sum of squared inputs per column (``in*kh*kw``
  numbers): all layers are collected in one pass. SparseGPT needs ``H = 2 X X^T`` per layer,
  ``(in*kh*kw)^2`` float64 numbers (4608^2 * 8 B = 170 MB for a 3x3 convolution of 512 channels):
  layers are grouped into passes whose Hessians fit ``memory_budget`` (at least one layer per
  pass), and each group is pruned and its Hessians freed before the next pass. Inputs are
  unfolded in float32 and their products added into float64 accumulators on the model's device.
* **Convolutions** with ``groups != 1`` or a string padding are refused (the UNets here have none):
  their weight is not one matmul over the unfolded input.

Wanda (Sun et al., 2023) scores ``|W_ij| * ||X_j||_2`` and compares within each output row
(:mod:`maskdm.method.pruning` ranks, counts and breaks ties). SparseGPT (Frantar & Alistarh, 2023) is
:func:`sparsegpt_layer`: the mask is chosen block by block from ``w^2 / [U]_jj^2`` (``U`` the upper
Cholesky factor of ``H^-1``) and the error of each pruned weight is propagated to the later columns,
so the kept weights change.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from maskdm.ddpm.diffusion import NoiseDraw, draw_noise_and_timesteps
from maskdm.errors import MaskDMError
from maskdm.method.pruning import PruneConfig, PruneResult, row_counts, smallest_per_row
from maskdm.method.replay import ReplayBatches, ReplaySpec

log = logging.getLogger(__name__)

ONESHOT_PRUNERS = ("wanda", "sparsegpt")
WEIGHTINGS = ("uniform", "logdecrease")
#: Draw streams of the extra timesteps (calib_timesteps > 1); stream 0 is the replay's own.
CALIB_STREAM = 0x63616C00
#: Default bytes of float64 Hessians held at once (SparseGPT); one layer is always allowed.
DEFAULT_HESSIAN_BUDGET = 1 << 30


@dataclass(frozen=True)
class CalibConfig:
    """Calibration and SparseGPT settings. Validated on construction.

    samples:    training images (``calib_samples``), >= 1.
    timesteps:  draws of (timestep, noise) per image (``calib_timesteps``), >= 1; 1 = the replay's own.
    batch_size: images per forward pass (memory only: results do not depend on it).
    weighting:  ``uniform`` or ``logdecrease`` (see the module docstring).
    damp:       SparseGPT's damping, a share of the mean diagonal of H added to it, > 0.
    blocksize:  SparseGPT's columns per block (lazy updates; the unstructured mask is chosen per block).
    seed:       the replay's seed (subset and draws).
    """

    samples: int = 64
    timesteps: int = 1
    batch_size: int = 16
    weighting: str = "uniform"
    damp: float = 0.01
    blocksize: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for name, label in (("samples", "calib_samples"), ("timesteps", "calib_timesteps"),
                            ("batch_size", "calib_batch_size"), ("blocksize", "sparsegpt_blocksize")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MaskDMError(f"{label} must be an integer >= 1, not '{value}'")
        weighting = str(self.weighting).strip().lower()
        if weighting not in WEIGHTINGS:
            raise MaskDMError(f"calib_weighting '{self.weighting}' is not known: use one of {', '.join(WEIGHTINGS)}")
        object.__setattr__(self, "weighting", weighting)
        damp = self.damp
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (math.isfinite(float(damp)) and float(damp) > 0):
            raise MaskDMError(f"sparsegpt_damp must be a number > 0 (a share of H's mean diagonal, e.g. 0.01), not '{damp}'")
        object.__setattr__(self, "damp", float(damp))

    def to_dict(self) -> dict:
        return {
            "calib_samples": self.samples, "calib_timesteps": self.timesteps, "calib_batch_size": self.batch_size,
            "calib_weighting": self.weighting, "sparsegpt_damp": self.damp, "sparsegpt_blocksize": self.blocksize,
            "calib_seed": self.seed,
        }


# --- calibration samples --------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibSamples:
    """What the model is run on: clean images, their draws, and each sample's weight (mean 1)."""

    images: torch.Tensor  # (N, C, H, W), N = samples * timesteps
    draw: NoiseDraw
    weights: torch.Tensor  # (N,) float64


def calibration_batches(dataset, config: CalibConfig) -> ReplayBatches:
    """The replayed images: one batch of ``calib_samples``; one line if the dataset is smaller."""
    if len(dataset) < config.samples:
        raise MaskDMError(f"calib_samples={config.samples} but the dataset holds {len(dataset)} images: lower calib_samples")
    return ReplayBatches(dataset, ReplaySpec(dataset_size=config.samples, batch_size=config.samples, max_batches=1, seed=config.seed))


def calibration_samples(batches: ReplayBatches, num_train_timesteps: int, config: CalibConfig) -> CalibSamples:
    images = batches.images(0)
    draws = [
        draw_noise_and_timesteps(batches.seed, 0, tuple(images.shape), num_train_timesteps, batches.stream if k == 0 else CALIB_STREAM + k)
        for k in range(config.timesteps)
    ]
    timesteps = torch.cat([d.timesteps for d in draws])
    return CalibSamples(
        images=images.repeat(config.timesteps, 1, 1, 1),
        draw=NoiseDraw(timesteps, torch.cat([d.noise for d in draws])),
        weights=timestep_weights(timesteps, num_train_timesteps, config.weighting),
    )


def timestep_weights(timesteps: torch.Tensor, num_train_timesteps: int, weighting: str) -> torch.Tensor:
    if weighting == "uniform":
        return torch.ones(timesteps.shape, dtype=torch.float64)
    w = torch.log(2.0 + timesteps.to(torch.float64)) / math.log(1.0 + num_train_timesteps)
    return w / w.mean()


# --- layer inputs ---------------------------------------------------------------------------------


def check_oneshot_layers(modules: Mapping[str, nn.Module]) -> None:
    for name, module in modules.items():
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or isinstance(module.padding, str)):
            raise MaskDMError(
                f"layer '{name}' is a grouped convolution or has padding '{module.padding}': wanda/sparsegpt need groups=1 "
                "and numeric padding; protect it (protect=...) or use pruner=magnitude"
            )


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as columns, shaped (batch, features, tokens): ``weight.flatten(1) @ column`` is its output."""
    x = x.detach().to(torch.float32)
    if isinstance(module, nn.Conv2d):
        return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)  # Linear: (B, ..., in) -> (B, in, tokens)


class _Accumulator:
    """Weighted sums over calibration columns: squared norms per feature (wanda) or ``X X^T`` (sparsegpt)."""

    def __init__(self, module: nn.Module, hessian: bool, device):
        features = module.weight[0].numel()
        shape = (features, features) if hessian else (features,)
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.hessian = hessian
        self.total = 0.0  # summed sample weight x tokens
        self.module = module
        self.weights: torch.Tensor | None = None  # the current chunk's sample weights, set before its forward

    def __call__(self, module, inputs, output) -> None:
        cols = input_columns(module, inputs[0])  # (B, F, L)
        if cols.shape[0] != self.weights.shape[0]:
            raise MaskDMError(
                f"a prunable layer saw a batch of {cols.shape[0]} for {self.weights.shape[0]} images: wanda/sparsegpt need "
                "layers that see one input per image; protect it"
            )
        w = self.weights.to(device=cols.device, dtype=torch.float32)
        if self.hessian:
            scaled = cols * w.sqrt()[:, None, None]
            flat = scaled.transpose(0, 1).reshape(cols.shape[1], -1)
            self.sum += (flat @ flat.T).to(torch.float64)
        else:
            self.sum += (cols.square() * w[:, None, None]).sum(dim=(0, 2)).to(torch.float64)
        self.total += float(w.sum()) * cols.shape[2]


@torch.no_grad()
def _collect(unet, scheduler, modules: Mapping[str, nn.Module], samples: CalibSamples, batch_size: int, hessian: bool,
             device, progress: bool, desc: str) -> dict[str, _Accumulator]:
    accumulators = {name: _Accumulator(m, hessian, device) for name, m in modules.items()}
    handles = [m.register_forward_hook(accumulators[name]) for name, m in modules.items()]
    was_training = unet.training
    unet.eval()
    try:
        total = samples.images.shape[0]
        for start in tqdm(range(0, total, batch_size), desc=desc, unit="batch", disable=not progress):
            stop = start + batch_size
            for acc in accumulators.values():
                acc.weights = samples.weights[start:stop]
            clean = samples.images[start:stop].to(device)
            draw = NoiseDraw(samples.draw.timesteps[start:stop], samples.draw.noise[start:stop]).to(device)
            unet(scheduler.add_noise(clean, draw.noise, draw.timesteps), draw.timesteps)
    finally:
        for handle in handles:
            handle.remove()
        unet.train(was_training)
    return accumulators


# --- wanda ----------------------------------------------------------------------------------------


def wanda_scores(unet, scheduler, modules: Mapping[str, nn.Module], samples: CalibSamples, batch_size: int = 16,
                 device="cpu", progress: bool = True) -> dict[str, torch.Tensor]:
    """``|W_ij| * ||X_j||_2`` per weight (float64, on the CPU, shaped like the weight), one pass for all layers."""
    check_oneshot_layers(modules)
    stats = _collect(unet, scheduler, modules, samples, batch_size, False, device, progress, "wanda calibration")
    return {name: wanda_score(modules[name].weight, acc.sum) for name, acc in stats.items()}


def wanda_score(weight: torch.Tensor, squared_norms: torch.Tensor) -> torch.Tensor:
    w = weight.detach().to(torch.float64)
    norms = squared_norms.to(device=w.device, dtype=torch.float64).sqrt()
    return (w.flatten(1).abs() * norms[None, :]).reshape(w.shape).cpu()


# --- sparsegpt ------------------------------------------------------------------------------------


@dataclass
class SparseGPTLayer:
    weight: torch.Tensor  # reconstructed, pruned entries exactly 0, the layer's shape and dtype
    mask: torch.Tensor  # bool, True = kept
    scores: torch.Tensor  # float64, w^2 / U_jj^2 at the moment each entry's selection was made
    dead_inputs: int


def sparsegpt_layer(
    weight: torch.Tensor, hessian: torch.Tensor, ratio: float, nm: tuple[int, int] | None = None,
    blocksize: int = 128, damp: float = 0.01, mask: torch.Tensor | None = None,
) -> SparseGPTLayer:
    """Prune one layer OBS-style with weight reconstruction (SparseGPT's algorithm, in float64).

    ``hessian``: ``X X^T`` over the calibration columns (its scale does not matter). Inputs that
    were always 0 (``H_jj = 0``) get ``H_jj = 1`` and their weights set to 0, as in the paper: they
    change no calibration output, and with score 0 they are the first pruned. ``damp * mean(diag H)``
    is added to the diagonal. With ``mask`` given, that mask is kept and only the reconstruction runs.

    Selection: unstructured, per output row within each block of ``blocksize`` columns, the
    block's share of the row's count (:func:`row_counts`, spread over blocks by cumulative floors);
    N:M, per group of M columns when the sweep reaches it. Ties go to the lower column index.
    """
    shape, dtype = weight.shape, weight.dtype
    W = weight.detach().to(torch.float64).flatten(1).clone()
    rows, cols = W.shape
    H = hessian.detach().to(device=W.device, dtype=torch.float64).clone()
    if H.shape != (cols, cols):
        raise MaskDMError(f"the Hessian has shape {tuple(H.shape)}, the weight {cols} columns")
    if nm is not None and blocksize % nm[1]:
        raise MaskDMError(f"sparsegpt_blocksize={blocksize} is not a multiple of M={nm[1]} of pattern {nm[0]}:{nm[1]}")
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    W[:, dead] = 0.0
    diag += damp * float(diag.mean())
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(H))
        U = torch.linalg.cholesky(inverse, upper=True)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses it
        raise MaskDMError(f"sparsegpt: the damped Hessian is not positive definite; raise sparsegpt_damp (now {damp:g})") from None
    keep = torch.ones((rows, cols), dtype=torch.bool, device=W.device) if mask is None else mask.to(W.device, torch.bool).reshape(rows, cols).clone()
    scores = torch.zeros((rows, cols), dtype=torch.float64, device=W.device)
    counts = row_counts(ratio, rows, cols).to(W.device) if (mask is None and nm is None) else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        errors = torch.zeros_like(W1)
        if counts is not None:
            scores[:, i1:i2] = W1.square() / d.square()
            # The share of each row's count that falls in this block: cumulative floors over columns.
            in_block = counts * i2 // cols - counts * i1 // cols
            keep[:, i1:i2] = ~smallest_per_row(scores[:, i1:i2], in_block)
        for j in range(i2 - i1):
            if nm is not None and mask is None and j % nm[1] == 0:
                n_keep, m = nm
                group = W1[:, j : j + m].square() / d[j : j + m].square()
                scores[:, i1 + j : i1 + j + m] = group
                order = torch.argsort(group, dim=1, stable=True)
                pruned = torch.zeros_like(group, dtype=torch.bool).scatter_(1, order[:, : m - n_keep], True)
                keep[:, i1 + j : i1 + j + m] = ~pruned
            w = W1[:, j]
            q = torch.where(keep[:, i1 + j], w, torch.zeros_like(w))
            err = (w - q) / d[j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            W1[:, j] = q  # exactly 0 where pruned, whatever rounding the update left
            errors[:, j] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= errors @ U[i1:i2, i2:]
    return SparseGPTLayer(weight=W.reshape(shape).to(dtype), mask=keep.reshape(shape), scores=scores.reshape(shape), dead_inputs=int(dead.sum()))


def hessian_groups(modules: Mapping[str, nn.Module], budget: int) -> list[list[str]]:
    """Layers in ``named_modules`` order, cut into passes whose float64 Hessians fit ``budget`` bytes."""
    groups: list[list[str]] = []
    used = budget + 1
    for name, module in modules.items():
        size = 8 * module.weight[0].numel() ** 2
        if used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


@dataclass
class SparseGPTResult:
    result: PruneResult
    scores: dict[str, torch.Tensor]
    passes: int
    dead_inputs: int


def sparsegpt_prune(unet, scheduler, modules: Mapping[str, nn.Module], samples: CalibSamples, config: PruneConfig,
                    calib: CalibConfig, device="cpu", progress: bool = True,
                    budget: int = DEFAULT_HESSIAN_BUDGET) -> SparseGPTResult:
    """Prune ``modules`` (the prunable layers of ``unet``) in place with SparseGPT; masks, scores and what it took."""
    if config.scope != "layer":
        raise MaskDMError("pruner=sparsegpt prunes each layer against its own reconstruction error: use scope=layer")
    check_oneshot_layers(modules)
    nm = config.nm
    masks, scores, dense = {}, {}, []
    groups = hessian_groups(modules, budget)
    dead = 0
    # All statistics come from the dense model (see the module docstring): pruning is written back
    # only after every pass, so a later pass does not see the layers an earlier one pruned.
    new_weights: dict[str, torch.Tensor] = {}
    for g, names in enumerate(groups):
        group = {n: modules[n] for n in names}
        stats = _collect(unet, scheduler, group, samples, calib.batch_size, True, device, progress,
                         f"sparsegpt calibration {g + 1}/{len(groups)}")
        for name in tqdm(names, desc=f"sparsegpt layers {g + 1}/{len(groups)}", unit="layer", disable=not progress):
            weight = modules[name].weight
            if nm is not None and weight[0].numel() % nm[1]:
                masks[name] = torch.ones_like(weight, dtype=torch.bool, device="cpu")
                scores[name] = torch.zeros(weight.shape, dtype=torch.float64)  # ranks nothing: the layer stays dense
                dense.append(name)
                continue
            acc = stats.pop(name)
            H = acc.sum.mul_(2.0 / max(acc.total, 1e-300))
            layer = sparsegpt_layer(weight, H, config.ratio, nm, calib.blocksize, calib.damp)
            del H, acc
            new_weights[name] = layer.weight
            masks[name], scores[name] = layer.mask.cpu(), layer.scores.cpu()
            dead += layer.dead_inputs
        del stats
    with torch.no_grad():
        for name, w in new_weights.items():
            modules[name].weight.copy_(w)
    if dense:
        log.warning("%d layer(s) left dense: their input size is not a multiple of %d (%s)", len(dense), nm[1], ", ".join(dense))
    return SparseGPTResult(PruneResult(masks=masks, dense_layers=dense, config=config), scores, len(groups), dead)
