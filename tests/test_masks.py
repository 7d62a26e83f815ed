"""The mask mechanism: parametrize registration, swapping, baking, file round trip."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from maskdm.errors import MaskDMError
from maskdm.masks import (
    apply_masks,
    assert_sparse_as,
    bake_masks,
    check_masks_match_weights,
    current_masks,
    load_masks,
    mask_sparsity,
    masked_modules,
    masks_from_weights,
    prunable_modules,
    save_masks,
    set_masks,
)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def random_masks(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(m.weight.shape, generator=gen) < 0.5 for name, m in prunable_modules(model, ()).items()}


def test_masked_forward_equals_zeroed_weights():
    model, masks = small_model(), None
    masks = random_masks(model)
    reference = small_model()
    with torch.no_grad():
        for name, m in prunable_modules(reference, ()).items():
            m.weight.mul_(masks[name])
    apply_masks(model, masks)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(model(x), reference(x))
    assert set(masked_modules(model)) == set(masks)


def test_masked_weights_get_zero_gradient_and_stay_zero_under_adamw():
    model = small_model()
    masks = random_masks(model)
    apply_masks(model, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    before = {n: m.parametrizations.weight.original.detach().clone() for n, m in masked_modules(model).items()}
    for _ in range(3):
        model(torch.randn(2, 3, 4, 4)).pow(2).sum().backward()
        for name, m in masked_modules(model).items():
            assert torch.all(m.parametrizations.weight.original.grad[~masks[name]] == 0)
        opt.step()
        opt.zero_grad()
    for name, m in masked_modules(model).items():
        orig = m.parametrizations.weight.original.detach()
        assert not torch.equal(orig[masks[name]], before[name][masks[name]])  # kept weights learn
    bake_masks(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert_sparse_as(model, masks)


def test_set_masks_swaps_in_place_and_current_masks_reads_back():
    model = small_model()
    first, second = random_masks(model, 0), random_masks(model, 1)
    apply_masks(model, first)
    set_masks(model, second)
    got = current_masks(model)
    assert all(torch.equal(got[n], second[n]) for n in second)


def test_bake_then_extract_recovers_masks(tmp_path):
    model = small_model()
    masks = random_masks(model)
    apply_masks(model, masks)
    bake_masks(model)
    extracted = masks_from_weights(model, masks)
    assert all(torch.equal(extracted[n], masks[n]) for n in masks)
    save_masks(extracted, tmp_path / "m.safetensors")
    loaded = load_masks(tmp_path / "m.safetensors")
    assert loaded.keys() == masks.keys() and all(loaded[n].dtype == torch.bool for n in loaded)
    assert mask_sparsity(loaded) == pytest.approx(1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()))


def test_assert_sparse_as_catches_leaks():
    model = small_model()
    masks = random_masks(model)
    with pytest.raises(AssertionError, match="nonzero weights where its mask is False"):
        assert_sparse_as(model, masks)


def test_masks_that_do_not_fit_name_the_layer():
    model = small_model()
    with pytest.raises(MaskDMError, match="'0'.*mask shape"):
        apply_masks(model, {"0": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(MaskDMError, match="'nope'"):
        apply_masks(model, {"nope": torch.ones(2, 2, dtype=torch.bool)})


def test_protected_layers_are_not_prunable(tiny_ddpm):
    names = set(prunable_modules(tiny_ddpm.unet))
    assert names and not any(p in n for n in names for p in ("conv_in", "conv_out", "time_emb"))
    assert "conv_in" in {n for n, _ in tiny_ddpm.unet.named_modules()}


def test_check_masks_match_weights_allows_kept_zeros_and_refuses_pruned_nonzeros():
    model = small_model()
    masks = random_masks(model)
    for name, module in prunable_modules(model, ()).items():
        with torch.no_grad():
            module.weight.mul_(masks[name])
    conv = model[0].weight
    kept = tuple(torch.nonzero(masks["0"])[0].tolist())
    with torch.no_grad():
        conv[kept] = 0.0  # a kept weight that is exactly zero: still consistent
    check_masks_match_weights(model, masks)
    assert not torch.equal(masks_from_weights(model, ["0"])["0"], masks["0"])  # zeros would lose it

    pruned = tuple(torch.nonzero(~masks["3"])[0].tolist())
    with torch.no_grad():
        model[3].weight[pruned] = 0.5  # a pruned entry that is not zero: the masks cannot be the model's
    with pytest.raises(MaskDMError, match=r"these masks contradict the model's weights: layer '3' has 1 nonzero") as err:
        check_masks_match_weights(model, masks, "these masks")
    assert "\n" not in str(err.value) and str(pruned) in str(err.value)
    with pytest.raises(MaskDMError, match="does not fit"):
        check_masks_match_weights(model, {"0": torch.ones(2, 2, dtype=torch.bool)})
