"""Mask learning on the fast path (bf16 autocast, channels_last, torch.compile, several replayed
batches per forward pass): the replay stays exact, swapped masks are never served stale, and the
stages record and replay the baseline's fast path."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from conftest import tiny_unet
from entrypoints.baseline_loss import FAST_PATH_TAG
from maskdm.errors import MaskDMError
from maskdm.ddpm.fastpath import FastPath
from maskdm.method.maskpro import (
    MaskTrainer,
    ReplayBatches,
    ReplayedLosses,
    ReplaySpec,
    TrainConfig,
    auto_forward_batches,
    check_forward_batches,
    compute_baseline_losses,
    make_policy,
    replay_model,
    select_targets,
)
from maskdm.masks import set_masks
from maskdm.ddpm.models import DDPM, default_scheduler, save_ddpm
from test_maskpro import image_dataset, magnitude_masks
from test_maskpro_stages import assert_one_line_failure, invoke, masks_run, metric_history, ok, runs_of

BF16_NHWC = FastPath(mixed_precision="bf16", channels_last=True)


def setup(fast: FastPath, group: int, pattern: str = "unstructured", dataset_size: int = 32, batch_size: int = 4):
    """A tiny DDPM, its initial masks, replayed batches and the baseline losses on ``fast`` (made on a copy, as the stage does)."""
    torch.manual_seed(0)
    ddpm = DDPM(tiny_unet(), default_scheduler())
    masks = magnitude_masks(ddpm.unet, pattern)
    batches = ReplayBatches(image_dataset(dataset_size), ReplaySpec(dataset_size, batch_size, 0, seed=5))
    baseline = compute_baseline_losses(copy.deepcopy(ddpm.unet), ddpm.scheduler, masks, batches, progress=False, fast=fast, group=group)
    return ddpm, masks, batches, baseline


def trainer_on(ddpm, masks, batches, baseline, fast, group, config, magnitude=30.0):
    """The trainer as train_masks makes it: the model from replay_model, losses from ReplayedLosses."""
    model = replay_model(ddpm.unet, masks, fast)
    policy = make_policy("unstructured", masks, select_targets(masks, "all"), magnitude)
    losses = ReplayedLosses(model, ddpm.scheduler, batches, "cpu", fast, group)
    return MaskTrainer(ddpm.unet, masks, policy, losses, baseline, config)


# --- 1. exact at the initial mask under the fast path ------------------------------------------------


def test_bf16_channels_last_grouped_replay_is_exact_at_the_initial_mask():
    ddpm, masks, batches, baseline = setup(BF16_NHWC, group=2)
    # Saturated logits and lr=0: every sampled mask is the initial one; 8 batches, windows of 4
    # batches in 2 forward passes of 8 images, 3 updates so one window wraps round the subset.
    config = TrainConfig(lr=0.0, epoch=0, max_step=3, accumulation=4, seed=1)
    history = trainer_on(ddpm, masks, batches, baseline, BF16_NHWC, 2, config).run(progress=False)
    assert len(history) == 3 and all(h.mask_flip_rate == 0.0 for h in history)
    assert [h.improvement for h in history] == [0.0] * 3
    assert all(h.loss == h.baseline_loss > 0 for h in history)
    # The model really ran on the fast path: its weights are NHWC and its losses are not fp32's.
    assert ddpm.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    ddpm32, _, _, fp32 = setup(FastPath(), group=1)
    assert not np.array_equal(fp32, baseline)
    assert np.allclose(fp32, baseline, rtol=0.05)


def test_a_baseline_of_another_precision_is_not_exact():
    """Why train_masks must replay the baseline's fast path: fp32 losses against a bf16 baseline
    give a nonzero "improvement" at the initial mask."""
    ddpm, masks, batches, baseline = setup(BF16_NHWC, group=2)
    config = TrainConfig(lr=0.0, epoch=0, max_step=2, accumulation=2, seed=1)
    history = trainer_on(ddpm, masks, batches, baseline, FastPath(), 1, config).run(progress=False)
    assert all(h.mask_flip_rate == 0.0 for h in history)
    assert any(h.improvement != 0.0 for h in history)


def test_grouped_losses_match_one_batch_per_forward_in_full_precision():
    _, _, _, one = setup(FastPath(), group=1)
    _, _, _, four = setup(FastPath(), group=4)
    np.testing.assert_allclose(four, one, rtol=1e-5)


# --- 2. masks swapped between forward passes are not served stale ------------------------------------


def test_swapped_masks_are_evaluated_afresh_under_autocast():
    ddpm, masks, batches, baseline = setup(BF16_NHWC, group=2)
    model = replay_model(ddpm.unet, masks, BF16_NHWC)
    losses = ReplayedLosses(model, ddpm.scheduler, batches, "cpu", BF16_NHWC, 2)
    other = {k: ~m if m.dim() == 2 else m for k, m in masks.items()}  # the linear layers' masks inverted
    assert any(m.dim() == 2 for m in masks.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an enclosing context would keep its cache alive
        set_masks(ddpm.unet, other)
        swapped = losses.losses([0, 1])
        set_masks(ddpm.unet, masks)
        back = losses.losses([0, 1])
    fresh_model = DDPM(copy.deepcopy(ddpm.unet), ddpm.scheduler)
    set_masks(fresh_model.unet, other)
    expected = ReplayedLosses(fresh_model.unet, ddpm.scheduler, batches, "cpu", BF16_NHWC, 2).losses([0, 1])
    assert swapped.tolist() == expected.tolist()
    assert not np.allclose(swapped, baseline[:2], rtol=1e-3)
    assert back.tolist() == baseline[:2].tolist()


def test_compiled_replay_is_exact_and_follows_mask_swaps():
    """The one compiled test (inductor on the CPU is slow): a compiled model replays its own
    baseline exactly, and a swapped mask changes its losses as it does the eager model's."""
    fast = FastPath(mixed_precision="no", channels_last=True, compile=True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    ddpm = DDPM(tiny_unet(), default_scheduler())
    masks = magnitude_masks(ddpm.unet, "unstructured")
    batches = ReplayBatches(image_dataset(16), ReplaySpec(16, 4, 0, seed=5))
    # The baseline on the model the trainer then uses (not a copy, as the stage would have): one compilation, not two.
    baseline = compute_baseline_losses(ddpm.unet, ddpm.scheduler, masks, batches, progress=False, fast=fast, group=2)
    config = TrainConfig(lr=0.0, epoch=0, max_step=2, accumulation=2, seed=1)
    trainer = trainer_on(ddpm, masks, batches, baseline, fast, 2, config)
    history = trainer.run(progress=False)
    assert [h.improvement for h in history] == [0.0, 0.0]
    other = {k: ~m if m.dim() == 2 else m for k, m in masks.items()}
    set_masks(ddpm.unet, other)
    compiled = trainer.batch_loss.losses([0, 1])
    eager = ReplayedLosses(ddpm.unet, ddpm.scheduler, batches, "cpu", FastPath(channels_last=True), 2).losses([0, 1])
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)
    assert not np.allclose(compiled, baseline[:2], rtol=1e-3)


# --- 3. the grouping ---------------------------------------------------------------------------------


def test_forward_batches_must_tile_the_subset_and_the_window():
    check_forward_batches(8, 312, 16)
    with pytest.raises(MaskDMError, match="does not divide the subset's 313 batches"):
        check_forward_batches(8, 313)
    with pytest.raises(MaskDMError, match="accumulation=12 is not a multiple of the baseline run's forward_batches=8"):
        check_forward_batches(8, 312, 12)
    ddpm, masks, batches, _ = setup(FastPath(), group=1)
    losses = ReplayedLosses(replay_model(ddpm.unet, masks), ddpm.scheduler, batches, "cpu", FastPath(), 4)
    with pytest.raises(MaskDMError, match="not whole groups"):
        losses.losses([2, 3, 4, 5])


def test_auto_forward_batches():
    # The paper's subset: 20,000 images in 312 batches of 64 = 8 x 39: eight batches (512 images) per forward.
    assert auto_forward_batches(312, 64, BF16_NHWC) == 8
    assert auto_forward_batches(320, 64, BF16_NHWC) == 16  # 1,024 images at most
    assert auto_forward_batches(313, 64, BF16_NHWC) == 1
    assert auto_forward_batches(312, 64, FastPath()) == 1  # full precision, eager, NCHW: the CPU default


# --- 4. the stages ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fast_chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("maskpro_fastpath")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    patch.chdir(root)
    mlflow.set_tracking_uri(uri)
    model_dir = save_ddpm(DDPM(tiny_unet(), default_scheduler()), root / "tiny_model")
    _, masks_id = masks_run(model_dir, "2:4")
    ok(invoke("baseline_loss", "--masks_run_id", masks_id, "--dataset_size", "32", "--batch_size", "4", "--seed", "7",
              "--mixed_precision", "bf16", "--channels_last", "true", "--compile", "false", "--forward_batches", "2"))
    yield runs_of("baseline_loss")[0]
    mlflow.set_tracking_uri(None)
    patch.undo()


def test_stages_record_and_replay_the_baselines_fast_path(fast_chain):
    bid = fast_chain.info.run_id
    assert fast_chain.data.tags[FAST_PATH_TAG] == "bf16,channels_last"
    summary = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=bid, artifact_path="baseline_summary.json")).read_text())
    assert {k: summary["params"][k] for k in ("mixed_precision", "channels_last", "compile", "forward_batches", "device")} == {
        "mixed_precision": "bf16", "channels_last": "true", "compile": "false", "forward_batches": 2, "device": "cpu"}
    # auto everywhere: the baseline's fast path, so the initial mask's reward is exactly 0.
    ok(invoke("train_masks", "--baseline_run_id", bid, "--lr", "0", "--logits", "30", "--max_step", "3", "--accumulation", "4",
              "--heldout_size", "8"))
    trained = runs_of("train_masks")[0]
    assert trained.data.tags[FAST_PATH_TAG] == "bf16,channels_last"
    assert metric_history(trained.info.run_id, "improvement") == [0.0] * 3
    assert trained.data.metrics["heldout_improvement"] == 0.0
    ok(invoke("train_masks", "--baseline_run_id", bid, "--max_step", "1", "--accumulation", "2", "--mixed_precision", "bf16",
              "--channels_last", "true", "--heldout_size", "0"))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--mixed_precision", "no"], "mixed_precision=no contradicts the baseline run's mixed_precision=bf16"),
        (["--channels_last", "false"], "channels_last=false contradicts"),
        (["--compile", "true"], "compile=true contradicts"),
        (["--accumulation", "3"], "accumulation=3 is not a multiple of the baseline run's forward_batches=2"),
        (["--compile", "often"], "compile must be one of auto, true, false"),
    ],
)
def test_train_masks_refuses_another_fast_path(fast_chain, args, fragment):
    result = invoke("train_masks", "--baseline_run_id", fast_chain.info.run_id, *args)
    assert_one_line_failure(result, "train_masks", fragment)


def test_baseline_loss_refuses_a_grouping_that_does_not_tile(fast_chain):
    masks_id = fast_chain.data.tags["maskdm.upstream.extract_masks"]
    result = invoke("baseline_loss", "--masks_run_id", masks_id, "--dataset_size", "32", "--batch_size", "4",
                    "--forward_batches", "3")
    assert_one_line_failure(result, "baseline_loss", "forward_batches=3 does not divide the subset's 8 batches")
