"""train_masks' options (magnitude init, advantage normalisation, several samples with a
leave-one-out baseline) and its held-out scoring, in the library."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch

from maskdm.errors import MaskDMError
from maskdm.method.mask_policy import magnitude_logits, make_policy, select_targets, top_entries
from maskdm.method.maskpro import (
    HELDOUT_SHARE,
    MaskTrainer,
    TrainConfig,
    TrainState,
    advantages,
    auto_eval_every,
    heldout_scores,
    mask_generator,
)
from maskdm.masks import set_masks
from maskdm.method.replay import ReplayBatches, ReplaySpec, compute_baseline_losses, ensure_masks, heldout_batches, replayed_loss
from test_maskpro import diffusion_setup, harmful_nm_toy, image_dataset, linear_toy

# --- lr = 0 changes nothing, with samples that do differ from the initial mask ----------------------


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize(
    "options",
    [dict(), dict(normalize=True), dict(samples=2, reward_baseline="loo"), dict(samples=3, normalize=True)],
    ids=["plain", "normalize", "loo2", "delta3-normalize"],
)
def test_lr_zero_with_unsaturated_logits_changes_nothing(pattern, options):
    ddpm, masks, batches, baseline = diffusion_setup(pattern)
    config = TrainConfig(lr=0.0, epoch=0, max_step=3, accumulation=2, seed=4, **options)
    # logits=1: about a quarter of the sampled entries differ from the initial mask (unstructured).
    policy = make_policy(pattern, masks, select_targets(masks, "all"), 1.0)
    before = policy.flat.clone()
    probe = copy.deepcopy(ddpm.unet)  # measures the sampled masks independently of the trainer
    trainer = MaskTrainer(ddpm.unet, masks, policy, lambda b: replayed_loss(ddpm.unet, ddpm.scheduler, batches, b), baseline, config)
    history = trainer.run(progress=False)

    assert torch.equal(policy.flat, before)
    assert all(torch.equal(trainer.final_masks()[k], masks[k]) for k in masks)
    assert all(h.mask_flip_rate > 0.01 for h in history), "the samples must differ from the initial mask"
    ensure_masks(probe, masks)
    probe.eval()
    for t, h in enumerate(history):
        window = [(t * 2 + i) % len(batches) for i in range(2)]
        losses = []
        for k in range(config.samples):
            sampled = policy.unflatten(policy.sample_flat(mask_generator(config.seed, t, "cpu", k)))
            set_masks(probe, sampled)
            losses.append(np.mean([replayed_loss(probe, ddpm.scheduler, batches, b) for b in window]))
        expected = float(np.mean(baseline[window]) - np.mean(losses))
        assert h.improvement == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert h.improvement != 0.0


# --- the leave-one-out baseline is unbiased ---------------------------------------------------------


def test_leave_one_out_gradient_matches_the_plain_estimator_exactly():
    # Three Bernoulli entries, a reward that is any function of the mask: enumerate every joint draw
    # of K=2 samples and compare E[(1/K) sum_k A_k score(m_k)] with the true gradient of E[R].
    logits = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    p = torch.sigmoid(logits)
    masks = [torch.tensor(bits, dtype=torch.bool) for bits in itertools.product([0, 1], repeat=3)]
    reward = {tuple(m.tolist()): float(v) for m, v in zip(masks, [0.2, -1.0, 0.7, 0.05, 1.3, -0.4, 0.9, -2.0])}

    def prob(m: torch.Tensor) -> float:
        return float(torch.where(m, p, 1 - p).prod())

    def score(m: torch.Tensor) -> torch.Tensor:  # bernoulli_score in float64 (the library's is float32)
        return m.double() - p

    true_gradient = sum(prob(m) * reward[tuple(m.tolist())] * score(m) for m in masks)
    loo = TrainConfig(samples=2, reward_baseline="loo")
    expected = torch.zeros(3, dtype=torch.float64)
    for m1, m2 in itertools.product(masks, masks):
        rewards = np.array([reward[tuple(m1.tolist())], reward[tuple(m2.tolist())]])
        adv, scale = advantages(rewards, loo, TrainState())
        assert scale == 1.0
        expected += prob(m1) * prob(m2) * (adv[0] * score(m1) + adv[1] * score(m2)) / 2
    # Unbiased because the other samples' rewards are independent of m_k: E[R_j score(m_k)] = 0.
    torch.testing.assert_close(expected, true_gradient, rtol=1e-12, atol=1e-12)
    # The check can fail: a baseline that includes the sample's own reward (the plain mean of the
    # update's rewards) shrinks the expected gradient by (K-1)/K, and the comparison sees it.
    biased = torch.zeros(3, dtype=torch.float64)
    for m1, m2 in itertools.product(masks, masks):
        r1, r2 = reward[tuple(m1.tolist())], reward[tuple(m2.tolist())]
        mean = (r1 + r2) / 2
        biased += prob(m1) * prob(m2) * ((r1 - mean) * score(m1) + (r2 - mean) * score(m2)) / 2
    assert not torch.allclose(biased, true_gradient)


def test_advantages_normalise_by_a_running_spread():
    config = TrainConfig(normalize=True)
    state = TrainState()
    adv, scale = advantages(np.array([0.004]), config, state)
    # First update: delta = 0.01 * R, the advantage 0.99 R, divided by its own size.
    assert scale == pytest.approx(0.99 * 0.004)
    assert adv[0] == pytest.approx(1.0)
    adv, scale = advantages(np.array([-0.004]), config, state)
    assert scale > 0 and abs(adv[0]) < 2
    plain_state = TrainState()
    plain, one = advantages(np.array([0.004]), TrainConfig(), plain_state)
    assert one == 1.0 and plain[0] == pytest.approx(0.99 * 0.004)


# --- toy problems whose better mask is known, one per option ------------------------------------


def near_threshold_toy(seed: int):
    """16 weights: 4 large useful ones, 4 tiny useless ones, and 4 pairs near the 50 % threshold in
    which the slightly larger weight is harmful and the slightly smaller one is the target's.
    Magnitude pruning keeps the harmful member of every pair; the best mask keeps the useful one."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(16, generator=gen)
    signs = torch.randn(16, generator=gen).sign()
    large, tiny, useful, harmful = perm[:4], perm[4:8], perm[8:12], perm[12:]
    target, weight = torch.zeros(16), torch.zeros(16)
    target[large] = weight[large] = 3 * signs[large]
    target[useful] = weight[useful] = signs[useful]
    weight[harmful] = 1.1 * signs[harmful]
    weight[tiny] = 0.01 * signs[tiny]
    initial = top_entries(weight.abs().reshape(1, -1), 8, torch.zeros(1, 16, dtype=torch.bool)).reshape(2, 8)
    best = torch.zeros(16, dtype=torch.bool)
    best[large], best[useful] = True, True
    return weight.view(2, 8), target.view(2, 8), initial, best.view(2, 8), large.tolist() + tiny.tolist()


@pytest.mark.parametrize("seed", [0, 1])
def test_magnitude_init_finds_the_better_mask_and_leaves_clear_weights_alone(seed):
    weight, target, initial, best, clear = near_threshold_toy(seed)
    assert not torch.equal(initial, best)
    logits = magnitude_logits({"0": weight}, {"0": initial}, ["0"], "unstructured", temperature=0.1)
    config = TrainConfig(lr=0.05, epoch=0, max_step=600, accumulation=1, seed=seed)
    trainer = linear_toy(weight, target, initial, "unstructured", config, logits=logits)
    assert torch.equal(trainer.final_masks()["0"], initial), "the magnitude logits start at the pruning mask"
    flat_clear = torch.zeros(16, dtype=torch.bool)
    flat_clear[clear] = True
    flips = torch.zeros(16, dtype=torch.bool)
    for t in range(config.max_step):
        sampled = trainer.policy.sample_flat(mask_generator(seed, t))
        flips |= sampled != trainer.policy.flat_initial
        trainer.update()
    assert torch.equal(trainer.final_masks()["0"], best)
    assert not (flips & flat_clear).any(), "weights far from the threshold never flip"


@pytest.mark.parametrize("seed", [0, 1])
def test_normalize_learns_when_rewards_are_tiny(seed):
    # Rewards 1e-6 times the toy's: without normalisation lr would need to be 1e6 times larger.
    weight, target, initial, best, _ = near_threshold_toy(seed)
    config = TrainConfig(lr=0.1, epoch=0, max_step=800, accumulation=1, seed=seed, normalize=True)
    trainer = linear_toy(weight, target, initial, "unstructured", config, magnitude=0.5, scale=1e-6)
    trainer.run(progress=False)
    assert torch.equal(trainer.final_masks()["0"], best)
    plain = linear_toy(weight, target, initial, "unstructured", TrainConfig(**{**config.__dict__, "normalize": False}), scale=1e-6)
    plain.run(progress=False)
    assert torch.equal(plain.final_masks()["0"], initial), "without normalize the same lr moves nothing"


@pytest.mark.parametrize("seed", [0, 1])
def test_leave_one_out_samples_find_the_better_nm_mask(seed):
    weight, target, best, initial = harmful_nm_toy(seed)
    assert not torch.equal(initial, best)
    config = TrainConfig(lr=0.05, epoch=0, max_step=250, accumulation=1, seed=seed, samples=4, reward_baseline="loo")
    trainer = linear_toy(weight, target, initial, "2:4", config)
    history = trainer.run(progress=False)
    assert torch.equal(trainer.final_masks()["0"], best)
    assert np.mean([h.improvement for h in history[-50:]]) > 0


# --- magnitude logits ------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_magnitude_logits_start_at_the_pruning_mask_and_order_by_magnitude(pattern):
    ddpm, masks, _, _ = diffusion_setup(pattern)
    names = select_targets(masks, "all")
    modules = dict(ddpm.unet.named_modules())
    weights = {n: modules[n].weight for n in names}
    logits = magnitude_logits(weights, masks, names, pattern, temperature=0.05)
    policy = make_policy(pattern, masks, names, 5.0, logits=logits)
    final = policy.final_masks()
    assert final and all(torch.equal(final[k], masks[k]) for k in final)
    name = next(iter(logits))
    flat_w, flat_l = weights[name].detach().abs().reshape(-1), logits[name].reshape(-1)
    if pattern == "unstructured":
        kept = masks[name].reshape(-1)
        assert (flat_l[kept] >= 0).all() and (flat_l[~kept] <= 0).all()
        order = torch.argsort(flat_w)
        assert (flat_l[order].diff() >= 0).all(), "larger weights get larger logits"
        # A lower temperature makes every logit larger in size.
        colder = magnitude_logits(weights, masks, names, pattern, temperature=0.01)[name].reshape(-1)
        assert (colder.abs() >= flat_l.abs()).all() and (colder.abs() > flat_l.abs()).any()


def test_magnitude_logits_refuse_a_mask_that_is_not_the_magnitude_one():
    ddpm, masks, _, _ = diffusion_setup("unstructured")
    name = next(iter(masks))
    swapped = dict(masks)
    flat = masks[name].reshape(-1).clone()
    kept, pruned = flat.nonzero()[0, 0], (~flat).nonzero()[0, 0]
    flat[kept], flat[pruned] = False, True
    swapped[name] = flat.view(masks[name].shape)
    weights = {n: m.weight for n, m in ddpm.unet.named_modules() if n in masks}
    with pytest.raises(MaskDMError, match="not a magnitude mask.*init=constant"):
        magnitude_logits(weights, swapped, list(masks), "unstructured", 0.05)
    with pytest.raises(MaskDMError, match="temperature must be a positive number"):
        magnitude_logits(weights, masks, list(masks), "unstructured", 0.0)


# --- the held-out set -------------------------------------------------------------------------------


def test_heldout_images_are_disjoint_from_the_subset_and_drawn_on_their_own_stream():
    dataset = image_dataset(64)
    spec = ReplaySpec(24, 4, 0, seed=3)
    train = ReplayBatches(dataset, spec)
    held = heldout_batches(dataset, spec, 16)
    assert len(held) == 4 and len(held.indices) == 16
    assert np.intersect1d(held.indices, train.indices).size == 0
    assert held.stream != train.stream
    # The same images on the two streams get different draws, so different losses.
    ddpm, masks, _, _ = diffusion_setup("unstructured")
    ensure_masks(ddpm.unet, masks)
    ddpm.unet.eval()
    same_images = ReplayBatches(dataset, spec, indices=held.indices)
    assert replayed_loss(ddpm.unet, ddpm.scheduler, held, 0) != replayed_loss(ddpm.unet, ddpm.scheduler, same_images, 0)
    assert replayed_loss(ddpm.unet, ddpm.scheduler, held, 1) == replayed_loss(ddpm.unet, ddpm.scheduler, held, 1)
    with pytest.raises(MaskDMError, match="heldout_size=16: only 8 images"):
        heldout_batches(image_dataset(32), ReplaySpec(24, 16, 0, seed=3), 16)


def test_trainer_scores_the_final_mask_on_the_heldout_set_every_n_updates():
    ddpm, masks, batches, baseline = diffusion_setup("unstructured", dataset_size=24)
    dataset = image_dataset(64)
    batches = ReplayBatches(dataset, ReplaySpec(24, 4, 0, seed=3))
    baseline = compute_baseline_losses(copy.deepcopy(ddpm.unet), ddpm.scheduler, masks, batches, progress=False)
    held = heldout_batches(dataset, batches.spec, 16)
    config = TrainConfig(lr=300.0, epoch=0, max_step=5, accumulation=2, seed=0)
    policy = make_policy("unstructured", masks, select_targets(masks, "all"), 0.01)
    trainer = MaskTrainer(
        ddpm.unet, masks, policy, lambda b: replayed_loss(ddpm.unet, ddpm.scheduler, batches, b), baseline, config,
        heldout_loss=lambda b: replayed_loss(ddpm.unet, ddpm.scheduler, held, b), heldout_batches=len(held), eval_every=2,
    )
    seen = []
    trainer.run(progress=False, on_heldout=seen.append)
    assert [p.step for p in seen] == [0, 2, 4, 5]
    assert len(seen) == heldout_scores(2, 5)
    result = trainer.heldout_result()
    final = trainer.final_masks()
    assert any(not torch.equal(final[k], masks[k]) for k in masks), "lr 300 at logits 0.01 must move the final mask"
    # Both sides scored independently on a fresh copy give the same numbers.
    probe = copy.deepcopy(ddpm.unet)
    set_masks(probe, masks)
    initial = [replayed_loss(probe, ddpm.scheduler, held, b) for b in range(len(held))]
    set_masks(probe, final)
    learned = [replayed_loss(probe, ddpm.scheduler, held, b) for b in range(len(held))]
    assert result.initial.tolist() == initial and result.final.tolist() == learned
    assert seen[0].loss == pytest.approx(np.mean(initial)) and seen[-1].loss == pytest.approx(np.mean(learned))
    diff = np.array(initial) - np.array(learned)
    assert result.improvement == pytest.approx(diff.mean())
    assert result.improvement_se == pytest.approx(diff.std(ddof=1) / math.sqrt(len(diff)))


def test_auto_eval_interval_keeps_heldout_scoring_within_its_share():
    def share(every, held, update, total):
        cost = heldout_scores(every, total) * held
        return cost / (cost + total * update)

    for held, update, total in [(512, 128, 10_000), (512, 1024, 15_000), (2048, 64, 3000), (256, 64, 150)]:
        every = auto_eval_every(held, update, total)
        assert every > 0 and share(every, held, update, total) <= HELDOUT_SHARE + 1e-12
        if every > 1:
            assert share(every - 1, held, update, total) > HELDOUT_SHARE, "the smallest such interval"
    # The demo preset's numbers: 150 updates of 64 images, 256 held-out images.
    assert auto_eval_every(256, 64, 150) == 50 and heldout_scores(50, 150) == 4
    assert auto_eval_every(0, 128, 100) == 0
    assert auto_eval_every(512, 128, 5) == 0, "even the scores before and after cost more than the share"


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(samples=0), "samples must be at least 1"),
        (dict(reward_baseline="mean"), "reward_baseline must be one of delta, loo"),
        (dict(reward_baseline="loo", samples=1), "needs samples >= 2"),
        (dict(lr=float("nan")), "lr must be a finite number"),
    ],
)
def test_bad_options_are_refused(kwargs, fragment):
    with pytest.raises(MaskDMError, match=fragment):
        TrainConfig(**kwargs)
