"""The DDPM training loop shared by ``pretrain`` and ``finetune`` (which adds masks).

Shaped like diffusers' ``train_unconditional.py``: accelerator, model, EMA, optimizer, scheduler,
loop, save. Noise-prediction MSE, AdamW, a ``get_scheduler`` warm-up schedule, diffusers
``EMAModel``, bf16 autocast on GPU, gradient accumulation and multi-GPU through accelerate.

One optimizer step is ``gradient_accumulation_steps`` micro-batches of ``train_batch_size`` images
on each process; ``num_iters`` and ``save_model_steps`` count optimizer steps.

Checkpoints (``checkpoint-<step>/``) hold accelerate's ``save_state`` (model, optimizer, lr scheduler
and RNG states; accelerate loads them back with ``weights_only=True``) plus the EMA weights as
safetensors keyed by parameter name, and last ``ema.json``: a checkpoint without ``ema.json`` is
incomplete and is never resumed from. A killed run resumes from its newest complete checkpoint and
loses at most ``save_model_steps`` steps. Resuming restores the step, weights, optimizer, lr
schedule and EMA; the data order starts a fresh epoch, so a resumed run is not bit-identical to an
uninterrupted one.

Masks are applied with :func:`maskdm.masks.apply_masks` (a parametrization ``weight = original *
mask``) and the stored ``original`` is zeroed where the mask is False. Masked weights are then zero
in every forward pass and get exactly zero gradient, so AdamW (weight decay included: it only
scales) never moves them off zero, the EMA of a weight that is always zero stays zero, and
checkpoints hold zeros there too. The EMA model handed out is built fresh, masks baked, and checked
to be exactly as sparse as the masks.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, set_seed
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from maskdm.diffusion import NoiseDraw, batch_loss
from maskdm.errors import MaskDMError
from maskdm.masks import apply_masks, assert_sparse_as, bake_masks, masked_modules
from maskdm.models import DDPM

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
#: Written last into a checkpoint folder: its presence marks the checkpoint complete.
CHECKPOINT_DONE = "ema.json"
EMA_WEIGHTS = "ema.safetensors"
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
LR_SCHEDULERS = tuple(s.value for s in SchedulerType)


#: The demo model's configuration, the ``pretrain`` entry point's defaults: a 0.7M-parameter UNet
#: on the embedded shapes at 16x16, about 4 minutes on 2 CPU cores (docs/details/pretrain.md).
#: 16x16 rather than the dataset's default 32x32 makes every later demo stage 4x cheaper.
#: ``model=demo`` resolves to the newest FINISHED pretrain run made with exactly these values.
DEMO_PRETRAIN = dict(
    dataset="shapes",
    arch="tiny",
    resolution=16,
    num_iters=2000,
    train_batch_size=32,
    learning_rate=2e-3,
    lr_warmup_steps=100,
    lr_scheduler="cosine",
    beta_schedule="squaredcos_cap_v2",
    ema_max_decay=0.995,
    gradient_accumulation_steps=1,
    save_model_steps=1000,
    mixed_precision="auto",
    seed=0,
)


@dataclass
class TrainConfig:
    num_iters: int
    train_batch_size: int
    learning_rate: float
    lr_warmup_steps: int = 0
    lr_scheduler: str = "constant_with_warmup"
    ema_max_decay: float = 0.9999
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    save_model_steps: int = 1000
    mixed_precision: str = "auto"
    #: Dropout probability set on every dropout layer of the UNet; None leaves the model's own.
    dropout: float | None = None
    dataloader_num_workers: int = 0
    seed: int = 0
    log_every: int = 10
    #: Local checkpoints kept in ``checkpoint_dir`` (older ones are deleted once a newer one is complete).
    checkpoints_total_limit: int = 1

    def validate(self) -> None:
        for name in ("num_iters", "train_batch_size", "gradient_accumulation_steps", "save_model_steps",
                     "log_every", "checkpoints_total_limit"):
            if getattr(self, name) < 1:
                raise MaskDMError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "adam_weight_decay", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise MaskDMError(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise MaskDMError(f"learning_rate must be positive, got {self.learning_rate}")
        if not self.max_grad_norm > 0:
            raise MaskDMError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if not 0.0 <= self.ema_max_decay < 1.0:
            raise MaskDMError(f"ema_max_decay must be in [0, 1), got {self.ema_max_decay}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise MaskDMError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise MaskDMError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got '{self.mixed_precision}'")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise MaskDMError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got '{self.lr_scheduler}'")


def resolve_mixed_precision(choice: str) -> str:
    """``auto``: bf16 where a CUDA device supports it, else full precision."""
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def set_dropout(unet: nn.Module, p: float) -> None:
    """Set every dropout layer of ``unet`` to ``p`` (as the original recipe does) and record it in the config.

    The recorded ``dropout`` is what diffusers applies to the resnet blocks when the model is
    rebuilt from its config; the attention output dropout is set here too but not saved.
    """
    if not 0.0 <= p < 1.0:
        raise MaskDMError(f"dropout must be in [0, 1), got {p}")
    for module in unet.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    if hasattr(unet, "register_to_config"):
        # diffusers rebuilds keys listed in _use_default_values from the class default, not the config.
        defaults = [k for k in unet.config.get("_use_default_values", []) if k != "dropout"]
        unet.register_to_config(dropout=p, _use_default_values=defaults)


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, else None."""
    m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    return int(m.group(1)) if m else None


def complete_checkpoints(folder: Path | None) -> list[Path]:
    """The complete checkpoints (those with ``ema.json``) in ``folder``, oldest first."""
    if folder is None or not folder.is_dir():
        return []
    found = [(step, p) for p in folder.iterdir() if (step := checkpoint_step(p)) is not None and (p / CHECKPOINT_DONE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path | None) -> Path | None:
    """The newest complete checkpoint in ``folder`` (what a killed run resumes from), else None."""
    found = complete_checkpoints(folder)
    return found[-1] if found else None


@dataclass
class TrainResult:
    ddpm: DDPM  # the EMA model, masks baked in
    steps: int  # the optimizer step reached (counting steps done before a resume)
    last_loss: float
    steps_per_s: float  # optimizer steps of this call per second of its loop, checkpoints included


def train_ddpm(
    ddpm: DDPM,
    dataset,
    config: TrainConfig,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    on_log: Callable[[dict, int], None] | None = None,
    on_checkpoint: Callable[[Path, int, DDPM], None] | None = None,
) -> TrainResult:
    """Train ``ddpm.unet`` (in place) up to optimizer step ``config.num_iters``; return the EMA model.

    ``masks`` (bool, True = kept, by module name) are registered on ``ddpm.unet`` for the whole run.
    ``resume_from`` is a checkpoint folder written by an earlier call on the same model and masks.
    ``on_log(metrics, step)`` is called every ``log_every`` steps with ``loss`` (mean over the
    micro-batches since the last call), ``lr`` and ``steps_per_s``; ``on_checkpoint(path, step,
    ema_ddpm)`` after each checkpoint is written, with a CPU copy of the EMA model (masks baked), to
    log it and evaluate it. Both run on the main process only.
    """
    config.validate()
    if len(dataset) == 0:
        raise MaskDMError("the training dataset is empty")
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        # Not synced with the dataloader: every optimizer step sees exactly gradient_accumulation_steps
        # micro-batches, epoch boundaries included (our step counter, not epochs, ends training).
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        ),
    )
    # Different noise on each process; the same run twice draws the same.
    set_seed(config.seed, device_specific=True)
    unet, scheduler = ddpm.unet, ddpm.scheduler
    if config.dropout is not None:
        set_dropout(unet, config.dropout)
    if masks:
        _register_masks(unet, masks)
    unet.train()

    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.num_iters * accelerator.num_processes,
    )
    loader = DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        shuffle=True,
        drop_last=len(dataset) >= config.train_batch_size,
        num_workers=config.dataloader_num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )
    model, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    names = [name for name, _ in unet.named_parameters()]
    ema = EMAModel(unet.parameters(), decay=config.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4, foreach=True)
    ema.to(accelerator.device)

    step = start_step = 0
    if resume_from is not None:
        step = start_step = _load_checkpoint(accelerator, ema, names, Path(resume_from))
        log.info("resumed from %s at step %d", resume_from, step)

    def ema_ddpm() -> DDPM:
        return DDPM(_ema_unet(unet, ema, names, masks), scheduler)

    batches = _batches(loader)
    progress = tqdm(total=config.num_iters, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    loss_value = float("nan")
    window: list[torch.Tensor] = []
    loop_start = window_start = time.perf_counter()
    window_steps = 0
    while step < config.num_iters:
        with accelerator.accumulate(model):
            loss = _loss(model, scheduler, next(batches))
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        window.append(loss.detach())
        if not accelerator.sync_gradients:
            continue
        ema.step(unet.parameters())
        step += 1
        window_steps += 1
        progress.update(1)
        if step % config.log_every == 0 or step == config.num_iters:
            # One host sync per log call, not per step.
            loss_value = float(torch.stack(window).mean())
            now = time.perf_counter()
            metrics = {"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0], "steps_per_s": window_steps / max(now - window_start, 1e-9)}
            progress.set_postfix(loss=f"{loss_value:.4f}")
            if on_log and accelerator.is_main_process:
                on_log(metrics, step)
            window, window_start, window_steps = [], now, 0
        if checkpoint_dir is not None and (step % config.save_model_steps == 0 or step == config.num_iters):
            checkpoint_start = time.perf_counter()
            path = _save_checkpoint(accelerator, ema, names, Path(checkpoint_dir), step)
            if accelerator.is_main_process:
                if on_checkpoint:
                    on_checkpoint(path, step, ema_ddpm())
                _drop_old_checkpoints(Path(checkpoint_dir), config.checkpoints_total_limit)
            accelerator.wait_for_everyone()
            # The logged steps_per_s is the training rate: checkpoint time is left out of it.
            window_start += time.perf_counter() - checkpoint_start
    progress.close()
    elapsed = time.perf_counter() - loop_start
    accelerator.wait_for_everyone()
    return TrainResult(ema_ddpm(), step, loss_value, (step - start_step) / max(elapsed, 1e-9))


def _register_masks(unet: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Register ``masks`` and zero the stored weights they mask, so checkpoints are sparse too."""
    apply_masks(unet, masks)
    with torch.no_grad():
        for name, module in masked_modules(unet).items():
            original = module.parametrizations.weight.original
            original.mul_(masks[name].to(device=original.device, dtype=original.dtype))


def _loss(model: nn.Module, scheduler, clean: torch.Tensor) -> torch.Tensor:
    # Drawn on the device with the global (seeded) generator: training needs fresh noise, not replay.
    draw = NoiseDraw(
        torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device),
        torch.randn_like(clean, dtype=torch.float32),
    )
    return batch_loss(model, scheduler, clean, draw)


def _batches(loader: DataLoader):
    while True:  # epochs run back to back; the step count, not epochs, ends training
        for batch in loader:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _ema_unet(live: nn.Module, ema: EMAModel, names: list[str], masks: Mapping[str, torch.Tensor] | None) -> nn.Module:
    """A fresh CPU fp32 UNet holding the EMA weights, masks baked in and checked.

    Built from the config rather than deep-copied, so it carries none of accelerate's forward
    wrappers (autocast) and shares nothing with the live model.
    """
    model = type(live).from_config(live.config)
    if masks:
        apply_masks(model, masks)
    model.load_state_dict(live.state_dict())  # buffers; every parameter is overwritten below
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, shadow in zip(names, ema.shadow_params):
            params[name].copy_(shadow)
    bake_masks(model)
    if masks:
        assert_sparse_as(model, masks)
    return model.eval()


def _save_checkpoint(accelerator: Accelerator, ema: EMAModel, names: list[str], folder: Path, step: int) -> Path:
    path = folder / f"{CHECKPOINT_PREFIX}{step}"
    accelerator.save_state(str(path), safe_serialization=True)
    if accelerator.is_main_process:
        save_file({n: p.detach().cpu().contiguous() for n, p in zip(names, ema.shadow_params)}, str(path / EMA_WEIGHTS))
        # Last: marks the checkpoint complete.
        (path / CHECKPOINT_DONE).write_text(json.dumps({"step": step, "optimization_step": ema.optimization_step}))
    accelerator.wait_for_everyone()
    return path


def _drop_old_checkpoints(folder: Path, keep: int) -> None:
    for old in complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(accelerator: Accelerator, ema: EMAModel, names: list[str], path: Path) -> int:
    if not (path / CHECKPOINT_DONE).exists():
        raise MaskDMError(f"checkpoint {path} is incomplete (no {CHECKPOINT_DONE}); resume from an earlier one")
    try:
        accelerator.load_state(str(path))
        shadow = load_file(str(path / EMA_WEIGHTS))
        for name, param in zip(names, ema.shadow_params):
            param.data.copy_(shadow[name].to(param.device))
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MaskDMError(f"checkpoint {path} does not fit this model and its masks: {first_line}") from None
    meta = json.loads((path / CHECKPOINT_DONE).read_text())
    ema.optimization_step = int(meta["optimization_step"])
    return int(meta["step"])
