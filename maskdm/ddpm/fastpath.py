"""The fast paths of the heavy stages: bf16 autocast, channels_last, torch.compile, each resolvable from ``auto``.

Every heavy stage (``baseline_loss``, ``train_masks``, ``finetune``, ``sample``) takes the same three
choices, resolved here for the device it runs on, so one spelling means one thing everywhere:

- ``mixed_precision``: ``auto`` is bf16 on a CUDA device that supports it, else full precision
  (``no``); or ``no``, ``bf16``, ``fp16`` explicitly. The UNet runs under autocast; losses, the
  DDIM update and the optimizer stay float32.
- ``channels_last``: ``auto`` is on for CUDA (NHWC convolutions run on tensor cores without
  transposes), off on the CPU; or ``true`` / ``false``.
- ``compile``: ``auto`` compiles the UNet on CUDA when a call sees at least
  :data:`COMPILE_MIN_BATCH` images (below that, compilation costs more than it saves in a stage
  of this project's size); ``true`` / ``false`` force it. On the CPU ``true`` works too (inductor
  builds C++ kernels; the tests exercise it) but is rarely faster.

Why a module of its own: the choices are parameters of four stages and of the benchmarks that
project the paper sweep (``benchmarks/project_paper_sweep.py``); resolving them in one place keeps
"auto" the same decision in all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from maskdm.errors import MaskDMError

#: The autocast dtype of each explicit ``mixed_precision`` choice (``no``: no autocast).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MIXED_PRECISION_CHOICES = ("auto", *AUTOCAST_DTYPES)
SWITCH_CHOICES = ("auto", "true", "false")
#: ``compile=auto`` compiles only when one UNet call sees at least this many images.
COMPILE_MIN_BATCH = 64


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_mixed_precision(choice: str, device: torch.device | str | None = None) -> str:
    """``auto``: bf16 where the CUDA device supports it, else ``no``; explicit choices are checked and kept."""
    choice = str(choice).strip().lower()
    if choice not in MIXED_PRECISION_CHOICES:
        raise MaskDMError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got '{choice}'")
    if choice != "auto":
        return choice
    dev = _device(device)
    return "bf16" if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _switch(name: str, choice: str | bool) -> str:
    if isinstance(choice, bool):
        return "true" if choice else "false"
    text = str(choice).strip().lower()
    if text not in SWITCH_CHOICES:
        raise MaskDMError(f"{name} must be one of {', '.join(SWITCH_CHOICES)}, got '{choice}'")
    return text


def resolve_channels_last(choice: str | bool, device: torch.device | str | None = None) -> bool:
    """``auto``: on for CUDA, off elsewhere."""
    text = _switch("channels_last", choice)
    return _device(device).type == "cuda" if text == "auto" else text == "true"


def resolve_compile(choice: str | bool, device: torch.device | str | None = None, batch_size: int | None = None) -> bool:
    """``auto``: on for CUDA when a call sees at least :data:`COMPILE_MIN_BATCH` images."""
    text = _switch("compile", choice)
    if text != "auto":
        return text == "true"
    return _device(device).type == "cuda" and (batch_size is None or batch_size >= COMPILE_MIN_BATCH)


@dataclass(frozen=True)
class FastPath:
    """The resolved choices of one stage run (what is logged as its ``maskdm.fast_path`` tag)."""

    mixed_precision: str = "no"
    channels_last: bool = False
    compile: bool = False

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES[self.mixed_precision]

    def describe(self) -> str:
        """E.g. ``bf16,channels_last,compile`` or ``fp32``: one tag value to filter and compare runs by."""
        parts = [self.mixed_precision if self.mixed_precision != "no" else "fp32"]
        if self.channels_last:
            parts.append("channels_last")
        if self.compile:
            parts.append("compile")
        return ",".join(parts)

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """Autocast for the UNet's forward pass, or a no-op context in full precision."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.autocast_dtype)

    def to_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """An NCHW batch laid out as the model expects it."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def prepare(self, module: nn.Module, *, dynamic: bool = False, mode: str | None = None) -> nn.Module:
        """``module`` in the chosen memory format (in place); compiled if chosen (a wrapper sharing its parameters)."""
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        if self.compile:
            return torch.compile(module, dynamic=dynamic, mode=mode)
        return module


def resolve(
    mixed_precision: str = "auto",
    channels_last: str | bool = "auto",
    compile: str | bool = "auto",
    *,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> FastPath:
    """The stage's three choices resolved for ``device`` (and for calls of ``batch_size`` images)."""
    return FastPath(
        mixed_precision=resolve_mixed_precision(mixed_precision, device),
        channels_last=resolve_channels_last(channels_last, device),
        compile=resolve_compile(compile, device, batch_size),
    )


@contextlib.contextmanager
def no_autocast_cache() -> Iterator[None]:
    """Autocast without its weight-cast cache: masks or weights that change between calls are re-cast each call."""
    previous = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(previous)
