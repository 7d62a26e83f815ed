"""The sampler's fast path (bf16 autocast, channels_last, torch.compile) and how ``auto`` resolves.

The tolerance test compiles (inductor builds C++ kernels on the CPU: a minute or more on a shared
pair of cores), so it is the only compiled test here.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import PartialState
from torch import nn

from conftest import tiny_unet

from maskdm.ddpm import fastpath
from maskdm.ddpm.models import default_scheduler
from maskdm.ddpm.sampling import (
    FAST_PATH_TOLERANCE,
    iter_sample_batches,
    make_run,
    prepare_unet,
    sample_tensors,
    shard_indices,
    to_uint8,
)


class WellConditioned(nn.Module):
    """An eps model whose DDIM chain is stable: the exact eps of N(0, std^2) data plus the tiny UNet.

    A random UNet alone is no model to state a tolerance with: its eta=0 chain is chaotic (x0 of
    +-600 after 100 steps, and float32 NCHW against channels_last alone differs by 230 grey levels
    with clipping), so any rounding decides the image. A trained model's chain is stable; training
    one costs minutes, so here the analytic eps of Gaussian data, ``sqrt(1-a) x / (a std^2 + 1-a)``,
    keeps the chain stable and the UNet adds an output of its own full size (weight 1), which
    bf16, channels_last and compile all act on. Elementwise float32 ops are untouched by autocast,
    so the fast path's error is the UNet's. Measured: 10 steps, bf16 against fp32, at most 0.056
    per image in [-1, 1] units, 0.45 mean grey levels; the trained demo model gave 0.056 and 1.0.
    """

    def __init__(self, std: float = 0.5):
        super().__init__()
        self.unet = tiny_unet()
        self.config = self.unet.config
        self.std = std
        self.register_buffer("alphas_cumprod", default_scheduler().alphas_cumprod.float().clone())

    def forward(self, x, t, return_dict=False):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        ideal = (1 - a).sqrt() * x / (a * self.std**2 + 1 - a)
        return (ideal + self.unet(x, t, return_dict=False)[0],)


def images(model: nn.Module, seed: int = 3, **fast) -> tuple[torch.Tensor, nn.Module]:
    run = make_run(model, default_scheduler(), steps=10, seed=seed, batch_size=8, clip_sample=False, **fast)
    prepared = prepare_unet(model, run)
    out = torch.cat([batch for _, batch in iter_sample_batches(prepared, run, range(8))])
    return out, prepared


def test_fast_path_matches_fp32_within_the_stated_tolerance():
    torch._inductor.config.compile_threads = 1  # no worker pool on a shared pair of cores
    reference, plain = images(WellConditioned(), mixed_precision="no", channels_last=False, compile=False)
    fast, compiled = images(WellConditioned(), mixed_precision="bf16", channels_last=True, compile=True)
    assert not isinstance(plain, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)  # the fast path ran compiled

    max_abs, mean_grey = FAST_PATH_TOLERANCE
    per_image_max = (fast - reference).abs().amax(dim=(1, 2, 3))
    grey = np.abs(to_uint8(fast).astype(float) - to_uint8(reference).astype(float)).reshape(8, -1)
    assert per_image_max.max() <= max_abs, per_image_max
    assert grey.mean(axis=1).max() <= mean_grey, grey.mean(axis=1)
    # bf16 did reach the UNet (the images are not the float32 ones) ...
    assert per_image_max.min() > 1e-3
    # ... and the bound tells images apart: another seed's images are far outside it.
    other, _ = images(WellConditioned(), seed=4, mixed_precision="no", channels_last=False, compile=False)
    assert (other - reference).abs().amax(dim=(1, 2, 3)).min() > 4 * max_abs


def test_compile_auto_is_eager_on_the_cpu_and_compiles_large_cuda_batches():
    unet = tiny_unet()
    run = make_run(unet, default_scheduler(), steps=2, batch_size=256, device="cpu", mixed_precision="auto",
                   channels_last="auto", compile="auto")
    assert (run.compile, run.channels_last, run.autocast_dtype) == (False, False, None)
    assert run.fast_path.describe() == "fp32"
    assert prepare_unet(unet, run) is unet  # not wrapped by torch.compile
    # The same choice on CUDA (resolution only; no GPU needed): compiled from COMPILE_MIN_BATCH images.
    assert fastpath.resolve_compile("auto", "cuda", fastpath.COMPILE_MIN_BATCH)
    assert not fastpath.resolve_compile("auto", "cuda", fastpath.COMPILE_MIN_BATCH - 1)
    explicit = make_run(tiny_unet(), default_scheduler(), steps=2, mixed_precision="bf16", channels_last="true",
                        compile="false")
    assert explicit.fast_path.describe() == "bf16,channels_last"


def test_the_defaults_of_the_library_calls_are_the_float32_eager_path():
    # registry.generate and save_preview call sample_images without fast-path options.
    run = make_run(tiny_unet(), default_scheduler(), steps=2, device="cpu")
    assert run.fast_path == fastpath.FastPath("no", False, False)


def test_channels_last_alone_changes_nothing_but_rounding(tiny_ddpm):
    """Without bf16, NHWC is the same arithmetic in another order (the tiny UNet's chain is short here)."""
    run = make_run(tiny_ddpm.unet, tiny_ddpm.scheduler, steps=3, batch_size=4, seed=1)
    nchw = sample_tensors(tiny_ddpm.unet, run, range(4))
    run_cl = make_run(tiny_ddpm.unet, tiny_ddpm.scheduler, steps=3, batch_size=4, seed=1, channels_last=True)
    nhwc = sample_tensors(tiny_ddpm.unet, run_cl, range(4))
    assert (nhwc - nchw).abs().max() < 1e-3
    assert np.abs(to_uint8(nhwc).astype(int) - to_uint8(nchw).astype(int)).max() <= 1


@pytest.mark.parametrize("total,processes", [(5, 2), (7, 3), (2, 4), (50000, 8)])
def test_accelerates_split_is_the_documented_blocks(total, processes):
    """The stage splits with split_between_processes; its blocks are shard_indices' (index order kept)."""
    blocks = []
    for rank in range(processes):
        fake_state = SimpleNamespace(num_processes=processes, process_index=rank)
        with PartialState.split_between_processes(fake_state, list(range(total))) as block:
            blocks.append(block)
        assert block == list(shard_indices(total, rank, processes))
    assert sum(blocks, []) == list(range(total))
