"""The shared DDPM trainer: masked weights stay exactly zero, resume, accumulation, dropout, bad config.

A tiny UNet at 16x16 on a 16-image TensorDataset, a few optimizer steps per test.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import TensorDataset

from conftest import tiny_unet
from maskdm.errors import MaskDMError
from maskdm.masks import DEFAULT_PROTECT, maskable_modules, prunable_modules
from maskdm.ddpm.models import DDPM, default_scheduler, load_ddpm, save_ddpm
from maskdm.ddpm.sparse_storage import load_tensors
from maskdm.ddpm.training import (
    CHECKPOINT_DONE,
    EMA_WEIGHTS,
    TrainConfig,
    complete_checkpoints,
    latest_checkpoint,
    train_ddpm,
)

BASE = TrainConfig(
    num_iters=6, train_batch_size=4, learning_rate=1e-2, adam_weight_decay=0.1, save_model_steps=3,
    ema_max_decay=0.9, log_every=1, mixed_precision="no",
)


@pytest.fixture
def images():
    return TensorDataset(torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1)


def fresh_ddpm() -> DDPM:
    return DDPM(tiny_unet(), default_scheduler())


def half_masks(unet: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random 50% masks on every prunable layer (the protected ends stay dense)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.weight.shape, generator=gen) < 0.5 for n, m in prunable_modules(unet, DEFAULT_PROTECT).items()}


def weights(unet: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies (the live model may be on a GPU)."""
    return {n: m.weight.detach().cpu().clone() for n, m in maskable_modules(unet).items()}


def assert_zero_where_masked(named: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], what: str) -> None:
    for name, mask in masks.items():
        leaked = int((named[name][~mask] != 0).sum())
        assert leaked == 0, f"{what}: {leaked} nonzero masked weights in {name}"


class Stop(Exception):
    """Stands in for a kill: raised from on_log at a chosen step."""


def stop_at(step_to_stop: int, seen: list[int]):
    def on_log(metrics: dict, step: int) -> None:
        seen.append(step)
        if step == step_to_stop:
            raise Stop

    return on_log


def test_masked_weights_stay_exactly_zero_live_ema_checkpoint_and_saved(images, tmp_path):
    ddpm = fresh_ddpm()  # dense: every masked weight starts nonzero, so the zeros come from the trainer
    masks = half_masks(ddpm.unet)
    before = weights(ddpm.unet)
    assert all(bool((before[n][~m] != 0).any()) for n, m in masks.items())
    handed: dict[int, DDPM] = {}

    result = train_ddpm(
        ddpm, images, BASE, masks=masks, checkpoint_dir=tmp_path / "ckpt",
        on_checkpoint=lambda path, step, ema: handed.setdefault(step, ema),
    )

    assert result.steps == BASE.num_iters and sorted(handed) == [3, 6]
    # Live model: the effective weight and the stored original are zero where masked.
    live = maskable_modules(ddpm.unet)
    assert_zero_where_masked(weights(ddpm.unet), masks, "live weight")
    assert_zero_where_masked({n: live[n].parametrizations.weight.original.detach().cpu() for n in masks}, masks, "live original")
    # EMA model (what is returned and what on_checkpoint gets), its checkpoint copy, and the saved model.
    ema_weights = weights(result.ddpm.unet)
    assert_zero_where_masked(ema_weights, masks, "EMA model")
    assert_zero_where_masked(weights(handed[3].unet), masks, "EMA at checkpoint 3")
    stored = load_tensors(tmp_path / "ckpt" / "checkpoint-6" / EMA_WEIGHTS)
    assert_zero_where_masked({n: stored[f"{n}.parametrizations.weight.original"] for n in masks}, masks, "checkpoint EMA")
    reloaded = load_ddpm(str(save_ddpm(result.ddpm, tmp_path / "saved")))
    assert_zero_where_masked(weights(reloaded.unet), masks, "saved model")

    # Kept weights moved, the EMA is not the live model, and no mask parametrization is left on the copy.
    for name, mask in masks.items():
        assert not torch.equal(ema_weights[name][mask], before[name][mask]), name
    live_now = weights(ddpm.unet)
    assert any(not torch.equal(ema_weights[n], live_now[n]) for n in masks)
    assert not any(hasattr(m, "parametrizations") for m in result.ddpm.unet.modules())
    # The checkpoint-3 copy was not changed by the training after it (it shares nothing with the live model).
    assert any(not torch.equal(weights(handed[3].unet)[n], ema_weights[n]) for n in masks)


def test_resume_restores_step_ema_and_lr_schedule(images, tmp_path):
    config = replace(BASE, lr_scheduler="linear", lr_warmup_steps=2, checkpoints_total_limit=5)
    first = fresh_ddpm()
    masks = half_masks(first.unet)
    done = train_ddpm(first, images, config, masks=masks, checkpoint_dir=tmp_path / "a")
    assert [p.name for p in complete_checkpoints(tmp_path / "a")] == ["checkpoint-3", "checkpoint-6"]

    # Resuming at the last step trains nothing and hands back exactly the stored EMA model.
    again = train_ddpm(fresh_ddpm(), images, config, masks=masks, resume_from=tmp_path / "a" / "checkpoint-6")
    assert again.steps == 6
    for name, w in weights(done.ddpm.unet).items():
        assert torch.equal(weights(again.ddpm.unet)[name], w), name

    # Resuming at step 3 continues from step 4 with the lr schedule where it was.
    logged: dict[int, dict] = {}
    resumed = train_ddpm(
        fresh_ddpm(), images, config, masks=masks, resume_from=tmp_path / "a" / "checkpoint-3",
        on_log=lambda m, s: logged.setdefault(s, m),
    )
    assert resumed.steps == 6 and sorted(logged) == [4, 5, 6]
    # linear: warm-up to learning_rate over 2 steps, then linear decay to 0 at num_iters.
    for step, metrics in logged.items():
        expected = config.learning_rate * (config.num_iters - step) / (config.num_iters - config.lr_warmup_steps)
        assert metrics["lr"] == pytest.approx(expected), step
    assert_zero_where_masked(weights(resumed.ddpm.unet), masks, "resumed EMA model")


def test_killed_run_loses_at_most_save_model_steps_and_resumes_to_num_iters(images, tmp_path):
    config = replace(BASE, num_iters=10)
    masks = half_masks(tiny_unet())
    seen: list[int] = []
    with pytest.raises(Stop):
        train_ddpm(fresh_ddpm(), images, config, masks=masks, checkpoint_dir=tmp_path, on_log=stop_at(8, seen))
    newest = latest_checkpoint(tmp_path)
    step = json.loads((newest / CHECKPOINT_DONE).read_text())["step"]
    assert newest.name == f"checkpoint-{step}" and 8 - config.save_model_steps <= step <= 8
    assert len(complete_checkpoints(tmp_path)) == config.checkpoints_total_limit

    # A checkpoint whose ema.json never got written (killed while saving) is not resumed from.
    (tmp_path / "checkpoint-9").mkdir()
    assert latest_checkpoint(tmp_path) == newest
    with pytest.raises(MaskDMError, match="incomplete"):
        train_ddpm(fresh_ddpm(), images, config, masks=masks, resume_from=tmp_path / "checkpoint-9")

    after: list[int] = []
    result = train_ddpm(fresh_ddpm(), images, config, masks=masks, resume_from=newest, on_log=lambda m, s: after.append(s))
    assert result.steps == config.num_iters and after == list(range(step + 1, config.num_iters + 1))


def test_resume_from_a_checkpoint_of_another_model_is_a_user_error(images, tmp_path):
    train_ddpm(fresh_ddpm(), images, replace(BASE, num_iters=3), checkpoint_dir=tmp_path)
    other = DDPM(tiny_unet(channels=1), default_scheduler())
    gray = TensorDataset(torch.zeros(8, 1, 16, 16))
    with pytest.raises(MaskDMError, match="does not fit"):
        train_ddpm(other, gray, BASE, resume_from=latest_checkpoint(tmp_path))


@pytest.mark.parametrize("accumulation", [1, 3])
def test_gradient_accumulation_does_num_iters_optimizer_steps(images, accumulation):
    config = replace(BASE, num_iters=4, gradient_accumulation_steps=accumulation)
    ddpm = fresh_ddpm()
    forwards, optimizer_steps = [], []
    hook = ddpm.unet.register_forward_hook(lambda *_: forwards.append(1))
    step_hook = register_optimizer_step_post_hook(lambda *_: optimizer_steps.append(1))
    try:
        # 16 images in batches of 4: with accumulation 3 the micro-batches cross epoch boundaries.
        result = train_ddpm(ddpm, images, config)
    finally:
        hook.remove()
        step_hook.remove()
    assert result.steps == config.num_iters
    assert len(optimizer_steps) == config.num_iters
    assert len(forwards) == config.num_iters * accumulation


def test_dropout_is_set_on_the_unet_and_in_its_config(images):
    ddpm = fresh_ddpm()
    result = train_ddpm(ddpm, images, replace(BASE, num_iters=1, dropout=0.3))
    dropouts = [m for m in ddpm.unet.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.3 for m in dropouts)
    assert result.ddpm.unet.config.dropout == 0.3
    # A model rebuilt from the saved config trains its resnet blocks with that dropout.
    assert all(b.dropout.p == 0.3 for b in result.ddpm.unet.down_blocks[0].resnets)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_iters=0), "num_iters"),
        (dict(train_batch_size=0), "train_batch_size"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
        (dict(save_model_steps=0), "save_model_steps"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(lr_warmup_steps=-1), "lr_warmup_steps"),
        (dict(ema_max_decay=1.0), "ema_max_decay"),
        (dict(dropout=1.0), "dropout"),
        (dict(mixed_precision="fp8"), "mixed_precision"),
        (dict(lr_scheduler="step"), "lr_scheduler"),
    ],
)
def test_bad_config_values_raise_maskdm_error(images, change, message):
    with pytest.raises(MaskDMError, match=message):
        train_ddpm(fresh_ddpm(), images, replace(BASE, **change))


def test_masks_that_do_not_fit_and_empty_data_raise_maskdm_error(images):
    masks = half_masks(tiny_unet())
    name = next(iter(masks))
    with pytest.raises(MaskDMError, match=f"'{name}'"):
        train_ddpm(fresh_ddpm(), images, BASE, masks={name: masks[name][:1]})
    with pytest.raises(MaskDMError, match="empty"):
        train_ddpm(fresh_ddpm(), TensorDataset(torch.zeros(0, 3, 16, 16)), BASE)


def test_pretrain_call_without_masks_still_trains_and_checkpoints(images, tmp_path):
    """The call pretrain makes: no masks, a checkpoint_dir and both callbacks."""
    ddpm = fresh_ddpm()
    before = weights(ddpm.unet)
    logged, saved = [], []
    result = train_ddpm(
        ddpm, images, replace(BASE, num_iters=4, save_model_steps=2), checkpoint_dir=tmp_path,
        on_log=lambda m, s: logged.append((s, set(m))), on_checkpoint=lambda p, s, e: saved.append((p.name, s)),
    )
    assert [s for s, _ in logged] == [1, 2, 3, 4] and all(keys == {"loss", "lr", "steps_per_s"} for _, keys in logged)
    assert saved == [("checkpoint-2", 2), ("checkpoint-4", 4)]
    assert any(not torch.equal(w, before[n]) for n, w in weights(result.ddpm.unet).items())
    assert Path(tmp_path / "checkpoint-4" / CHECKPOINT_DONE).exists()
