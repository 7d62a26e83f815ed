"""The replayed minibatches of mask learning, and the baseline train_masks measures against.

The signal of mask learning must be the mask and nothing else, so every minibatch is *replayed*:
batch ``b`` is the same images (a fixed subset in a fixed order, deterministic transforms) with the
same timesteps and noise (:func:`maskdm.diffusion.draw_noise_and_timesteps` seeded by ``(seed, b)``)
in the baseline stage and in every epoch of training. Both go through :func:`replayed_loss`, so they
cannot drift apart, and with the sampled mask equal to the initial one the reward is exactly 0.

The held-out set (:class:`HeldoutBatches`) is the next images of the same seeded permutation,
after the subset, with draws from a stream of their own: images and noise mask training never saw.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from maskdm.diffusion import batch_loss, draw_noise_and_timesteps
from maskdm.errors import MaskDMError
from maskdm.masks import apply_masks, masked_modules, set_masks

log = logging.getLogger(__name__)

#: Version tag of the replay protocol below; a baseline made under another cannot be replayed.
REPLAY_PROTOCOL_VERSION = "maskdm-replay/1"


def seeded_permutation(dataset_len: int, seed: int) -> np.ndarray:
    """The order in which the subset, then the held-out set, take dataset indices."""
    return np.random.Generator(np.random.PCG64(int(seed))).permutation(int(dataset_len))


def subset_indices(dataset_len: int, dataset_size: int, seed: int) -> np.ndarray:
    """The fixed subset of dataset indices, in the order batches take them.

    ``numpy.random.Generator(PCG64(seed)).permutation(dataset_len)[:dataset_size]``: a seeded
    permutation rather than the first ``dataset_size`` indices, because image folders are sorted by
    class and the first images would all be of one class. ``dataset_size`` larger than the dataset
    takes the whole dataset.
    """
    if dataset_size <= 0:
        raise MaskDMError(f"dataset_size must be positive, not {dataset_size}")
    return seeded_permutation(dataset_len, seed)[: min(int(dataset_size), int(dataset_len))]


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

    def __init__(self, dataset, spec: ReplaySpec, cache: bool = True, indices: np.ndarray | None = None, stream: int = 0):
        self.dataset = dataset
        self.spec = spec
        # ``indices`` and ``stream`` are for the held-out set (heldout_batches); training uses the subset on stream 0.
        self.indices = subset_indices(len(dataset), spec.dataset_size, spec.seed) if indices is None else np.asarray(indices)
        self.stream = int(stream)
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


#: Draw stream of the held-out batches: their timesteps and noise are independent of the training draws.
HELDOUT_STREAM = 0x68656C64


def images_outside_subset(dataset_len: int, spec: ReplaySpec) -> int:
    """How many images a held-out set can take: those the training subset does not."""
    return max(0, int(dataset_len) - min(int(spec.dataset_size), int(dataset_len)))


def heldout_batches(dataset, spec: ReplaySpec, size: int, cache: bool = True) -> ReplayBatches:
    """``size`` images that mask training never sees, replayed on a draw stream of their own.

    They are the next images of the subset's seeded permutation after the first ``dataset_size``
    (the most the subset can take), so they are disjoint from the training subset by construction,
    and checked to be. Same batch size as training; the incomplete last batch is dropped.
    """
    if size <= 0:
        raise MaskDMError(f"heldout_size must be positive, not {size}")
    perm = seeded_permutation(len(dataset), spec.seed)
    taken = min(int(spec.dataset_size), len(dataset))
    indices = perm[taken : taken + int(size)]
    if len(indices) < max(int(size), spec.batch_size):
        raise MaskDMError(
            f"heldout_size={size}: only {images_outside_subset(len(dataset), spec)} images of the dataset's {len(dataset)} lie outside the "
            f"training subset of {taken} (and a batch holds {spec.batch_size}); lower heldout_size or dataset_size, "
            f"or set heldout_size=0"
        )
    held = ReplayBatches(dataset, ReplaySpec(len(indices), spec.batch_size, 0, spec.seed), cache, indices=indices, stream=HELDOUT_STREAM)
    if np.intersect1d(held.indices, perm[:taken]).size:
        raise MaskDMError("the held-out images overlap the training subset")  # cannot happen: a permutation has no repeats
    return held


def _image(item) -> torch.Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


@torch.no_grad()
def replayed_loss(unet: nn.Module, scheduler, batches: ReplayBatches, b: int, device: torch.device | str = "cpu") -> float:
    """Mean noise-prediction loss of ``unet`` on batch ``b`` under the replayed draw ``(seed, b)``.

    The one loss both baseline_loss and train_masks compute, so the two cannot drift apart.
    ``unet`` must be in eval mode (dropout would make the replay inexact).
    """
    images = batches.images(b).to(device)
    draw = draw_noise_and_timesteps(batches.seed, b, tuple(images.shape), scheduler.config.num_train_timesteps, batches.stream)
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

