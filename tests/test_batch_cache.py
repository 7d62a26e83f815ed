"""maskdm.ddpm.batch_cache: replayed batches kept as uint8, in memory up to a budget and on disk beyond it."""

from __future__ import annotations

import numpy as np
import torch

from maskdm.ddpm.batch_cache import BatchCache, decode, encode
from maskdm.ddpm.data import shapes_dataset
from maskdm.method.replay import ReplayBatches, ReplaySpec


def eight_bit(n: int, seed: int) -> torch.Tensor:
    pixels = torch.randint(0, 256, (n, 3, 4, 4), generator=torch.Generator().manual_seed(seed))
    return pixels.float() / 127.5 - 1.0


def test_eight_bit_batches_are_stored_as_uint8_and_come_back_as_stored():
    batch = eight_bit(5, 0)
    # The values a normalised dataset gives (k / 255 - 0.5) / 0.5 round back to the same pixels.
    normalised = ((batch + 1) * 127.5 / 255 - 0.5) / 0.5
    for x in (batch, normalised):
        stored = encode(x)
        assert stored.dtype == np.uint8 and stored.nbytes == x.numel()
        assert torch.allclose(decode(stored), x, atol=1e-5, rtol=0)


def test_other_values_are_kept_as_float32_exactly():
    values = torch.randn(2, 3, 4, 4)
    stored = encode(values)
    assert stored.dtype == np.float32
    assert torch.equal(decode(stored), values)


def test_beyond_the_budget_batches_go_to_disk_and_come_back_the_same():
    cache = BatchCache(memory_budget=2 * 48)  # two batches of 1 x 3 x 4 x 4 uint8 (48 bytes each)
    given = {b: cache.put(b, eight_bit(1, b)) for b in range(5)}
    assert cache.memory_bytes == 96 and cache.disk_bytes == 3 * 48 and len(cache) == 5
    for b, batch in given.items():
        assert torch.equal(cache.get(b), batch)
    assert cache.get(9) is None
    cache.close()
    assert len(cache) == 0


def test_replayed_batches_are_the_same_in_memory_on_disk_and_uncached():
    dataset = shapes_dataset("eval", 8, size=40, augment=False)
    spec = ReplaySpec(dataset_size=40, batch_size=8, max_batches=0, seed=3)
    in_memory = ReplayBatches(dataset, spec)
    on_disk = ReplayBatches(dataset, spec, memory_budget=0)
    uncached = ReplayBatches(dataset, spec, cache=False)
    for _ in range(2):  # first read (from the dataset) and second (from the cache)
        for b in range(len(in_memory)):
            first = in_memory.images(b)
            assert torch.equal(first, on_disk.images(b)) and torch.equal(first, uncached.images(b))
    assert on_disk._cache.memory_bytes == 0 and on_disk._cache.disk_bytes == 40 * 3 * 8 * 8
    # The pixels are the dataset's own: uint8 round trip of the shapes' k / 127.5 - 1 is exact.
    indices = in_memory.indices[:8]
    expected = torch.stack([dataset[int(i)][0] for i in indices])
    assert torch.equal(in_memory.images(0), expected)
