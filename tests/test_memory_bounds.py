"""Transient copies of a whole chunk in the fid stage: the reference decoding and the samples' reading.

benchmarks/bench_memory.py measured the fid stage at 4.6 GB peak RSS on 1,000 images at 256x256
(docs/benchmarks.md): the reference images were decoded as one float batch per 1,000-image chunk
(about 3.4 GB of float copies); they are now decoded :data:`maskdm.evaluation.fid.DECODE_IMAGES` at a time into
a uint8 chunk. samples.npz chunks were read as bytes and copied into a bytearray (the chunk twice);
they are now read :data:`maskdm.evaluation.npz_stream.READ_PIECE_BYTES` at a time into the chunk's buffer.
baseline_loss on 10,000 images peaked above 3 GB with 1 GiB of replayed batches kept in memory; the
budget is now 512 MiB, and what lies beyond it must not stay resident.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdm.ddpm import sampling
from maskdm.evaluation import fid, npz_stream
from maskdm.ddpm.batch_cache import DEFAULT_MEMORY_BUDGET, BatchCache
from maskdm.ddpm.data import ArrayImageDataset, render_shapes


class TensorOnly(torch.utils.data.Dataset):
    """The [-1, 1] tensors of an in-memory dataset without its stored pixels: the path image folders take."""

    def __init__(self, dataset: ArrayImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i]


def test_reference_chunks_decode_a_few_float_images_at_a_time(monkeypatch):
    pixels, labels = render_shapes(75, seed=3, resolution=8)
    dataset = TensorOnly(ArrayImageDataset(pixels, labels, train=False))
    float_batches = []
    real = sampling.to_uint8

    def recording(images):
        float_batches.append(len(images))
        return real(images)

    monkeypatch.setattr(sampling, "to_uint8", recording)
    chunks = list(fid.dataset_uint8_chunks(dataset, batch_size=40))

    # The chunks are as before (sizes, order, exact pixels) ...
    assert [len(c) for c in chunks] == [40, 35]
    assert all(c.dtype == np.uint8 for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), pixels)
    # ... but never more than DECODE_IMAGES float images at once (a whole chunk of 40 before).
    assert max(float_batches) <= fid.DECODE_IMAGES < 40
    assert sum(float_batches) == 75


def test_reference_chunks_are_new_arrays_and_respect_the_limit():
    pixels, labels = render_shapes(70, seed=4, resolution=8)
    dataset = TensorOnly(ArrayImageDataset(pixels, labels, train=False))
    chunks = list(fid.dataset_uint8_chunks(dataset, limit=66, batch_size=33))
    assert [len(c) for c in chunks] == [33, 33]
    # A consumer may keep a chunk: the next one must not overwrite it.
    assert not np.shares_memory(chunks[0], chunks[1])
    np.testing.assert_array_equal(np.concatenate(chunks), pixels[:66])


def test_sample_chunks_are_read_a_piece_at_a_time(tmp_path, monkeypatch):
    images = np.random.default_rng(5).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)  # 768 bytes a row
    path = tmp_path / "samples.npz"
    with npz_stream.NpzWriter(path) as writer:
        writer.add("images", images)
    requested = []
    real_read = zipfile.ZipExtFile.read

    def recording(self, n=-1):
        requested.append(n)
        return real_read(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", recording)
    monkeypatch.setattr(npz_stream, "READ_PIECE_BYTES", 500, raising=False)
    chunks = list(npz_stream.iter_rows(path, "images", 3))  # 2,304-byte chunks, read 500 bytes or fewer at a time
    assert [len(c) for c in chunks] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), images)
    assert all(c.flags.writeable for c in chunks)
    # No read asks for a whole chunk (the .npy header's reads are shorter than a piece).
    assert 500 in requested and max(requested) <= 500


def test_a_truncated_array_is_still_refused(tmp_path, monkeypatch):
    images = np.zeros((4, 2, 2, 3), dtype=np.uint8)
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w") as archive, archive.open("images.npy", "w") as stream:
        header = {"descr": "|u1", "fortran_order": False, "shape": (6, 2, 2, 3)}  # says 6 rows, holds 4
        np.lib.format.write_array_header_2_0(stream, header)
        stream.write(images.tobytes())
    monkeypatch.setattr(npz_stream, "READ_PIECE_BYTES", 5, raising=False)
    with pytest.raises(ValueError, match="ends after 4 of 6 rows"):
        list(npz_stream.iter_rows(path, "images", 5))


def resident_bytes() -> int:
    """This process's resident set, after glibc hands its free heap back (freed float batches would
    otherwise stay counted: 53 MiB here against 14 MiB after the trim, whatever the cache holds)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from /proc (Linux)")
def test_replayed_batches_beyond_the_budget_do_not_stay_resident(tmp_path):
    budget, batches = 8 << 20, 96
    pixels = torch.randint(0, 256, (4, 3, 256, 256), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    cache = BatchCache(memory_budget=budget, folder=tmp_path)
    before = resident_bytes()
    for b in range(batches):  # 96 batches of 0.75 MiB of pixels: 72 MiB in all
        cache.put(b, pixels.float().div(127.5).sub(1.0))
    for b in range(batches):  # a replay pass reads every batch back
        cache.get(b)
    grown = resident_bytes() - before
    total = batches * pixels.numel()
    assert cache.memory_bytes <= budget and cache.memory_bytes + cache.disk_bytes == total
    # The budget plus a few float batches of slack, far from the 72 MiB held in all.
    assert grown < budget + (16 << 20) < total
    cache.close()


def test_the_default_budget_leaves_room_under_3_gb():
    # Measured (docs/benchmarks.md): without cached batches baseline_loss and train_masks peak near
    # 2.1 GB on 256x256 images at batch 64 on a CPU, so a 1 GiB budget took them past 3 GB.
    assert DEFAULT_MEMORY_BUDGET <= 512 << 20
