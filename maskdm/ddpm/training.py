"""The DDPM training loop shared by ``pretrain`` and ``finetune`` (which adds masks).

Shaped like diffusers' ``train_unconditional.py``: accelerator, model, EMA, optimizer, scheduler,
loop, save. Noise-prediction MSE, AdamW, a ``get_scheduler`` warm-up schedule, diffusers
``EMAModel``, gradient accumulation and multi-GPU through accelerate.

Fast path (:mod:`maskdm.ddpm.fastpath`, each ``auto`` = on for CUDA): bf16 autocast (accelerate's
``mixed_precision``), channels_last weights and batches, and ``torch.compile`` of the prepared
(DDP-wrapped) model, used for the forward pass only. accelerate, the EMA and the checkpoints see the
uncompiled module, so a checkpoint's names are the same with or without compile and a run may resume
with the other setting.

One optimizer step is ``gradient_accumulation_steps`` micro-batches of ``train_batch_size`` images
on each process; ``num_iters`` and ``save_model_steps`` count optimizer steps.

Checkpoints (``checkpoint-<step>/``) hold accelerate's ``save_state`` (model, optimizer, lr scheduler
and RNG states; accelerate loads them back with ``weights_only=True``) plus the EMA weights as
safetensors keyed by parameter name, and last ``ema.json``: a checkpoint without ``ema.json`` is
incomplete and is never resumed from. With several processes (on one machine or many) every rank's
RNG state file ``random_states_<rank>.pkl`` is gathered into the main process's checkpoint folder,
so a resume restores each rank's noise stream. A killed run resumes from its newest complete checkpoint and
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

import dataclasses
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import GradientAccumulationPlugin, gather_object, set_seed
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from maskdm.ddpm import fastpath
from maskdm.ddpm.diffusion import NoiseDraw, batch_loss
from maskdm.errors import MaskDMError
from maskdm.masks import apply_masks, assert_sparse_as, bake_masks, masked_modules
from maskdm.ddpm.models import DDPM
from maskdm.ddpm.sparse_storage import dense_folder, pack_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
#: Written last into a checkpoint folder: its presence marks the checkpoint complete.
CHECKPOINT_DONE = "ema.json"
EMA_WEIGHTS = "ema.safetensors"
MIXED_PRECISION = fastpath.MIXED_PRECISION_CHOICES
#: accelerate's name of a rank's RNG state file in a checkpoint (``random_states_<rank>.pkl``).
RNG_STATE_FILE = "random_states_{}.pkl"
#: How long a collective (gradient all-reduce, barrier) waits for a peer before raising: a rank that
#: died without its launcher noticing must not hold the others for torch's default 30 minutes.
#: Checkpoint logging on the main process runs while the others wait at a barrier, so it is generous.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
LR_SCHEDULERS = tuple(s.value for s in SchedulerType)


#: The demo model's configuration, the ``pretrain`` entry point's defaults: a 0.7M-parameter UNet
#: on the embedded shapes at 16x16, about 4 minutes on 2 CPU cores (docs/details/pretrain.md).
#: 16x16 rather than the dataset's default 32x32 makes every later demo stage 4x cheaper.
#: The shipped demo model (``maskdm/assets/demo_model``, what ``model=demo`` resolves to) was made
#: with exactly these values; a pretrain run made with them is tagged ``maskdm.demo=true``.
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
    channels_last="auto",
    compile="auto",
    seed=0,
    checkpoints_total_limit=2,
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
    #: channels_last weights and batches, and torch.compile of the forward pass: auto, true or false
    #: (:mod:`maskdm.ddpm.fastpath`; ``auto`` is on for CUDA, compile from batch 64).
    channels_last: str = "auto"
    compile: str = "auto"
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
        fastpath.resolve(self.mixed_precision, self.channels_last, self.compile, device="cpu")  # checks the spelling
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise MaskDMError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got '{self.lr_scheduler}'")


def resolve_mixed_precision(choice: str, device: torch.device | str | None = None) -> str:
    """``auto``: bf16 where a CUDA device supports it, else full precision (:func:`maskdm.ddpm.fastpath.resolve_mixed_precision`)."""
    return fastpath.resolve_mixed_precision(choice, device)


def fast_path(config: TrainConfig, device: torch.device | str) -> fastpath.FastPath:
    """The fast path ``train_ddpm`` takes for ``config`` on ``device`` (what the stages tag as ``maskdm.fast_path``)."""
    return fastpath.resolve(config.mixed_precision, config.channels_last, config.compile, device=device,
                            batch_size=config.train_batch_size)


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
    # The process state (device, process group) the stage started, else started here with the timeout.
    fast = fast_path(config, PartialState(timeout=COLLECTIVE_TIMEOUT).device)
    # accelerate keeps one mixed precision per process and refuses another: a second call in the same
    # process (tests, benchmarks) starts its accelerator state afresh; the process group stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=fast.mixed_precision,
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
    if fast.channels_last:
        # Before the optimizer and EMA see the parameters: their state takes the same layout.
        unet.to(memory_format=torch.channels_last)
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
    # Compiled after DDP wrapping (as torch recommends) and kept out of accelerate's model list: the
    # wrapper shares the parameters, so gradients, clipping, EMA and checkpoints are unchanged.
    forward = torch.compile(model) if fast.compile else model
    names = [name for name, _ in unet.named_parameters()]
    ema = EMAModel(unet.parameters(), decay=config.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4, foreach=True)
    ema.to(accelerator.device)

    step = start_step = 0
    if resume_from is not None:
        step = start_step = _load_checkpoint(accelerator, ema, names, Path(resume_from))
        log.info("resumed from %s at step %d", resume_from, step)

    def ema_ddpm() -> DDPM:
        # A latent model's autoencoder goes along unchanged (it is never trained).
        return dataclasses.replace(ddpm, unet=_ema_unet(unet, ema, names, masks))

    batches = _batches(loader)
    progress = tqdm(total=config.num_iters, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    loss_value = float("nan")
    window: list[torch.Tensor] = []
    loop_start = window_start = time.perf_counter()
    window_steps = 0
    while step < config.num_iters:
        with accelerator.accumulate(model):
            loss = _loss(forward, scheduler, fast.to_memory_format(next(batches)))
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
            # masked_fill, not a multiply: -w * 0 is -0.0, which sparse storage would have to record.
            original.masked_fill_(~masks[name].to(device=original.device, dtype=torch.bool), 0.0)


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
    if accelerator.num_processes > 1:
        # Each rank wrote its RNG state into its own folder (another machine's, or another temporary
        # folder); the main process's checkpoint, the one logged, gets all of them.
        own = path / RNG_STATE_FILE.format(accelerator.process_index)
        states = gather_object([own.read_bytes()])
        if accelerator.is_main_process:
            for rank, data in enumerate(states):
                (path / RNG_STATE_FILE.format(rank)).write_bytes(data)
    if accelerator.is_main_process:
        save_file({n: p.detach().cpu().contiguous() for n, p in zip(names, ema.shadow_params)}, str(path / EMA_WEIGHTS))
        # Weights, EMA and optimizer states stored as kept values + a 1-bit mask (bit-exact; about
        # 0.53x the bytes at 50 % sparsity): maskdm.ddpm.sparse_storage, read back by _load_checkpoint.
        pack_checkpoint(path)
        # Last: marks the checkpoint complete.
        (path / CHECKPOINT_DONE).write_text(json.dumps({"step": step, "optimization_step": ema.optimization_step}))
    accelerator.wait_for_everyone()
    return path


def _drop_old_checkpoints(folder: Path, keep: int) -> None:
    # Not accelerate's ProjectConfiguration(total_limit=...): it applies only to its own automatic
    # checkpoint names and deletes the oldest folders *before* the new one is written, complete or
    # not, so with a limit of 1 a kill mid-save would leave no complete checkpoint.
    for old in complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(accelerator: Accelerator, ema: EMAModel, names: list[str], path: Path) -> int:
    if not (path / CHECKPOINT_DONE).exists():
        raise MaskDMError(f"checkpoint {path} is incomplete (no {CHECKPOINT_DONE}); resume from an earlier one")
    try:
        # A packed checkpoint is unpacked into a temporary folder of this process for accelerate.
        with dense_folder(path) as dense:
            accelerator.load_state(str(dense))
            shadow = load_file(str(dense / EMA_WEIGHTS))
        for name, param in zip(names, ema.shadow_params):
            param.data.copy_(shadow[name].to(param.device))
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MaskDMError(f"checkpoint {path} does not fit this model and its masks: {first_line}") from None
    meta = json.loads((path / CHECKPOINT_DONE).read_text())
    ema.optimization_step = int(meta["optimization_step"])
    return int(meta["step"])
