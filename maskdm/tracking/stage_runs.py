"""Opening a stage run (:func:`stage_run`): lineage copied from upstream, params, tags, system
metrics, and artifacts logged only when the stage succeeds (:class:`StageRun`)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from maskdm import liveness
from maskdm.errors import MaskDMError
from maskdm.tracking.dead_runs import _heartbeat
from maskdm.tracking.demo_model import demo_model_run_id
from maskdm.tracking.lineage import (
    CODE_VERSION_TAG, EXPERIMENT_KIND_TAG, LINEAGE_PARAMS, MASKS_SOURCE_TAG, MODEL_TRAINING_KIND, MODEL_URI_TAG,
    REPLICATE_SEEDS, REPLICATE_TAG, STAGE_TAG, UPSTREAM_TAG_PREFIX, Upstream, client, code_version, get_upstream,
    is_run_ref, masks_source_of, parse_run_ref, replicate_of,
)

log = logging.getLogger("maskdm.tracking")


def mark_model_training(experiment_id: str) -> None:
    """Tag the experiment ``mlflow.experimentKind=custom_model_development`` (model training, not GenAI).

    A kind someone chose (``genai_development``, or this one) is left alone; an absent, empty or
    UI-inferred (``*_inferred``, ``no_inferred_type``) kind is replaced. A store that refuses the
    tag (no permission on a shared server) only costs the UI default, so it is a warning.
    """
    mlflow_client = client()
    try:
        kind = mlflow_client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG, "")
        if not kind or kind.endswith("_inferred") or kind == "no_inferred_type":
            mlflow_client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    except MlflowException as exc:
        log.warning("cannot tag experiment %s %s=%s: %s", experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, exc)


def runs_view_url(tracking_uri: str, experiment_id: str) -> str:
    """The link that opens the experiment on its runs in MLflow 3's UI ("Model training" mode).

    MLflow 3.17's UI picks GenAI or Model training from the link's ``workflowType`` (else from the
    browser's last choice, GenAI at first), not from the experiment's kind tag (checked in a
    browser: docs/details/report_promote.md). For a local store: where ``mlflow ui`` serves it
    by default.
    """
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


class StageRun:
    """The MLflow run of one stage invocation; see the module docstring."""

    def __init__(self, stage: str, run: mlflow.ActiveRun):
        self.stage = stage
        self.run = run
        self.run_id = run.info.run_id
        self.out = Path(tempfile.mkdtemp(prefix=f"maskdm-{stage}-out-"))
        self._params = dict(client().get_run(self.run_id).data.params)

    # -- logging ---------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, object]) -> None:
        """Log params not yet on the run. ``mlflow run`` logs the -P values itself, as typed.

        ``None`` and ``""`` mean "not given": not logged, so the lineage value can take the key later.
        """
        fresh = {k: _param_str(v) for k, v in params.items() if k not in self._params and v not in (None, "")}
        if fresh:
            mlflow.log_params(fresh)
            self._params.update(fresh)

    def param(self, key: str) -> str | None:
        return self._params.get(key)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: Mapping[str, object]) -> None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact_now(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Log immediately (checkpoints): for what must survive if the run is killed later."""
        local_path = Path(local_path)
        if local_path.is_dir():
            mlflow.log_artifacts(str(local_path), artifact_path)
        else:
            mlflow.log_artifact(str(local_path), artifact_path)

    def log_image(self, image, key: str, step: int) -> None:
        """Log a picture (a PNG path, PIL image or uint8 array) under ``key`` at ``step``: the run
        page's Images panel shows each key with a slider over the steps."""
        if isinstance(image, (str, os.PathLike)):
            from PIL import Image

            with Image.open(image) as opened:
                image = opened.convert("RGB")
        mlflow.log_image(image, key=key, step=int(step), synchronous=True)

    def delete_artifacts(self, artifact_path: str) -> None:
        """Delete a logged artifact (file or folder) of this run: bounded checkpoints.

        Through the artifact repository of the run's store (local folder, S3, ...); one that cannot
        delete raises MLflow's error.
        """
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(self.run.info.artifact_uri).delete_artifacts(artifact_path)

    # -- lineage ---------------------------------------------------------------------------------
    def upstream(
        self, run_ref: str, accepted_stages: Iterable[str], artifacts: str | Iterable[str] | None, what: str
    ) -> Upstream:
        """Resolve and check an upstream run, then take on its lineage."""
        up = get_upstream(run_ref, accepted_stages, artifacts, what)
        self.adopt_lineage(up)
        return up

    def adopt_lineage(self, up: Upstream) -> None:
        tags = {f"{UPSTREAM_TAG_PREFIX}{stage}": run_id for stage, run_id in up.lineage.items()}
        if MODEL_URI_TAG in up.tags:
            tags[MODEL_URI_TAG] = up.tags[MODEL_URI_TAG]
        source = masks_source_of({*up.lineage, self.stage})
        if source:
            tags[MASKS_SOURCE_TAG] = source
        if self.stage not in REPLICATE_SEEDS and REPLICATE_TAG in up.tags:
            tags[REPLICATE_TAG] = up.tags[REPLICATE_TAG]  # fid of a replicate's sample, promote of its finetune
        self.set_tags(tags)
        self.log_params({k: up.params[k] for k in LINEAGE_PARAMS if k in up.params})

    def resolve_model(self, ref: str):
        """Open ``ref`` (hub id, local folder, run ID, ``runs:/<id>/model`` or ``demo``) and record it."""
        from maskdm.ddpm.models import load_ddpm

        ref = str(ref).strip()
        if ref == "demo":
            ref = demo_model_run_id()
        if is_run_ref(ref):
            run_id, path = parse_run_ref(ref)
            up = get_upstream(run_id, MODEL_STAGES, path or "model", "model")
            self.adopt_lineage(up)
            self.set_tags({MODEL_URI_TAG: up.tags.get(MODEL_URI_TAG, f"runs:/{run_id}/model")})
            return load_ddpm(str(up.download(path or "model")))
        ddpm = load_ddpm(ref)
        self.set_tags({MODEL_URI_TAG: os.path.abspath(os.path.expanduser(ref)) if os.path.exists(os.path.expanduser(ref)) else ref})
        return ddpm

    def load_lineage_model(self, override: str | None = None):
        """The original dense model of this run's lineage (or ``override``), e.g. for baseline_loss."""
        from maskdm.ddpm.models import load_ddpm

        if override:
            return self.resolve_model(override)
        ref = client().get_run(self.run_id).data.tags.get(MODEL_URI_TAG)
        if not ref:
            raise MaskDMError("the upstream lineage records no original model; pass original_model explicitly")
        if is_run_ref(ref):
            run_id, path = parse_run_ref(ref)
            return load_ddpm(str(get_upstream(run_id, MODEL_STAGES, path or "model", "original model").download(path or "model")))
        return load_ddpm(ref)

    # -- models ----------------------------------------------------------------------------------
    def log_model(self, ddpm, dataset, device="cpu", step: int | None = None) -> float:
        """Save ``ddpm`` to ``out/model`` (logged on success) and log its ``eval_loss``.

        ``dataset`` is a dataset name or an already loaded evaluation split.
        """
        from maskdm.ddpm.data import load_dataset
        from maskdm.ddpm.diffusion import eval_images, eval_loss
        from maskdm.ddpm.models import save_ddpm

        if isinstance(dataset, str):
            if ddpm.is_latent:  # its UNet would take the images for latents without a word
                raise MaskDMError("a latent model's eval_loss needs its latents: pass the loaded latent dataset, not a dataset name")
            dataset = load_dataset(dataset, ddpm.resolution, split="eval")
        save_ddpm(ddpm, self.out / "model")
        loss = eval_loss(ddpm.unet.to(device), ddpm.scheduler, eval_images(dataset), device)
        self.log_metrics({"eval_loss": loss}, step=step)
        return loss


#: Stages whose runs hold a ``model/`` pipeline folder.
MODEL_STAGES = ("pretrain", "prune", "train_masks", "finetune")


def _param_str(value: object) -> str:
    if isinstance(value, bool):  # as MLproject spells them, so CLI and `mlflow run` runs match
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


#: Stages long enough for MLflow's system metrics (``system/cpu_utilization_percentage``, memory,
#: GPU utilisation and memory where NVIDIA's management library is installed) to show something.
SYSTEM_METRICS_STAGES = ("pretrain", "baseline_loss", "train_masks", "finetune", "sample", "fid")
#: ``false`` turns the system metrics of the stages above off for a run, ``true`` on for any stage.
SYSTEM_METRICS_ENV = "MASKDM_SYSTEM_METRICS"
#: Seconds between samples unless ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` says otherwise: MLflow's
#: default; its cost is below what can be measured (benchmarks/bench_system_metrics.py).
SYSTEM_METRICS_INTERVAL_S = 10.0


def system_metrics_on(stage: str) -> bool:
    """Whether ``stage``'s run logs MLflow's system metrics (:data:`SYSTEM_METRICS_ENV`)."""
    value = os.environ.get(SYSTEM_METRICS_ENV, "").strip().lower()
    if value in ("", "auto"):
        on = stage in SYSTEM_METRICS_STAGES
    elif value in ("true", "1", "yes", "false", "0", "no"):
        on = value in ("true", "1", "yes")
    else:
        raise MaskDMError(f"{SYSTEM_METRICS_ENV} must be true, false or auto, not '{value}'")
    if on and not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    return on


@contextmanager
def stage_run(stage: str, params: Mapping[str, object]):
    """Open (or, under ``mlflow run``, continue) the run of ``stage``; end it FINISHED or FAILED.

    On success the files under ``run.out`` are logged as artifacts; on any exception nothing more
    is logged, the run is marked FAILED (KILLED for Ctrl-C) and the exception propagates.
    """
    active = mlflow.start_run(log_system_metrics=system_metrics_on(stage))
    run = StageRun(stage, active)
    mark_model_training(active.info.experiment_id)
    heartbeat = _heartbeat(run.run_id)
    try:
        # The process working on the run, so that `maskdm reap` and the driver can tell when it died.
        run.set_tags({STAGE_TAG: stage, CODE_VERSION_TAG: code_version(), **liveness.process_tags()})
        replicate = replicate_of(stage, params)
        if replicate is not None:
            run.set_tags({REPLICATE_TAG: replicate})
        heartbeat.start()
        try:
            run.log_params(params)
            yield run
            if any(run.out.iterdir()):
                mlflow.log_artifacts(str(run.out))
        finally:
            heartbeat.stop()
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
    finally:
        shutil.rmtree(run.out, ignore_errors=True)
