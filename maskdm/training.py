"""The DDPM training loop shared by ``pretrain`` and ``finetune`` (which adds masks).

Shaped like diffusers' ``train_unconditional.py``: accelerator, model, EMA, optimizer, scheduler,
loop, save. Noise-prediction MSE, AdamW, a ``get_scheduler`` warm-up schedule, diffusers
``EMAModel``, bf16 autocast on GPU, gradient accumulation and multi-GPU through accelerate.

Checkpoints (``checkpoint-<step>/``) hold accelerate's ``save_state`` (model, optimizer and lr
scheduler; loaded back with ``weights_only=True``) plus the EMA weights as safetensors. A killed run
resumes from its newest checkpoint and loses at most ``save_model_steps`` steps.

Masks are applied with :func:`maskdm.masks.apply_masks` (a parametrization): masked weights are zero
in every forward pass and get zero gradient, so AdamW never moves them off zero, and the EMA of a
weight that is always zero stays zero. The saved model is checked to be exactly as sparse as the masks.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from maskdm.errors import MaskDMError
from maskdm.masks import apply_masks, assert_sparse_as, bake_masks
from maskdm.models import DDPM

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


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
    dataloader_num_workers: int = 0
    seed: int = 0
    log_every: int = 10

    def validate(self) -> None:
        for name in ("num_iters", "train_batch_size", "gradient_accumulation_steps", "save_model_steps"):
            if getattr(self, name) < 1:
                raise MaskDMError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise MaskDMError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.ema_max_decay < 1.0:
            raise MaskDMError(f"ema_max_decay must be in [0, 1), got {self.ema_max_decay}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise MaskDMError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got '{self.mixed_precision}'")


def resolve_mixed_precision(choice: str) -> str:
    """``auto``: bf16 where a CUDA device supports it, else full precision."""
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def set_dropout(unet: nn.Module, p: float) -> None:
    """Set every dropout layer of ``unet`` to ``p`` and record it in the saved config."""
    if not 0.0 <= p < 1.0:
        raise MaskDMError(f"dropout must be in [0, 1), got {p}")
    for module in unet.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    if hasattr(unet, "register_to_config"):
        unet.register_to_config(dropout=p)


def latest_checkpoint(folder: Path | None) -> Path | None:
    if folder is None or not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name))]
    return max(found)[1] if found else None


@dataclass
class TrainResult:
    ddpm: DDPM  # the EMA model, masks baked in
    steps: int
    last_loss: float
    steps_per_s: float


def _loss(unet, scheduler, clean: torch.Tensor) -> torch.Tensor:
    noise = torch.randn_like(clean)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    return F.mse_loss(unet(noisy, timesteps).sample.float(), noise.float())


def _batches(loader: DataLoader):
    while True:  # epochs run back to back; the step count, not epochs, ends training
        for batch in loader:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch


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
    """Train ``ddpm.unet`` (in place) for ``config.num_iters`` optimizer steps; return the EMA model.

    ``on_log(metrics, step)`` is called every ``log_every`` steps; ``on_checkpoint(path, step,
    ema_ddpm)`` after each checkpoint is written (to log it and evaluate the EMA model).
    """
    config.validate()
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
    )
    set_seed(config.seed)
    unet, scheduler = ddpm.unet, ddpm.scheduler
    if masks:
        apply_masks(unet, masks)
    unet.train()

    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.num_iters * accelerator.num_processes,
    )
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        shuffle=True,
        drop_last=len(dataset) >= config.train_batch_size,
        num_workers=config.dataloader_num_workers,
        generator=generator,
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    raw_unet = accelerator.unwrap_model(unet)
    ema = EMAModel(raw_unet.parameters(), decay=config.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    ema.to(accelerator.device)

    step = start_step = 0
    if resume_from is not None:
        step = start_step = _load_checkpoint(accelerator, ema, resume_from)
        log.info("resumed from %s at step %d", resume_from, step)

    def ema_ddpm() -> DDPM:
        """A copy of the model with the EMA weights, masks baked in (and checked)."""
        model = copy.deepcopy(raw_unet).to("cpu").float()
        ema_cpu = [p.detach().to("cpu", torch.float32) for p in ema.shadow_params]
        for p, s in zip(model.parameters(), ema_cpu):
            p.data.copy_(s)
        bake_masks(model)
        if masks:
            assert_sparse_as(model, masks)
        return DDPM(model.eval(), copy.deepcopy(scheduler))

    batches = _batches(loader)
    progress = tqdm(total=config.num_iters, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    loss_value = float("nan")
    window, window_start = [], _now()
    while step < config.num_iters:
        with accelerator.accumulate(unet):
            loss = _loss(unet, scheduler, next(batches))
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        ema.step(raw_unet.parameters())
        step += 1
        window.append(loss.detach())
        progress.update(1)
        if step % config.log_every == 0 or step == config.num_iters:
            loss_value = float(torch.stack(window).mean())
            elapsed = max(_now() - window_start, 1e-9)
            metrics = {"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0], "steps_per_s": len(window) / elapsed}
            progress.set_postfix(loss=f"{loss_value:.4f}")
            if on_log and accelerator.is_main_process:
                on_log(metrics, step)
            window, window_start = [], _now()
        if checkpoint_dir is not None and (step % config.save_model_steps == 0 or step == config.num_iters):
            path = _save_checkpoint(accelerator, ema, checkpoint_dir, step)
            if on_checkpoint and accelerator.is_main_process:
                on_checkpoint(path, step, ema_ddpm())
    progress.close()
    accelerator.wait_for_everyone()
    elapsed = progress.format_dict.get("elapsed", 0.0) or 1e-9
    return TrainResult(ema_ddpm(), step, loss_value, (step - start_step) / elapsed)


def _now() -> float:
    return time.perf_counter()


def _save_checkpoint(accelerator: Accelerator, ema: EMAModel, folder: Path, step: int) -> Path:
    path = folder / f"{CHECKPOINT_PREFIX}{step}"
    accelerator.save_state(str(path), safe_serialization=True)
    if accelerator.is_main_process:
        save_file({f"shadow.{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}, str(path / "ema.safetensors"))
        (path / "ema.json").write_text(json.dumps({"optimization_step": ema.optimization_step, "decay": ema.decay, "step": step}))
    accelerator.wait_for_everyone()
    return path


def _load_checkpoint(accelerator: Accelerator, ema: EMAModel, path: Path) -> int:
    if not (path / "ema.json").exists():
        raise MaskDMError(f"checkpoint {path} is incomplete (no ema.json); resume from an earlier one")
    accelerator.load_state(str(path))
    shadow = load_file(str(path / "ema.safetensors"))
    for i, p in enumerate(ema.shadow_params):
        p.data.copy_(shadow[f"shadow.{i}"].to(p.device))
    meta = json.loads((path / "ema.json").read_text())
    ema.optimization_step = int(meta["optimization_step"])
    return int(meta["step"])
