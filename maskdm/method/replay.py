"""The replayed minibatches of mask learning, and the baseline train_masks measures against.

The signal of mask learning must be the mask and nothing else, so every minibatch is *replayed*:
batch ``b`` is the same images (a fixed subset in a fixed order, deterministic transforms) with the
same timesteps and noise (:func:`maskdm.ddpm.diffusion.draw_noise_and_timesteps` seeded by ``(seed, b)``)
in the baseline stage and in every epoch of training. Both go through :func:`replayed_loss`, so they
cannot drift apart, and with the sampled mask equal to the initial one the reward is exactly 0.

The held-out set (:class:`HeldoutBatches`) is the next images of the same seeded permutation,
after the subset, with draws from a stream of their own: images and noise mask training never saw.

The fast path (:mod:`maskdm.ddpm.fastpath`: bf16 autocast, channels_last, torch.compile) and the
grouping of ``forward_batches`` replayed batches into one forward pass (:class:`ReplayedLosses`)
change the losses in their last bits, so both are part of the replay: the baseline records them
(:func:`replay_settings`) and train_masks takes them from it, and both stages make their model
the same way (:func:`replay_model`). With the sampled mask equal to the initial one the reward is
then exactly 0 under the fast path too.
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

from maskdm.ddpm.diffusion import NoiseDraw, batch_loss, draw_noise_and_timesteps
from maskdm.errors import MaskDMError
from maskdm.ddpm.batch_cache import DEFAULT_MEMORY_BUDGET, BatchCache, decode, encode
from maskdm.ddpm.fastpath import FastPath, no_autocast_cache
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

    Images are read once and kept (``cache=True``), since training passes over the same subset
    thousands of times: as uint8 pixels, in memory up to a budget and beyond it in a temporary
    file (:class:`maskdm.ddpm.batch_cache.BatchCache`), so memory does not grow with the subset (20,000
    CIFAR images take 61 MB; 20,000 at 256x256, 3.9 GB, mostly on disk). Every batch handed out is
    the cache's decoded form, the first time too, so replays stay exact.
    """

    def __init__(
        self, dataset, spec: ReplaySpec, cache: bool = True, indices: np.ndarray | None = None, stream: int = 0,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ):
        self.dataset = dataset
        self.spec = spec
        # ``indices`` and ``stream`` are for the held-out set (heldout_batches); training uses the subset on stream 0.
        self.indices = subset_indices(len(dataset), spec.dataset_size, spec.seed) if indices is None else np.asarray(indices)
        self.stream = int(stream)
        self.num_batches = count_batches(len(self.indices), spec.batch_size, spec.max_batches)
        self._cache = BatchCache(memory_budget) if cache else None
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
            return self._cache.get(b)
        lo = b * self.spec.batch_size
        batch = torch.stack([_image(self.dataset[int(i)]) for i in self.indices[lo : lo + self.spec.batch_size]])
        if self._cache is not None:
            return self._cache.put(b, batch)
        # Uncached, the same values as cached: encoded and decoded (8-bit pixels exactly).
        return decode(encode(batch))

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
            "draws": "batch b: maskdm.ddpm.diffusion.draw_noise_and_timesteps(seed, b, shape, num_train_timesteps)",
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

    The full-precision, one-batch-per-forward case of :class:`ReplayedLosses` (the same numbers).
    ``unet`` must be in eval mode (dropout would make the replay inexact).
    """
    images = batches.images(b).to(device)
    draw = draw_noise_and_timesteps(batches.seed, b, tuple(images.shape), scheduler.config.num_train_timesteps, batches.stream)
    return float(batch_loss(unet, scheduler, images, draw))


class ReplayedLosses:
    """The per-batch replayed losses of one model, ``group`` batches per forward pass, on a fast path.

    Batches are grouped by a fixed grid, batch ``b`` in group ``b // group``: a forward pass of
    ``group * batch_size`` images keeps a GPU busy where one batch of 64 would not, and each batch's
    loss is the mean of its images' losses. Grouping changes the kernels (and so the last bits), so
    the same batch is always evaluated inside the same group: the baseline and every update of
    train_masks see identical numbers. :meth:`losses` therefore takes whole groups only.

    The model runs under ``fast`` (autocast in a context of its own for each forward pass, without
    the autocast weight cache, so masks swapped between calls are never served stale; inputs in the
    model's memory format). ``model`` may be a compiled wrapper: :func:`maskdm.masks.set_masks`
    writes into the mask buffers it reads, so a new mask needs no recompilation.
    """

    def __init__(self, model: nn.Module, scheduler, batches: ReplayBatches, device: torch.device | str = "cpu",
                 fast: FastPath | None = None, group: int = 1):
        if group < 1:
            raise MaskDMError(f"forward_batches must be at least 1, not {group}")
        self.model = model
        self.scheduler = scheduler
        self.batches = batches
        self.device = torch.device(device)
        self.fast = fast or FastPath()
        self.group = int(group)

    def __call__(self, b: int) -> float:
        """The loss of batch ``b`` (its whole group is evaluated)."""
        first = b - b % self.group
        return float(self.losses(range(first, min(first + self.group, len(self.batches))))[b - first])

    def groups(self) -> list[list[int]]:
        """Every batch index, in its group."""
        n = len(self.batches)
        return [list(range(lo, min(lo + self.group, n))) for lo in range(0, n, self.group)]

    @torch.no_grad()
    def losses(self, indices) -> np.ndarray:
        """The losses of batches ``indices`` (float64, in that order); they must be whole groups."""
        indices = [int(b) for b in indices]
        out = np.empty(len(indices), dtype=np.float64)
        position = {b: i for i, b in enumerate(indices)}
        done: set[int] = set()
        for b in indices:
            if b in done:
                continue
            first = b - b % self.group
            members = list(range(first, min(first + self.group, len(self.batches))))
            if any(m not in position for m in members):
                raise MaskDMError(
                    f"batches {indices} are not whole groups of forward_batches={self.group}: the losses would not replay the baseline's"
                )
            for m, value in zip(members, self._forward(members)):
                out[position[m]] = value
            done.update(members)
        return out

    def _forward(self, members: list[int]) -> list[float]:
        images, noise, timesteps, sizes = [], [], [], []
        steps = self.scheduler.config.num_train_timesteps
        for b in members:
            batch = self.batches.images(b)
            draw = draw_noise_and_timesteps(self.batches.seed, b, tuple(batch.shape), steps, self.batches.stream)
            images.append(batch)
            noise.append(draw.noise)
            timesteps.append(draw.timesteps)
            sizes.append(len(batch))
        draw = NoiseDraw(torch.cat(timesteps), torch.cat(noise))
        clean = torch.cat(images).to(self.device)
        with no_autocast_cache():
            per_image = batch_loss(self.model, self.scheduler, clean, draw, reduction="none", fast=self.fast)
        return [float(chunk.mean()) for chunk in per_image.split(sizes)]


def replay_model(unet: nn.Module, masks: Mapping[str, torch.Tensor], fast: FastPath | None = None) -> nn.Module:
    """``unet`` (in place) carrying ``masks``, in eval mode, in ``fast``'s memory format; compiled if chosen.

    baseline_loss and train_masks both make their model here, in this order (masks, then layout),
    so the weights have the same layout and the kernels the same inputs in both stages. The
    returned module (a compiled wrapper, or ``unet`` itself) shares ``unet``'s parameters and mask
    buffers: swap masks on ``unet`` with :func:`maskdm.masks.set_masks`, evaluate with the returned one.
    """
    ensure_masks(unet, masks)
    unet.eval()
    return (fast or FastPath()).prepare(unet)


#: What a baseline made before the fast path records nothing about: full precision, one batch per forward.
LEGACY_SETTINGS = {"mixed_precision": "no", "channels_last": "false", "compile": "false", "forward_batches": 1}


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
    fast: FastPath | None = None,
    group: int = 1,
) -> np.ndarray:
    """One mean loss per replayed batch of the dense ``unet`` under the initial ``masks`` (float64),
    on the fast path ``fast``, ``group`` batches per forward pass (see :class:`ReplayedLosses`)."""
    check_forward_batches(group, len(batches))
    model = replay_model(unet, masks, fast)
    replay = ReplayedLosses(model, scheduler, batches, device, fast, group)
    losses = []
    with tqdm(total=len(batches), desc="baseline loss", unit="batch", disable=not progress) as bar:
        for members in replay.groups():
            losses.extend(replay.losses(members))
            bar.update(len(members))
    return np.array(losses, dtype=np.float64)


def replay_settings(fast: FastPath, group: int) -> dict:
    """How the baseline's forward passes were made, as recorded in its summary's params (and checked by train_masks)."""
    return {
        "mixed_precision": fast.mixed_precision,
        "channels_last": "true" if fast.channels_last else "false",
        "compile": "true" if fast.compile else "false",
        "forward_batches": int(group),
    }


def fast_path_of(settings: Mapping[str, object]) -> FastPath:
    """The :class:`FastPath` of recorded :func:`replay_settings`."""
    return FastPath(
        mixed_precision=str(settings["mixed_precision"]),
        channels_last=str(settings["channels_last"]) == "true",
        compile=str(settings["compile"]) == "true",
    )


def auto_forward_batches(num_batches: int, batch_size: int, fast: FastPath, max_images: int = 1024) -> int:
    """``forward_batches=auto``: 1 in full precision on the CPU-like path (nothing to gain), else
    the largest power of two that divides ``num_batches`` with at most ``max_images`` per forward.

    A power of two, because train_masks needs its ``accumulation`` to be a multiple of it (16 by
    default); a divisor of the batch count, so that windows wrapping round the subset stay aligned.
    """
    if not (fast.channels_last or fast.compile or fast.autocast_dtype is not None):
        return 1
    group = 1
    while num_batches % (group * 2) == 0 and group * 2 * batch_size <= max_images:
        group *= 2
    return group


def check_forward_batches(group: int, num_batches: int, accumulation: int | None = None) -> None:
    """``group`` batches per forward must tile the subset (and an update's window of ``accumulation``)."""
    if group < 1:
        raise MaskDMError(f"forward_batches must be at least 1, not {group}")
    if num_batches % group:
        raise MaskDMError(
            f"forward_batches={group} does not divide the subset's {num_batches} batches: use a divisor of {num_batches} (or auto)"
        )
    if accumulation is not None and accumulation % group:
        raise MaskDMError(
            f"accumulation={accumulation} is not a multiple of the baseline run's forward_batches={group}: use a multiple "
            f"of {group}, or rerun baseline_loss with forward_batches dividing {accumulation}"
        )


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

