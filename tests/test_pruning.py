"""Pruning semantics: which weights go, how many, and what the stats and compact checkpoint say.

Expected masks are recomputed independently in numpy (stable argsort on |w|), never copied from
the output of the code under test.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from maskdm.errors import MaskDMError
from maskdm.masks import (
    DEFAULT_PROTECT,
    check_masks_match_weights,
    mask_sparsity,
    maskable_modules,
    masks_from_weights,
    prunable_modules,
)
from maskdm.method.patterns import parse_pattern, pattern_ratio
from maskdm.method.pruning import (
    PruneConfig,
    apply_pruning,
    compact_state_dict,
    compute_masks,
    expand_compact_state_dict,
    load_compact_checkpoint,
    prune,
    prune_count,
    pruning_stats,
    save_compact_checkpoint,
)


class SmallNet(nn.Module):
    """Named like a UNet's ends so the default protect list applies; row lengths 27, 80, 12, 6."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_in = nn.Conv2d(3, 5, 3)  # protected
        self.body = nn.Sequential(nn.Conv2d(5, 8, 4), nn.ReLU(), nn.Conv2d(8, 6, 1))
        self.head = nn.Linear(12, 7)
        self.odd = nn.Linear(6, 4)  # 6 is no multiple of 4: an N:M layer left dense
        self.conv_out = nn.Linear(4, 3)  # protected
        with torch.no_grad():
            for i, module in enumerate(maskable_modules(self).values()):
                # Distinct scales per layer so a global threshold prunes layers unequally.
                module.weight.copy_(torch.randn(module.weight.shape) * (i + 1) ** 2)


PRUNABLE = ["body.0", "body.2", "head", "odd"]


def weights_np(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: m.weight.detach().numpy().copy() for name, m in maskable_modules(model).items()}


def expected_keep(abs_w: np.ndarray, k: int) -> np.ndarray:
    """Reference: prune the first k of a stable ascending sort of |w| (earlier index first on ties)."""
    keep = np.ones(abs_w.size, dtype=bool)
    keep[np.argsort(abs_w.ravel(), kind="stable")[:k]] = False
    return keep.reshape(abs_w.shape)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


# --- parsing and validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [("unstructured", None), ("Unstructured", None), ("2:4", (2, 4)), (" 1 : 4 ", (1, 4)), ("3:8", (3, 8))],
)
def test_parse_pattern_accepts_unstructured_and_n_of_m(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text", ["4:2", "2:0", "a:b", "2:", "", "4:4", "0:4", "2:4:8", "-1:4", "2.0:4"])
def test_parse_pattern_rejects_malformed_in_one_line_naming_the_value(text):
    with pytest.raises(MaskDMError) as exc:
        parse_pattern(text)
    message = one_line(exc)
    assert f"'{text}'" in message and "unstructured" in message and "N:M" in message


def test_pattern_ratio_is_one_minus_n_over_m():
    assert pattern_ratio("2:4") == 0.5
    assert pattern_ratio("1:4") == 0.75
    assert pattern_ratio("unstructured") is None


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "abc"])
def test_ratio_outside_zero_one_is_rejected(ratio):
    with pytest.raises(MaskDMError) as exc:
        PruneConfig(ratio=ratio)
    assert "pruning_ratio" in one_line(exc)


@pytest.mark.parametrize("pattern", ["4:2", "2:0", "a:b"])
def test_config_rejects_malformed_pattern(pattern):
    with pytest.raises(MaskDMError) as exc:
        PruneConfig(ratio=0.5, pattern=pattern)
    assert pattern in one_line(exc)


@pytest.mark.parametrize("kwargs,word", [(dict(pruner="l1"), "pruner"), (dict(scope="model"), "scope")])
def test_config_rejects_unknown_pruner_and_scope(kwargs, word):
    with pytest.raises(MaskDMError) as exc:
        PruneConfig(ratio=0.3, **kwargs)
    assert word in one_line(exc)


def test_n_of_m_needs_its_own_ratio_and_layer_scope():
    with pytest.raises(MaskDMError) as exc:
        PruneConfig(ratio=0.3, pattern="2:4")
    assert "0.5" in one_line(exc)
    with pytest.raises(MaskDMError) as exc:
        PruneConfig(ratio=0.5, pattern="2:4", scope="global")
    assert "scope=layer" in one_line(exc)
    assert PruneConfig(ratio=0.5, pattern="2:4").nm == (2, 4)
    assert PruneConfig(ratio=0.667, pattern="1:3").nm == (1, 3)


def test_config_normalises_strings():
    config = PruneConfig(ratio="0.25", pruner=" Random ", pattern=" Unstructured", protect="a, b,")
    assert (config.ratio, config.pruner, config.pattern, config.protect) == (0.25, "random", "unstructured", ("a", "b"))
    assert PruneConfig(ratio=0.5, pattern=" 2 : 4 ").pattern == "2:4"
    assert json.loads(json.dumps(config.to_dict()))["protect"] == ["a", "b"]


# --- the count --------------------------------------------------------------------------------------


def test_prune_count_is_floor_of_the_decimal_ratio():
    # Integer arithmetic on the percentage is the reference; float 0.29 * 100 would give 28.
    for percent in range(100):
        for n in (1, 7, 100, 1000, 4097):
            assert prune_count(percent / 100, n) == percent * n // 100
    assert prune_count(0.5, 7) == 3
    assert prune_count(0.3, 3) == 0


# --- magnitude ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.77])
def test_magnitude_layer_keeps_the_largest_per_layer(ratio):
    model = SmallNet()
    before = weights_np(model)
    result = compute_masks(model, PruneConfig(ratio=ratio))
    assert sorted(result.masks) == sorted(PRUNABLE)
    for name, mask in result.masks.items():
        w = np.abs(before[name])
        k = round(ratio * 100) * w.size // 100
        np.testing.assert_array_equal(mask.numpy(), expected_keep(w, k))
        assert int((~mask).sum()) == k
        if 0 < k < w.size:
            assert w[mask.numpy()].min() >= w[~mask.numpy()].max()
    # compute_masks only decides; the model is untouched.
    for name, w in weights_np(model).items():
        np.testing.assert_array_equal(w, before[name])


def test_magnitude_ties_prune_exactly_k_earlier_index_first():
    model = nn.Sequential(nn.Linear(10, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0, 2.0, 1.0, -1.0, 3.0, 1.0, 1.0, 5.0, -1.0]] * 2))
    mask = compute_masks(model, PruneConfig(ratio=0.35, protect=())).masks["0"].flatten()
    # 20 weights, k = 7: the twelve |w| = 1 tie; the seven earliest of them go.
    abs_w = model[0].weight.detach().abs().flatten().numpy()
    np.testing.assert_array_equal(mask.numpy(), expected_keep(abs_w, 7))
    assert int((~mask).sum()) == 7
    assert (~mask).nonzero().flatten().tolist() == [0, 1, 3, 4, 6, 7, 9]


def test_magnitude_global_uses_one_threshold_across_layers():
    model = SmallNet()
    before = weights_np(model)
    ratio = 0.6
    result = compute_masks(model, PruneConfig(ratio=ratio, scope="global"))
    flat = np.concatenate([np.abs(before[n]).ravel() for n in PRUNABLE])
    k = 6 * flat.size // 10
    keep = expected_keep(flat, k)
    got = np.concatenate([result.masks[n].numpy().ravel() for n in PRUNABLE])
    np.testing.assert_array_equal(got, keep)
    assert int((~got).sum()) == k
    sparsities = [1 - result.masks[n].float().mean().item() for n in PRUNABLE]
    # Layers were built with growing scales, so the global threshold prunes them unequally.
    assert max(sparsities) - min(sparsities) > 0.3


def test_magnitude_is_deterministic():
    model = SmallNet()
    for config in (PruneConfig(ratio=0.5, scope="global"), PruneConfig(ratio=0.5, pattern="2:4")):
        a, b = compute_masks(model, config).masks, compute_masks(model, config).masks
        assert all(torch.equal(a[n], b[n]) for n in a)


# --- random ------------------------------------------------------------------------------------------


def test_random_layer_keeps_the_right_count_and_is_seeded():
    model = SmallNet()
    first = compute_masks(model, PruneConfig(ratio=0.4, pruner="random", seed=1)).masks
    again = compute_masks(model, PruneConfig(ratio=0.4, pruner="random", seed=1)).masks
    other = compute_masks(model, PruneConfig(ratio=0.4, pruner="random", seed=2)).masks
    for name, mask in first.items():
        assert int((~mask).sum()) == 4 * mask.numel() // 10
        assert torch.equal(mask, again[name])
    assert any(not torch.equal(first[n], other[n]) for n in first)
    # Random is not magnitude in disguise.
    magnitude = compute_masks(model, PruneConfig(ratio=0.4)).masks
    assert any(not torch.equal(first[n], magnitude[n]) for n in first)


def test_random_global_keeps_the_right_count_overall():
    model = SmallNet()
    config = PruneConfig(ratio=0.45, pruner="random", scope="global", seed=3)
    masks = compute_masks(model, config).masks
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == 45 * total // 100
    again = compute_masks(model, config).masks
    assert all(torch.equal(masks[n], again[n]) for n in masks)


# --- N:M ---------------------------------------------------------------------------------------------


def groups_of(mask_or_weight: np.ndarray, m: int) -> np.ndarray:
    rows = mask_or_weight.reshape(mask_or_weight.shape[0], -1)
    return rows.reshape(rows.shape[0], -1, m)


@pytest.mark.parametrize("pattern", ["2:4", "1:4"])
@pytest.mark.parametrize("pruner", ["magnitude", "random"])
def test_n_of_m_keeps_exactly_n_in_every_group(pattern, pruner):
    n, m = parse_pattern(pattern)
    model = SmallNet()
    before = weights_np(model)
    result = compute_masks(model, PruneConfig(ratio=1 - n / m, pattern=pattern, pruner=pruner, seed=5))
    # body.0 rows are 5*4*4 = 80, body.2 rows 8, head rows 12: multiples of 4. odd rows are 6.
    assert result.dense_layers == ["odd"]
    assert result.masks["odd"].all()
    for name in ("body.0", "body.2", "head"):
        groups = groups_of(result.masks[name].numpy(), m)
        assert (groups.sum(axis=-1) == n).all()
        if pruner == "magnitude":
            abs_groups = groups_of(np.abs(before[name]), m)
            smallest_kept = np.where(groups, abs_groups, np.inf).min(axis=-1)
            largest_pruned = np.where(groups, -np.inf, abs_groups).max(axis=-1)
            assert (smallest_kept >= largest_pruned).all()


def test_n_of_m_random_differs_across_seeds():
    model = SmallNet()
    a = compute_masks(model, PruneConfig(ratio=0.5, pattern="2:4", pruner="random", seed=0)).masks
    b = compute_masks(model, PruneConfig(ratio=0.5, pattern="2:4", pruner="random", seed=1)).masks
    assert not torch.equal(a["body.0"], b["body.0"])


def test_n_of_m_groups_run_along_the_flattened_input_of_a_conv():
    conv = nn.Conv2d(2, 1, 2, bias=False)  # one row of 2*2*2 = 8: (in, kh, kw) row-major
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 9.0, 8.0, 2.0, 7.0, 3.0, 4.0, 6.0]).reshape(1, 2, 2, 2))
    mask = compute_masks(nn.Sequential(conv), PruneConfig(ratio=0.5, pattern="2:4", protect=())).masks["0"]
    assert mask.flatten().tolist() == [False, True, True, False, True, False, False, True]


# --- applying ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        PruneConfig(ratio=0.5),
        PruneConfig(ratio=0.5, scope="global"),
        PruneConfig(ratio=0.5, pattern="2:4"),
        PruneConfig(ratio=0.3, pruner="random"),
    ],
)
def test_pruning_a_unet_touches_only_the_pruned_weights(tiny_ddpm, config):
    unet = tiny_ddpm.unet
    before = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    result = prune(unet, config)
    masks = result.masks
    assert sorted(masks) == sorted(prunable_modules(unet, DEFAULT_PROTECT))
    after = unet.state_dict()
    masked_keys = {f"{name}.weight" for name in masks}
    for key, value in after.items():
        if key not in masked_keys:
            # protected layers, biases, norms: bit-identical
            assert torch.equal(value.view(torch.int32), before[key].view(torch.int32)), key
    for name, mask in masks.items():
        new, old = after[f"{name}.weight"], before[f"{name}.weight"]
        assert torch.equal(new[mask].view(torch.int32), old[mask].view(torch.int32))
        # +0.0 exactly, not -0.0, where a weight was pruned
        assert (new[~mask].view(torch.int32) == 0).all()
    protected = set(maskable_modules(unet)) - set(masks)
    assert protected and all(any(p in n for p in DEFAULT_PROTECT) for n in protected)


def test_masks_equal_the_pruned_models_nonzero_pattern(tiny_ddpm):
    unet = tiny_ddpm.unet
    assert all(bool((m.weight != 0).all()) for m in maskable_modules(unet).values())
    result = prune(unet, PruneConfig(ratio=0.6, scope="global"))
    extracted = masks_from_weights(unet, result.masks)
    assert all(torch.equal(extracted[n], result.masks[n]) for n in result.masks)


def test_ratio_zero_changes_nothing(tiny_ddpm):
    unet = tiny_ddpm.unet
    before = copy.deepcopy(unet.state_dict())
    result = prune(unet, PruneConfig(ratio=0.0))
    assert all(m.all() for m in result.masks.values())
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_everything_protected_is_an_error():
    with pytest.raises(MaskDMError) as exc:
        compute_masks(SmallNet(), PruneConfig(ratio=0.3, protect=("body", "head", "odd", "conv")))
    assert "nothing to prune" in one_line(exc)


def test_apply_pruning_rejects_a_mask_that_does_not_fit():
    with pytest.raises(MaskDMError):
        apply_pruning(SmallNet(), {"head": torch.ones(3, 3, dtype=torch.bool)})


# --- stats -------------------------------------------------------------------------------------------


def test_stats_agree_with_the_masks_and_the_model():
    model = SmallNet()
    result = prune(model, PruneConfig(ratio=0.5, pattern="2:4"))
    stats = json.loads(json.dumps(pruning_stats(model, result)))
    masks = result.masks
    for name, mask in masks.items():
        layer = stats["layers"][name]
        assert layer["numel"] == mask.numel() and layer["kept"] == int(mask.sum())
        assert layer["sparsity"] == pytest.approx(1 - mask.float().mean().item())
        assert layer["nonzero"] == int((maskable_modules(model)[name].weight != 0).sum())
    assert stats["layers"]["odd"]["sparsity"] == 0.0
    assert stats["sparsity"] == pytest.approx(mask_sparsity(masks))
    all_weights = sum(m.weight.numel() for m in maskable_modules(model).values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert stats["sparsity_all_weights"] == pytest.approx(pruned / all_weights)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    nonzero = sum(int((p != 0).sum()) for p in params)
    assert (stats["params_total"], stats["params_nonzero"]) == (total, nonzero)
    assert stats["compression_ratio"] == pytest.approx(total / nonzero)
    assert stats["sparsity_all_params"] == pytest.approx(1 - nonzero / total)
    assert sorted(stats["protected_layers"]) == ["conv_in", "conv_out"]
    assert stats["dense_layers"] == ["odd"]
    assert stats["config"]["pattern"] == "2:4" and stats["config"]["ratio"] == 0.5


def test_stats_on_a_unet_match_the_ratio(tiny_ddpm):
    unet = tiny_ddpm.unet
    result = prune(unet, PruneConfig(ratio=0.5))
    stats = pruning_stats(unet, result)
    expected = sum(m.numel() // 2 for m in result.masks.values()) / sum(m.numel() for m in result.masks.values())
    assert stats["sparsity"] == pytest.approx(expected)
    assert stats["compact_checkpoint_bytes"] < stats["dense_checkpoint_bytes"]
    size_ratio = stats["compact_checkpoint_bytes"] / stats["dense_checkpoint_bytes"]
    assert stats["checkpoint_size_ratio"] == pytest.approx(size_ratio)


# --- compact checkpoint ------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [PruneConfig(ratio=0.5), PruneConfig(ratio=0.75, pattern="1:4", pruner="random")])
def test_compact_checkpoint_round_trips_exactly(tiny_ddpm, tmp_path, config):
    unet = tiny_ddpm.unet
    result = prune(unet, config)
    dense = unet.state_dict()
    state, masks = expand_compact_state_dict(compact_state_dict(unet, result.masks))
    assert state.keys() == dense.keys()
    assert all(torch.equal(state[k], dense[k]) and state[k].dtype == dense[k].dtype for k in dense)
    assert masks.keys() == result.masks.keys()
    assert all(torch.equal(masks[n], result.masks[n]) for n in masks)

    path = tmp_path / "compact.safetensors"
    save_compact_checkpoint(unet, result.masks, path)
    loaded, _ = load_compact_checkpoint(path)
    assert all(torch.equal(loaded[k], dense[k]) for k in dense)
    fresh = copy.deepcopy(unet)
    for p in fresh.parameters():
        p.data.fill_(1.0)
    fresh.load_state_dict(loaded)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), dense.values()))


def test_compact_checkpoint_is_smaller_than_dense_at_half(tiny_ddpm, tmp_path):
    from safetensors.torch import save_file

    unet = tiny_ddpm.unet
    result = prune(unet, PruneConfig(ratio=0.5))
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp_path / "dense.safetensors"))
    save_compact_checkpoint(unet, result.masks, tmp_path / "compact.safetensors")
    dense_size = (tmp_path / "dense.safetensors").stat().st_size
    compact_size = (tmp_path / "compact.safetensors").stat().st_size
    assert compact_size < dense_size
    stats = pruning_stats(unet, result)
    assert stats["dense_checkpoint_bytes"] == dense_size


def test_a_corrupt_compact_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(MaskDMError) as exc:
        load_compact_checkpoint(path)
    one_line(exc)


# --- kept weights that are exactly zero -----------------------------------------------------------


def plant_zero_group(unet: nn.Module) -> str:
    """Make the first 2:4 group of the first prunable layer [0, 0, 0, 1]: magnitude 2:4 prunes the first
    two zeros (ties: earlier first) and keeps the third, a kept weight that is exactly zero."""
    name, module = next(iter(prunable_modules(unet, DEFAULT_PROTECT).items()))
    with torch.no_grad():
        module.weight.view(module.weight.shape[0], -1)[0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    return name


def first_group(tensor: torch.Tensor) -> list:
    return tensor.reshape(tensor.shape[0], -1)[0, :4].tolist()


def test_a_kept_zero_is_in_the_masks_and_only_re_deriving_from_zeros_loses_it(tiny_ddpm):
    unet = tiny_ddpm.unet
    name = plant_zero_group(unet)
    result = prune(unet, PruneConfig(ratio=0.5, pattern="2:4"))
    assert first_group(unet.get_submodule(name).weight.detach()) == [0.0, 0.0, 0.0, 1.0]
    assert first_group(result.masks[name]) == [False, False, True, True]
    assert all(bool((m.reshape(-1, 4).sum(-1) == 2).all()) for m in result.masks.values())
    check_masks_match_weights(unet, result.masks)  # the masks are consistent with the weights
    # The nonzero pattern calls the kept zero pruned, and its group then keeps 1 of 4, not 2.
    derived = masks_from_weights(unet, result.masks)
    assert first_group(derived[name]) == [False, False, False, True]
    assert int(derived[name].reshape(-1, 4).sum(-1).min()) == 1
