"""A cache of replayed image batches whose memory is bounded by a budget, not by the dataset.

Mask learning passes over the same subset thousands of times, so its batches are read once and
kept. Kept as float32 they cost 15.7 GB for the recipe's 20,000 images at 256x256; kept as the
8-bit pixels they came from, 3.9 GB. So batches are stored as uint8 when they are 8-bit images
(every dataset of this project is: PNG/JPEG folders, CIFAR-10, the embedded shapes), in memory up
to ``memory_budget`` bytes and beyond it in a temporary file read back with ordinary reads (file
pages in the OS cache do not count against the process's resident memory, mapped ones would).

Every batch handed out is the *decoded* stored form, the first time too, so a batch is the same
tensor whether it was just read from the dataset or from the cache: the replay that
``baseline_loss`` and ``train_masks`` rely on stays exact.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

#: In-memory bytes before batches go to the temporary file (the rest of a stage's memory is the
#: model, the activations of one forward pass and the data loader). 512 MiB: at 1 GiB,
#: baseline_loss on 10,000 images at 256x256 peaked above 3 GB on a CPU (docs/benchmarks.md), the
#: rest being the imports (0.8 GB) and one batch of 64 through the UNet; a batch read back from the
#: file's pages in the OS cache costs milliseconds against the seconds of its forward pass.
DEFAULT_MEMORY_BUDGET = 512 << 20
#: ``x`` in [-1, 1] is an 8-bit image when ``round((x + 1) * 127.5) / 127.5 - 1`` gives it back
#: within this (a normalised ``k / 255`` differs from ``k / 127.5 - 1`` by rounding only).
EIGHT_BIT_TOLERANCE = 1e-5


def encode(batch: torch.Tensor) -> np.ndarray:
    """uint8 pixels of an 8-bit batch in [-1, 1], else the float32 values unchanged."""
    batch = batch.detach().to(torch.float32).cpu().contiguous()
    pixels = ((batch + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    if torch.allclose(decode(pixels.numpy()), batch, rtol=0.0, atol=EIGHT_BIT_TOLERANCE):
        return pixels.numpy()
    return batch.numpy()


def decode(stored: np.ndarray) -> torch.Tensor:
    """The float32 batch in [-1, 1] of an :func:`encode` result."""
    tensor = torch.from_numpy(np.array(stored, copy=True))
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32).div_(127.5).sub_(1.0)
    return tensor


@dataclass(frozen=True)
class _OnDisk:
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]


class BatchCache:
    """``put(b, batch)`` / ``get(b)``: stored encoded, in memory up to ``memory_budget`` bytes, then on disk."""

    def __init__(self, memory_budget: int = DEFAULT_MEMORY_BUDGET, folder: str | os.PathLike | None = None):
        self.memory_budget = int(memory_budget)
        self.folder = folder
        self._memory: dict[int, np.ndarray] = {}
        self._disk: dict[int, _OnDisk] = {}
        self.memory_bytes = 0
        self._file = None

    def __contains__(self, b: int) -> bool:
        return b in self._memory or b in self._disk

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    @property
    def disk_bytes(self) -> int:
        return sum(int(np.prod(e.shape)) * e.dtype.itemsize for e in self._disk.values())

    def put(self, b: int, batch: torch.Tensor) -> torch.Tensor:
        """Store batch ``b``; return what :meth:`get` will return for it."""
        stored = encode(batch)
        if self.memory_bytes + stored.nbytes <= self.memory_budget:
            self._memory[b] = stored
            self.memory_bytes += stored.nbytes
        else:
            if self._file is None:
                # Deleted on close (and by the OS if the process dies): nothing to clean up.
                self._file = tempfile.TemporaryFile(prefix="maskdm-batches-", dir=self.folder)
            self._file.seek(0, os.SEEK_END)
            self._disk[b] = _OnDisk(self._file.tell(), stored.dtype, stored.shape)
            self._file.write(stored.tobytes())
        return decode(stored)

    def get(self, b: int) -> torch.Tensor | None:
        if b in self._memory:
            return decode(self._memory[b])
        entry = self._disk.get(b)
        if entry is None:
            return None
        self._file.seek(entry.offset)
        data = bytearray(int(np.prod(entry.shape)) * entry.dtype.itemsize)
        self._file.readinto(data)
        return decode(np.frombuffer(data, dtype=entry.dtype).reshape(entry.shape))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._memory.clear()
        self._disk.clear()
        self.memory_bytes = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
