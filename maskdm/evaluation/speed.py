"""Side-by-side speed: the dense model and pruned ones timed in one process, interleaved.

A speed claim compares like with like: every model runs the same work (same batch, DDIM steps,
dtype, device, threads) in the same process, the repeats interleaved round by round in A B B A
order (:func:`interleaved_order`: round ``r`` goes forward when ``r`` is even, backward when odd,
so a drift in the machine's speed hits every model alike), warm-up calls excluded. Per model:
the median seconds and their spread (quartiles, min, max: :class:`Spread`); against the
reference (the dense model): the median of the per-round ratios ``reference_s / model_s`` (a
speed-up: above 1 is faster) with a percentile bootstrap interval (:func:`ratio_interval`).

What a kernel can speed up (docs/details/speed.md):

* ``dense`` kernels multiply every weight, zeros included: an unstructured mask (or any mask) does
  the same work as the dense model, so its speed-up is 1 up to noise.
* ``semi_structured`` (CUDA, compute capability 8.0+): PyTorch's 2:4 sparse kernels
  (``torch.sparse.to_sparse_semi_structured``) for the layers that are one matrix multiply of a 2:4
  weight: ``nn.Linear`` (the attention projections) and 1x1 convolutions (as NHWC pixels times the
  (out, in) weight) whose weight is 2:4 along its rows and whose shape the kernels take
  (:func:`qualifying_layers`). 3x3 convolutions are not one matmul: their zeros are still multiplied.

This module takes modules and callables; the ``speed`` stage (entrypoints/speed.py) tracks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maskdm.errors import MaskDMError

log = logging.getLogger(__name__)

KERNELS = ("dense", "semi_structured")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Relative L2 error allowed between a model with semi-structured layers and the same model dense,
#: on one UNet call in bf16/fp16: the two sum the same products in another order (bench_semistructured.py).
SEMI_STRUCTURED_TOLERANCE = 2e-2
#: The smallest (and the multiple of) rows and columns of a 2:4 weight the kernels take in fp16/bf16:
#: the CUTLASS backend's limits (cuSPARSELt's, 16 x 16, are looser), so a layer that qualifies runs on both.
MIN_ROWS, MIN_COLS = 32, 64
NEEDS_CUDA = ("kernel=semi_structured needs a CUDA GPU of compute capability 8.0 or newer "
              "(PyTorch's 2:4 sparse kernels); this machine has none: use kernel=dense")


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise MaskDMError(f"unknown kernel '{kernel}': choose one of {', '.join(KERNELS)}")
    return kernel


def check_kernel_device(kernel: str, device: torch.device | str) -> None:
    """semi_structured on anything but a CUDA sm80+ device: the one line saying it needs CUDA."""
    device = torch.device(device)
    if check_kernel(kernel) == "semi_structured" and (
        device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0)
    ):
        raise MaskDMError(NEEDS_CUDA)


def resolve_dtype(dtype: str, device: torch.device | str, kernel: str = "dense") -> torch.dtype:
    """``auto``: bfloat16 on CUDA (the semi-structured kernels take no float32), float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise MaskDMError(f"unknown dtype '{dtype}': choose one of auto, {', '.join(DTYPES)}")
    if kernel == "semi_structured" and dtype == "float32":
        raise MaskDMError("kernel=semi_structured runs in bfloat16 or float16 (the 2:4 kernels take no float32): pass dtype=auto")
    return DTYPES[dtype]


# --------------------------------------------------------------------------------------------
# The measurement


def interleaved_order(labels: Sequence[str], repeats: int) -> list[list[str]]:
    """The labels of each round: forward in even rounds, backward in odd ones (A B, B A, A B, ...)."""
    if repeats < 1:
        raise MaskDMError(f"repeats must be at least 1, not {repeats}")
    return [list(labels) if r % 2 == 0 else list(reversed(labels)) for r in range(repeats)]


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds of one ``fn()``: CUDA events around it on a GPU (synchronised), ``perf_counter`` on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def measure(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    timer: Callable[[Callable[[], object]], float] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[float]]:
    """``{label: [seconds of each round]}``: ``warmup`` untimed calls of each, then the interleaved rounds.

    ``timer(fn)`` times one call (default :func:`time_call` on the CPU); ``progress(done, total)``
    is called after each round.
    """
    timer = timer or time_call
    for _ in range(max(0, warmup)):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {label: [] for label in fns}
    order = interleaved_order(list(fns), repeats)
    for done, labels in enumerate(order, 1):
        for label in labels:
            times[label].append(float(timer(fns[label])))
        if progress:
            progress(done, len(order))
    return times


@dataclass(frozen=True)
class Spread:
    """Median and spread of repeated timings (seconds)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, times: Sequence[float]) -> "Spread":
        values = np.asarray(times, dtype=float)
        if values.size == 0:
            raise ValueError("no timings")
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        return cls(float(median), float(q1), float(q3), float(values.min()), float(values.max()), int(values.size))


@dataclass(frozen=True)
class Ratio:
    """A speed-up against the reference: median of the per-round ratios, and its interval."""

    value: float
    low: float
    high: float
    confidence: float


def ratio_interval(
    reference: Sequence[float], times: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Ratio:
    """``reference_s / model_s`` per round (the two timed in the same round), its median, and a
    percentile bootstrap interval of that median (rounds resampled with replacement, fixed seed)."""
    ref, mine = np.asarray(reference, dtype=float), np.asarray(times, dtype=float)
    if ref.shape != mine.shape or ref.size == 0:
        raise ValueError("reference and times must be paired rounds of the same length")
    ratios = ref / mine
    rng = np.random.default_rng(seed)
    medians = np.median(ratios[rng.integers(0, ratios.size, size=(resamples, ratios.size))], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return Ratio(float(np.median(ratios)), float(low), float(high), confidence)


@dataclass(frozen=True)
class Timed:
    label: str
    spread: Spread
    ratio: Ratio  # against the reference (the reference's own is 1 [1, 1])


def summarize(times: Mapping[str, Sequence[float]], reference: str, confidence: float = 0.95) -> dict[str, Timed]:
    """:class:`Timed` of every label, ratios against ``reference``."""
    return {
        label: Timed(label, Spread.of(values), ratio_interval(times[reference], values, confidence))
        for label, values in times.items()
    }


# --------------------------------------------------------------------------------------------
# Semi-structured (2:4) layers


def is_1x1(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding == (0, 0) and module.groups == 1 and module.dilation == (1, 1))


def is_2_4(weight: torch.Tensor) -> bool:
    """At most two nonzeros in every four consecutive input weights of each row."""
    rows = weight.reshape(weight.shape[0], -1)
    return rows.shape[1] % 4 == 0 and bool(((rows.reshape(rows.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def layer_kind(name: str, module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "attention projection" if ".attentions." in f".{name}" else "linear"
    if isinstance(module, nn.Conv2d):
        return "1x1 conv" if is_1x1(module) else f"{module.kernel_size[0]}x{module.kernel_size[1]} conv"
    return type(module).__name__


def why_not(module: nn.Module) -> str | None:
    """None when the semi-structured kernels can serve ``module``; else why they cannot."""
    if not (isinstance(module, nn.Linear) or is_1x1(module)):
        return "not one 2-D matmul (only Linear layers and 1x1 convolutions are)"
    rows, cols = module.weight.shape[0], module.weight[0].numel()
    if rows % MIN_ROWS or cols % MIN_COLS:
        return f"weight {rows}x{cols}: the kernels need multiples of {MIN_ROWS}x{MIN_COLS}"
    if not is_2_4(module.weight):
        return "weight not 2:4 (more than two nonzeros in some group of four)"
    return None


def qualifying_layers(unet: nn.Module) -> dict[str, str]:
    """``{name: kind}`` of the layers :func:`to_semi_structured` converts (2-D weight, 2:4, right shape)."""
    return {
        name: layer_kind(name, module)
        for name, module in unet.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and why_not(module) is None
    }


class SemiStructuredLinear(nn.Module):
    """``nn.Linear`` with its weight compressed 2:4; any leading input dims."""

    def __init__(self, linear: nn.Linear, to_sparse: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.weight = nn.Parameter(to_sparse(linear.weight.detach().contiguous()), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = F.linear(x.reshape(-1, shape[-1]), self.weight, self.bias)
        return out.reshape(*shape[:-1], self.out_features)


class SemiStructuredConv1x1(nn.Module):
    """A 1x1 convolution as NHWC pixels times its compressed (out, in) weight."""

    def __init__(self, conv: nn.Conv2d, to_sparse: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.out_channels = conv.out_channels
        weight = conv.weight.detach().reshape(conv.out_channels, conv.in_channels).contiguous()
        self.weight = nn.Parameter(to_sparse(weight), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(-1, c)  # free for a channels_last x
        out = F.linear(pixels, self.weight, self.bias)
        return out.reshape(n, h, w, self.out_channels).permute(0, 3, 1, 2)


def to_semi_structured(
    unet: nn.Module, to_sparse: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> dict[str, str]:
    """Swap every :func:`qualifying_layers` layer of ``unet`` (in place) for its 2:4 compressed form.

    ``to_sparse`` defaults to ``torch.sparse.to_sparse_semi_structured`` (CUDA only); a test may pass
    a dense copy to check the wrappers' reshapes anywhere. Returns the swapped ``{name: kind}``;
    none qualifying is an error (nothing would be measured).
    """
    if to_sparse is None:
        from torch.sparse import to_sparse_semi_structured as to_sparse
    swapped = qualifying_layers(unet)
    if not swapped:
        raise MaskDMError(
            "kernel=semi_structured: no layer of this model is a 2:4 Linear or 1x1 convolution of a shape "
            "the kernels take; prune with pattern=2:4 (or use kernel=dense)"
        )
    for name in swapped:
        module = unet.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        new = SemiStructuredLinear(module, to_sparse) if isinstance(module, nn.Linear) else SemiStructuredConv1x1(module, to_sparse)
        setattr(parent, child, new)
    return swapped


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def check_close(out: torch.Tensor, ref: torch.Tensor, tolerance: float = SEMI_STRUCTURED_TOLERANCE, what: str = "model") -> float:
    """The relative error of ``out`` against ``ref``; above ``tolerance`` an error (the model changed)."""
    error = relative_error(out, ref)
    if not error <= tolerance:
        raise MaskDMError(f"{what}: semi-structured output differs from dense by {error:.3g} (relative L2; tolerance {tolerance:g})")
    return error


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"torch": torch.__version__}
    for name in ("diffusers", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
    return versions


def prepare_kernel(unet: nn.Module, kernel: str, device: torch.device | str, dtype: str = "auto") -> dict[str, str]:
    """Put ``unet`` (in place) on ``device`` in ``dtype``, eval mode; for ``semi_structured`` swap its
    qualifying layers and check one UNet call against the dense one (:func:`check_close`).

    Returns the swapped ``{name: kind}`` (empty for ``dense``).
    """
    import copy

    check_kernel(kernel)
    check_kernel_device(kernel, device)
    torch_dtype = resolve_dtype(dtype, device, kernel)
    unet.to(device=device).eval()
    if next(unet.parameters()).dtype != torch_dtype:  # diffusers warns about any dtype cast, even a no-op
        unet.to(dtype=torch_dtype)
    if kernel == "dense":
        return {}
    dense = copy.deepcopy(unet)
    swapped = to_semi_structured(unet)
    channels, size = int(unet.config.in_channels), unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, channels, height, width, generator=generator).to(device=device, dtype=next(dense.parameters()).dtype)
    t = torch.full((8,), 10, dtype=torch.long, device=device)
    with torch.no_grad():
        error = check_close(unet(x, t).sample, dense(x, t).sample)
    log.info("semi_structured: %d layers swapped; UNet output within %.2e of dense", len(swapped), error)
    del dense
    return swapped
