"""Weight masks: which layers can be masked, and the one mechanism that applies a mask.

A mask is a ``torch.nn.utils.parametrize`` parametrization of a layer's ``weight``:
``weight = original * mask``. It is registered once (:func:`apply_masks`), can be swapped in place
while it is registered (:func:`set_masks`, used by mask learning), and is baked in once
(:func:`bake_masks`) before a model is saved. Gradients, optimizers, EMA and ``state_dict`` all
see the masked weight without any patched ``forward``.

Masks are bool tensors shaped like the weight, True = kept, keyed by the exact module name
(``down_blocks.0.resnets.0.conv1``). On disk they are a safetensors file of those tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from maskdm.errors import MaskDMError

#: Name substrings of layers that pruning leaves dense by default: the input/output convolutions
#: and the time/class embeddings, which the original recipe protects because pruning them costs
#: far more quality than the parameters they hold.
DEFAULT_PROTECT: tuple[str, ...] = ("conv_in", "conv_out", "time_emb", "class_emb")

#: Layer kinds whose ``weight`` can carry a mask.
MASKABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def parse_protect(protect: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"conv_in,conv_out"`` -> ``("conv_in", "conv_out")``; empty string or None protects nothing."""
    if protect is None:
        return ()
    if isinstance(protect, str):
        protect = protect.split(",")
    return tuple(p.strip() for p in protect if p.strip())


def is_protected(name: str, protect: Iterable[str]) -> bool:
    return any(p in name for p in protect)


def maskable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d/Linear layer of ``model``, by module name, in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MASKABLE_TYPES)}


def prunable_modules(model: nn.Module, protect: Iterable[str] = DEFAULT_PROTECT) -> dict[str, nn.Module]:
    """The maskable layers whose names contain none of the ``protect`` substrings."""
    protect = tuple(protect)
    return {n: m for n, m in maskable_modules(model).items() if not is_protected(n, protect)}


class WeightMask(nn.Module):
    """Parametrization ``weight = original * mask``; the mask is a buffer so it follows ``.to()``.

    The buffer holds 0/1 in the weight's dtype rather than bools: converting a bool mask on every
    forward pass cost 12% of a masked training step on a CPU.
    """

    def __init__(self, mask: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool).to(dtype), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def check_masks_fit(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Raise a one-line :class:`MaskDMError` naming the first mask that does not fit ``model``."""
    modules = maskable_modules(model)
    for name, mask in masks.items():
        if name not in modules:
            raise MaskDMError(f"mask for layer '{name}' does not fit the model: it has no Conv2d/Linear layer of that name")
        shape = tuple(_weight(modules[name]).shape)
        if tuple(mask.shape) != shape:
            raise MaskDMError(
                f"mask for layer '{name}' does not fit the model: mask shape {tuple(mask.shape)}, weight shape {shape}"
            )


def _weight(module: nn.Module) -> torch.Tensor:
    # With a parametrization registered, ``module.weight`` is recomputed; the stored tensor is here.
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Register a :class:`WeightMask` on every layer named in ``masks`` (in place; returns ``model``)."""
    check_masks_fit(model, masks)
    modules = maskable_modules(model)
    for name, mask in masks.items():
        module = modules[name]
        if parametrize.is_parametrized(module, "weight"):
            raise MaskDMError(f"layer '{name}' already carries a mask")
        weight = _weight(module)
        parametrize.register_parametrization(module, "weight", WeightMask(mask.to(weight.device), weight.dtype))
    return model


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The layers that carry a :class:`WeightMask`, by module name."""
    return {
        name: m
        for name, m in model.named_modules()
        if parametrize.is_parametrized(m, "weight")
        and any(isinstance(p, WeightMask) for p in m.parametrizations.weight)
    }


def _mask_param(module: nn.Module) -> WeightMask:
    return next(p for p in module.parametrizations.weight if isinstance(p, WeightMask))


def set_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Swap the masks of already-masked layers in place (no re-registration; cheap inside a loop)."""
    modules = masked_modules(model)
    for name, mask in masks.items():
        buf = _mask_param(modules[name]).mask
        buf.copy_(mask.to(device=buf.device, dtype=torch.bool))  # copy_ casts True/False to 1/0


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks registered on ``model`` (CPU copies), by module name."""
    return {name: _mask_param(m).mask.detach().cpu() != 0 for name, m in masked_modules(model).items()}


def bake_masks(model: nn.Module) -> nn.Module:
    """Remove every mask parametrization, leaving ``weight = original * mask`` as a plain parameter."""
    for module in masked_modules(model).values():
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def masks_from_weights(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Masks of the nonzero pattern of the named layers' weights (True = nonzero = kept).

    Only a fallback for masks nobody recorded: a kept weight that happens to be exactly zero comes
    out as pruned. Prefer the masks the pruner applied (``prune`` logs them).
    """
    modules = maskable_modules(model)
    return {name: (_weight(modules[name]).detach() != 0).cpu() for name in names}


def assert_sparse_as(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Check that every masked-out weight is exactly zero (a save-time guard, not a user error)."""
    modules = maskable_modules(model)
    for name, mask in masks.items():
        weight = modules[name].weight.detach()
        leaked = int((weight[~mask.to(weight.device)] != 0).sum())
        if leaked:
            raise AssertionError(f"layer '{name}' has {leaked} nonzero weights where its mask is False")


def check_masks_match_weights(model: nn.Module, masks: Mapping[str, torch.Tensor], what: str = "masks") -> None:
    """Check that ``masks`` can be the masks ``model`` was pruned with: every masked-out weight is
    exactly zero. A kept weight may be zero as well (a weight can be 0 and still be kept), so this
    is a one-way check, not an equality with the nonzero pattern.

    Raises a one-line :class:`MaskDMError` (``what`` names the masks) for the first layer that
    does not fit the model or holds a nonzero weight where its mask is False.
    """
    check_masks_fit(model, masks)
    modules = maskable_modules(model)
    for name, mask in masks.items():
        weight = _weight(modules[name]).detach()
        leaked = (weight != 0) & ~mask.to(device=weight.device, dtype=torch.bool)
        count = int(leaked.sum())
        if count:
            first = tuple(int(i) for i in torch.nonzero(leaked)[0].tolist())
            raise MaskDMError(
                f"{what} contradict the model's weights: layer '{name}' has {count} nonzero weight(s) where the "
                f"mask says pruned (first at index {first}, value {float(weight[first]):.6g})"
            )


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Share of masked-out entries over all entries of ``masks`` (0.0 for no masks)."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 0.0 if total == 0 else 1.0 - kept / total


#: The file name of a masks artifact (``prune``, ``extract_masks`` and ``train_masks`` runs).
MASKS_FILE = "masks.safetensors"


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    save_file({k: v.to(torch.bool).contiguous().cpu() for k, v in masks.items()}, str(path))


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        masks = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a corrupt or foreign file
        raise MaskDMError(f"cannot read masks file {path}: {exc}") from None
    bad = [k for k, v in masks.items() if v.dtype != torch.bool]
    if bad:
        raise MaskDMError(f"masks file {path} holds non-bool tensors (first: '{bad[0]}')")
    return masks
