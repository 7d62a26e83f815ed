"""The trainer's fast path on the CPU: a compiled, bf16-autocast, channels_last masked training step.

On a GPU ``auto`` turns all three on (finetune's defaults); here they are forced, so the CPU runs
the same code: torch.compile (inductor's C++ kernels) of the DDP-less prepared model, accelerate's
bf16 autocast, channels_last weights and batches. One compiled training run only: inductor takes
tens of seconds to build its kernels on a loaded 2-core machine.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from torch._dynamo.utils import counters
from torch.utils.data import TensorDataset

from conftest import tiny_unet
from entrypoints.cli import cli
from maskdm.errors import MaskDMError
from maskdm.ddpm.fastpath import FastPath
from maskdm.masks import DEFAULT_PROTECT, assert_sparse_as, maskable_modules, prunable_modules
from maskdm.ddpm.models import DDPM, default_scheduler
from maskdm.ddpm.sparse_storage import load_tensors
from maskdm.ddpm.training import CHECKPOINT_DONE, EMA_WEIGHTS, TrainConfig, fast_path, train_ddpm

FAST = TrainConfig(
    num_iters=3, train_batch_size=4, learning_rate=1e-2, adam_weight_decay=0.1, save_model_steps=3,
    ema_max_decay=0.9, log_every=1, mixed_precision="bf16", channels_last="true", compile="true",
)


def half_masks(unet, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.weight.shape, generator=gen) < 0.5 for n, m in prunable_modules(unet, DEFAULT_PROTECT).items()}


def test_fast_path_resolves_per_device_and_checks_spelling():
    config = replace(FAST, mixed_precision="auto", channels_last="auto", compile="auto", train_batch_size=128)
    assert fast_path(config, "cpu") == FastPath("no", False, False)
    assert fast_path(FAST, "cpu") == FastPath("bf16", True, True)
    assert fast_path(FAST, "cpu").describe() == "bf16,channels_last,compile"
    for change, message in [({"compile": "yes please"}, "compile must be one of auto, true, false"),
                            ({"channels_last": "maybe"}, "channels_last must be one of auto, true, false")]:
        with pytest.raises(MaskDMError, match=message):
            replace(FAST, **change).validate()


@pytest.mark.parametrize("option, value", [("--compile", "sometimes"), ("--channels_last", "2")])
def test_finetune_fast_path_options_are_checked_first(tracking, option, value):
    result = CliRunner().invoke(cli, ["finetune", "--masks_run_id", "0" * 32, option, value])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == f"maskdm: error: {option[2:]} must be one of auto, true, false, got '{value}'"


def test_compiled_bf16_channels_last_step_keeps_masked_weights_exactly_zero(tmp_path):
    images = TensorDataset(torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    ddpm = DDPM(tiny_unet(), default_scheduler())
    masks = half_masks(ddpm.unet)
    before = {n: m.weight.detach().clone() for n, m in maskable_modules(ddpm.unet).items()}
    assert all(bool((before[n][~m] != 0).any()) for n, m in masks.items())  # zeros must come from the trainer
    losses: list[float] = []
    counters.clear()

    result = train_ddpm(ddpm, images, FAST, masks=masks, checkpoint_dir=tmp_path / "ckpt",
                        on_log=lambda metrics, step: losses.append(metrics["loss"]))

    assert counters["stats"]["unique_graphs"] >= 1  # dynamo compiled the forward pass
    assert result.steps == 3 and len(losses) == 3 and all(loss == loss for loss in losses)  # no NaN under bf16
    live = maskable_modules(ddpm.unet)
    # The fast path really ran: weights in channels_last (4-D ones), and kept weights moved.
    conv = live[next(n for n in masks if live[n].weight.dim() == 4)]
    assert conv.parametrizations.weight.original.is_contiguous(memory_format=torch.channels_last)
    for name, mask in masks.items():
        original = live[name].parametrizations.weight.original.detach()
        assert int((original[~mask] != 0).sum()) == 0, name  # exactly zero, not "small"
        assert not torch.equal(original[mask], before[name][mask]), name
    # The EMA model handed out is exactly as sparse as the masks (asserted inside too; checked here).
    assert_sparse_as(result.ddpm.unet, masks)
    # The checkpoint is named as without compile (no `_orig_mod.` prefix) and holds zeros where masked.
    folder = tmp_path / "ckpt" / "checkpoint-3"
    live_state = load_tensors(folder / "model.safetensors")
    assert not any("_orig_mod" in k for k in live_state)
    ema_state = load_tensors(folder / EMA_WEIGHTS)
    for name, mask in masks.items():
        key = f"{name}.parametrizations.weight.original"
        assert int((live_state[key][~mask] != 0).sum()) == 0 and int((ema_state[key][~mask] != 0).sum()) == 0, name
    assert json.loads((folder / CHECKPOINT_DONE).read_text())["step"] == 3

    # A compiled run's checkpoint resumes without compile (same names), and training on keeps the zeros.
    plain = replace(FAST, num_iters=4, mixed_precision="no", channels_last="false", compile="false")
    resumed = train_ddpm(DDPM(tiny_unet(), default_scheduler()), images, plain, masks=masks, resume_from=folder)
    assert resumed.steps == 4
    assert_sparse_as(resumed.ddpm.unet, masks)
