"""DDIM sampling: the original timestep sequences, agreement with DDIMPipeline and with the
original generalized_steps, per-image reproducibility, image files, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMScheduler
from PIL import Image
from torch import nn

from maskdm.errors import MaskDMError
from maskdm.ddpm.sampling import (
    check_sampling_params,
    ddim_sample,
    ddim_schedule,
    ddim_timesteps,
    draw_per_image,
    image_generator,
    make_run,
    sample_images,
    sample_tensors,
    save_grid,
    save_pngs,
    shard_indices,
    to_uint8,
)

STEPS = 10


def run_for(ddpm, **options):
    options.setdefault("steps", STEPS)
    options.setdefault("seed", 7)
    options.setdefault("batch_size", 4)
    return make_run(ddpm.unet, ddpm.scheduler, **options)


# --------------------------------------------------------------------------------------------
# Timestep sequences


def original_ddim_sequence(num_timesteps: int, timesteps: int, skip_type: str) -> list:
    """The sequence ``Diffusion.sample_image`` builds in ermongroup/ddim's ``runners/diffusion.py``,
    statement for statement (``self.num_timesteps`` and ``self.args.timesteps`` as arguments)."""
    if skip_type == "uniform":
        skip = num_timesteps // timesteps
        seq = range(0, num_timesteps, skip)
    elif skip_type == "quad":
        seq = np.linspace(0, np.sqrt(num_timesteps * 0.8), timesteps) ** 2
        seq = [int(s) for s in list(seq)]
    else:
        raise NotImplementedError
    return list(seq)


# Every step count up to 1000 (and T itself), for the usual T and two others.
@pytest.mark.parametrize("T", [1000, 4000, 50])
@pytest.mark.parametrize("skip_type", ["uniform", "quad"])
def test_sequence_is_exactly_the_original_ddim_codes_for_every_step_count(T, skip_type):
    mismatches = {}
    for S in [*range(1, min(T, 1000) + 1), T]:
        ours, original = ddim_timesteps(T, S, skip_type), original_ddim_sequence(T, S, skip_type)
        if ours != original or not all(type(t) is int for t in ours):
            mismatches[S] = (ours, original)
    assert not mismatches, dict(list(mismatches.items())[:3])


def test_sequence_properties():
    T = 1000
    for S in (1, 2, 3, 7, 10, 100, 1000):
        quad = ddim_timesteps(T, S, "quad")
        assert len(quad) == S and quad == sorted(quad) and quad[0] == 0
        # The top is sqrt(0.8 T) squared, truncated: 0.8 T or, where the square rounds down, one less.
        assert S == 1 or 0.8 * T - 1 <= quad[-1] <= 0.8 * T
        uniform = ddim_timesteps(T, S, "uniform")
        # Every (T // S)-th step from 0 up to T (excluded): S of them, more where S does not divide T.
        assert uniform[0] == 0 and set(np.diff(uniform)) <= {T // S} and uniform[-1] < T <= uniform[-1] + T // S
        assert len(uniform) >= S and (T % S != 0 or len(uniform) == S)
    assert len(ddim_timesteps(T, 400, "uniform")) == T // (T // 400) > 400  # 1000 // 400 = 2: 500 steps


def test_exact_comparison_tells_apart_a_formula_that_rounds_differently():
    """Why the comparison above is exact: squaring ``top * k / (S - 1)`` instead of linspace's
    values truncates to a neighbouring integer at some step counts, which a +-1 tolerance passes."""

    def k_over_s_minus_1(T, S):
        top = math.sqrt(0.8 * T)
        return [int((top * k / (S - 1)) ** 2) if S > 1 else 0 for k in range(S)]

    differing = [S for S in range(1, 101) if k_over_s_minus_1(1000, S) != original_ddim_sequence(1000, S, "quad")]
    assert differing
    for S in differing:
        pairs = zip(k_over_s_minus_1(1000, S), original_ddim_sequence(1000, S, "quad"))
        assert max(abs(a - b) for a, b in pairs) == 1


def test_quad_is_denser_at_small_timesteps_than_uniform():
    quad = ddim_timesteps(1000, 20, "quad")
    uniform = ddim_timesteps(1000, 20, "uniform")
    assert sum(t < 200 for t in quad) > sum(t < 200 for t in uniform)


# --------------------------------------------------------------------------------------------
# Agreement with diffusers' DDIMPipeline (fp32, uniform)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_fp32_uniform_matches_diffusers_ddim_pipeline(tiny_ddpm, eta):
    # clip_sample=True as in google/ddpm-cifar10-32: without it an untrained UNet's x_0 runs to
    # +-100 and the pipeline's clamped output compares nothing (clip_sample=False is checked
    # against the original generalized_steps below).
    scheduler = tiny_ddpm.scheduler
    assert scheduler.config.clip_sample
    unet = tiny_ddpm.unet.eval()
    indices = [0, 1, 2, 3]
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    # One generator per image, the ones our sampler uses: the pipeline then draws the same initial
    # noise (and, with eta > 0, the same per-step noise) for each image.
    generators = [image_generator(7, i) for i in indices]
    theirs = pipe(batch_size=4, generator=generators, eta=eta, num_inference_steps=STEPS, output_type="pt").images

    run = make_run(unet, scheduler, steps=STEPS, eta=eta, seed=7, batch_size=4)
    assert run.schedule.timesteps == pipe.scheduler.timesteps.tolist()
    assert run.schedule.timesteps == ddim_timesteps(1000, STEPS, "uniform")[::-1]
    ours = sample_tensors(unet, run, indices)

    # The pipeline returns (x / 2 + 0.5).clamp(0, 1); compare in the [-1, 1] range.
    assert (ours.clamp(-1, 1) - (theirs * 2 - 1)).abs().max().item() < 1e-4
    # Not a comparison of saturated pixels only.
    assert (ours.abs() < 0.99).float().mean() > 0.5


# --------------------------------------------------------------------------------------------
# Agreement with the original generalized_steps (ermongroup/ddim), for both sequences


class ToyEps(nn.Module):
    """The ideal noise predictor for Gaussian data N(0, 0.25) plus a small nonlinearity: a smooth,
    timestep-dependent model under which the chain stays bounded and rounding is not amplified."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.alphas_cumprod = alphas_cumprod

    def forward(self, x, t, return_dict=False):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return ((1 - a).sqrt() * x / (0.25 * a + 1 - a) + 0.05 * torch.sin(3 * x),)


def original_generalized_steps(x, seq, model, betas, eta, generators):
    """Song et al.'s generalized_steps, rewritten from the paper's eq. 12 and the original loop."""

    def alpha(t):
        padded = torch.cat([torch.zeros(1), betas])
        return (1 - padded).cumprod(dim=0)[t + 1]

    seq_next = [-1] + list(seq[:-1])
    for i, j in zip(reversed(seq), reversed(seq_next)):
        at, at_next = alpha(i), alpha(j)
        et = model(x, torch.full((x.shape[0],), i))[0]
        x0_t = (x - et * (1 - at).sqrt()) / at.sqrt()
        c1 = eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
        c2 = ((1 - at_next) - c1**2).sqrt()
        x = at_next.sqrt() * x0_t + c1 * draw_per_image(generators, x.shape[1:]) + c2 * et
    return x


@pytest.mark.parametrize("skip_type", ["uniform", "quad"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_matches_original_generalized_steps(skip_type, eta):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    schedule = ddim_schedule(scheduler, 20, skip_type, eta, clip_sample=False)
    seq = ddim_timesteps(1000, 20, skip_type)

    ours_gens = [image_generator(3, i) for i in range(3)]
    x_T = draw_per_image(ours_gens, (3, 8, 8))
    model = ToyEps(scheduler.alphas_cumprod)
    ours = ddim_sample(model, x_T, schedule, lambda _: draw_per_image(ours_gens, (3, 8, 8)))

    ref_gens = [image_generator(3, i) for i in range(3)]
    ref_x = draw_per_image(ref_gens, (3, 8, 8))
    ref = original_generalized_steps(ref_x, seq, model, scheduler.betas, eta, ref_gens)
    assert (ours - ref).abs().max() < 1e-5
    assert 0.1 < ours.std() < 3


class Recorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.timesteps: list[int] = []
        self.autocast: list[bool] = []

    def forward(self, x, t, return_dict=False):
        self.timesteps.append(int(t[0]))
        self.autocast.append(torch.is_autocast_enabled(x.device.type))
        return self.inner(x, t)


def test_quad_skip_type_is_used_by_the_sampler():
    model = Recorder(ToyEps(DDPMScheduler().alphas_cumprod))
    schedule = ddim_schedule(DDPMScheduler(), 15, "quad")
    ddim_sample(model, torch.zeros(2, 3, 4, 4), schedule)
    assert model.timesteps == ddim_timesteps(1000, 15, "quad")[::-1]
    assert model.timesteps != ddim_timesteps(1000, 15, "uniform")[::-1]


def test_quad_sampling_differs_from_uniform(tiny_ddpm):
    quad = sample_tensors(tiny_ddpm.unet, run_for(tiny_ddpm, skip_type="quad"), [0, 1])
    uniform = sample_tensors(tiny_ddpm.unet, run_for(tiny_ddpm), [0, 1])
    assert torch.isfinite(quad).all()
    assert (quad - uniform).abs().max() > 0.05


def test_bf16_runs_the_unet_under_autocast_only():
    model = Recorder(ToyEps(DDPMScheduler().alphas_cumprod))
    schedule = ddim_schedule(DDPMScheduler(), 5, "uniform")
    out = ddim_sample(model, torch.zeros(2, 3, 4, 4), schedule, autocast_dtype=torch.bfloat16)
    assert model.autocast == [True] * 5
    assert out.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Per-image reproducibility


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_image_i_is_the_same_whatever_batch_size_or_process_split(tiny_ddpm, eta):
    indices = list(range(7))
    reference = sample_tensors(tiny_ddpm.unet, run_for(tiny_ddpm, eta=eta, batch_size=7), indices)
    for batch_size in (1, 3):
        other = sample_tensors(tiny_ddpm.unet, run_for(tiny_ddpm, eta=eta, batch_size=batch_size), indices)
        # Batched convolutions round differently per batch size; an untrained UNet amplifies that.
        assert (other - reference).abs().max() < 1e-3, batch_size
    shards = [shard_indices(7, rank, 2) for rank in range(2)]
    split = torch.cat([sample_tensors(tiny_ddpm.unet, run_for(tiny_ddpm, eta=eta, batch_size=3), s) for s in shards])
    assert (split - reference).abs().max() < 1e-3
    assert np.abs(to_uint8(split).astype(int) - to_uint8(reference).astype(int)).max() <= 1
    # ... and the images are not all alike, nor independent of the seed.
    assert (reference[0] - reference[1]).abs().max() > 0.1
    reseeded = sample_tensors(tiny_ddpm.unet, run_for(tiny_ddpm, eta=eta, seed=8, batch_size=7), [0])
    assert (reseeded[0] - reference[0]).abs().max() > 0.1


def test_images_come_back_in_the_order_of_indices(tiny_ddpm):
    forward = sample_tensors(tiny_ddpm.unet, run_for(tiny_ddpm, batch_size=2), [4, 5, 6])
    backward = sample_tensors(tiny_ddpm.unet, run_for(tiny_ddpm, batch_size=2), [6, 5, 4])
    assert (forward.flip(0) - backward).abs().max() < 1e-3


def test_sample_images_is_uint8_nhwc(tiny_ddpm):
    images = sample_images(tiny_ddpm.unet, tiny_ddpm.scheduler, range(3), steps=3, seed=1, batch_size=2)
    assert images.dtype == np.uint8 and images.shape == (3, 16, 16, 3)
    floats = sample_tensors(tiny_ddpm.unet, run_for(tiny_ddpm, steps=3, seed=1, batch_size=3), range(3))
    assert np.abs(images.astype(int) - to_uint8(floats).astype(int)).max() <= 1
    assert images.std() > 5


@pytest.mark.parametrize("total,processes", [(7, 2), (10, 3), (2, 4), (50000, 8)])
def test_shards_are_contiguous_balanced_and_cover_everything(total, processes):
    shards = [shard_indices(total, rank, processes) for rank in range(processes)]
    assert [i for s in shards for i in s] == list(range(total))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


# --------------------------------------------------------------------------------------------
# Image files


def test_to_uint8_maps_minus_one_to_one_onto_0_255():
    images = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    out = to_uint8(images)
    assert out.shape == (2, 1, 5, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_save_grid_and_pngs(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 6, 5, 3), dtype=np.uint8)
    grid = np.asarray(Image.open(save_grid(images, tmp_path / "grid.png", nrow=4, min_size=0)))
    # 4 columns x 3 rows of 5x6 tiles with 2-pixel padding.
    assert grid.shape == (3 * 8 + 2, 4 * 7 + 2, 3)
    assert (grid[2:8, 2:7] == images[0]).all()
    assert (grid[10:16, 2 + 7 : 7 + 7] == images[5]).all()

    # Enlarged to at least 64 px per image by an integer factor (13: 5 px -> 65), each pixel a block.
    big = np.asarray(Image.open(save_grid(images, tmp_path / "big.png", nrow=4)))
    assert big.shape == (3 * (78 + 2) + 2, 4 * (65 + 2) + 2, 3)
    assert (big[2:80, 2:67] == images[0].repeat(13, axis=0).repeat(13, axis=1)).all()
    assert (big[2 + 80 : 80 + 80, 2 + 67 : 67 + 67] == images[5].repeat(13, axis=0).repeat(13, axis=1)).all()

    folder = save_pngs(images[:3], tmp_path / "pngs", indices=[10, 11, 12])
    assert sorted(p.name for p in folder.iterdir()) == ["000010.png", "000011.png", "000012.png"]
    assert (np.asarray(Image.open(folder / "000011.png")) == images[1]).all()


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "steps,skip_type,match",
    [(1001, "uniform", "ddim_steps"), (0, "uniform", "ddim_steps"), (10, "linear", "skip_type")],
)
def test_bad_steps_or_skip_type(steps, skip_type, match):
    with pytest.raises(MaskDMError, match=match) as err:
        ddim_timesteps(1000, steps, skip_type)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(total_samples=1), "total_samples"),
        (dict(steps=2000), "ddim_steps"),
        (dict(skip_type="cubic"), "skip_type"),
        (dict(eta=-0.1), "eta"),
        (dict(eta=1.5), "eta"),
        (dict(batch_size=0), "batch_size"),
        (dict(mixed_precision="fp8"), "mixed_precision"),
    ],
)
def test_bad_sampling_params(options, match):
    params = dict(num_train_timesteps=1000, steps=100, skip_type="uniform", eta=0.0, batch_size=8, total_samples=10)
    params.update(options)
    with pytest.raises(MaskDMError, match=match):
        check_sampling_params(**params)


def test_make_run_checks_against_the_models_own_timesteps(tiny_ddpm):
    scheduler = DDPMScheduler(num_train_timesteps=50)
    with pytest.raises(MaskDMError, match="50 training timesteps"):
        make_run(tiny_ddpm.unet, scheduler, steps=51)
    assert len(make_run(tiny_ddpm.unet, scheduler, steps=50).schedule.steps) == 50


# --------------------------------------------------------------------------------------------
# x0 clipping (clip_sample): each setting against a hand-written reference loop


def reference_ddim(unet, x, alphas_cumprod, seq, clip, eta=0.0, generators=None):
    """The original generalized_steps loop, written out again, with an optional clamp of x0 to [-1, 1]
    (the one line diffusers' DDIMScheduler adds when its config says clip_sample)."""
    seq_next = [-1] + list(seq[:-1])
    for i, j in zip(reversed(seq), reversed(seq_next)):
        at = alphas_cumprod[i]
        at_next = alphas_cumprod[j] if j >= 0 else torch.tensor(1.0)
        et = unet(x, torch.full((x.shape[0],), i), return_dict=False)[0]
        x0_t = (x - et * (1 - at).sqrt()) / at.sqrt()
        if clip:
            x0_t = x0_t.clamp(-1, 1)
        c1 = eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
        c2 = ((1 - at_next) - c1**2).sqrt()
        x = at_next.sqrt() * x0_t + c2 * et
        if eta > 0:
            x = x + c1 * draw_per_image(generators, x.shape[1:])
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_clip_sample_each_setting_matches_its_reference_and_clipping_changes_the_output(tiny_ddpm, eta):
    unet = tiny_ddpm.unet.eval()
    indices, seed, steps = [0, 1, 2], 5, 6
    seq = ddim_timesteps(1000, steps, "uniform")
    acp = tiny_ddpm.scheduler.alphas_cumprod.float()
    ours, refs = {}, {}
    for clip in (False, True):
        run = make_run(unet, tiny_ddpm.scheduler, steps=steps, eta=eta, seed=seed, batch_size=3, clip_sample=clip)
        assert run.schedule.clip_sample_range == (1.0 if clip else None)
        ours[clip] = sample_tensors(unet, run, indices)
        generators = [image_generator(seed, i) for i in indices]
        with torch.no_grad():
            x_T = draw_per_image(generators, (3, 16, 16))
            refs[clip] = reference_ddim(unet, x_T, acp, seq, clip, eta, generators)
    # An untrained UNet's unclipped x0 runs to +-100 at t=999 (sqrt(a) = 0.006 there): compare
    # relative to the output's own scale.
    for clip in (False, True):
        scale = 1 + refs[clip].abs().max()
        assert (ours[clip] - refs[clip]).abs().max() < 1e-5 * scale, clip
    # Clipping changes the output, so each comparison above could fail with the other setting.
    assert refs[False].abs().max() > 2  # unclipped: far outside the data range
    assert refs[True].abs().max() < 1.5
    assert (ours[True] - refs[False]).abs().max() > 0.5
    assert (ours[False] - refs[True]).abs().max() > 0.5


def test_clip_sample_true_and_false_override_the_config_and_none_follows_it():
    clipping = DDPMScheduler(clip_sample=True, clip_sample_range=2.0)
    plain = DDPMScheduler(clip_sample=False)
    assert ddim_schedule(clipping, 5).clip_sample_range == 2.0  # None: the config, range included
    assert ddim_schedule(plain, 5).clip_sample_range is None
    for scheduler in (clipping, plain):
        assert ddim_schedule(scheduler, 5, clip_sample=True).clip_sample_range == 1.0  # the data range
        assert ddim_schedule(scheduler, 5, clip_sample=False).clip_sample_range is None


def test_clip_sample_reaches_uint8_images(tiny_ddpm):
    options = dict(steps=4, seed=2, batch_size=3)
    clipped = sample_images(tiny_ddpm.unet, tiny_ddpm.scheduler, range(3), clip_sample=True, **options)
    plain = sample_images(tiny_ddpm.unet, tiny_ddpm.scheduler, range(3), clip_sample=False, **options)
    assert np.abs(clipped.astype(int) - plain.astype(int)).max() > 10
