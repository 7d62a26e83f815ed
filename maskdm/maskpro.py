"""MaskPro mask learning: better masks for the original dense weights by policy gradient.

Start from the masks a cheap pruner gave and learn, on the ORIGINAL dense weights, a distribution
over masks whose samples lower the diffusion loss. The gradient estimate is REINFORCE with the
initial mask's loss on the same minibatch as the baseline, plus a moving average of the remaining
reward (``delta``) as a second baseline.

The two estimators (see docs/details/maskpro.md for the formulas):

* **N:M** (:class:`NMPolicy`): per group of M consecutive entries of ``weight.reshape(out, -1)``,
  N kept entries drawn without replacement from ``softmax(logits)`` (Plackett-Luce; sampled as
  Gumbel-top-N). The score is the exact gradient of log P(kept set), the sum over the N! orders in
  which the set can be drawn. Final mask: the top-N logits per group.
* **unstructured** (:class:`BernoulliPolicy`): one Bernoulli(sigmoid(logit)) per weight; score
  ``m - sigmoid(logit)``. Final mask: the top-k logits per layer, k = the initial mask's kept
  count, so the final sparsity is the pruning's exactly.

The signal must be the mask and nothing else, so every minibatch is *replayed*: batch ``b`` is the
same images (a fixed subset in a fixed order, deterministic transforms) with the same timesteps
and noise (:func:`maskdm.diffusion.draw_noise_and_timesteps` seeded by ``(seed, b)``) in the
baseline stage and in every epoch of training. Both go through :func:`replayed_loss`, so they
cannot drift apart, and with the sampled mask equal to the initial one the reward is exactly 0.

No backpropagation through the UNet: forward passes only, under ``torch.no_grad``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from maskdm.diffusion import batch_loss, draw_noise_and_timesteps
from maskdm.errors import MaskDMError
from maskdm.masks import apply_masks, masked_modules, set_masks

log = logging.getLogger(__name__)

#: Largest N the exact N:M score supports: it sums over the N! orders of each kept set.
MAX_EXACT_N = 4
#: Decay of the moving reward baseline ``delta`` (the original recipe's 0.99).
DELTA_DECAY = 0.99
#: Version tag of the replay protocol below; a baseline made under another cannot be replayed.
REPLAY_PROTOCOL_VERSION = "maskdm-replay/1"
#: Version tag of logits.safetensors files.
LOGITS_FORMAT = "maskdm-maskpro-logits/1"
#: Mixed into the mask-sampling seed so its stream never coincides with the replay draws.
_MASK_STREAM = 0x6D61736B

TARGET_CHOICES = ("all", "down_blocks", "up_blocks", "mid_block")


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


# --- the replayed minibatches --------------------------------------------------------------------


def subset_indices(dataset_len: int, dataset_size: int, seed: int) -> np.ndarray:
    """The fixed subset of dataset indices, in the order batches take them.

    ``numpy.random.Generator(PCG64(seed)).permutation(dataset_len)[:dataset_size]``: a seeded
    permutation rather than the first ``dataset_size`` indices, because image folders are sorted by
    class and the first images would all be of one class. ``dataset_size`` larger than the dataset
    takes the whole dataset.
    """
    if dataset_size <= 0:
        raise MaskDMError(f"dataset_size must be positive, not {dataset_size}")
    perm = np.random.Generator(np.random.PCG64(int(seed))).permutation(int(dataset_len))
    return perm[: min(int(dataset_size), int(dataset_len))]


def count_batches(subset_len: int, batch_size: int, max_batches: int = 0) -> int:
    """Full batches of ``batch_size`` from ``subset_len`` images (the incomplete last one dropped,
    so every batch's loss has the same variance), at most ``max_batches`` (0 = no limit)."""
    if batch_size <= 0:
        raise MaskDMError(f"batch_size must be positive, not {batch_size}")
    if max_batches < 0:
        raise MaskDMError(f"max_batches must be 0 (no limit) or positive, not {max_batches}")
    full = subset_len // batch_size
    if full == 0:
        raise MaskDMError(
            f"the subset holds {subset_len} images, fewer than one batch of {batch_size}: lower batch_size or raise dataset_size"
        )
    return min(full, max_batches) if max_batches else full


@dataclass(frozen=True)
class ReplaySpec:
    """Everything that fixes the replayed minibatches (apart from the dataset's contents)."""

    dataset_size: int
    batch_size: int
    max_batches: int
    seed: int


class ReplayBatches:
    """The minibatches of a replayed pass: batch ``b`` holds the same images every time.

    Images are read once and kept in memory (``cache=True``), since training passes over the same
    subset thousands of times; 20,000 CIFAR images take about 250 MB.
    """

    def __init__(self, dataset, spec: ReplaySpec, cache: bool = True):
        self.dataset = dataset
        self.spec = spec
        self.indices = subset_indices(len(dataset), spec.dataset_size, spec.seed)
        self.num_batches = count_batches(len(self.indices), spec.batch_size, spec.max_batches)
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None
        self._check_deterministic()

    def __len__(self) -> int:
        return self.num_batches

    @property
    def seed(self) -> int:
        return self.spec.seed

    def images(self, b: int) -> torch.Tensor:
        if not 0 <= b < self.num_batches:
            raise IndexError(f"batch {b} out of range 0..{self.num_batches - 1}")
        if self._cache is not None and b in self._cache:
            return self._cache[b]
        lo = b * self.spec.batch_size
        batch = torch.stack([_image(self.dataset[int(i)]) for i in self.indices[lo : lo + self.spec.batch_size]])
        if self._cache is not None:
            self._cache[b] = batch
        return batch

    def _check_deterministic(self) -> None:
        # A random transform (a training-split flip) would make the replay silently inexact.
        for i in self.indices[:8]:
            if not torch.equal(_image(self.dataset[int(i)]), _image(self.dataset[int(i)])):
                raise MaskDMError(
                    "the dataset returns different images for the same index (random transforms): "
                    "mask learning needs deterministic (evaluation) transforms"
                )

    def fingerprint(self) -> str:
        """sha256 over the subset order, the batching and the first batch's pixels."""
        digest = hashlib.sha256()
        digest.update(np.asarray(self.indices[: self.num_batches * self.spec.batch_size], dtype=np.int64).tobytes())
        digest.update(f"{self.spec.batch_size}/{self.num_batches}".encode())
        digest.update(self.images(0).to(torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def protocol(self) -> dict:
        """The sampling protocol, as recorded in baseline_summary.json and checked by train_masks."""
        return {
            "version": REPLAY_PROTOCOL_VERSION,
            "subset": "numpy.random.Generator(PCG64(seed)).permutation(len(dataset))[:dataset_size]",
            "batches": "consecutive batch_size slices of the subset, incomplete last batch dropped, at most max_batches",
            "transforms": "deterministic (no random flip)",
            "draws": "batch b: maskdm.diffusion.draw_noise_and_timesteps(seed, b, shape, num_train_timesteps)",
            "model_mode": "eval (no dropout), torch.no_grad",
            "dataset_len": len(self.dataset),
            "subset_len": int(len(self.indices)),
            "num_batches": self.num_batches,
            "fingerprint": self.fingerprint(),
        }


def _image(item) -> torch.Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


@torch.no_grad()
def replayed_loss(unet: nn.Module, scheduler, batches: ReplayBatches, b: int, device: torch.device | str = "cpu") -> float:
    """Mean noise-prediction loss of ``unet`` on batch ``b`` under the replayed draw ``(seed, b)``.

    The one loss both baseline_loss and train_masks compute, so the two cannot drift apart.
    ``unet`` must be in eval mode (dropout would make the replay inexact).
    """
    images = batches.images(b).to(device)
    draw = draw_noise_and_timesteps(batches.seed, b, tuple(images.shape), scheduler.config.num_train_timesteps)
    return float(batch_loss(unet, scheduler, images, draw))


def ensure_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Register ``masks`` on ``model`` once; if exactly these layers already carry masks, swap them."""
    registered = masked_modules(model)
    if not registered:
        # apply_masks keeps the given tensors as the mask buffers; set_masks later writes into
        # them, so they must not be the caller's (the initial masks would change under it).
        apply_masks(model, {k: v.clone() for k, v in masks.items()})
    elif set(registered) == set(masks):
        set_masks(model, masks)
    else:
        raise MaskDMError("the model already carries masks on other layers than the ones given")


def compute_baseline_losses(
    unet: nn.Module,
    scheduler,
    masks: Mapping[str, torch.Tensor],
    batches: ReplayBatches,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """One mean loss per replayed batch of the dense ``unet`` under the initial ``masks`` (float64)."""
    ensure_masks(unet, masks)
    unet.eval()
    steps = tqdm(range(len(batches)), desc="baseline loss", unit="batch", disable=not progress)
    return np.array([replayed_loss(unet, scheduler, batches, b, device) for b in steps], dtype=np.float64)


def baseline_summary(losses: np.ndarray, batches: ReplayBatches, **params) -> dict:
    """The content of baseline_summary.json: statistics, protocol, and what train_masks must match."""
    return {
        "mean": float(np.mean(losses)),
        "std": float(np.std(losses)),
        "count": int(len(losses)),
        "protocol": batches.protocol(),
        "params": {**asdict(batches.spec), **params},
    }


def resolve_from_baseline(summary: Mapping, explicit: Mapping[str, object | None]) -> dict:
    """Each of ``explicit``'s keys: the baseline's value where not given, else the given one if equal.

    A given value that contradicts the baseline run is an error: the baseline losses would belong
    to other minibatches than the ones trained on, and the reward would be noise.
    """
    recorded = summary["params"]
    resolved = {}
    for key, value in explicit.items():
        if key not in recorded:
            raise MaskDMError(f"the baseline summary records no '{key}'; rerun baseline_loss with this code version")
        if value is not None and not _same(value, recorded[key]):
            raise MaskDMError(
                f"{key}={value} contradicts the baseline run's {key}={recorded[key]}; leave {key} unset to use the "
                f"baseline's, or run baseline_loss with {key}={value}"
            )
        resolved[key] = recorded[key]
    return resolved


def _same(given: object, recorded: object) -> bool:
    if isinstance(recorded, int) and not isinstance(recorded, bool):
        try:
            return int(str(given).strip()) == recorded
        except ValueError:
            return False
    return str(given).strip() == str(recorded)


def check_protocol(summary: Mapping, batches: ReplayBatches, num_baseline_losses: int) -> None:
    """Check that ``batches`` replays exactly the minibatches the baseline run measured."""
    recorded = summary["protocol"]
    if recorded.get("version") != REPLAY_PROTOCOL_VERSION:
        raise MaskDMError(
            f"the baseline run used replay protocol {recorded.get('version')!r}, this code {REPLAY_PROTOCOL_VERSION!r}: rerun baseline_loss"
        )
    if num_baseline_losses != len(batches):
        raise MaskDMError(f"the baseline run holds {num_baseline_losses} batch losses but the subset makes {len(batches)} batches")
    if recorded.get("fingerprint") != batches.fingerprint():
        raise MaskDMError(
            "the dataset does not give the baseline run's minibatches (subset, order or pixels differ): "
            "use the same dataset as the baseline run"
        )


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


# --- training ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """``max_step`` counts updates and ``epoch`` passes over the subset; training stops at whichever
    comes first (0 = no limit for either, not both). One update per ``accumulation`` batches."""

    lr: float = 1.0
    epoch: int = 2000
    max_step: int = 15000
    accumulation: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.accumulation <= 0:
            raise MaskDMError(f"accumulation must be positive, not {self.accumulation}")
        if self.epoch < 0 or self.max_step < 0:
            raise MaskDMError("epoch and max_step must be 0 (no limit) or positive")
        if self.epoch == 0 and self.max_step == 0:
            raise MaskDMError("epoch and max_step are both 0 (no limit): set at least one")


def planned_updates(num_batches: int, config: TrainConfig) -> int:
    """Updates until ``max_step`` updates or ``epoch`` passes over ``num_batches`` batches, whichever first.

    Batches form one stream that wraps around the subset, so an update's window may span two
    epochs; a last window that the epoch limit would cut short is not run.
    """
    by_epoch = (config.epoch * num_batches) // config.accumulation if config.epoch else None
    by_step = config.max_step or None
    return min(x for x in (by_epoch, by_step) if x is not None)


@dataclass
class UpdateMetrics:
    step: int  # 1-based update count
    epoch: float  # passes over the subset so far
    loss: float  # mean loss of the sampled mask over the update's batches
    baseline_loss: float  # mean initial-mask loss over the same batches
    improvement: float  # baseline_loss - loss
    delta: float  # moving baseline of the reward after this update
    mask_flip_rate: float  # share of all mask entries where the sampled mask differs from the initial one
    sparsity: float  # share of all mask entries the sampled mask drops

    def as_metrics(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "step"}


@dataclass
class TrainState:
    """What continuing a run needs besides the logits."""

    updates: int = 0
    delta: float = 0.0


def mask_generator(seed: int, update: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator that samples the mask of update ``update`` (0-based): fixed by ``(seed, update)``,
    so a continued run samples exactly what an uninterrupted one would."""
    state = np.random.SeedSequence([int(seed), int(update), _MASK_STREAM]).generate_state(2, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] % (2**63 - 1)))


@dataclass
class Timings:
    forward_s: float = 0.0  # forward passes (the batches' losses)
    mask_s: float = 0.0  # mask sampling, set_masks, score and logits update

    @property
    def mask_share(self) -> float:
        total = self.forward_s + self.mask_s
        return self.mask_s / total if total else 0.0


class MaskTrainer:
    """The update loop, generic over how a batch's loss is measured.

    ``model`` carries (or gets) the initial masks on every masked layer; each update samples one
    mask of the trained layers, swaps it in with :func:`set_masks`, measures ``batch_loss(b)`` on
    ``accumulation`` consecutive batches of the wrapping stream, and then with
    ``R = mean(loss) - mean(baseline[b])``: ``delta <- 0.99 delta + 0.01 R`` and
    ``logits <- logits - lr (R - delta) score(sampled mask)``.
    """

    def __init__(
        self,
        model: nn.Module,
        initial_masks: Mapping[str, torch.Tensor],
        policy: MaskPolicy,
        batch_loss: Callable[[int], float],
        baseline: np.ndarray,
        config: TrainConfig,
        state: TrainState | None = None,
    ):
        self.model = model
        # Copies: the model's mask buffers are rewritten every update and may alias the caller's tensors.
        self.initial = {k: v.detach().clone() for k, v in initial_masks.items()}
        self.policy = policy
        self.batch_loss = batch_loss
        self.baseline = np.asarray(baseline, dtype=np.float64)
        self.config = config
        self.state = state or TrainState()
        self.history: list[UpdateMetrics] = []
        self.timings = Timings()
        ensure_masks(model, self.initial)
        self.device = next(model.parameters()).device
        self.policy.to(self.device)
        trained = set(policy.names)
        self._total_entries = sum(m.numel() for m in self.initial.values())
        self._fixed_kept = sum(int(m.sum()) for k, m in self.initial.items() if k not in trained)

    @property
    def num_batches(self) -> int:
        return len(self.baseline)

    def total_updates(self) -> int:
        return planned_updates(self.num_batches, self.config)

    def run(self, on_update: Callable[[UpdateMetrics], None] | None = None, progress: bool = True) -> list[UpdateMetrics]:
        """Run the remaining updates (from ``state.updates``); ``on_update`` gets each update's metrics."""
        total = self.total_updates()
        self.model.eval()
        bar = tqdm(total=total, initial=min(self.state.updates, total), desc="train_masks", unit="update", disable=not progress)
        with bar:
            while self.state.updates < total:
                metrics = self.update()
                self.history.append(metrics)
                bar.update(1)
                bar.set_postfix(improvement=f"{metrics.improvement:.2e}", flips=f"{metrics.mask_flip_rate:.2e}")
                if on_update is not None:
                    on_update(metrics)
        return self.history

    @torch.no_grad()
    def update(self) -> UpdateMetrics:
        cfg = self.config
        start = time.perf_counter()
        sampled = self.policy.sample_flat(mask_generator(cfg.seed, self.state.updates, self.device))
        set_masks(self.model, self.policy.unflatten(sampled))
        self._sync()  # so that the timings below split mask work from forward passes on a GPU too
        mask_s = time.perf_counter() - start

        first = self.state.updates * cfg.accumulation
        window = [(first + i) % self.num_batches for i in range(cfg.accumulation)]
        start = time.perf_counter()
        loss = float(np.mean([self.batch_loss(b) for b in window]))
        self.timings.forward_s += time.perf_counter() - start
        baseline = float(np.mean(self.baseline[window]))

        start = time.perf_counter()
        reward = loss - baseline
        self.state.delta = DELTA_DECAY * self.state.delta + (1 - DELTA_DECAY) * reward
        if cfg.lr != 0:
            self.policy.step(sampled, cfg.lr * (reward - self.state.delta))
        flips, kept = self._mask_stats(sampled)
        self.timings.mask_s += mask_s + time.perf_counter() - start

        self.state.updates += 1
        return UpdateMetrics(
            step=self.state.updates,
            epoch=self.state.updates * cfg.accumulation / self.num_batches,
            loss=loss,
            baseline_loss=baseline,
            improvement=baseline - loss,
            delta=self.state.delta,
            mask_flip_rate=flips / self._total_entries,
            sparsity=1.0 - kept / self._total_entries,
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _mask_stats(self, sampled: torch.Tensor) -> tuple[int, int]:
        # Untrained layers keep their initial masks: no flips, a fixed kept count.
        flips = int((sampled != self.policy.flat_initial).sum())
        return flips, self._fixed_kept + int(sampled.sum())

    def final_masks(self) -> dict[str, torch.Tensor]:
        """The learned masks of every masked layer (untrained ones keep their initial mask), on the CPU."""
        learned = {k: v.cpu() for k, v in self.policy.final_masks().items()}
        return {name: learned.get(name, mask.cpu()) for name, mask in self.initial.items()}


# --- files ---------------------------------------------------------------------------------------


def save_logits(
    path: str | os.PathLike, policy: MaskPolicy, state: TrainState, pattern: str, extra: Mapping[str, object] | None = None
) -> None:
    """logits.safetensors: float32 logits shaped like each trained layer's weight, keyed by module name;
    the metadata holds the format, pattern, update count and delta needed to continue."""
    metadata = {
        "format": LOGITS_FORMAT,
        "pattern": str(pattern),
        "updates": str(state.updates),
        "delta": repr(float(state.delta)),
        **{k: str(v) for k, v in (extra or {}).items()},
    }
    save_file({k: v.detach().to(torch.float32).contiguous().cpu() for k, v in policy.logits.items()}, str(path), metadata)


def load_logits(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], TrainState, dict[str, str]]:
    """The logits, training state and metadata of a logits.safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        logits = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a corrupt or foreign file
        raise MaskDMError(f"cannot read logits file {path}: {exc}") from None
    if metadata.get("format") != LOGITS_FORMAT:
        raise MaskDMError(f"{path} is not a MaskDM logits file (format {metadata.get('format')!r})")
    state = TrainState(updates=int(metadata["updates"]), delta=float(metadata["delta"]))
    return logits, state, metadata


def plot_training_curves(history: Sequence[UpdateMetrics], path: str | os.PathLike) -> None:
    """training_curves.png: loss vs baseline, improvement and delta, flip rate and sparsity, per update."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h.step for h in history]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    axes[0, 0].plot(steps, [h.loss for h in history], label="loss (sampled mask)")
    axes[0, 0].plot(steps, [h.baseline_loss for h in history], label="baseline (initial mask)", alpha=0.7)
    axes[0, 0].set_title("loss on the replayed batches")
    axes[0, 0].legend()
    improvement = np.array([h.improvement for h in history])
    axes[0, 1].plot(steps, improvement, alpha=0.4, label="improvement")
    window = max(1, len(improvement) // 20)
    if window > 1:
        smooth = np.convolve(improvement, np.ones(window) / window, mode="valid")
        axes[0, 1].plot(steps[window - 1 :], smooth, label=f"moving mean ({window})")
    axes[0, 1].axhline(0.0, color="grey", lw=0.8)
    axes[0, 1].set_title("improvement = baseline - loss")
    axes[0, 1].legend()
    axes[1, 0].plot(steps, [h.delta for h in history])
    axes[1, 0].set_title("delta (moving reward baseline)")
    axes[1, 1].plot(steps, [h.mask_flip_rate for h in history], label="mask_flip_rate")
    axes[1, 1].plot(steps, [h.sparsity for h in history], label="sparsity")
    axes[1, 1].set_title("sampled mask")
    axes[1, 1].legend()
    for ax in axes.flat:
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = [
    "BernoulliPolicy",
    "MaskPolicy",
    "MaskTrainer",
    "NMPattern",
    "NMPolicy",
    "ReplayBatches",
    "ReplaySpec",
    "TrainConfig",
    "TrainState",
    "UpdateMetrics",
    "baseline_summary",
    "bernoulli_sample",
    "bernoulli_score",
    "check_protocol",
    "compute_baseline_losses",
    "ensure_masks",
    "gumbel_top_n",
    "load_logits",
    "make_policy",
    "nm_log_prob",
    "nm_score",
    "parse_pattern",
    "planned_updates",
    "plot_training_curves",
    "replayed_loss",
    "resolve_from_baseline",
    "save_logits",
    "select_targets",
    "subset_indices",
    "top_entries",
]
