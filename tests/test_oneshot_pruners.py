"""wanda and sparsegpt: calibration inputs, masks against brute-force references, SparseGPT's
reconstruction, counts and patterns, the stage, its errors, and train_masks init=pruner."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from types import SimpleNamespace

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from torch import nn

from conftest import REPO
from entrypoints.cli import cli
from maskdm.errors import MaskDMError
from maskdm.method.mask_policy import magnitude_logits, score_logits
from maskdm.masks import MASKS_FILE, load_masks, maskable_modules, prunable_modules
from maskdm.ddpm.models import default_scheduler, load_ddpm
from maskdm.method.oneshot import (
    CalibConfig,
    calibration_batches,
    calibration_samples,
    input_columns,
    sparsegpt_layer,
    sparsegpt_prune,
    timestep_weights,
    wanda_scores,
)
from maskdm.method.pruning import SCORES_FILE, PruneConfig, compute_masks, load_scores, prune_count
from maskdm.tracking import MODEL_URI_TAG
from test_foundation_stages import assert_user_error, download, only_run
from test_taylor import TensorImages


class ConvThenLinear(nn.Module):
    """``pred = linear(conv(x))``, the linear acting on channels: one layer of each kind, small enough to brute-force."""

    def __init__(self, channels: int = 3, hidden: int = 4):
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(channels, hidden, 3, stride=1, padding=1)
        self.linear = nn.Linear(hidden, channels)

    def forward(self, x, t):
        h = self.conv(x)
        return SimpleNamespace(sample=self.linear(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def toy_samples(samples: int = 6, timesteps: int = 1, weighting: str = "uniform"):
    config = CalibConfig(samples=samples, timesteps=timesteps, weighting=weighting, batch_size=4)
    scheduler = default_scheduler()
    return scheduler, calibration_samples(calibration_batches(TensorImages(20), config), 1000, config)


def layer_inputs(model: ConvThenLinear, scheduler, samples):
    """Each layer's input, computed directly (no hooks)."""
    noisy = scheduler.add_noise(samples.images, samples.draw.noise, samples.draw.timesteps)
    with torch.no_grad():
        return noisy, model.conv(noisy).permute(0, 2, 3, 1)


def brute_conv_sq_norms(x: torch.Tensor, conv: nn.Conv2d, weights: torch.Tensor) -> torch.Tensor:
    """sum over samples and output positions of w_s * (the input pixel weight (c, i, j) multiplies)^2, loop by loop."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    n, c, h, w = x.shape
    out_h, out_w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    norms = torch.zeros(c, kh, kw, dtype=torch.float64)
    for s in range(n):
        for ci in range(c):
            for i in range(kh):
                for j in range(kw):
                    for p in range(out_h):
                        for q in range(out_w):
                            y, z = p * sh - ph + i, q * sw - pw + j
                            if 0 <= y < h and 0 <= z < w:
                                norms[ci, i, j] += float(weights[s]) * float(x[s, ci, y, z]) ** 2
    return norms.flatten()


def brute_row_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per row: the k_r lowest scores pruned, ties lower index first, k_r the cumulative-floor share."""
    rows = scores.flatten(1)
    r_count, length = rows.shape
    exact = Fraction(str(ratio))
    keep = torch.ones_like(rows, dtype=torch.bool)
    for r in range(r_count):
        k = math.floor(exact * (r + 1) * length) - math.floor(exact * r * length)
        order = sorted(range(length), key=lambda j: (float(rows[r, j]), j))
        keep[r, order[:k]] = False
    return keep.reshape(scores.shape)


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_wanda_masks_equal_a_brute_force_reference_on_a_linear_and_a_conv(ratio):
    model = ConvThenLinear()
    scheduler, samples = toy_samples()
    modules = {"conv": model.conv, "linear": model.linear}
    scores = wanda_scores(model, scheduler, modules, samples, batch_size=4, progress=False)  # 6 samples: chunks of 4 and 2
    x, hidden = layer_inputs(model, scheduler, samples)
    conv_norms = brute_conv_sq_norms(x, model.conv, samples.weights).sqrt()
    linear_norms = hidden.reshape(-1, hidden.shape[-1]).to(torch.float64).square().sum(0).sqrt()
    expected = {
        "conv": model.conv.weight.detach().to(torch.float64).flatten(1).abs() * conv_norms,
        "linear": model.linear.weight.detach().to(torch.float64).abs() * linear_norms,
    }
    for name in modules:
        assert torch.allclose(scores[name].flatten(1), expected[name], rtol=1e-5, atol=1e-7), name
    masks = compute_masks(model, PruneConfig(ratio=ratio, pruner="wanda", protect=""), scores).masks
    for name in modules:
        assert torch.equal(masks[name], brute_row_mask(expected[name].reshape(scores[name].shape), ratio)), name
        assert int((~masks[name]).sum()) == prune_count(ratio, masks[name].numel())


def test_wanda_ties_break_by_position_within_the_row():
    model = ConvThenLinear()
    with torch.no_grad():
        model.linear.weight.fill_(0.5)
    scheduler, samples = toy_samples()
    scores = wanda_scores(model, scheduler, {"linear": model.linear}, samples, progress=False)
    scores["linear"][:] = 1.0  # every score equal
    masks = compute_masks(model, PruneConfig(ratio=0.5, pruner="wanda", protect="conv"), scores).masks
    # 3 rows of 4: 6 pruned, 2 per row, the first two of each.
    assert masks["linear"].tolist() == [[False, False, True, True]] * 3


def test_calibration_timesteps_and_weighting():
    _, one = toy_samples(samples=4)
    _, three = toy_samples(samples=4, timesteps=3)
    assert three.images.shape[0] == 12 and torch.equal(three.images[:4], one.images) and torch.equal(three.images[4:8], one.images)
    # The first draw is the replay's own; the others are new timesteps for the same images.
    assert torch.equal(three.draw.timesteps[:4], one.draw.timesteps) and not torch.equal(three.draw.timesteps[4:8], one.draw.timesteps)
    weights = timestep_weights(torch.tensor([0, 10, 500, 999]), 1000, "logdecrease")
    assert weights.mean().item() == pytest.approx(1.0) and bool((weights[1:] > weights[:-1]).all())
    assert torch.equal(one.weights, torch.ones(4, dtype=torch.float64))


def correlated_layer(rows=6, cols=16, n=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen, dtype=torch.float64)
    X = mix @ torch.randn(cols, n, generator=gen, dtype=torch.float64)
    W = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return W, X


def error(W, V, X) -> float:
    return float(torch.linalg.norm(W @ X - V @ X))


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_magnitude_at_the_same_sparsity(pattern):
    W, X = correlated_layer()
    layer = sparsegpt_layer(W, X @ X.T, 0.5, pattern, blocksize=8)
    magnitude = compute_masks(
        _linear(W), PruneConfig(ratio=0.5, pattern="unstructured" if pattern is None else "2:4", protect="")
    ).masks["weight_holder"]
    assert int((~layer.mask).sum()) == int((~magnitude).sum()) == 48
    assert bool((layer.weight[~layer.mask] == 0).all())
    # The kept weights changed, and the output on the calibration inputs is closer to the dense one.
    assert not torch.equal(layer.weight[layer.mask], W[layer.mask])
    assert error(W, layer.weight, X) < 0.9 * error(W, W * magnitude, X)
    assert error(W, layer.weight, X) < error(W, W * layer.mask, X)


def _linear(W: torch.Tensor) -> nn.Module:
    holder = nn.Module()
    holder.weight_holder = nn.Linear(W.shape[1], W.shape[0], bias=False).to(torch.float64)
    with torch.no_grad():
        holder.weight_holder.weight.copy_(W)
    return holder


def test_with_its_mask_fixed_sparsegpt_gives_the_least_squares_weights():
    # SparseGPT freezes each column once the sweep passes it, so its weights are the exact
    # least-squares fit on the kept columns when each row's pruned columns come before its kept
    # ones; for any other mask the later kept columns compensate alone (checked below as a bound).
    W, X = correlated_layer()
    mask = torch.ones_like(W, dtype=torch.bool)
    for r in range(W.shape[0]):
        mask[r, : 4 + r] = False
    for blocksize in (16, 32, 5):
        layer = sparsegpt_layer(W, X @ X.T, 0.5, blocksize=blocksize, damp=1e-12, mask=mask)
        assert torch.equal(layer.mask, mask)
        for r in range(W.shape[0]):
            kept = mask[r]
            lstsq = torch.linalg.lstsq(X[kept].T, (W[r] @ X)[:, None]).solution[:, 0]
            assert torch.allclose(layer.weight[r, kept], lstsq, atol=1e-8), (blocksize, r)
    # Any fixed mask: never better than least squares, better than zeroing alone.
    scattered = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    layer = sparsegpt_layer(W, X @ X.T, 0.5, blocksize=16, damp=1e-12, mask=scattered)
    best = torch.zeros_like(W)
    for r in range(W.shape[0]):
        best[r, scattered[r]] = torch.linalg.lstsq(X[scattered[r]].T, (W[r] @ X)[:, None]).solution[:, 0]
    assert error(W, best, X) - 1e-9 <= error(W, layer.weight, X) < error(W, W * scattered, X)


def test_sparsegpt_counts_patterns_scores_and_dead_inputs():
    W, X = correlated_layer(rows=5, cols=24)
    X[7] = 0.0  # an input that is always 0
    H = X @ X.T
    layer = sparsegpt_layer(W, H, 0.3, blocksize=8)
    assert int((~layer.mask).sum()) == prune_count(0.3, W.numel()) and layer.dead_inputs == 1
    assert bool(torch.isfinite(layer.weight).all()) and not bool(layer.mask[:, 7].any())  # dead inputs score 0: pruned first
    # Unstructured: within each row and block, no pruned weight scored above a kept one.
    for lo in range(0, 24, 8):
        s, k = layer.scores[:, lo : lo + 8], layer.mask[:, lo : lo + 8]
        assert bool((s.masked_fill(k, -1).amax(1) <= s.masked_fill(~k, math.inf).amin(1)).all())
    nm = sparsegpt_layer(W, H, 0.5, (2, 4), blocksize=8)
    groups, scores = nm.mask.reshape(5, -1, 4), nm.scores.reshape(5, -1, 4)
    assert bool((groups.sum(-1) == 2).all())
    assert bool((scores.masked_fill(groups, -1).amax(-1) <= scores.masked_fill(~groups, math.inf).amin(-1)).all())
    with pytest.raises(MaskDMError, match="not a multiple of M=4"):
        sparsegpt_layer(W, H, 0.5, (2, 4), blocksize=6)


def test_sparsegpt_prunes_a_model_in_place_and_lowers_the_layers_output_error():
    model = ConvThenLinear()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    scheduler, samples = toy_samples(samples=8)
    config = PruneConfig(ratio=0.5, pruner="sparsegpt", protect="")
    modules = {"conv": model.conv, "linear": model.linear}
    # A budget below one Hessian: one layer per pass, same result.
    done = sparsegpt_prune(model, scheduler, modules, samples, config, CalibConfig(samples=8, blocksize=16), progress=False, budget=1)
    assert done.passes == 2
    # Statistics come from the dense model in every pass: one pass for both layers gives the same result.
    together = ConvThenLinear()
    one_pass = sparsegpt_prune(together, scheduler, {"conv": together.conv, "linear": together.linear}, samples, config,
                               CalibConfig(samples=8, blocksize=16), progress=False)
    assert one_pass.passes == 1
    assert all(torch.allclose(together.state_dict()[k], model.state_dict()[k], atol=1e-6) for k in dense)
    assert all(torch.equal(one_pass.result.masks[k], done.result.masks[k]) for k in modules)
    x, _ = layer_inputs(model, scheduler, samples)
    cols = input_columns(model.conv, x).transpose(0, 1).reshape(27, -1).to(torch.float64)
    W = dense["conv.weight"].flatten(1).to(torch.float64)
    mask = done.result.masks["conv"].flatten(1)
    pruned = model.conv.weight.detach().flatten(1).to(torch.float64)
    assert bool((pruned[~mask] == 0).all()) and int((~mask).sum()) == prune_count(0.5, mask.numel())
    assert error(W, pruned, cols) < error(W, W * mask, cols)
    # Global scope has no meaning for sparsegpt.
    with pytest.raises(MaskDMError, match="use scope=layer"):
        PruneConfig(ratio=0.5, pruner="sparsegpt", scope="global")


def test_wanda_on_a_unet_nm_global_and_protect(tiny_ddpm):
    unet, scheduler = tiny_ddpm.unet, tiny_ddpm.scheduler
    config = CalibConfig(samples=4)
    samples = calibration_samples(calibration_batches(TensorImages(8, size=16), config), 1000, config)
    protect = ("conv_in", "conv_out", "time_emb", "class_emb", "attentions")
    scores = wanda_scores(unet, scheduler, prunable_modules(unet, protect), samples, progress=False)
    assert not any("attentions" in k for k in scores)
    # 2:4: exactly 2 of every 4 consecutive inputs of each row, the two highest-scored.
    nm = compute_masks(unet, PruneConfig(ratio=0.5, pruner="wanda", pattern="2:4", protect=protect), scores)
    for name, keep in nm.masks.items():
        groups, s = keep.reshape(keep.shape[0], -1, 4), scores[name].reshape(keep.shape[0], -1, 4)
        assert bool((groups.sum(-1) == 2).all())
        assert bool((s.masked_fill(groups, -1).amax(-1) <= s.masked_fill(~groups, math.inf).amin(-1)).all())
    # layer: every row loses its share, the layer exactly floor(ratio * n).
    layer = compute_masks(unet, PruneConfig(ratio=0.3, pruner="wanda", protect=protect), scores).masks
    for name, keep in layer.items():
        assert int((~keep).sum()) == prune_count(0.3, keep.numel())
        per_row = (~keep).flatten(1).sum(1)
        assert int(per_row.max() - per_row.min()) <= 1
    # global: the scores pooled over all layers, one ranking; layers end up with other sparsities.
    glob = compute_masks(unet, PruneConfig(ratio=0.3, pruner="wanda", scope="global", protect=protect), scores).masks
    pruned = torch.cat([scores[k][~m] for k, m in glob.items()])
    kept = torch.cat([scores[k][m] for k, m in glob.items()])
    assert pruned.numel() == prune_count(0.3, pruned.numel() + kept.numel()) and pruned.max() <= kept.min()
    assert len({round(float((~m).float().mean()), 3) for m in glob.values()}) > 1


def test_bad_calibration_params_are_refused():
    for kwargs, fragment in [
        (dict(samples=0), "calib_samples must be an integer >= 1"),
        (dict(damp=0.0), "sparsegpt_damp must be a number > 0"),
        (dict(damp=-1.0), "sparsegpt_damp must be a number > 0"),
        (dict(timesteps=0), "calib_timesteps must be"),
        (dict(weighting="snr"), "calib_weighting 'snr' is not known"),
    ]:
        with pytest.raises(MaskDMError, match=fragment):
            CalibConfig(**kwargs)
    with pytest.raises(MaskDMError, match="the dataset holds 20 images"):
        calibration_batches(TensorImages(20), CalibConfig(samples=21))


# --- train_masks init=pruner: the logits ------------------------------------------------------------


def test_score_logits_start_at_the_pruners_mask_and_match_magnitude_for_magnitude(tiny_ddpm):
    unet = tiny_ddpm.unet
    weights = {n: m.weight.detach() for n, m in prunable_modules(unet).items()}
    names = list(weights)
    masks = compute_masks(unet, PruneConfig(ratio=0.5)).masks
    magnitude = {n: w.abs() for n, w in weights.items()}
    from_scores = score_logits(magnitude, masks, names, "unstructured", 0.05, "layer")
    expected = magnitude_logits(weights, masks, names, "unstructured", 0.05)
    assert all(torch.allclose(from_scores[n], expected[n]) for n in names)
    # Per-row (wanda) and per-block (sparsegpt) choices: kept start above 1/2, pruned below, so
    # the final mask at these logits (top-k per layer) is the initial mask.
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(w.shape, generator=gen, dtype=torch.float64) * torch.rand(w.shape[0], *[1] * (w.ndim - 1), generator=gen, dtype=torch.float64) for n, w in weights.items()}
    rowwise = compute_masks(unet, PruneConfig(ratio=0.5, pruner="wanda"), scores).masks
    logits = score_logits(scores, rowwise, names, "unstructured", 0.05, "row")
    for n in names:
        assert bool((logits[n][rowwise[n]] >= 0).all()) and bool((logits[n][~rowwise[n]] <= 0).all())
        top = torch.zeros(rowwise[n].numel(), dtype=torch.bool)
        top[torch.argsort(logits[n].flatten(), descending=True, stable=True)[: int(rowwise[n].sum())]] = True
        assert torch.equal(top.reshape(rowwise[n].shape), rowwise[n])
    # The same per-row scores under a per-layer threshold do not order the mask: one line.
    with pytest.raises(MaskDMError, match="not the one wanda's recorded scores chose"):
        score_logits(scores, rowwise, names, "unstructured", 0.05, "layer", "wanda")
    W, X = correlated_layer(rows=4, cols=16)
    layer = sparsegpt_layer(W, X @ X.T, 0.5, blocksize=8)
    block = score_logits({"l": layer.scores}, {"l": layer.mask}, ["l"], "unstructured", 0.05, "block:8")["l"]
    assert bool((block[layer.mask] >= 0).all()) and bool((block[~layer.mask] <= 0).all())
    with pytest.raises(MaskDMError, match="not known"):
        score_logits({"l": layer.scores}, {"l": layer.mask}, ["l"], "unstructured", 0.05, "diagonal")


# --- the stage --------------------------------------------------------------------------------------


def prune_args(model_dir, pruner, *extra):
    return ["--model", str(model_dir), "--dataset", "shapes", "--pruner", pruner, "--pruning_ratio", "0.5",
            "--calib_samples", "8", "--calib_batch_size", "4", *extra]


@pytest.mark.parametrize("pruner, pattern", [("wanda", "unstructured"), ("sparsegpt", "unstructured"), ("sparsegpt", "2:4")])
def test_the_stage_records_params_stats_masks_scores_and_the_weights(tracking, tiny_model_dir, tiny_ddpm, pruner, pattern):
    result = CliRunner().invoke(cli, ["prune", *prune_args(tiny_model_dir, pruner, "--pattern", pattern, "--sparsegpt_blocksize", "16")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = only_run("prune")
    params = run.data.params
    assert (params["pruner"], params["calib_samples"], params["calib_timesteps"], params["calib_weighting"]) == (pruner, "8", "1", "uniform")
    assert float(params["sparsegpt_damp"]) == 0.01 and params["sparsegpt_blocksize"] == "16"
    stats = json.loads(open(download(run, "pruning_stats.json")).read())
    assert stats["calibration"]["calib_samples"] == 8 and stats["sparsity"] == 0.5
    masks = load_masks(download(run, MASKS_FILE))
    scores, meta = load_scores(download(run, SCORES_FILE))
    assert meta["pruner"] == pruner and meta["selection"] == {"wanda": "row", "sparsegpt": "block:16"}[pruner] if pattern == "unstructured" else meta["selection"] == "2:4"
    assert set(scores) == set(masks)
    pruned = load_ddpm(download(run, "model")).unet
    original = dict(tiny_ddpm.unet.named_modules())
    changed_kept = 0
    for name, module in maskable_modules(pruned).items():
        w, w0 = module.weight.detach(), original[name].weight.detach()
        if name not in masks:
            assert torch.equal(w, w0), name  # protected layers are untouched
            continue
        assert bool((w[~masks[name]] == 0).all())
        changed_kept += int((w[masks[name]] != w0[masks[name]]).sum())
    # wanda only zeroes; sparsegpt reconstructs: the kept weights of the model it logs have changed.
    assert (changed_kept == 0) if pruner == "wanda" else (changed_kept > 0)


def test_a_latent_model_is_pruned_on_its_latents(tracking, tmp_path, monkeypatch):
    from maskdm.ddpm.models import save_ddpm
    from test_latent import tiny_latent_ddpm

    monkeypatch.setenv("MASKDM_DATA_DIR", str(tmp_path / "data"))
    ldm_dir = save_ddpm(tiny_latent_ddpm(), tmp_path / "tiny_ldm")
    result = CliRunner().invoke(cli, ["prune", *prune_args(ldm_dir, "sparsegpt", "--pattern", "2:4", "--sparsegpt_blocksize", "8")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = only_run("prune")
    assert any(k.startswith("maskdm.latent_cache") for k in run.data.tags)
    masks = load_masks(download(run, MASKS_FILE))
    assert masks and all(bool((m.reshape(-1, 4).sum(-1) == 2).all()) for m in masks.values() if m[0].numel() % 4 == 0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsegpt_damp", "0"], "sparsegpt_damp must be a number > 0"),
        (["--calib_samples", "0"], "calib_samples must be an integer >= 1"),
        (["--calib_samples", "100000"], "lower calib_samples"),
        (["--calib_weighting", "x"], "calib_weighting 'x' is not known"),
        (["--scope", "global"], "use scope=layer"),
        (["--pattern", "2:4", "--sparsegpt_blocksize", "6"], "not a multiple of M=4"),
    ],
)
def test_bad_sparsegpt_params_are_one_line_and_a_failed_run(tracking, tiny_model_dir, args, message):
    assert_user_error("prune", prune_args(tiny_model_dir, "sparsegpt", *args), message)


def test_unknown_pruner_and_no_dataset_are_one_line_and_a_failed_run(tracking, tiny_model_dir):
    assert_user_error("prune", ["--model", str(tiny_model_dir), "--pruner", "obs"], "pruner 'obs' is not known")


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_oneshot_pruners_without_a_dataset_fail_as_taylor_does(tracking, tiny_model_dir, pruner):
    assert_user_error("prune", ["--model", str(tiny_model_dir), "--pruner", pruner], "no dataset is given")


def test_mlproject_declares_the_calibration_params_and_passes_them_on():
    prune = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["prune"]
    from entrypoints.prune import command

    options = {p.name for p in command.params}
    for key in ("calib_samples", "calib_timesteps", "calib_batch_size", "calib_weighting", "sparsegpt_damp", "sparsegpt_blocksize"):
        assert key in prune["parameters"] and f"--{key} {{{key}}}" in prune["command"] and key in options


# --- what later stages start from, and init=pruner through the stages ---------------------------------


def invoke_ok(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, (result.output, result.stderr)


def newest(stage: str) -> str:
    from test_maskpro_stages import runs_of

    return runs_of(stage)[0].info.run_id


@pytest.mark.parametrize("pruner, pattern", [("sparsegpt", "unstructured"), ("wanda", "2:4")])
def test_train_masks_starts_from_the_pruners_scores_over_the_original_weights(tracking, tiny_model_dir, tiny_ddpm, pruner, pattern):
    from entrypoints.finetune import start_model_run
    from maskdm.tracking import get_upstream

    invoke_ok("prune", *prune_args(tiny_model_dir, pruner, "--pattern", pattern, "--sparsegpt_blocksize", "16"))
    prune_id = newest("prune")
    invoke_ok("extract_masks", "--prune_run_id", prune_id)
    masks_id = newest("extract_masks")
    invoke_ok("baseline_loss", "--masks_run_id", masks_id, "--dataset_size", "16", "--batch_size", "8", "--seed", "3")
    baseline_id = newest("baseline_loss")
    # baseline_loss and train_masks measure the ORIGINAL dense weights under the mask: the lineage's
    # model is the prune run's input, not its (for sparsegpt, reconstructed) output.
    baseline = MlflowClient().get_run(baseline_id)
    assert baseline.data.tags[MODEL_URI_TAG] == str(tiny_model_dir)
    # finetune from extract_masks starts from the prune run's model/: the reconstructed weights.
    assert start_model_run(get_upstream(masks_id, ["extract_masks"], MASKS_FILE, "m")).run_id == prune_id
    # lr=0 with logits from the recorded scores: the final mask is the pruner's mask.
    invoke_ok("train_masks", "--baseline_run_id", baseline_id, "--init", "pruner", "--lr", "0", "--max_step", "2",
              "--accumulation", "2", "--heldout_size", "0")
    trained = MlflowClient().get_run(newest("train_masks"))
    assert trained.data.params["init"] == "pruner"
    learned = load_masks(mlflow.artifacts.download_artifacts(run_id=trained.info.run_id, artifact_path=MASKS_FILE))
    initial = load_masks(mlflow.artifacts.download_artifacts(run_id=masks_id, artifact_path=MASKS_FILE))
    assert all(torch.equal(learned[k], initial[k]) for k in initial)
    # Its model is the original weights under the mask (not sparsegpt's reconstruction).
    model = load_ddpm(mlflow.artifacts.download_artifacts(run_id=trained.info.run_id, artifact_path="model")).unet
    original = dict(tiny_ddpm.unet.named_modules())
    for name, module in maskable_modules(model).items():
        if name in initial:
            assert torch.equal(module.weight.detach()[initial[name]], original[name].weight.detach()[initial[name]]), name


def test_init_pruner_from_a_random_prune_run_is_one_line(tracking, tiny_model_dir):
    invoke_ok("prune", "--model", str(tiny_model_dir), "--dataset", "shapes", "--pruner", "random", "--pruning_ratio", "0.5")
    invoke_ok("extract_masks", "--prune_run_id", newest("prune"))
    invoke_ok("baseline_loss", "--masks_run_id", newest("extract_masks"), "--dataset_size", "16", "--batch_size", "8")
    assert_user_error_in("train_masks", ["--baseline_run_id", newest("baseline_loss"), "--init", "pruner", "--max_step", "1"],
                         "recorded no scores.safetensors")


def assert_user_error_in(stage: str, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, [stage, *args])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskdm: error: ") and message in lines[0], result.stderr
    from test_maskpro_stages import runs_of

    assert runs_of(stage)[0].info.status == "FAILED"
