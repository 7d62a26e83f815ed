"""finetune: train a pruned DDPM with its masks held fixed; save the EMA model, exactly as sparse as the masks.

Start: ``masks_run_id`` names a ``train_masks`` run (its ``model/`` is the dense weights x the
learned masks) or an ``extract_masks`` run (the ``model/`` of the prune run it was extracted from,
which is dense x masks already). The masks are a parametrization for the whole run (see
:mod:`maskdm.training`), so masked weights are zero in every forward pass, in the optimizer's
updates, in the EMA model and in what is saved; the saved model is asserted to be so.

Checkpoints: every ``save_model_steps`` optimizer steps ``checkpoints/checkpoint-<step>/`` is
logged at once (``ema.json`` uploaded last, so a checkpoint artifact with ``ema.json`` is
complete), with the EMA model's ``eval_loss`` at that step and a sample grid
``samples/step-<step>.png``.

Resume: ``resume_run_id`` names an earlier finetune run of the same ``masks_run_id`` in any state
(RUNNING after a SIGKILL, FAILED, KILLED, or FINISHED to train on to a larger ``num_iters``). This
run downloads that run's newest complete checkpoint and continues from its step to ``num_iters``;
it is tagged ``maskdm.resumed_from=<run_id>:<step>``. A resume run without a complete checkpoint is
warned about and training starts at step 0.

Multi-GPU: ``accelerate launch -m entrypoints.cli finetune --masks_run_id ...`` from the project
directory (or ``accelerate launch $(which maskdm) finetune ...`` from anywhere). Every process
trains; only the main process opens, logs and ends the MLflow run.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import mlflow
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from mlflow.exceptions import MlflowException

from entrypoints.common import configure_logging, fail, optional, save_preview, stage
from maskdm.data import load_dataset
from maskdm.diffusion import eval_images, eval_loss
from maskdm.errors import MaskDMError
from maskdm.masks import check_masks_fit, load_masks, mask_sparsity, masks_from_weights
from maskdm.models import DDPM, load_ddpm
from maskdm.tracking import STAGE_TAG, StageRun, Upstream, client, get_upstream, has_artifact
from maskdm.training import CHECKPOINT_DONE, TrainConfig, checkpoint_step, resolve_mixed_precision, train_ddpm

log = logging.getLogger(__name__)

MASKS_STAGES = ("train_masks", "extract_masks")
MASKS_FILE = "masks.safetensors"
RESUMED_FROM_TAG = "maskdm.resumed_from"
#: The dataset trained on when neither the option nor the masks run's lineage names one.
FALLBACK_DATASET = "cifar10"


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


@click.command("finetune", help="Finetune a pruned DDPM with fixed masks (a train_masks or extract_masks run); logs model/ and checkpoints/.")
@click.option("--masks_run_id", required=True, help="MLflow run ID of a train_masks or extract_masks run.")
@click.option("--dataset", default=None, help="shapes, cifar10 or imagefolder:<path> [default: the masks run's lineage dataset].")
@click.option("--num_iters", type=int, default=100000, show_default=True, help="Optimizer steps in all (a resumed run counts those before it).")
@click.option("--train_batch_size", type=int, default=128, show_default=True, help="Images per micro-batch, per process.")
@click.option("--learning_rate", type=float, default=2e-4, show_default=True, help="AdamW learning rate after warm-up.")
@click.option("--lr_warmup_steps", type=int, default=0, show_default=True, help="Linear warm-up steps, then constant.")
@click.option("--ema_max_decay", type=float, default=0.9999, show_default=True, help="Upper bound of the EMA decay (warm-up 1-(1+step)^-3/4).")
@click.option("--dropout", type=float, default=0.1, show_default=True, help="Dropout probability set on the UNet.")
@click.option("--gradient_accumulation_steps", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--save_model_steps", type=int, default=1000, show_default=True, help="Checkpoint, eval_loss and sample grid every this many steps.")
@click.option("--mixed_precision", default="auto", show_default=True, help="auto (bf16 on CUDA, no on CPU), no, bf16 or fp16.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data order, noise and timesteps.")
@click.option("--resume_run_id", default=None, help="An earlier finetune run of the same masks_run_id to continue from its newest complete checkpoint.")
def command(**params) -> None:
    params["dataset"] = optional(params["dataset"])
    params["resume_run_id"] = optional(params["resume_run_id"])
    # Without CUDA, several processes (accelerate launch --cpu) share the work over gloo.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    with tempfile.TemporaryDirectory(prefix="maskdm-finetune-") as workdir:
        if state.is_main_process:
            with stage("finetune", params) as run:
                job = prepare(params, Path(workdir), run)
                finetune(job, state, run)
        else:
            # Other processes only train; they never touch the main process's run.
            configure_logging()
            try:
                finetune(prepare(params, Path(workdir), None), state, None)
            except MaskDMError as exc:
                fail(str(exc))


def prepare(params: dict, workdir: Path, run: StageRun | None) -> Job:
    """Check everything (config, masks run, resume run, masks against the model), then download."""
    config = TrainConfig(
        num_iters=params["num_iters"],
        train_batch_size=params["train_batch_size"],
        learning_rate=params["learning_rate"],
        lr_warmup_steps=params["lr_warmup_steps"],
        ema_max_decay=params["ema_max_decay"],
        dropout=params["dropout"],
        gradient_accumulation_steps=params["gradient_accumulation_steps"],
        save_model_steps=params["save_model_steps"],
        mixed_precision=params["mixed_precision"],
        seed=params["seed"],
    )
    config.validate()
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
    return Job(ddpm, masks, dataset, config, resume, workdir)


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
    listed = [f.path for f in client().list_artifacts(resume_run_id, "checkpoints") if f.is_dir]
    # Newest first; one killed mid-upload has no ema.json yet, so the one before it is taken.
    for step, path in sorted(((checkpoint_step(Path(p)), p) for p in listed if checkpoint_step(Path(p)) is not None), reverse=True):
        if has_artifact(resume_run_id, f"{path}/{CHECKPOINT_DONE}"):
            local = mlflow.artifacts.download_artifacts(run_id=resume_run_id, artifact_path=path, dst_path=str(workdir / "resume"))
            return Resume(resume_run_id, step, Path(local))
    log.warning("resume_run_id: run %s has no complete checkpoint under checkpoints/; training starts at step 0", resume_run_id)
    return None


def finetune(job: Job, state: PartialState, run: StageRun | None) -> None:
    """Train on every process; on the main process (``run`` given) log checkpoints, metrics and the model."""
    train_set = load_dataset(job.dataset, job.ddpm.resolution, split="train")
    on_checkpoint = None
    if run is not None:
        run.log_params({"dataset": job.dataset})
        run.set_tags({
            "maskdm.device": str(state.device),
            "maskdm.num_processes": state.num_processes,
            "maskdm.mixed_precision": resolve_mixed_precision(job.config.mixed_precision),
        })
        if job.resume:
            run.set_tags({RESUMED_FROM_TAG: f"{job.resume.run_id}:{job.resume.step}"})
        eval_set = load_dataset(job.dataset, job.ddpm.resolution, split="eval")
        on_checkpoint = checkpoint_logger(run, eval_images(eval_set), job.workdir, state.device)

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


def checkpoint_logger(run: StageRun, images: torch.Tensor, workdir: Path, device):
    """The ``on_checkpoint`` callback: log the checkpoint at once, then the EMA model's eval_loss and a sample grid."""

    def on_checkpoint(path: Path, step: int, ema: DDPM) -> None:
        log_checkpoint(run, path)
        loss = eval_loss(ema.unet.to(device), ema.scheduler, images, device)
        run.log_metrics({"eval_loss": loss}, step=step)
        grid = workdir / "samples" / f"step-{step}.png"
        grid.parent.mkdir(exist_ok=True)
        save_preview(ema, grid)
        run.log_artifact_now(grid, "samples")
        log.info("step %d: checkpoint logged, eval_loss %.5f", step, loss)

    return on_checkpoint


def log_checkpoint(run: StageRun, path: Path) -> None:
    """Upload ``ema.json`` last: a checkpoint artifact holding it is complete even if the run is killed mid-upload."""
    dest = f"checkpoints/{path.name}"
    for item in sorted(path.iterdir()):
        if item.name != CHECKPOINT_DONE:
            run.log_artifact_now(item, f"{dest}/{item.name}" if item.is_dir() else dest)
    run.log_artifact_now(path / CHECKPOINT_DONE, dest)
