"""Mask distributions for MaskPro: which layers train, the N:M and Bernoulli estimators, initial logits.

* **N:M** (:class:`NMPolicy`): per group of M consecutive entries of ``weight.reshape(out, -1)``,
  N kept entries drawn without replacement from ``softmax(logits)`` (Plackett-Luce; sampled as
  Gumbel-top-N). The score is the exact gradient of log P(kept set), the sum over the N! orders in
  which the set can be drawn. Final mask: the top-N logits per group.
* **unstructured** (:class:`BernoulliPolicy`): one Bernoulli(sigmoid(logit)) per weight; score
  ``m - sigmoid(logit)``. Final mask: the top-k logits per layer, k = the initial mask's kept
  count, so the final sparsity is the pruning's exactly.

Initial logits are either constant (``+-logits``, the original recipe) or the magnitude pruner's
own score through a temperature (:func:`magnitude_logits`), so that weights near the pruning
threshold start uncertain and clear keeps and prunes stay put.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from maskdm.errors import MaskDMError

log = logging.getLogger(__name__)

#: Largest N the exact N:M score supports: it sums over the N! orders of each kept set.
MAX_EXACT_N = 4

TARGET_CHOICES = ("all", "down_blocks", "up_blocks", "mid_block")
#: ``constant``: +-logits from the initial mask (the original recipe); ``magnitude``: the magnitude
#: pruner's own score through a temperature (:func:`magnitude_logits`); ``pruner``: the scores the
#: prune run recorded, whatever its pruner (:func:`score_logits`).
INIT_CHOICES = ("constant", "magnitude", "pruner")
#: Logits from scores are clipped to +-LOGIT_CAP: beyond about 17 a float32 draw never flips anyway.
LOGIT_CAP = 30.0
#: Magnitudes below this count as this, so an exact zero has a finite log.
_TINY = 1e-30

# --- targets -----------------------------------------------------------------------------------


def select_targets(mask_names: Iterable[str], targets: str) -> list[str]:
    """The mask names selected by ``targets``, in the order of ``mask_names``.

    ``targets`` is ``all`` or comma-separated module-name prefixes (``down_blocks``, ``up_blocks``,
    ``mid_block``, or finer ones such as ``down_blocks.1``). A prefix matches a name equal to it or
    starting with it followed by a dot. A prefix that matches nothing is an error, not a no-op.
    """
    names = list(mask_names)
    prefixes = [p.strip() for p in str(targets).split(",") if p.strip()]
    if not prefixes:
        raise MaskDMError(f"targets is empty: use 'all' or comma-separated prefixes ({_available(names)})")
    if "all" in prefixes:
        if not names:
            raise MaskDMError("targets=all matches no layer: the masks file holds no masks")
        return names
    for prefix in prefixes:
        if not any(_matches(n, prefix) for n in names):
            raise MaskDMError(f"targets '{prefix}' matches no masked layer; available prefixes: {_available(names)}")
    return [n for n in names if any(_matches(n, p) for p in prefixes)]


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _available(names: Sequence[str]) -> str:
    tops = sorted({n.split(".", 1)[0] for n in names})
    return ", ".join(["all", *tops]) if tops else "none (no masks)"


# --- patterns ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NMPattern:
    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(pattern: str) -> NMPattern | None:
    """``"unstructured"`` -> None; ``"2:4"`` -> NMPattern(2, 4). N > 4 is refused (see MAX_EXACT_N)."""
    text = str(pattern).strip().lower()
    if text == "unstructured":
        return None
    try:
        n_text, m_text = text.split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise MaskDMError(f"pattern '{pattern}' is neither 'unstructured' nor N:M such as '2:4'") from None
    if not 0 < n < m:
        raise MaskDMError(f"pattern '{pattern}': N:M needs 0 < N < M")
    if n > MAX_EXACT_N:
        raise MaskDMError(
            f"pattern '{pattern}': train_masks supports N <= {MAX_EXACT_N}; its exact score sums over the "
            f"N! = {math.factorial(n)} orders of every kept set"
        )
    return NMPattern(n, m)


# --- N:M policy: Plackett-Luce sampling without replacement --------------------------------------


# Groups are processed "columns first": a (M, G) tensor whose row j holds entry j of every group,
# so each step is an elementwise operation over G contiguous values. Reductions over a tiny last
# dimension of a (G, M) tensor run several times slower on a CPU.


@lru_cache(maxsize=None)
def _orders(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All n! orders of n slots, and for each order the position of each slot in it."""
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)
    return perms, torch.argsort(perms, dim=1)


def _slots(mask: torch.Tensor, n: int) -> torch.Tensor:
    """(N, G) row indices of the kept entries of a (M, G) mask, in increasing order."""
    m, groups = mask.shape
    small = torch.uint8 if m < 256 else torch.int32  # byte arithmetic is several times faster here
    seen = torch.zeros(groups, dtype=small, device=mask.device)
    slots = [torch.zeros(groups, dtype=small, device=mask.device) for _ in range(n)]
    for j in range(m):
        kept = mask[j]
        for s, slot in enumerate(slots):
            slot.add_((kept & (seen == s)).to(small), alpha=j)
        seen += kept
    if not bool((seen == n).all()):
        raise ValueError(f"every group of the mask must keep exactly {n} entries")
    return torch.stack(slots).long()


def _plackett_luce(logits: torch.Tensor, mask: torch.Tensor, n: int):
    """Columns-first terms of P(kept set), in float64 (the softmax of a group underflows only for
    logit gaps above about 700).

    Returns p (M, G); the slots (N, G) and their p; for every order (P of them) and draw k the
    inverse of the mass left before that draw, 1 / (1 - c_k) (P, G each, one per draw); and the
    probability of each order (P, G).
    """
    z = logits.to(torch.float64)
    p = (z - z.amax(0)).exp_()
    p /= p.sum(0)
    slots = _slots(mask, n)
    kept_p = p.gather(0, slots)
    perms, _ = _orders(n)
    ordered = kept_p[perms.to(kept_p.device)]  # (P, N, G)
    # The mass left before draw k is the mass outside the set plus the kept entries not drawn yet:
    # a sum of positive terms, never 1 - (drawn mass), which cancels when one entry dominates.
    left = p.masked_fill(mask, 0.0).sum(0).expand(perms.shape[0], -1)
    inv_left = [None] * n
    for k in reversed(range(n)):
        left = left + ordered[:, k]
        inv_left[k] = 1.0 / left.clamp_min(1e-300)
    p_orders = ordered[:, 0] * inv_left[0]
    for k in range(1, n):
        p_orders = p_orders * ordered[:, k] * inv_left[k]
    return p, slots, kept_p, inv_left, p_orders


def _nm_score_columns(logits: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Columns-first :func:`nm_score`: (M, G) logits and mask in, (M, G) float32 score out."""
    p, slots, kept_p, inv_left, p_orders = _plackett_luce(logits, mask, n)
    w = p_orders / p_orders.sum(0).clamp_min(1e-300)  # posterior over the orders (P, G)
    # Running sum over draws of w / (mass left): B_k = sum_{k' <= k} w / (1 - c_k').
    running, acc = [], torch.zeros_like(w)
    for k in range(n):
        acc = acc + w * inv_left[k]
        running.append(acc)
    b_outside = running[-1].sum(0)
    _, positions = _orders(n)
    by_slot = torch.stack(running, 1).gather(1, positions.to(w.device)[:, :, None].expand(-1, -1, w.shape[1]))
    b_kept = by_slot.sum(0)  # (N, G): each slot's sum up to its own draw, averaged over orders
    score = -(p * b_outside)
    score.scatter_(0, slots, 1.0 - kept_p * b_kept)
    return score.to(torch.float32)


def _rank_top(keys: torch.Tensor, n: int, prefer: torch.Tensor | None = None) -> torch.Tensor:
    """Columns-first top-N: (M, G) keys -> (M, G) bool, ties to ``prefer`` then to the lower row."""
    m = keys.shape[0]
    if prefer is None:
        prefer = torch.zeros_like(keys, dtype=torch.bool)
    keep = []
    for j in range(m):
        beaten_by = torch.zeros(keys.shape[1], dtype=torch.int32, device=keys.device)
        for i in range(m):
            if i == j:
                continue
            tie_win = prefer[i] >= prefer[j] if i < j else prefer[i] > prefer[j]
            beaten_by += (keys[i] > keys[j]) | ((keys[i] == keys[j]) & tie_win)
        keep.append(beaten_by < n)
    return torch.stack(keep)


def _gumbel_top_n_columns(logits: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    gumbel = uniform.clamp_min_(1e-30).log_().neg_().log_().neg_()  # -log(-log U), U in (0, 1)
    return _rank_top(logits.float() + gumbel, n)


def nm_log_prob(logits: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """(G,) log P(kept set): the N kept entries of each (G, M) group drawn without replacement from softmax(logits)."""
    *_, p_orders = _plackett_luce(logits.T, mask.T, n)
    return p_orders.sum(0).log()


def nm_score(logits: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """(G, M) exact gradient of log P(kept set) w.r.t. the logits (see docs/details/maskpro.md).

    With w the posterior over orders and 1/(1 - c_k) the inverse mass left before draw k:
    an entry outside the set gets ``-p_j E_w[sum_k 1/(1 - c_k)]``; a kept entry drawn at position
    r gets ``1 - p_j E_w[sum_{k<=r} 1/(1 - c_k)]``.
    """
    return _nm_score_columns(logits.T, mask.T, n).T


def gumbel_top_n(logits: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(G, M) bool: N entries per row drawn without replacement from softmax(logits) (Gumbel-top-N)."""
    return _gumbel_top_n_columns(logits.T.contiguous(), n, generator).T


def top_entries(scores: torch.Tensor, k: int, prefer: torch.Tensor) -> torch.Tensor:
    """Bool mask of the k largest ``scores`` along the last dim; ties go to ``prefer`` (the initial mask), then to the lower index."""
    by_prefer = torch.argsort(prefer.to(torch.uint8), dim=-1, descending=True, stable=True)
    by_score = torch.argsort(scores.gather(-1, by_prefer), dim=-1, descending=True, stable=True)
    return _scatter_top(scores, by_prefer.gather(-1, by_score)[..., :k])


def _scatter_top(like: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.zeros(like.shape, dtype=torch.bool, device=like.device).scatter_(-1, indices, True)


# --- unstructured policy: independent Bernoulli ---------------------------------------------------


def bernoulli_sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    # 1 - U lies in (0, 1], so an entry whose probability is below float32 resolution never flips.
    u = 1.0 - torch.rand(logits.shape, generator=generator, device=logits.device)
    return u < torch.sigmoid(logits.float())


def bernoulli_score(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """d log P(mask) / d logits for independent Bernoulli(sigmoid(logits)): ``m - sigmoid(logit)``."""
    return mask.to(torch.float32) - torch.sigmoid(logits.float())


# --- policies over a model's layers --------------------------------------------------------------

#: Bounds the (orders x draws x groups) float64 temporaries of the N:M score (2:4: 4 per group,
#: 4:8: 96) to about 32 MB each.
_SCORE_CHUNK_ELEMENTS = 1 << 22


class MaskPolicy:
    """Logits of all trained layers in one flat buffer, and the pattern's estimator.

    One buffer for every layer means a handful of kernels per update instead of a handful per
    layer: on a GPU the per-layer launches would otherwise cost more than the arithmetic.
    ``flat`` is the buffer; ``logits`` gives each layer's logits shaped like its weight.
    """

    def __init__(self, initial_masks: Mapping[str, torch.Tensor], logits: Mapping[str, torch.Tensor]):
        self.names = list(logits)
        self.shapes = {k: tuple(v.shape) for k, v in logits.items()}
        self.initial = {k: initial_masks[k] for k in self.names}
        self.flat = self._flatten({k: v.to(torch.float32) for k, v in logits.items()})
        self.flat_initial = self._flatten(self.initial)

    def _flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer, weight-shaped tensors of a flat buffer (views where the layout allows)."""
        raise NotImplementedError

    @property
    def logits(self) -> dict[str, torch.Tensor]:
        return self.unflatten(self.flat)

    def to(self, device: torch.device | str) -> "MaskPolicy":
        self.initial = {k: v.to(device) for k, v in self.initial.items()}
        self.flat = self.flat.to(device)
        self.flat_initial = self.flat_initial.to(device)
        return self

    def sample_flat(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One mask sample of every trained layer, in the flat layout."""
        raise NotImplementedError

    def score_flat(self, mask: torch.Tensor) -> torch.Tensor:
        """d log P(mask) / d logits, in the flat layout."""
        raise NotImplementedError

    def final_masks(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sample(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.unflatten(self.sample_flat(generator))

    def step(self, mask: torch.Tensor, coefficient: float) -> None:
        """``logits <- logits - coefficient * score(mask)`` for a flat sampled ``mask``."""
        self.flat.sub_(self.score_flat(mask), alpha=coefficient)


class NMPolicy(MaskPolicy):
    """N:M: per group of M consecutive entries of ``weight.reshape(out, -1)``, N kept (Plackett-Luce).

    The flat layout is columns-first, (M, all groups of all layers). Layers whose flattened input
    size is not a multiple of M (left dense by N:M pruning) are not trained: :func:`make_policy`
    leaves them out.
    """

    def __init__(self, pattern: NMPattern, initial_masks, logits):
        self.pattern = pattern
        super().__init__(initial_masks, logits)

    def _flatten(self, tensors):
        return torch.cat([tensors[k].reshape(-1, self.pattern.m).T for k in self.names], 1).contiguous()

    def unflatten(self, flat):
        out, start = {}, 0
        for name in self.names:
            groups = math.prod(self.shapes[name]) // self.pattern.m
            out[name] = flat[:, start : start + groups].T.reshape(self.shapes[name])
            start += groups
        return out

    def sample_flat(self, generator=None):
        return _gumbel_top_n_columns(self.flat, self.pattern.n, generator)

    def score_flat(self, mask):
        groups = max(1, _SCORE_CHUNK_ELEMENTS // (math.factorial(self.pattern.n) * self.pattern.n))
        parts = [_nm_score_columns(lg, mk, self.pattern.n) for lg, mk in zip(self.flat.split(groups, 1), mask.split(groups, 1))]
        return torch.cat(parts, 1)

    def final_masks(self):
        return self.unflatten(_rank_top(self.flat, self.pattern.n, self.flat_initial))


class BernoulliPolicy(MaskPolicy):
    """Unstructured: one Bernoulli(sigmoid(logit)) per weight; final mask keeps the initial count per layer."""

    def _flatten(self, tensors):
        return torch.cat([tensors[k].reshape(-1) for k in self.names]).contiguous()

    def unflatten(self, flat):
        out, start = {}, 0
        for name in self.names:
            size = math.prod(self.shapes[name])
            out[name] = flat[start : start + size].view(self.shapes[name])
            start += size
        return out

    def sample_flat(self, generator=None):
        return bernoulli_sample(self.flat, generator)

    def score_flat(self, mask):
        return bernoulli_score(self.flat, mask)

    def final_masks(self):
        final = {}
        for name, lg in self.logits.items():
            initial = self.initial[name]
            kept = top_entries(lg.reshape(1, -1), int(initial.sum()), initial.reshape(1, -1))
            final[name] = kept.reshape(lg.shape)
        return final


def trainable_layers(masks: Mapping[str, torch.Tensor], names: Iterable[str], pattern: NMPattern | None) -> list[str]:
    """The selected layers the pattern can train (N:M: flattened input a multiple of M)."""
    if pattern is None:
        return list(names)
    return [n for n in names if masks[n][0].numel() % pattern.m == 0]


def check_nm_masks(masks: Mapping[str, torch.Tensor], names: Iterable[str], pattern: NMPattern) -> None:
    """Every group of the named layers' masks keeps exactly N of M, else one line naming the layer."""
    for name in names:
        per_group = masks[name].reshape(-1, pattern.m).sum(-1)
        bad = per_group != pattern.n
        if bool(bad.any()):
            raise MaskDMError(
                f"the initial mask of '{name}' is not {pattern}: a group keeps {int(per_group[bad][0])} of {pattern.m}; "
                f"train it with the pattern it was pruned with"
            )


def make_policy(
    pattern: str | NMPattern | None,
    initial_masks: Mapping[str, torch.Tensor],
    targets: Sequence[str],
    magnitude: float,
    logits: Mapping[str, torch.Tensor] | None = None,
) -> MaskPolicy:
    """The policy for ``targets`` of ``initial_masks``: logits ``+magnitude`` where kept, ``-magnitude`` elsewhere
    (or the given ``logits``, to continue training)."""
    nm = parse_pattern(pattern) if isinstance(pattern, str) else pattern
    names = trainable_layers(initial_masks, targets, nm)
    if not names:
        raise MaskDMError(
            f"none of the {len(targets)} selected layers can be trained with pattern {nm}: "
            f"their flattened input sizes are not multiples of {nm.m if nm else 1}"
        )
    if nm is not None:
        check_nm_masks(initial_masks, names, nm)
        skipped = len(targets) - len(names)
        if skipped:
            log.info("%d selected layers are left at their initial mask: input size not a multiple of %d", skipped, nm.m)
    if logits is None:
        logits = {n: initial_masks[n].to(torch.float32) * (2 * magnitude) - magnitude for n in names}
    else:
        missing = [n for n in names if n not in logits]
        if missing:
            raise MaskDMError(f"the logits to continue from hold no logits for '{missing[0]}'")
        for n in names:
            if tuple(logits[n].shape) != tuple(initial_masks[n].shape):
                raise MaskDMError(f"the logits of '{n}' have shape {tuple(logits[n].shape)}, its mask {tuple(initial_masks[n].shape)}")
        logits = {n: logits[n] for n in names}
    if nm is None:
        return BernoulliPolicy(initial_masks, logits)
    return NMPolicy(nm, initial_masks, logits)


def magnitude_logits(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    names: Sequence[str],
    pattern: str | NMPattern | None,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """Initial logits from the magnitude pruner's own score, for the layers of ``names`` the pattern trains.

    * unstructured: ``log(|w| / t) / temperature`` with ``t`` the layer's threshold, the geometric
      midpoint between its smallest kept and largest pruned magnitude. A weight at the threshold
      starts at probability 1/2; one a factor ``e^temperature`` above it at sigmoid(1).
    * N:M: ``log|w| / temperature`` per group (softmax is shift-invariant), so a group's
      Plackett-Luce draw weights each entry by ``|w|^(1/temperature)``.

    Clipped to +-:data:`LOGIT_CAP`. The final mask at these logits is the initial mask, so the
    mask must be a magnitude mask of ``weights``: a kept weight smaller than a pruned one in the
    same layer (or group) is an error.
    """
    missing = [name for name in trainable_layers(masks, names, parse_pattern(pattern) if isinstance(pattern, str) else pattern)
               if name not in weights]
    if missing:
        raise MaskDMError(f"init=magnitude: the model has no weight for the masked layer '{missing[0]}'")
    # The magnitude pruner compares |w| within each layer (or N:M group): its scores, thresholded there.
    scores = {name: w.detach().abs() for name, w in weights.items()}
    return score_logits(scores, masks, names, pattern, temperature, "layer", pruner="magnitude")


def score_logits(
    scores: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    names: Sequence[str],
    pattern: str | NMPattern | None,
    temperature: float,
    selection: str,
    pruner: str = "the pruner",
) -> dict[str, torch.Tensor]:
    """Initial logits from any pruner's recorded scores (``scores.safetensors`` of a prune run).

    ``magnitude_logits`` with the recorded score in place of ``|w|``, thresholded where the pruner
    made its choice (``selection``, :func:`maskdm.method.pruning.selection_of`): ``layer`` one threshold
    per layer, ``row`` one per output row (wanda), ``block:<B>`` one per row within each block of B
    columns (sparsegpt). Each threshold is the geometric midpoint between the smallest kept and
    the largest pruned score of its group, so every kept weight starts above 1/2 and every pruned
    one below, and the final mask at these logits (top-k per layer) is the initial mask. A group
    that keeps all or none starts at +-:data:`LOGIT_CAP`. N:M: ``log s / temperature`` per group.
    The mask must be the one the scores chose: a kept score below a pruned one in a group is an error.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise MaskDMError(f"temperature must be a positive number, not {temperature}")
    nm = parse_pattern(pattern) if isinstance(pattern, str) else pattern
    out = {}
    for name in trainable_layers(masks, names, nm):
        if name not in scores:
            raise MaskDMError(f"init=pruner: the prune run recorded no scores for the masked layer '{name}'")
        score = scores[name].detach().to(torch.float64).cpu()
        kept = masks[name].to(torch.bool).cpu()
        if score.shape != kept.shape:
            raise MaskDMError(f"init=pruner: the scores of '{name}' have shape {tuple(score.shape)}, its mask {tuple(kept.shape)}")
        if not bool(torch.isfinite(score).all()) or bool((score < 0).any()):
            raise MaskDMError(f"init=pruner: the scores of '{name}' are not all finite and >= 0")
        log_score = score.clamp_min(_TINY).log()
        if nm is not None:
            rows, kept_rows = score.reshape(-1, nm.m), kept.reshape(-1, nm.m)
            _check_score_order(name, pruner, rows, kept_rows)
            log_rows = log_score.reshape(-1, nm.m)
            logits = ((log_rows - log_rows.amax(1, keepdim=True)) / temperature).reshape(kept.shape)
        else:
            rows, kept_rows, log_rows = score.reshape(kept.shape[0], -1), kept.reshape(kept.shape[0], -1), log_score.reshape(kept.shape[0], -1)
            logits = torch.empty_like(log_rows)
            for lo, hi, whole_layer in _selection_blocks(selection, rows.shape[1]):
                s, k, ls = rows[:, lo:hi], kept_rows[:, lo:hi], log_rows[:, lo:hi]
                if whole_layer:
                    s, k, ls = s.reshape(1, -1), k.reshape(1, -1), ls.reshape(1, -1)
                _check_score_order(name, pruner, s, k)
                logits[:, lo:hi] = _group_logits(s, ls, k, temperature).reshape(rows.shape[0], hi - lo)
            logits = logits.reshape(kept.shape)
        out[name] = logits.clamp(-LOGIT_CAP, LOGIT_CAP).to(torch.float32)
    return out


def _selection_blocks(selection: str, cols: int) -> list[tuple[int, int, bool]]:
    """Column ranges ``(lo, hi, whole_layer)`` of the (rows, cols) view within which each row's choice was made."""
    if selection == "layer":
        return [(0, cols, True)]
    if selection == "row":
        return [(0, cols, False)]
    if selection.startswith("block:") and selection[6:].isdigit() and int(selection[6:]) > 0:
        size = int(selection[6:])
        return [(i, min(i + size, cols), False) for i in range(0, cols, size)]
    raise MaskDMError(f"init=pruner: the scores' selection '{selection}' is not known to this code version")


def _group_logits(score, log_score, kept, temperature) -> torch.Tensor:
    """Per group (row of the 2-D inputs): ``(log s - log t) / temperature``, t the midpoint threshold; +-cap if all kept or none."""
    smallest_kept = score.masked_fill(~kept, math.inf).amin(1, keepdim=True)
    largest_pruned = score.masked_fill(kept, -math.inf).amax(1, keepdim=True)
    mixed = torch.isfinite(smallest_kept) & torch.isfinite(largest_pruned)
    threshold = 0.5 * (smallest_kept.clamp_min(_TINY).log() + largest_pruned.clamp_min(_TINY).log())
    logits = (log_score - torch.where(mixed, threshold, torch.zeros_like(threshold))) / temperature
    return torch.where(mixed, logits, torch.where(kept, LOGIT_CAP, -LOGIT_CAP).to(torch.float64))


def _check_score_order(name: str, pruner: str, score: torch.Tensor, kept: torch.Tensor) -> None:
    """Each group (row of the 2-D inputs): no pruned score above a kept one."""
    smallest_kept = score.masked_fill(~kept, math.inf).amin(-1)
    largest_pruned = score.masked_fill(kept, -math.inf).amax(-1)
    excess = float((largest_pruned - smallest_kept).max())
    if excess > 0:
        option, chosen = ("init=magnitude", "a magnitude mask of the original weights") if pruner == "magnitude" else (
            "init=pruner", f"the one {pruner}'s recorded scores chose")
        raise MaskDMError(
            f"{option}: the initial mask of '{name}' is not {chosen} (a pruned weight scores higher than a kept one by "
            f"{excess:.3g}); use init=constant"
        )
