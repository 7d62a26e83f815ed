"""MaskPro mask learning (maskdm.method.maskpro): the estimator, the exact replay, the update loop."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.utils.data import Dataset, TensorDataset

from conftest import tiny_unet
from maskdm.errors import MaskDMError
from maskdm.method.maskpro import (
    MaskTrainer,
    NMPattern,
    ReplayBatches,
    ReplaySpec,
    TrainConfig,
    baseline_summary,
    bernoulli_score,
    check_protocol,
    compute_baseline_losses,
    ensure_masks,
    gumbel_top_n,
    load_logits,
    make_policy,
    nm_log_prob,
    nm_score,
    parse_pattern,
    planned_updates,
    replayed_loss,
    resolve_from_baseline,
    save_logits,
    select_targets,
    subset_indices,
    top_entries,
)
from maskdm.masks import current_masks, prunable_modules
from maskdm.ddpm.models import DDPM, default_scheduler

# --- helpers ---------------------------------------------------------------------------------------


def brute_force_log_prob(logits: torch.Tensor, kept: tuple[int, ...]) -> torch.Tensor:
    """log P(set) for one group, written out as the sum over orders of the Plackett-Luce product."""
    p = logits.softmax(-1)
    total = logits.new_zeros(())
    for order in itertools.permutations(kept):
        prob, drawn = logits.new_ones(()), logits.new_zeros(())
        for i in order:
            prob = prob * p[i] / (1 - drawn)
            drawn = drawn + p[i]
        total = total + prob
    return total.log()


def magnitude_masks(unet, pattern: str, ratio: float = 0.3) -> dict[str, torch.Tensor]:
    """Initial masks as a cheap pruner would give them: smallest magnitudes dropped, per layer."""
    nm = parse_pattern(pattern)
    masks = {}
    for name, module in prunable_modules(unet).items():
        w = module.weight.detach().abs()
        if nm is None:
            k = int(round(w.numel() * (1 - ratio)))
            masks[name] = top_entries(w.reshape(1, -1), k, torch.zeros(1, w.numel(), dtype=torch.bool)).reshape(w.shape)
        elif w[0].numel() % nm.m == 0:
            groups = w.reshape(-1, nm.m)
            masks[name] = top_entries(groups, nm.n, torch.zeros_like(groups, dtype=torch.bool)).reshape(w.shape)
        else:
            masks[name] = torch.ones_like(w, dtype=torch.bool)
    return masks


def image_dataset(n: int = 24, resolution: int = 16, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, resolution, resolution, generator=gen) * 2 - 1
    return TensorDataset(images, torch.zeros(n, dtype=torch.long))


def diffusion_setup(pattern: str, batch_size: int = 4, dataset_size: int = 24):
    """A tiny dense DDPM, its initial masks, replayed batches and their baseline losses (made on a copy,
    as the baseline_loss stage would)."""
    ddpm = DDPM(tiny_unet(), default_scheduler())
    masks = magnitude_masks(ddpm.unet, pattern)
    batches = ReplayBatches(image_dataset(dataset_size), ReplaySpec(dataset_size, batch_size, 0, seed=3))
    baseline = compute_baseline_losses(copy.deepcopy(ddpm.unet), ddpm.scheduler, masks, batches, progress=False)
    return ddpm, masks, batches, baseline


def diffusion_trainer(ddpm, masks, batches, baseline, pattern, magnitude, config, targets="all", state=None, logits=None):
    policy = make_policy(pattern, masks, select_targets(masks, targets), magnitude, logits=logits)
    loss = lambda b: replayed_loss(ddpm.unet, ddpm.scheduler, batches, b)  # noqa: E731
    return MaskTrainer(ddpm.unet, masks, policy, loss, baseline, config, state=state)


# --- 1. the replay is exact --------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_lr_zero_improvement_is_exactly_zero(pattern):
    ddpm, masks, batches, baseline = diffusion_setup(pattern)
    # Logits of magnitude 30 put every sampled mask on the initial one (a flip would need a Gumbel
    # or logistic draw beyond float32's range), so with lr=0 the only difference left is the draws.
    config = TrainConfig(lr=0.0, epoch=2, max_step=0, accumulation=4, seed=1)
    history = diffusion_trainer(ddpm, masks, batches, baseline, pattern, 30.0, config).run(progress=False)
    assert len(history) == planned_updates(len(batches), config) == 3
    assert all(h.mask_flip_rate == 0.0 for h in history)
    assert [h.improvement for h in history] == [0.0] * len(history)
    assert all(h.loss == h.baseline_loss > 0 for h in history)


def test_replay_is_what_makes_it_exact():
    ddpm, masks, batches, baseline = diffusion_setup("2:4")
    ensure_masks(ddpm.unet, masks)
    ddpm.unet.eval()
    again = [replayed_loss(ddpm.unet, ddpm.scheduler, batches, b) for b in range(len(batches))]
    assert again == baseline.tolist()
    other_seed = ReplayBatches(batches.dataset, ReplaySpec(24, 4, 0, seed=4))
    fresh = compute_baseline_losses(ddpm.unet, ddpm.scheduler, masks, other_seed, progress=False)
    assert not np.array_equal(fresh, baseline)


def test_sampled_masks_that_differ_change_the_loss():
    ddpm, masks, batches, baseline = diffusion_setup("unstructured")
    config = TrainConfig(lr=0.0, epoch=0, max_step=2, accumulation=2, seed=0)
    history = diffusion_trainer(ddpm, masks, batches, baseline, "unstructured", 1.0, config).run(progress=False)
    assert all(h.mask_flip_rate > 0 for h in history)
    assert all(h.improvement != 0.0 for h in history)


# --- 2. the N:M estimator -----------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 5), (4, 6)])
def test_nm_probabilities_sum_to_one_and_match_the_definition(n, m):
    logits = torch.randn(6, m, generator=torch.Generator().manual_seed(n * 10 + m)) * 2
    total = torch.zeros(6, dtype=torch.float64)
    for kept in itertools.combinations(range(m), n):
        mask = torch.zeros(6, m, dtype=torch.bool)
        mask[:, list(kept)] = True
        log_p = nm_log_prob(logits, mask, n)
        expected = torch.stack([brute_force_log_prob(row.double(), kept) for row in logits])
        torch.testing.assert_close(log_p.double(), expected, rtol=1e-5, atol=1e-5)
        total += log_p.double().exp()
    torch.testing.assert_close(total, torch.ones(6, dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,m", [(2, 4), (3, 5), (4, 6)])
def test_nm_score_is_the_gradient_of_log_prob(n, m):
    gen = torch.Generator().manual_seed(m)
    logits = torch.randn(5, m, generator=gen) * 2
    for kept in itertools.combinations(range(m), n):
        mask = torch.zeros(5, m, dtype=torch.bool)
        mask[:, list(kept)] = True
        score = nm_score(logits, mask, n)
        for row, got in zip(logits, score):
            x = row.double().clone().requires_grad_(True)
            brute_force_log_prob(x, kept).backward()
            torch.testing.assert_close(got.double(), x.grad, rtol=1e-4, atol=1e-5)


def test_nm_score_is_finite_for_saturated_logits():
    logits = torch.tensor([[80.0, -80.0, -80.0, -80.0], [40.0, -40.0, 39.0, -40.0]])
    mask = torch.tensor([[False, True, True, False], [True, False, False, True]])
    score = nm_score(logits, mask, 2)
    assert torch.isfinite(score).all()
    # Every row of a softmax score sums to zero (adding a constant to the logits changes nothing).
    torch.testing.assert_close(score.sum(-1), torch.zeros(2), atol=1e-5, rtol=0)


def test_gumbel_top_n_frequencies_match_the_probabilities():
    logits = torch.tensor([1.0, 0.2, -0.5, 0.7])
    draws = 30000
    sampled = gumbel_top_n(logits.expand(draws, 4), 2, torch.Generator().manual_seed(0))
    assert (sampled.sum(-1) == 2).all()
    sets = list(itertools.combinations(range(4), 2))
    code = {s: i for i, s in enumerate(sets)}
    observed = np.bincount([code[tuple(np.flatnonzero(row))] for row in sampled.numpy()], minlength=len(sets))
    masks = torch.zeros(len(sets), 4, dtype=torch.bool)
    for i, s in enumerate(sets):
        masks[i, list(s)] = True
    probs = nm_log_prob(logits.expand(len(sets), 4), masks, 2).double().exp().numpy()
    chi2 = stats.chisquare(observed, probs / probs.sum() * draws)
    assert chi2.pvalue > 1e-3


def test_bernoulli_score_is_the_gradient_of_log_prob():
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) < 0.5
    log_p = torch.where(mask, F.logsigmoid(logits), F.logsigmoid(-logits)).sum()
    log_p.backward()
    torch.testing.assert_close(bernoulli_score(logits.detach(), mask).double(), logits.grad, rtol=1e-6, atol=1e-6)


# --- 3. toy problems whose best mask is known ----------------------------------------------------------


def linear_toy(weight, target, initial, pattern, config, magnitude=0.5, logits=None, scale=1.0):
    """A bias-free linear layer learning to imitate ``x @ target.T``; batch b is a fixed input batch;
    the loss is multiplied by ``scale`` (a tiny scale makes rewards tiny, as on a real model)."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    model = torch.nn.Sequential(layer)
    inputs = torch.randn(8, 32, weight.shape[1], generator=torch.Generator().manual_seed(1))
    outputs = inputs @ target.T

    def loss(b: int) -> float:
        with torch.no_grad():
            return scale * float(F.mse_loss(model(inputs[b]), outputs[b]))

    masks = {"0": initial}
    ensure_masks(model, masks)
    baseline = np.array([loss(b) for b in range(8)])
    policy = make_policy(pattern, masks, ["0"], magnitude, logits=logits)
    return MaskTrainer(model, masks, policy, loss, baseline, config)


def linear_toy_trainer(weight, target, initial, pattern, lr, magnitude, updates, seed=0):
    config = TrainConfig(lr=lr, epoch=0, max_step=updates, accumulation=1, seed=seed)
    return linear_toy(weight, target, initial, pattern, config, magnitude=magnitude)


def harmful_nm_toy(seed: int):
    """(weight, target, best mask, magnitude 2:4 mask): each group of 4 holds two weights the target
    uses, one large harmful weight the target does not have, and a zero. Magnitude 2:4 keeps the
    harmful one; the best 2:4 mask is the target's."""
    gen = torch.Generator().manual_seed(seed)
    rows, groups = 2, 2
    target = torch.zeros(rows, groups * 4)
    weight = torch.zeros_like(target)
    for r, q in itertools.product(range(rows), range(groups)):
        good_a, good_b, harmful, _ = (torch.randperm(4, generator=gen) + 4 * q).tolist()
        signs = torch.randn(3, generator=gen).sign()
        target[r, good_a], target[r, good_b] = signs[0], signs[1]
        weight[r, good_a], weight[r, good_b], weight[r, harmful] = signs[0], signs[1], 2 * signs[2]
    return weight, target, target != 0, magnitude_nm(weight, 2, 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_nm_learning_drops_the_harmful_weight_of_every_group(seed):
    weight, target, best, initial = harmful_nm_toy(seed)
    assert (initial != best).any(dim=-1).all(), "the toy must start from a wrong mask in every row"

    trainer = linear_toy_trainer(weight, target, initial, "2:4", lr=0.03, magnitude=0.5, updates=1000, seed=seed)
    history = trainer.run(progress=False)
    assert torch.equal(trainer.final_masks()["0"], best)
    assert np.mean([h.improvement for h in history[-100:]]) > 0


def magnitude_nm(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = weight.abs().reshape(-1, m)
    return top_entries(groups, n, torch.zeros_like(groups, dtype=torch.bool)).reshape(weight.shape)


@pytest.mark.parametrize("seed", [0, 1])
def test_unstructured_learning_swaps_harmful_for_useful_weights(seed):
    # Half the weights are the target's (+-1); the other half are larger (+-2) and harmful, so
    # magnitude pruning at 50% keeps exactly the wrong half. The best 50% mask is the target's.
    gen = torch.Generator().manual_seed(seed)
    n = 16
    perm = torch.randperm(n, generator=gen)
    signs = torch.randn(n, generator=gen).sign()
    useful, harmful = perm[: n // 2], perm[n // 2 :]
    target, weight = torch.zeros(n), torch.zeros(n)
    target[useful] = weight[useful] = signs[useful]
    weight[harmful] = 2 * signs[harmful]
    target, weight = target.view(2, 8), weight.view(2, 8)
    initial = top_entries(weight.abs().reshape(1, -1), n // 2, torch.zeros(1, n, dtype=torch.bool)).reshape(2, 8)
    assert not (initial & (target != 0)).any()

    trainer = linear_toy_trainer(weight, target, initial, "unstructured", lr=0.03, magnitude=0.5, updates=800, seed=seed)
    trainer.run(progress=False)
    assert torch.equal(trainer.final_masks()["0"], target != 0)


# --- 4. final masks keep the pattern -----------------------------------------------------------------


def test_final_masks_are_exactly_n_m():
    ddpm, masks, batches, baseline = diffusion_setup("2:4")
    # Near-equal logits (magnitude 0.01): any update reorders them, so the final masks move.
    config = TrainConfig(lr=200.0, epoch=0, max_step=3, accumulation=2, seed=0)
    trainer = diffusion_trainer(ddpm, masks, batches, baseline, "2:4", 0.01, config)
    trainer.run(progress=False)
    final = trainer.final_masks()
    assert set(final) == set(masks)
    assert any(not torch.equal(final[k], masks[k]) for k in masks), "training must have moved some mask"
    for name, mask in final.items():
        if mask[0].numel() % 4 == 0:
            assert (mask.reshape(-1, 4).sum(-1) == 2).all(), name
        else:
            assert torch.equal(mask, masks[name]), f"{name} cannot hold 2:4 and must stay as it was"


def test_final_masks_keep_the_pruning_sparsity_per_layer():
    ddpm, masks, batches, baseline = diffusion_setup("unstructured")
    config = TrainConfig(lr=200.0, epoch=0, max_step=3, accumulation=2, seed=0)
    trainer = diffusion_trainer(ddpm, masks, batches, baseline, "unstructured", 0.01, config, targets="down_blocks")
    trainer.run(progress=False)
    final = trainer.final_masks()
    changed = [k for k in masks if not torch.equal(final[k], masks[k])]
    assert changed and all(k.startswith("down_blocks.") for k in changed)
    for name, mask in final.items():
        assert int(mask.sum()) == int(masks[name].sum()), name


def test_training_swaps_masks_in_place_and_leaves_the_initial_masks_alone():
    ddpm, masks, batches, baseline = diffusion_setup("2:4")
    before = {k: v.clone() for k, v in masks.items()}
    config = TrainConfig(lr=50.0, epoch=0, max_step=2, accumulation=2, seed=0)
    trainer = diffusion_trainer(ddpm, masks, batches, baseline, "2:4", 1.0, config)
    trainer.run(progress=False)
    assert all(torch.equal(masks[k], before[k]) for k in masks)
    assert set(current_masks(ddpm.unet)) == set(masks)


# --- continuing, stopping ------------------------------------------------------------------------------


def test_continuing_from_saved_logits_equals_an_uninterrupted_run(tmp_path):
    ddpm, masks, batches, baseline = diffusion_setup("2:4")
    config = TrainConfig(lr=20.0, epoch=0, max_step=4, accumulation=2, seed=5)
    straight = diffusion_trainer(copy.deepcopy(ddpm), masks, batches, baseline, "2:4", 2.0, config)
    straight.run(progress=False)

    first = diffusion_trainer(copy.deepcopy(ddpm), masks, batches, baseline, "2:4", 2.0, TrainConfig(**{**config.__dict__, "max_step": 2}))
    first.run(progress=False)
    save_logits(tmp_path / "logits.safetensors", first.policy, first.state, "2:4")
    logits, state, meta = load_logits(tmp_path / "logits.safetensors")
    assert state.updates == 2 and meta["pattern"] == "2:4"
    second = diffusion_trainer(copy.deepcopy(ddpm), masks, batches, baseline, "2:4", 2.0, config, state=state, logits=logits)
    second.run(progress=False)

    assert [h.loss for h in first.history + second.history] == [h.loss for h in straight.history]
    for name in straight.policy.logits:
        torch.testing.assert_close(second.policy.logits[name], straight.policy.logits[name], rtol=0, atol=0)


def test_updates_stop_at_max_step_or_epoch_whichever_first():
    assert planned_updates(10, TrainConfig(epoch=3, max_step=100, accumulation=4)) == 7  # 30 batches // 4
    assert planned_updates(10, TrainConfig(epoch=3, max_step=5, accumulation=4)) == 5
    assert planned_updates(10, TrainConfig(epoch=0, max_step=5, accumulation=4)) == 5
    assert planned_updates(10, TrainConfig(epoch=2, max_step=0, accumulation=1)) == 20
    with pytest.raises(MaskDMError, match="both 0"):
        TrainConfig(epoch=0, max_step=0)


# --- replay bookkeeping -----------------------------------------------------------------------------


def test_subset_is_a_fixed_seeded_permutation():
    a = subset_indices(100, 10, seed=0)
    assert a.tolist() == subset_indices(100, 10, seed=0).tolist()
    assert a.tolist() != subset_indices(100, 10, seed=1).tolist()
    assert len(set(a.tolist())) == 10 and len(subset_indices(5, 10, 0)) == 5


def test_batches_drop_the_incomplete_last_one_and_honour_max_batches():
    data = image_dataset(10)
    assert len(ReplayBatches(data, ReplaySpec(10, 4, 0, 0))) == 2
    assert len(ReplayBatches(data, ReplaySpec(10, 2, 3, 0))) == 3
    with pytest.raises(MaskDMError, match="fewer than one batch"):
        ReplayBatches(data, ReplaySpec(3, 4, 0, 0))


class FlippingDataset(Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return (image.flip(-1) if torch.rand(()) < 0.5 else image), label


def test_random_transforms_are_refused():
    torch.manual_seed(0)
    with pytest.raises(MaskDMError, match="deterministic"):
        ReplayBatches(FlippingDataset(image_dataset(16)), ReplaySpec(16, 4, 0, 0))


def test_baseline_summary_catches_contradictions_and_other_data():
    batches = ReplayBatches(image_dataset(24), ReplaySpec(24, 4, 0, 3))
    summary = baseline_summary(np.ones(len(batches)), batches, dataset="shapes", targets="all")
    assert summary["count"] == 6 and summary["params"]["batch_size"] == 4
    resolved = resolve_from_baseline(summary, {"batch_size": None, "dataset": "shapes", "seed": "3"})
    assert resolved == {"batch_size": 4, "dataset": "shapes", "seed": 3}
    with pytest.raises(MaskDMError, match="batch_size=8 contradicts the baseline run's batch_size=4"):
        resolve_from_baseline(summary, {"batch_size": 8})
    check_protocol(summary, batches, 6)
    other_images = ReplayBatches(image_dataset(24, seed=9), ReplaySpec(24, 4, 0, 3))
    with pytest.raises(MaskDMError, match="same dataset"):
        check_protocol(summary, other_images, 6)


# --- bad input ---------------------------------------------------------------------------------------


def test_n_above_four_is_refused():
    with pytest.raises(MaskDMError, match=r"N <= 4.*120"):
        parse_pattern("5:8")
    assert parse_pattern("4:8") == NMPattern(4, 8) and parse_pattern("unstructured") is None
    with pytest.raises(MaskDMError):
        parse_pattern("4:2")


def test_targets_that_match_nothing_list_the_prefixes():
    names = ["down_blocks.0.resnets.0.conv1", "mid_block.attentions.0.to_q", "up_blocks.1.resnets.0.conv2"]
    assert select_targets(names, "all") == names
    assert select_targets(names, "down_blocks,mid_block") == names[:2]
    assert select_targets(names, "up_blocks.1") == names[2:]
    with pytest.raises(MaskDMError) as err:
        select_targets(names, "encoder")
    message = str(err.value)
    assert "\n" not in message and "all, down_blocks, mid_block, up_blocks" in message
    with pytest.raises(MaskDMError, match="up_block'"):
        select_targets(names, "up_block")  # a prefix of a name part is not a module prefix


def test_initial_masks_that_are_not_n_m_are_refused():
    masks = {"a": torch.tensor([[True, True, True, False]])}
    with pytest.raises(MaskDMError, match="not 2:4"):
        make_policy("2:4", masks, ["a"], 5.0)


def test_logits_initialised_from_the_initial_mask():
    masks = {"a": torch.tensor([[True, False, True, False]])}
    policy = make_policy("unstructured", masks, ["a"], 5.0)
    assert policy.logits["a"].tolist() == [[5.0, -5.0, 5.0, -5.0]]
    assert math.isclose(float(torch.sigmoid(policy.logits["a"][0, 0])), 1 / (1 + math.exp(-5)), rel_tol=1e-6)
