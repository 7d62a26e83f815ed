"""finetune: train a pruned DDPM with its masks held fixed; save the EMA model, exactly as sparse as the masks.

Start: ``masks_run_id`` names a ``train_masks`` run (its ``model/`` is the dense weights x the
learned masks) or an ``extract_masks`` run (the ``model/`` of the prune run it was extracted from,
which is dense x masks already). The masks are a parametrization for the whole run (see
:mod:`maskdm.ddpm.training`), so masked weights are zero in every forward pass, in the optimizer's
updates, in the EMA model and in what is saved; the saved model is asserted to be so.

Checkpoints: every ``save_model_steps`` optimizer steps ``checkpoints/checkpoint-<step>/`` is
logged at once (``ema.json`` uploaded last, so a checkpoint artifact with ``ema.json`` is
complete), with the EMA model's ``eval_loss`` at that step and a sample grid
``samples/step-<step>.png``. At most ``checkpoints_total_limit`` of them (default 2) stay in the
artifact store: before a new one is uploaded the oldest are deleted down to ``limit - 1`` (never
below one complete), after it down to ``limit``; each deletion removes ``ema.json`` first, so a
checkpoint cut off mid-deletion reads as incomplete and is never resumed from.

Resume: ``resume_run_id`` names an earlier finetune run of the same ``masks_run_id`` in any state
(RUNNING after a SIGKILL, FAILED, KILLED, or FINISHED to train on to a larger ``num_iters``). This
run downloads that run's newest complete checkpoint and continues from its step to ``num_iters``;
it is tagged ``maskdm.resumed_from=<run_id>:<step>``. A resume run without a complete checkpoint is
warned about and training starts at step 0.

Multi-GPU: ``accelerate launch -m entrypoints.cli finetune --masks_run_id ...`` from the project
directory (or ``torchrun --nproc_per_node N -m entrypoints.cli finetune ...``). Every process
trains; only the main process opens, logs and ends the MLflow run. A process that fails ends the
job: the launcher stops the others with SIGTERM, which the main process turns into a KILLED run
(FAILED if its own collective broke first; :func:`entrypoints.common.distributed_stage`), and collectives time out after
:data:`maskdm.ddpm.training.COLLECTIVE_TIMEOUT` where no launcher notices.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import mlflow
import torch
from mlflow.exceptions import MlflowException

from entrypoints.common import PREVIEW_IMAGES, PREVIEW_KEY, distributed_stage, integer, number, optional, save_preview
from entrypoints.datasets import stage_dataset
from maskdm.ddpm.diffusion import eval_images, eval_loss
from maskdm.errors import MaskDMError
from maskdm.masks import check_masks_fit, load_masks, mask_sparsity, masks_from_weights
from maskdm.ddpm.models import DDPM, load_ddpm
from maskdm.tracking import STAGE_TAG, StageRun, Upstream, client, get_upstream, has_artifact
from maskdm.ddpm.training import CHECKPOINT_DONE, TrainConfig, checkpoint_step, fast_path, train_ddpm

log = logging.getLogger(__name__)

MASKS_STAGES = ("train_masks", "extract_masks")
MASKS_FILE = "masks.safetensors"
RESUMED_FROM_TAG = "maskdm.resumed_from"
#: The dataset trained on when neither the option nor the masks run's lineage names one.
FALLBACK_DATASET = "cifar10"
#: The ``dropout`` value that keeps the model's own dropout (diffusers' UNet config ``dropout``):
#: a model trained without dropout is finetuned without it unless a value is asked for.
MODEL_DROPOUT = "model"


@dataclass
class Resume:
    run_id: str
    step: int
    checkpoint: Path  # the downloaded checkpoint folder


@dataclass
class Job:
    ddpm: DDPM  # dense weights x masks
    masks: dict[str, torch.Tensor]
    dataset: str
    config: TrainConfig
    resume: Resume | None
    workdir: Path
    checkpoints_total_limit: int = 2
    preview_images: int = PREVIEW_IMAGES


@click.command("finetune", help="Finetune a pruned DDPM with fixed masks (a train_masks or extract_masks run); logs model/ and checkpoints/.")
@click.option("--masks_run_id", required=True, help="MLflow run ID of a train_masks or extract_masks run.")
@click.option("--dataset", default=None, help="shapes, cifar10 or imagefolder:<path> [default: the masks run's lineage dataset].")
@click.option("--num_iters", type=int, default=100000, show_default=True, help="Optimizer steps in all (a resumed run counts those before it).")
@click.option("--train_batch_size", type=int, default=128, show_default=True, help="Images per micro-batch, per process.")
@click.option("--learning_rate", type=float, default=2e-4, show_default=True, help="AdamW learning rate after warm-up.")
@click.option("--lr_warmup_steps", type=int, default=0, show_default=True, help="Linear warm-up steps, then constant.")
@click.option("--ema_max_decay", type=float, default=0.9999, show_default=True, help="Upper bound of the EMA decay (warm-up 1-(1+step)^-3/4).")
@click.option("--dropout", default=MODEL_DROPOUT, show_default=True, help="model (the model's own, its UNet config's dropout) or a probability set on every dropout layer of the UNet (the paper recipe: 0.1).")
@click.option("--gradient_accumulation_steps", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--save_model_steps", type=int, default=1000, show_default=True, help="Checkpoint, eval_loss and sample grid every this many steps.")
@click.option("--mixed_precision", default="auto", show_default=True, help="auto (bf16 on CUDA, no on CPU), no, bf16 or fp16.")
@click.option("--channels_last", default="auto", show_default=True, help="auto (on for CUDA), true or false: channels_last weights and batches.")
@click.option("--compile", "compile_", default="auto", show_default=True, help="auto (on for CUDA from batch 64), true or false: torch.compile the UNet's forward pass.")
@click.option("--checkpoints_total_limit", type=int, default=2, show_default=True, help="Checkpoints kept in the artifact store (oldest deleted; at least one complete is always kept).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data order, noise and timesteps.")
@click.option("--preview_images", type=int, default=PREVIEW_IMAGES, show_default=True, help="Images in the sample grid logged at every checkpoint.")
@click.option("--resume_run_id", default=None, help="An earlier finetune run of the same masks_run_id to continue from its newest complete checkpoint.")
def command(**params) -> None:
    params["compile"] = params.pop("compile_")
    params["dataset"] = optional(params["dataset"])
    params["resume_run_id"] = optional(params["resume_run_id"])
    with tempfile.TemporaryDirectory(prefix="maskdm-finetune-") as workdir:
        # Only the main process opens the run (run is None on the others, which never touch it).
        with distributed_stage("finetune", params) as (state, run):
            finetune(prepare(params, Path(workdir), run), state, run)


def prepare(params: dict, workdir: Path, run: StageRun | None) -> Job:
    """Check everything (config, masks run, resume run, masks against the model), then download."""
    integer("preview_images", params["preview_images"])
    config = TrainConfig(
        num_iters=params["num_iters"],
        train_batch_size=params["train_batch_size"],
        learning_rate=params["learning_rate"],
        lr_warmup_steps=params["lr_warmup_steps"],
        ema_max_decay=params["ema_max_decay"],
        dropout=parse_dropout(params["dropout"]),
        gradient_accumulation_steps=params["gradient_accumulation_steps"],
        save_model_steps=params["save_model_steps"],
        mixed_precision=params["mixed_precision"],
        channels_last=params["channels_last"],
        compile=params["compile"],
        seed=params["seed"],
    )
    config.validate()
    if params["checkpoints_total_limit"] < 1:
        raise MaskDMError(f"checkpoints_total_limit must be at least 1, got {params['checkpoints_total_limit']}")
    if run is not None:
        up = run.upstream(params["masks_run_id"], MASKS_STAGES, MASKS_FILE, "masks_run_id")
    else:
        up = get_upstream(params["masks_run_id"], MASKS_STAGES, MASKS_FILE, "masks_run_id")
    model_run = start_model_run(up)
    resume = find_resume(params["resume_run_id"], up.run_id, workdir) if params["resume_run_id"] else None

    masks = load_masks(up.download(MASKS_FILE, workdir / "masks"))
    ddpm = load_ddpm(str(model_run.download("model", workdir / "start")))
    check_masks_fit(ddpm.unet, masks)
    dataset = params["dataset"] or up.params.get("dataset") or FALLBACK_DATASET
    return Job(ddpm, masks, dataset, config, resume, workdir, params["checkpoints_total_limit"], params["preview_images"])


def start_model_run(up: Upstream) -> Upstream:
    """The run whose ``model/`` finetuning starts from: the train_masks run itself, or extract_masks' prune run."""
    if up.stage == "train_masks":
        if not up.has_artifact("model"):
            raise MaskDMError(f"masks_run_id: run {up.run_id} (train_masks) has no 'model' artifact")
        return up
    prune_run_id = up.lineage.get("prune")
    if not prune_run_id:
        raise MaskDMError(f"masks_run_id: extract_masks run {up.run_id} records no prune run (tag maskdm.upstream.prune)")
    return get_upstream(prune_run_id, ["prune"], "model", f"the prune run of masks_run_id {up.run_id}")


def find_resume(resume_run_id: str, masks_run_id: str, workdir: Path) -> Resume | None:
    """Download the newest complete checkpoint of an earlier finetune run of the same masks run.

    Any run status is accepted: a killed run stays RUNNING in the tracking store.
    """
    try:
        earlier = client().get_run(resume_run_id)
    except MlflowException:
        raise MaskDMError(f"resume_run_id: run '{resume_run_id}' does not exist in the tracking store {mlflow.get_tracking_uri()}") from None
    stage_name = earlier.data.tags.get(STAGE_TAG, "")
    if stage_name != "finetune":
        raise MaskDMError(f"resume_run_id: run {resume_run_id} is a '{stage_name or 'non-MaskDM'}' run; expected a finetune run")
    if earlier.data.params.get("masks_run_id") != masks_run_id:
        raise MaskDMError(
            f"resume_run_id: run {resume_run_id} finetuned masks run {earlier.data.params.get('masks_run_id')}, not {masks_run_id}"
        )
    # Newest first; one killed mid-upload has no ema.json yet, nor one killed mid-deletion (ema.json
    # goes first), so the newest one that has it is taken.
    for step, path, complete in reversed(logged_checkpoints(resume_run_id)):
        if complete:
            local = mlflow.artifacts.download_artifacts(run_id=resume_run_id, artifact_path=path, dst_path=str(workdir / "resume"))
            return Resume(resume_run_id, step, Path(local))
    log.warning("resume_run_id: run %s has no complete checkpoint under checkpoints/; training starts at step 0", resume_run_id)
    return None


def finetune(job: Job, state, run: StageRun | None) -> None:
    """Train on every process (``state``: accelerate's PartialState); on the main process (``run`` given) log checkpoints, metrics and the model."""
    # A latent model's latents are encoded once, by the main process; the others then find its cache.
    with state.main_process_first():
        train_set = stage_dataset(job.ddpm, job.dataset, "train", run=run)
    on_checkpoint = None
    if run is not None:
        # The dropout in effect, whether asked for or the model's own (``dropout`` may say "model").
        dropout_used = job.config.dropout if job.config.dropout is not None else model_dropout(job.ddpm.unet)
        run.log_params({"dataset": job.dataset, "dropout_used": dropout_used})
        fast = fast_path(job.config, state.device)
        run.set_tags({
            "maskdm.device": str(state.device),
            "maskdm.num_processes": state.num_processes,
            "maskdm.mixed_precision": fast.mixed_precision,
            "maskdm.fast_path": fast.describe(),
        })
        if job.resume:
            run.set_tags({RESUMED_FROM_TAG: f"{job.resume.run_id}:{job.resume.step}"})
        eval_set = stage_dataset(job.ddpm, job.dataset, "eval", run=run)
        on_checkpoint = checkpoint_logger(run, eval_images(eval_set), job.workdir, state.device, job.checkpoints_total_limit,
                                          job.preview_images)

    result = train_ddpm(
        job.ddpm, train_set, job.config, masks=job.masks,
        checkpoint_dir=job.workdir / "checkpoints",
        resume_from=job.resume.checkpoint if job.resume else None,
        on_log=run.log_metrics if run else None,
        on_checkpoint=on_checkpoint,
    )
    if run is None:
        return
    # Zeros in the masked layers of the saved model (the masked-out ones, asserted, and any other).
    sparsity = mask_sparsity(masks_from_weights(result.ddpm.unet, job.masks))
    run.log_metrics({"sparsity": sparsity, "train_steps_per_s": result.steps_per_s}, step=result.steps)
    run.log_model(result.ddpm, eval_set, state.device)


def parse_dropout(value: str) -> float | None:
    """``model`` -> None (keep the model's own), else the probability (checked by TrainConfig)."""
    if str(value).strip().lower() == MODEL_DROPOUT:
        return None
    try:
        return number("dropout", value)
    except MaskDMError:
        raise MaskDMError(f"dropout must be '{MODEL_DROPOUT}' or a probability in [0, 1), not '{value}'") from None


def model_dropout(unet: torch.nn.Module) -> float:
    """The dropout a UNet was configured with (diffusers' ``UNet2DModel`` default is 0.0)."""
    config = getattr(unet, "config", None)
    return float(config.get("dropout", 0.0)) if config is not None else 0.0


def checkpoint_logger(run: StageRun, images: torch.Tensor, workdir: Path, device, total_limit: int = 2,
                      preview_images: int = PREVIEW_IMAGES):
    """The ``on_checkpoint`` callback: log the checkpoint at once (keeping at most ``total_limit``
    logged), then the EMA model's eval_loss and a sample grid of ``preview_images``."""

    def on_checkpoint(path: Path, step: int, ema: DDPM) -> None:
        # Room first, so the store never holds more than max(total_limit, 2) checkpoints, even mid-upload.
        drop_logged_checkpoints(run, keep=max(total_limit - 1, 1))
        log_checkpoint(run, path)
        drop_logged_checkpoints(run, keep=total_limit)
        loss = eval_loss(ema.unet.to(device), ema.scheduler, images, device)
        run.log_metrics({"eval_loss": loss}, step=step)
        grid = workdir / "samples" / f"step-{step}.png"
        grid.parent.mkdir(exist_ok=True)
        save_preview(ema, grid, num_images=preview_images)
        run.log_artifact_now(grid, "samples")
        run.log_image(grid, PREVIEW_KEY, step)  # the run page's slider over the checkpoints
        log.info("step %d: checkpoint logged, eval_loss %.5f", step, loss)

    return on_checkpoint


def logged_checkpoints(run_id: str) -> list[tuple[int, str, bool]]:
    """(step, artifact path, complete) of each ``checkpoints/checkpoint-<step>`` of a run, oldest first."""
    listed = [f.path for f in client().list_artifacts(run_id, "checkpoints") if f.is_dir]
    found = sorted((step, p) for p in listed if (step := checkpoint_step(Path(p))) is not None)
    return [(step, p, has_artifact(run_id, f"{p}/{CHECKPOINT_DONE}")) for step, p in found]


def drop_logged_checkpoints(run: StageRun, keep: int) -> None:
    """Delete this run's logged checkpoints older than its ``keep`` newest complete ones.

    ``ema.json`` goes first: a deletion cut off by a kill leaves a checkpoint without it, which
    resume skips, and the newer complete ones are untouched. Incomplete ones older than the kept
    are deleted too; an incomplete one newer than them (an upload in progress) is not.
    """
    checkpoints = logged_checkpoints(run.run_id)
    complete = [step for step, _, done in checkpoints if done]
    if len(complete) <= keep:
        return
    oldest_kept = complete[-keep]
    for step, path, done in checkpoints:
        if step >= oldest_kept:
            break
        if done:
            run.delete_artifacts(f"{path}/{CHECKPOINT_DONE}")
        run.delete_artifacts(path)
        log.info("deleted %s from the artifact store (keeping the %d newest complete)", path, keep)


def log_checkpoint(run: StageRun, path: Path) -> None:
    """Upload ``ema.json`` last: a checkpoint artifact holding it is complete even if the run is killed mid-upload."""
    dest = f"checkpoints/{path.name}"
    for item in sorted(path.iterdir()):
        if item.name != CHECKPOINT_DONE:
            run.log_artifact_now(item, f"{dest}/{item.name}" if item.is_dir() else dest)
    run.log_artifact_now(path / CHECKPOINT_DONE, dest)
