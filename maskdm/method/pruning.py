"""Weight pruning: which weights of a DDPM's Conv2d/Linear layers to zero, and what that saves.

Pruning is split into three steps so that each can be checked on its own:

* :func:`compute_masks` decides (``magnitude``, ``random``, ``taylor`` or ``wanda``; ``sparsegpt`` is
  :func:`maskdm.method.oneshot.sparsegpt_prune`; ``unstructured`` or ``N:M``,
  per ``layer`` or ``global``) and returns bool masks, True = kept, keyed by exact module name;
* :func:`apply_pruning` zeroes the masked-out weights in place and touches nothing else;
* :func:`pruning_stats` describes the result as a JSON-serialisable dict, including the measured
  size of a compact sparse checkpoint (:func:`compact_state_dict`) against the dense one.

Rules where a choice had to be made (``docs/details/prune.md`` has the full text):

* Count: a layer (or, with ``scope="global"``, the pool of all prunable weights) of ``n`` weights
  loses exactly ``k = floor(ratio * n)`` of them, ``ratio * n`` evaluated exactly on the decimal
  value of ``ratio`` (float arithmetic would give ``0.29 * 100 = 28.999...`` and prune 28).
* Ties: weights are ranked by their score (``|w|``; for ``taylor``, the importance of
  :mod:`maskdm.method.taylor`, given to :func:`compute_masks` as ``scores``) and, among equal scores,
  by position (flat index within a layer, then layer order for ``global``); the earlier one is
  pruned first. So exactly ``k`` go
  even when many weights are equal, and the result never depends on the sort implementation.
* ``random`` draws from one ``torch.Generator`` seeded with ``seed``, layers in ``named_modules``
  order, on the CPU: the same seed gives the same masks on any machine.
* ``N:M`` keeps exactly N of every M consecutive weights of each row of the weight viewed as
  ``(out_features, in_features * kh * kw)``. It fixes the ratio at ``1 - N/M``; ``ratio`` must
  state that value (so the lineage parameter ``pruning_ratio`` is true) and ``scope`` must be
  ``layer``. Layers whose row length is not a multiple of M stay dense and are reported.

We do not use ``torch.nn.utils.prune``: it rounds the count to nearest, breaks ties through
``topk`` (unspecified order), draws ``random`` from the global RNG and installs forward hooks
that would fight the parametrization in :mod:`maskdm.masks`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from maskdm.errors import MaskDMError
from maskdm.method.patterns import UNSTRUCTURED, parse_pattern
from maskdm.masks import DEFAULT_PROTECT, check_masks_fit, maskable_modules, parse_protect, prunable_modules

log = logging.getLogger(__name__)

PRUNERS: tuple[str, ...] = ("magnitude", "random", "taylor", "wanda", "sparsegpt")
#: Pruners whose scores come from outside (maskdm.method.taylor, maskdm.method.oneshot) and are given to compute_masks.
SCORED_PRUNERS: tuple[str, ...] = ("taylor", "wanda")
#: The prune run's record of what each pruner ranked by (train_masks init=pruner starts from it).
SCORES_FILE = "scores.safetensors"
SCOPES: tuple[str, ...] = ("layer", "global")

#: How far ``ratio`` may sit from ``1 - N/M`` and still count as stating it (so 0.667 names 1:3).
NM_RATIO_TOLERANCE = 1e-3

# Key suffixes of a compact checkpoint's entries for one masked weight.
_VALUES = ".values"
_BITS = ".mask_bits"
_SHAPE = ".shape"


@dataclass(frozen=True)
class PruneConfig:
    """What to prune. Validated on construction, so an invalid config never exists.

    ratio:   share of weights to prune, in [0, 1). With an ``N:M`` pattern it must equal ``1 - N/M``
             (within :data:`NM_RATIO_TOLERANCE`): the pattern decides, the ratio records it.
    pruner:  ``magnitude`` (drop the smallest ``|w|``), ``random`` (seeded uniform choice),
             ``taylor`` (drop the smallest first-order Taylor importance, :mod:`maskdm.method.taylor`),
             ``wanda`` (``|w| * ||x||``, compared within each output row) or ``sparsegpt``
             (OBS selection with weight reconstruction); both of :mod:`maskdm.method.oneshot`.
    pattern: ``unstructured`` or ``N:M`` (N kept of every M consecutive input weights).
    scope:   ``layer`` (every layer loses ``ratio`` of its weights) or ``global`` (one ranking over
             all prunable weights; layers end up with different sparsities). ``N:M`` needs ``layer``.
    protect: module-name substrings of layers left dense (``"a,b"`` strings are accepted).
    seed:    seed of the ``random`` pruner and of ``taylor``'s replayed batches (ignored by
             ``magnitude``, which has no randomness).
    """

    ratio: float
    pruner: str = "magnitude"
    pattern: str = UNSTRUCTURED
    scope: str = "layer"
    protect: tuple[str, ...] = DEFAULT_PROTECT
    seed: int = 0

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen: normalise the fields once, here
        set_field(self, "ratio", _as_ratio(self.ratio))
        set_field(self, "pruner", str(self.pruner).strip().lower())
        set_field(self, "scope", str(self.scope).strip().lower())
        set_field(self, "pattern", _canonical_pattern(self.pattern))
        set_field(self, "protect", parse_protect(self.protect))
        set_field(self, "seed", _as_seed(self.seed))
        self._validate()

    def _validate(self) -> None:
        if self.pruner not in PRUNERS:
            raise MaskDMError(f"pruner '{self.pruner}' is not known: use one of {', '.join(PRUNERS)}")
        if self.scope not in SCOPES:
            raise MaskDMError(f"scope '{self.scope}' is not known: use one of {', '.join(SCOPES)}")
        if self.pruner == "sparsegpt" and self.scope != "layer":
            raise MaskDMError(
                "pruner=sparsegpt reconstructs each layer against its own inputs, so there is no global ranking: use scope=layer"
            )
        nm = parse_pattern(self.pattern)
        if nm is None:
            return
        if self.scope != "layer":
            raise MaskDMError(
                f"scope '{self.scope}' does not apply to pattern '{self.pattern}': N:M keeps N of every M weights "
                "inside each layer; use scope=layer"
            )
        implied = 1.0 - nm[0] / nm[1]
        if abs(self.ratio - implied) > NM_RATIO_TOLERANCE:
            raise MaskDMError(
                f"pattern '{self.pattern}' prunes {implied:.4g} of the weights but pruning_ratio is {self.ratio:g}: "
                f"pass pruning_ratio={implied:.4g} with this pattern"
            )

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "protect": list(self.protect)}


def _canonical_pattern(pattern: object) -> str:
    nm = parse_pattern(str(pattern))
    return UNSTRUCTURED if nm is None else f"{nm[0]}:{nm[1]}"


def _as_ratio(ratio: object) -> float:
    try:
        value = float(ratio)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise MaskDMError(f"pruning_ratio '{ratio}' is not a number: use a value in [0, 1), e.g. 0.3") from None
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise MaskDMError(f"pruning_ratio {ratio} is out of range: use a value in [0, 1), e.g. 0.3")
    return value


def _as_seed(seed: object) -> int:
    try:
        return int(seed)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise MaskDMError(f"seed '{seed}' is not an integer") from None


@dataclass
class PruneResult:
    """Masks (True = kept) for every prunable layer, N:M layers left dense, and the config used."""

    masks: dict[str, torch.Tensor]
    dense_layers: list[str] = field(default_factory=list)
    config: PruneConfig | None = None


def prune_count(ratio: float, n: int) -> int:
    """How many of ``n`` weights ``ratio`` prunes: ``floor(ratio * n)`` on the ratio's decimal value."""
    exact = Fraction(repr(float(ratio)))  # repr is the shortest decimal that round-trips: 0.29, not 0.28999...
    return int(exact.numerator * n // exact.denominator)


def compute_masks(model: nn.Module, config: PruneConfig, scores: Mapping[str, torch.Tensor] | None = None) -> PruneResult:
    """Decide which weights of ``model``'s prunable layers to keep. Does not modify ``model``.

    ``scores``: the ``taylor`` pruner's importance of each prunable layer's weights (by module name,
    shaped like the weight; :func:`maskdm.method.taylor.taylor_scores`); the other pruners take none.
    """
    modules = prunable_modules(model, config.protect)
    if not modules:
        raise MaskDMError(
            f"nothing to prune: protect '{','.join(config.protect)}' covers every Conv2d/Linear layer of the model"
        )
    if config.pruner == "sparsegpt":
        raise MaskDMError("pruner=sparsegpt chooses its masks while reconstructing the weights: use maskdm.method.oneshot.sparsegpt_prune")
    weights = {name: _plain_weight(name, module).detach().cpu() for name, module in modules.items()}
    generator = torch.Generator().manual_seed(config.seed)
    ranking = _ranking_scores(weights, config.pruner, scores)
    nm = config.nm
    if nm is not None:
        masks, dense = _nm_masks(weights, nm, ranking, generator)
        if dense:
            log.warning(
                "%d layer(s) left dense: their input size is not a multiple of %d (%s)", len(dense), nm[1], ", ".join(dense)
            )
        return PruneResult(masks=masks, dense_layers=dense, config=config)
    if config.scope == "global":
        masks = _global_masks(weights, config.ratio, ranking, generator)
    elif config.pruner == "wanda":
        # Wanda compares weights within each output row: each row loses its share of the layer's count.
        masks = {name: _row_mask(ranking[name], config.ratio) for name in weights}
    else:
        masks = {
            name: _unstructured_mask(w, config.ratio, None if ranking is None else ranking[name], generator)
            for name, w in weights.items()
        }
    return PruneResult(masks=masks, dense_layers=[], config=config)


def _ranking_scores(
    weights: Mapping[str, torch.Tensor], pruner: str, scores: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor] | None:
    """What each pruner ranks by (smallest pruned first); None for ``random``, which draws instead."""
    if pruner not in SCORED_PRUNERS:
        if scores is not None:
            raise MaskDMError(f"pruner '{pruner}' takes no importance scores; they are for pruner={'/'.join(SCORED_PRUNERS)}")
        return {name: w.abs() for name, w in weights.items()} if pruner == "magnitude" else None
    if scores is None:
        source = "maskdm.method.taylor.taylor_scores" if pruner == "taylor" else "maskdm.method.oneshot.wanda_scores"
        raise MaskDMError(f"pruner={pruner} needs importance scores ({source}) and so a dataset")
    if set(scores) != set(weights):
        missing = sorted(set(weights) - set(scores)) or sorted(set(scores) - set(weights))
        raise MaskDMError(f"the {pruner} scores do not cover exactly the prunable layers (first difference: '{missing[0]}')")
    ranking = {}
    for name, w in weights.items():
        score = scores[name].detach().cpu()
        if score.shape != w.shape:
            raise MaskDMError(f"the {pruner} scores of '{name}' have shape {tuple(score.shape)}, its weight {tuple(w.shape)}")
        if not torch.isfinite(score).all():
            raise MaskDMError(f"the {pruner} scores of '{name}' are not all finite: the model's loss, gradient or inputs overflowed")
        ranking[name] = score
    return ranking


def _plain_weight(name: str, module: nn.Module) -> torch.Tensor:
    # A registered mask would make ``weight`` a computed tensor that in-place pruning cannot write to.
    if parametrize.is_parametrized(module, "weight"):
        raise MaskDMError(f"layer '{name}' carries a mask parametrization: bake the masks before pruning")
    return module.weight


def _unstructured_mask(weight: torch.Tensor, ratio: float, score: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    k = prune_count(ratio, weight.numel())
    if score is not None:
        pruned = _smallest_k(score.flatten(), k)
    else:
        pruned = _random_k(weight.numel(), k, generator)
    return (~pruned).reshape(weight.shape)


def row_counts(ratio: float, rows: int, row_length: int) -> torch.Tensor:
    """Weights pruned in each row: ``floor(ratio * n)`` for the layer, spread over rows by cumulative floors.

    Row ``r`` loses ``floor(ratio*(r+1)*L) - floor(ratio*r*L)``: every row loses ``floor(ratio*L)``
    or one more, and the layer exactly ``floor(ratio * rows * L)``, the count of every pruner here.
    """
    cumulative = torch.tensor([prune_count(ratio, r * row_length) for r in range(rows + 1)], dtype=torch.int64)
    return cumulative[1:] - cumulative[:-1]


def smallest_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool (rows, cols): each row's ``counts[r]`` smallest scores; equal scores go lower index first."""
    order = torch.argsort(scores, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return rank < counts.to(scores.device)[:, None]


def _row_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    rows = score.flatten(1)  # (out, in * kh * kw)
    return (~smallest_per_row(rows, row_counts(ratio, rows.shape[0], rows.shape[1]))).reshape(score.shape)


def selection_of(config: PruneConfig, blocksize: int | None = None) -> str:
    """Within what the pruner compared scores: ``layer``, ``row``, ``block:<B>`` (row within column blocks) or ``N:M``.

    Recorded with the scores, so that logits made from them (train_masks init=pruner) can be
    thresholded where the choice was made; ``global`` counts as ``layer`` (kept beat pruned in each layer too).
    """
    if config.nm is not None:
        return config.pattern
    if config.pruner == "sparsegpt":
        return f"block:{blocksize}"
    if config.pruner == "wanda" and config.scope == "layer":
        return "row"
    return "layer"


def save_scores(scores: Mapping[str, torch.Tensor], path: str | os.PathLike, pruner: str, selection: str) -> None:
    """What the pruner ranked by, float32 by layer, with ``pruner`` and ``selection`` (:func:`selection_of`) as metadata.

    float32: rounding is monotonic, so a kept score never falls below a pruned one of its group.
    """
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in scores.items()}
    save_file(tensors, str(path), metadata={"format": "maskdm-scores-v1", "pruner": pruner, "selection": selection})


def load_scores(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The scores and metadata (``pruner``, ``selection``) of a file written by :func:`save_scores`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            scores = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a corrupt or foreign file
        raise MaskDMError(f"cannot read scores file {path}: {exc}") from None
    if metadata.get("format") != "maskdm-scores-v1" or "selection" not in metadata:
        raise MaskDMError(f"scores file {path} is not a maskdm scores file (metadata {metadata})")
    return scores, metadata


def _global_masks(
    weights: Mapping[str, torch.Tensor], ratio: float, ranking: Mapping[str, torch.Tensor] | None, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    sizes = [w.numel() for w in weights.values()]
    k = prune_count(ratio, sum(sizes))
    if ranking is not None:
        # torch.cat promotes mixed dtypes, so |w| of a float64 layer is not rounded before ranking.
        pruned = _smallest_k(torch.cat([ranking[name].flatten() for name in weights]), k)
    else:
        pruned = _random_k(sum(sizes), k, generator)
    keeps = (~pruned).split(sizes)
    return {name: keep.reshape(w.shape) for (name, w), keep in zip(weights.items(), keeps)}


def _smallest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` smallest ``scores``; among equal scores the lower index is chosen first.

    The same set as a stable ascending argsort's first ``k``, in linear time (kthvalue + one pass),
    which matters for the global ranking over tens of millions of weights.
    """
    if k == 0:
        return torch.zeros(scores.numel(), dtype=torch.bool)
    threshold = torch.kthvalue(scores, k).values
    chosen = scores <= threshold
    surplus = int(torch.count_nonzero(chosen)) - k
    if surplus:
        # Ties at the threshold: release the last ``surplus`` of them, keeping the earlier ones pruned.
        tie_index = torch.nonzero(scores == threshold).flatten()
        chosen[tie_index[tie_index.numel() - surplus :]] = False
    return chosen


def _random_k(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.randperm(n, generator=generator)[:k]] = True
    return chosen


def _nm_masks(
    weights: Mapping[str, torch.Tensor], nm: tuple[int, int], ranking: Mapping[str, torch.Tensor] | None, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], list[str]]:
    n_keep, group = nm
    masks: dict[str, torch.Tensor] = {}
    dense: list[str] = []
    for name, weight in weights.items():
        row_length = weight[0].numel()  # in_features, or in_channels * kh * kw for a convolution
        if row_length % group:
            masks[name] = torch.ones_like(weight, dtype=torch.bool)
            dense.append(name)
            continue
        groups_shape = (weight.shape[0], row_length // group, group)
        if ranking is not None:
            scores = ranking[name].reshape(groups_shape)
        else:
            scores = torch.rand(groups_shape, generator=generator)
        # Stable ascending order within each group: the first M-N go, ties pruned lower index first.
        order = torch.argsort(scores, dim=-1, stable=True)
        keep = torch.ones(groups_shape, dtype=torch.bool)
        keep.scatter_(-1, order[..., : group - n_keep], False)
        masks[name] = keep.reshape(weight.shape)
    return masks, dense


def apply_pruning(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Set the masked-out weights to +0.0 in place; every other value stays bit-identical."""
    check_masks_fit(model, masks)
    modules = maskable_modules(model)
    with torch.no_grad():
        for name, mask in masks.items():
            weight = _plain_weight(name, modules[name])
            # masked_fill rather than ``weight * mask``: a product leaves -0.0 where w < 0.
            weight.masked_fill_(~mask.to(device=weight.device, dtype=torch.bool), 0.0)
    return model


def prune(model: nn.Module, config: PruneConfig, scores: Mapping[str, torch.Tensor] | None = None) -> PruneResult:
    """:func:`compute_masks` then :func:`apply_pruning`, in place; returns the masks."""
    result = compute_masks(model, config, scores)
    apply_pruning(model, result.masks)
    return result


# --- compact checkpoint ---------------------------------------------------------------------------


def compact_state_dict(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each masked weight stored as its kept values plus a bitmask.

    For a masked layer ``L`` the entry ``L.weight`` is replaced by ``L.weight.values`` (the kept
    entries, row-major), ``L.weight.mask_bits`` (uint8, ``numpy.packbits`` of the flattened mask,
    big-endian bit order) and ``L.weight.shape`` (int64). Everything else is stored as it is.
    Pruned entries are dropped, so they come back as 0 whatever they held.
    """
    check_masks_fit(model, masks)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    compact: dict[str, torch.Tensor] = {}
    weight_keys = {f"{name}.weight": name for name in masks}
    for key, value in state.items():
        name = weight_keys.get(key)
        if name is None:
            compact[key] = value.contiguous()
            continue
        mask = masks[name].to(torch.bool).cpu()
        compact[key + _VALUES] = value[mask].contiguous()
        compact[key + _BITS] = torch.from_numpy(np.packbits(mask.flatten().numpy()))
        compact[key + _SHAPE] = torch.tensor(tuple(mask.shape), dtype=torch.int64)
    return compact


def expand_compact_state_dict(
    compact: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inverse of :func:`compact_state_dict`: the dense state dict and the masks, by module name."""
    state: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for key, value in compact.items():
        if key.endswith(_VALUES) or key.endswith(_SHAPE):
            continue
        if not key.endswith(_BITS):
            state[key] = value
            continue
        weight_key = key[: -len(_BITS)]
        missing = [weight_key + s for s in (_VALUES, _SHAPE) if weight_key + s not in compact]
        if missing:
            raise MaskDMError(f"compact checkpoint is incomplete: '{missing[0]}' is missing")
        shape = tuple(int(d) for d in compact[weight_key + _SHAPE].tolist())
        values = compact[weight_key + _VALUES]
        mask = _unpack_mask(value, shape)
        kept = int(torch.count_nonzero(mask))
        if kept != values.numel():
            raise MaskDMError(
                f"compact checkpoint entry '{weight_key}' holds {values.numel()} values for {kept} kept weights"
            )
        weight = torch.zeros(shape, dtype=values.dtype)
        weight[mask] = values
        state[weight_key] = weight
        masks[weight_key.removesuffix(".weight")] = mask
    return state, masks


def _unpack_mask(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = math.prod(shape)
    flat = np.unpackbits(bits.numpy(), count=count).astype(bool)
    return torch.from_numpy(flat).reshape(shape)


def save_compact_checkpoint(model: nn.Module, masks: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    save_file(compact_state_dict(model, masks), str(path), metadata={"format": "maskdm-compact-v1"})


def load_compact_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The dense state dict and masks of a file written by :func:`save_compact_checkpoint`."""
    try:
        compact = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a corrupt or foreign file
        raise MaskDMError(f"cannot read compact checkpoint {path}: {exc}") from None
    return expand_compact_state_dict(compact)


def checkpoint_sizes(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Bytes on disk of the dense and the compact safetensors checkpoint, measured by writing both."""
    with tempfile.TemporaryDirectory(prefix="maskdm-ckpt-") as tmp:
        dense_path, compact_path = Path(tmp) / "dense.safetensors", Path(tmp) / "compact.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(dense_path))
        save_compact_checkpoint(model, masks, compact_path)
        return {
            "dense_checkpoint_bytes": dense_path.stat().st_size,
            "compact_checkpoint_bytes": compact_path.stat().st_size,
        }


# --- statistics -----------------------------------------------------------------------------------


def pruning_stats(model: nn.Module, result: PruneResult) -> dict:
    """A JSON-serialisable description of ``model`` pruned with ``result`` (fields in docs/details/prune.md).

    Sparsities are shares of weights masked out (by ``result.masks``); ``params_nonzero`` counts the
    model's actual nonzero parameter values, so the two agree only once the pruning is applied.
    """
    masks = result.masks
    check_masks_fit(model, masks)
    modules = maskable_modules(model)
    layers = {name: _layer_stats(modules[name].weight.detach(), mask) for name, mask in masks.items()}
    protected = [name for name in modules if name not in masks]

    prunable_total = sum(s["numel"] for s in layers.values())
    prunable_kept = sum(s["kept"] for s in layers.values())
    all_weights_total = sum(m.weight.numel() for m in modules.values())
    params_total = sum(p.numel() for p in model.parameters())
    params_nonzero = sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    stats = {
        "config": result.config.to_dict() if result.config is not None else None,
        "sparsity": _share(prunable_total - prunable_kept, prunable_total),
        "sparsity_all_weights": _share(prunable_total - prunable_kept, all_weights_total),
        "sparsity_all_params": _share(params_total - params_nonzero, params_total),
        "prunable_weights": prunable_total,
        "prunable_weights_kept": prunable_kept,
        "all_weights": all_weights_total,
        "params_total": params_total,
        "params_nonzero": params_nonzero,
        "compression_ratio": params_total / params_nonzero if params_nonzero else None,
        "protected_layers": protected,
        "dense_layers": list(result.dense_layers),
        "layers": layers,
    }
    sizes = checkpoint_sizes(model, masks)
    stats.update(sizes)
    stats["checkpoint_size_ratio"] = sizes["compact_checkpoint_bytes"] / sizes["dense_checkpoint_bytes"]
    return stats


def _layer_stats(weight: torch.Tensor, mask: torch.Tensor) -> dict:
    numel = mask.numel()
    kept = int(torch.count_nonzero(mask))
    return {
        "numel": numel,
        "kept": kept,
        "sparsity": _share(numel - kept, numel),
        "nonzero": int(torch.count_nonzero(weight)),
    }


def _share(part: int, whole: int) -> float:
    return 0.0 if whole == 0 else part / whole


def write_stats(stats: Mapping, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(stats, indent=2) + "\n")


def summarize(stats: Mapping) -> str:
    """One line for a log: overall sparsity, parameters kept and checkpoint sizes."""
    return (
        f"sparsity {stats['sparsity']:.4f} over {len(stats['layers'])} prunable layers "
        f"({len(stats['protected_layers'])} protected, {len(stats['dense_layers'])} left dense); "
        f"{stats['params_nonzero']:,} of {stats['params_total']:,} parameters nonzero; "
        f"checkpoint {stats['compact_checkpoint_bytes']:,} B compact vs {stats['dense_checkpoint_bytes']:,} B dense"
    )
