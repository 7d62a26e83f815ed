"""The taylor pruner: |w * gradient| on replayed batches, its threshold, patterns/scopes, and the stage."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from conftest import REPO
from entrypoints.cli import cli
from maskdm.ddpm.data import shapes_dataset
from maskdm.ddpm.diffusion import draw_noise_and_timesteps
from maskdm.errors import MaskDMError
from maskdm.masks import MASKS_FILE, load_masks, prunable_modules
from maskdm.ddpm.models import default_scheduler
from maskdm.method.pruning import PruneConfig, compute_masks, prune_count
from maskdm.method.taylor import TaylorConfig, replayed_samples, taylor_batches, taylor_scores
from test_foundation_stages import assert_user_error, download, only_run


class PixelLinear(nn.Module):
    """``pred = conv(x)`` with a 1x1 convolution, optionally only for timesteps below ``cutoff``
    (0 elsewhere): a model whose loss gradient can be written down by hand."""

    def __init__(self, channels: int = 3, cutoff: int | None = None):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(channels, channels, 1)
        self.cutoff = cutoff

    def forward(self, x, t):
        out = self.conv(x)
        if self.cutoff is not None:
            out = out * (t < self.cutoff).to(out.dtype)[:, None, None, None]
        return SimpleNamespace(sample=out)


class TensorImages(torch.utils.data.Dataset):
    def __init__(self, n: int, channels: int = 3, size: int = 4):
        self.images = torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], 0


def toy_batches(batches: int = 3, batch_size: int = 4, seed: int = 0, n: int = 40):
    return taylor_batches(TensorImages(n), TaylorConfig(batches=batches, batch_size=batch_size, seed=seed))


def test_score_is_abs_weight_times_the_gradient_worked_out_by_hand():
    model, scheduler, batches = PixelLinear(), default_scheduler(), toy_batches()
    result = taylor_scores(model, scheduler, {"conv": model.conv}, batches, progress=False)

    # The loss is the mean over the 12 samples of the per-image mean over pixels of (W x + b - n)^2,
    # so dL/dW[c, c'] = 2 / (N * C * H * W) * sum over samples and pixels of (pred - n)[c] * x[c'].
    # Batch by batch in replay order (the scorer works in timestep order): order does not matter.
    w, bias = model.conv.weight.detach().double()[:, :, 0, 0], model.conv.bias.detach().double()
    grad = torch.zeros_like(w)
    count = 0
    for b in range(len(batches)):
        images = batches.images(b)
        draw = draw_noise_and_timesteps(0, b, tuple(images.shape), 1000)
        x = scheduler.add_noise(images, draw.noise, draw.timesteps).double()
        residual = torch.einsum("oc,nchw->nohw", w, x) + bias[None, :, None, None] - draw.noise.double()
        grad += 2 * torch.einsum("nohw,nchw->oc", residual, x) / residual[0].numel()
        count += images.shape[0]
    expected = (w * grad / count).abs()
    assert result.scores["conv"].dtype == torch.float64
    torch.testing.assert_close(result.scores["conv"][:, :, 0, 0], expected, rtol=1e-5, atol=1e-9)
    assert (result.samples_used, result.samples_total, result.chunks_used) == (12, 12, 3)
    # Untouched: no .grad left behind, requires_grad and the training flag as they were.
    assert model.conv.weight.grad is None and model.conv.weight.requires_grad and model.training


def test_samples_are_counted_from_timestep_zero_upward():
    samples = replayed_samples(toy_batches(), 1000)
    t = samples.draw.timesteps
    assert torch.equal(t, torch.sort(t).values) and t[0] < t[-1]


def test_the_threshold_stops_once_the_gradient_stops_changing_and_zero_counts_every_sample():
    # Above the cutoff the model outputs 0 whatever its weights: those samples add no gradient, so
    # the accumulated gradient stops changing at the first chunk lying wholly above it.
    cutoff, batch_size = 500, 4
    model, scheduler, batches = PixelLinear(cutoff=cutoff), default_scheduler(), toy_batches(batches=8, batch_size=batch_size)
    t = replayed_samples(batches, 1000).draw.timesteps
    first_silent_chunk = next(k for k in range(len(t) // batch_size) if t[k * batch_size] >= cutoff)
    assert 1 <= first_silent_chunk < len(t) // batch_size - 1  # the case is what it claims to be

    early = taylor_scores(model, scheduler, {"conv": model.conv}, batches, threshold=1e-6, progress=False)
    full = taylor_scores(model, scheduler, {"conv": model.conv}, batches, threshold=0.0, progress=False)
    assert early.chunks_used == first_silent_chunk + 1 and early.samples_used == (first_silent_chunk + 1) * batch_size
    assert early.max_timestep_used >= cutoff > int(t[early.samples_used - batch_size - 1])
    assert early.relative_changes[-1] == 0.0 and all(c > 1e-6 for c in early.relative_changes[:-1])
    assert full.chunks_used == full.chunks_total == 8 and full.samples_used == 32 and full.relative_changes == []
    # The chunks left out add no gradient, but the mean is over fewer chunks: same ranking, scaled.
    torch.testing.assert_close(early.scores["conv"] * early.chunks_used / full.chunks_used, full.scores["conv"])
    # A threshold that real gradients cross stops early too, on a model without the cutoff.
    plain = PixelLinear()
    loose = taylor_scores(plain, scheduler, {"conv": plain.conv}, batches, threshold=0.5, progress=False)
    assert 2 <= loose.chunks_used < 8 and loose.relative_changes[-1] <= 0.5 < min(loose.relative_changes[:-1], default=1)


@pytest.mark.parametrize(
    "kwargs", [{"batches": 0}, {"batch_size": -1}, {"threshold": 1.0}, {"threshold": -0.1}, {"threshold": float("nan")}]
)
def test_bad_taylor_config_is_one_line(kwargs):
    with pytest.raises(MaskDMError, match="taylor_"):
        TaylorConfig(**kwargs)


def test_a_dataset_smaller_than_a_batch_is_one_line():
    with pytest.raises(MaskDMError, match="fewer than one taylor batch"):
        taylor_batches(TensorImages(3), TaylorConfig(batch_size=4))


@pytest.fixture(scope="module")
def shapes16():
    return shapes_dataset("train", resolution=16, size=64, augment=False)


def unet_scores(ddpm, dataset, seed=0, protect=None):
    config = TaylorConfig(batches=2, batch_size=8, seed=seed)
    modules = prunable_modules(ddpm.unet, protect) if protect is not None else prunable_modules(ddpm.unet)
    return taylor_scores(ddpm.unet, ddpm.scheduler, modules, taylor_batches(dataset, config), progress=False).scores


def test_same_seed_same_masks_and_another_seed_other_scores(tiny_ddpm, shapes16):
    config = PruneConfig(ratio=0.5, pruner="taylor")
    first = compute_masks(tiny_ddpm.unet, config, unet_scores(tiny_ddpm, shapes16)).masks
    again = compute_masks(tiny_ddpm.unet, config, unet_scores(tiny_ddpm, shapes16)).masks
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = unet_scores(tiny_ddpm, shapes16, seed=1)
    same = unet_scores(tiny_ddpm, shapes16)
    assert any(not torch.equal(other[k], same[k]) for k in same)
    # And it is not magnitude pruning under another name.
    magnitude = compute_masks(tiny_ddpm.unet, PruneConfig(ratio=0.5)).masks
    assert any(not torch.equal(first[k], magnitude[k]) for k in first)


def test_every_pattern_and_scope(tiny_ddpm, shapes16):
    scores = unet_scores(tiny_ddpm, shapes16)
    # layer: each layer loses exactly floor(ratio * n), its lowest-scored weights.
    layer = compute_masks(tiny_ddpm.unet, PruneConfig(ratio=0.3, pruner="taylor"), scores).masks
    for name, keep in layer.items():
        assert int((~keep).sum()) == prune_count(0.3, keep.numel())
        if (~keep).any():
            assert scores[name][~keep].max() <= scores[name][keep].min()
    # global: one ranking over every layer.
    glob = compute_masks(tiny_ddpm.unet, PruneConfig(ratio=0.3, pruner="taylor", scope="global"), scores).masks
    pruned = torch.cat([scores[k][~m] for k, m in glob.items()])
    kept = torch.cat([scores[k][m] for k, m in glob.items()])
    assert pruned.numel() == prune_count(0.3, pruned.numel() + kept.numel()) and pruned.max() <= kept.min()
    assert any(not torch.equal(glob[k], layer[k]) for k in layer)
    # 2:4: exactly 2 of every 4 consecutive weights of each row, the two highest-scored.
    nm = compute_masks(tiny_ddpm.unet, PruneConfig(ratio=0.5, pruner="taylor", pattern="2:4"), scores)
    assert nm.dense_layers == []
    for name, keep in nm.masks.items():
        groups, group_scores = keep.reshape(keep.shape[0], -1, 4), scores[name].reshape(keep.shape[0], -1, 4)
        assert (groups.sum(-1) == 2).all()
        kept_min = torch.where(groups, group_scores, torch.full_like(group_scores, float("inf"))).amin(-1)
        pruned_max = torch.where(groups, torch.full_like(group_scores, float("-inf")), group_scores).amax(-1)
        assert (pruned_max <= kept_min).all()
    # protect: protected layers get no score and no mask.
    protect = ("conv_in", "conv_out", "time_emb", "class_emb", "attentions")
    protected = compute_masks(tiny_ddpm.unet, PruneConfig(ratio=0.3, pruner="taylor", protect=protect), unet_scores(tiny_ddpm, shapes16, protect=protect))
    assert protected.masks and not any("attentions" in k for k in protected.masks)


def test_scores_must_fit_the_pruner_and_the_layers(tiny_ddpm, shapes16):
    with pytest.raises(MaskDMError, match="needs importance scores"):
        compute_masks(tiny_ddpm.unet, PruneConfig(ratio=0.3, pruner="taylor"))
    scores = unet_scores(tiny_ddpm, shapes16)
    with pytest.raises(MaskDMError, match="takes no importance scores"):
        compute_masks(tiny_ddpm.unet, PruneConfig(ratio=0.3), scores)
    with pytest.raises(MaskDMError, match="cover exactly"):
        compute_masks(tiny_ddpm.unet, PruneConfig(ratio=0.3, pruner="taylor"), dict(list(scores.items())[1:]))
    name = next(iter(scores))
    with pytest.raises(MaskDMError, match="not all finite"):
        compute_masks(tiny_ddpm.unet, PruneConfig(ratio=0.3, pruner="taylor"), {**scores, name: scores[name] * float("nan")})


# --- the stage ------------------------------------------------------------------------------------


def test_the_stage_prunes_by_taylor_and_logs_the_masks_and_params(tracking, tiny_model_dir, tiny_ddpm):
    args = ["--model", str(tiny_model_dir), "--dataset", "shapes", "--pruning_ratio", "0.5", "--pruner", "taylor",
            "--taylor_batches", "2", "--taylor_batch_size", "8", "--pattern", "2:4"]
    result = CliRunner().invoke(cli, ["prune", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = only_run("prune")
    params, metrics = run.data.params, run.data.metrics
    assert params["pruner"] == "taylor" and params["pattern"] == "2:4" and params["dataset"] == "shapes"
    assert (params["taylor_batches"], params["taylor_batch_size"], float(params["taylor_threshold"])) == ("2", "8", 0.0)
    assert metrics["taylor_samples_used"] == 16 and metrics["taylor_chunks_used"] == 2 and metrics["sparsity"] == 0.5
    # The recorded masks are the ones the library computes from the same replay (the dataset the
    # stage reads: shapes' training split, 16 px, unflipped).
    dataset = shapes_dataset("train", resolution=16, augment=False)
    config = TaylorConfig(batches=2, batch_size=8, seed=0)
    expected_scores = taylor_scores(
        tiny_ddpm.unet, tiny_ddpm.scheduler, prunable_modules(tiny_ddpm.unet), taylor_batches(dataset, config), progress=False
    ).scores
    expected = compute_masks(tiny_ddpm.unet, PruneConfig(ratio=0.5, pruner="taylor", pattern="2:4"), expected_scores).masks
    recorded = load_masks(download(run, MASKS_FILE))
    assert recorded.keys() == expected.keys() and all(torch.equal(recorded[k], expected[k]) for k in expected)


def test_taylor_with_no_dataset_is_one_line_and_a_failed_run(tracking, tiny_model_dir):
    # A local model folder has no lineage, so there is no dataset to fall back on but cifar10,
    # which taylor refuses to measure importance on for an unknown model.
    assert_user_error("prune", ["--model", str(tiny_model_dir), "--pruner", "taylor"], "no dataset is given")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--taylor_batches", "0"], "taylor_batches must be an integer >= 1"),
        (["--taylor_batch_size", "x"], "taylor_batch_size must be an integer >= 1"),
        (["--taylor_threshold", "1.5"], "taylor_threshold must be a number in [0, 1)"),
        (["--taylor_batch_size", "100000"], "fewer than one taylor batch"),
    ],
)
def test_bad_taylor_params_are_one_line_and_a_failed_run(tracking, tiny_model_dir, args, message):
    assert_user_error("prune", ["--model", str(tiny_model_dir), "--dataset", "shapes", "--pruner", "taylor", *args], message)


def test_mlproject_declares_the_taylor_params_and_passes_them_on():
    prune = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["prune"]
    from entrypoints.prune import command

    options = {p.name for p in command.params}
    for key in ("taylor_batches", "taylor_batch_size", "taylor_threshold"):
        assert key in prune["parameters"] and f"--{key} {{{key}}}" in prune["command"] and key in options
