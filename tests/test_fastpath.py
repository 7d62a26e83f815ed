"""maskdm.ddpm.fastpath: one resolution of auto/true/false for every heavy stage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maskdm.ddpm import fastpath
from maskdm.errors import MaskDMError


def test_auto_is_the_plain_path_on_the_cpu():
    assert fastpath.resolve(device="cpu", batch_size=1024) == fastpath.FastPath("no", False, False)
    assert fastpath.resolve(device="cpu").describe() == "fp32"


def test_auto_on_cuda_turns_on_layout_and_compile_for_large_batches():
    # Device "cuda" is only inspected for its type here, so this runs without a GPU.
    assert fastpath.resolve_channels_last("auto", "cuda") is True
    assert fastpath.resolve_compile("auto", "cuda", fastpath.COMPILE_MIN_BATCH) is True
    assert fastpath.resolve_compile("auto", "cuda", fastpath.COMPILE_MIN_BATCH - 1) is False
    # bf16 needs a device that supports it: never chosen where CUDA is absent.
    expected = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    assert fastpath.resolve_mixed_precision("auto", "cuda") == expected


def test_explicit_choices_win_over_the_device():
    path = fastpath.resolve("bf16", "true", True, device="cpu", batch_size=1)
    assert path == fastpath.FastPath("bf16", True, True)
    assert path.describe() == "bf16,channels_last,compile"
    assert fastpath.resolve("no", "false", "false", device="cuda", batch_size=4096).describe() == "fp32"


@pytest.mark.parametrize("kwargs, name", [
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"channels_last": "yes"}, "channels_last"),
    ({"compile": "maybe"}, "compile"),
])
def test_bad_choices_are_one_line_errors(kwargs, name):
    with pytest.raises(MaskDMError, match=rf"^{name} must be one of .*got") as caught:
        fastpath.resolve(device="cpu", **kwargs)
    assert "\n" not in str(caught.value)


def test_autocast_runs_the_forward_in_the_chosen_dtype_and_fp32_runs_none():
    layer = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with fastpath.FastPath("bf16").autocast("cpu"):
        assert layer(x).dtype == torch.bfloat16
    with fastpath.FastPath("no").autocast("cpu"):
        assert layer(x).dtype == torch.float32


def test_prepare_sets_the_memory_format_and_compiles_only_when_asked():
    conv = nn.Conv2d(4, 8, 3)
    assert fastpath.FastPath(channels_last=False).prepare(conv) is conv
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fastpath.FastPath(channels_last=True).prepare(conv) is conv
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 6, 6)
    assert fastpath.FastPath(channels_last=True).to_memory_format(x).is_contiguous(memory_format=torch.channels_last)
    assert fastpath.FastPath(channels_last=False).to_memory_format(x) is x
    compiled = fastpath.FastPath(compile=True).prepare(conv)
    assert compiled is not conv and isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)


def test_no_autocast_cache_restores_the_previous_setting():
    before = torch.is_autocast_cache_enabled()
    with fastpath.no_autocast_cache():
        assert torch.is_autocast_cache_enabled() is False
    assert torch.is_autocast_cache_enabled() is before
