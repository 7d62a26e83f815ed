"""MLflow lineage: the one module that opens stage runs and resolves upstream runs.

A stage run carries the tag ``maskdm.stage``, the tags ``maskdm.upstream.<stage>`` = run ID for
every ancestor, and the lineage params (:data:`LINEAGE_PARAMS`) copied from upstream, so runs of
one stage can be charted against ``pruning_ratio`` in the MLflow UI without joins.

Artifacts a stage produces go to :attr:`StageRun.out` and are logged only when the stage succeeds,
so a failed run holds no half-written outputs. Checkpoints, which must survive a kill, are logged
as they are written (:meth:`StageRun.log_artifact_now`).

No other module talks to the MLflow client for lineage or upstream lookups.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from maskdm import liveness
from maskdm.errors import MaskDMError

log = logging.getLogger(__name__)

STAGE_TAG = "maskdm.stage"
UPSTREAM_TAG_PREFIX = "maskdm.upstream."
#: The original dense model every run descends from, as something :func:`load_model_ref` opens.
MODEL_URI_TAG = "maskdm.model_uri"
CODE_VERSION_TAG = "maskdm.code_version"
#: Marks a ``pretrain`` run made with the demo configuration; ``model=demo`` resolves to the one
#: holding the shipped demo model (:func:`demo_model_run_id`).
DEMO_TAG = "maskdm.demo"
#: On the run of the shipped demo model: the digest of its files (:func:`maskdm.models.demo_model_digest`).
DEMO_DIGEST_TAG = "maskdm.demo_digest"
LINEAGE_PARAMS = ("model", "dataset", "pruning_ratio", "pruner", "pattern")
#: Where the masks of a finetuned model came from, set on the finetune run and on every run
#: descending from it (sample, fid, promote): ``train_masks`` (learned) or ``extract_masks``
#: (the pruning masks, no mask training). Derived from the lineage by :func:`masks_source_of`.
MASKS_SOURCE_TAG = "maskdm.masks_source"
MASKS_SOURCES = ("train_masks", "extract_masks")
#: Which replicate of a sweep a run belongs to (``main --seeds``): the offset of its own seed from
#: the seed replicate 0 uses (:data:`REPLICATE_SEEDS`), set by :func:`stage_run` from the run's
#: parameters, so a hand-made run is tagged like the driver's. A run of a stage without a
#: replicated seed (fid, promote) takes its upstream run's tag; prune, extract_masks and
#: baseline_loss are shared by every replicate and carry none.
REPLICATE_TAG = "maskdm.replicate"
#: ``{stage: (seed parameter, its value in replicate 0)}``: the stochastic stages a replicate
#: re-runs (mask sampling, finetune data order and noise, sampling noise). The values are the
#: MLproject defaults (a test holds them equal), so a run with default seeds is replicate 0.
REPLICATE_SEEDS = {"train_masks": ("mask_seed", 0), "finetune": ("seed", 0), "sample": ("seed", 42)}
#: The experiment tag where MLflow 3 records what kind an experiment is; ``custom_model_development``
#: is "Machine learning" (runs), ``genai_development`` GenAI (traces). MLflow 3.17's UI picks its
#: view from the link instead (:func:`runs_view_url`); the tag says what the experiment is.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_PACKAGE_ROOT = Path(__file__).resolve().parent


#: Project files besides the ``.py`` sources that decide what a stage run does: the entry points'
#: commands and parameter defaults, and the environment they run in.
CODE_VERSION_FILES = ("MLproject", "conda.yaml")


def code_version(project_dir: str | os.PathLike | None = None) -> str:
    """A digest of what a cached run must have been made by: every ``.py`` file under ``maskdm/``
    and ``entrypoints/`` and the files :data:`CODE_VERSION_FILES` (an absent one counts as absent),
    each with its path. ``project_dir``: the project folder (default: the one this module is in)."""
    root = Path(project_dir) if project_dir is not None else _PACKAGE_ROOT.parent
    files = [p for package in ("maskdm", "entrypoints") for p in sorted((root / package).rglob("*.py"))]
    files += [root / name for name in CODE_VERSION_FILES]
    digest = hashlib.sha256()
    for path in files:
        data = path.read_bytes() if path.is_file() else None
        # Length-prefixed, so that no two trees give the same byte stream.
        header = f"{path.relative_to(root).as_posix()}\0{-1 if data is None else len(data)}\0"
        digest.update(header.encode())
        digest.update(data or b"")
    return digest.hexdigest()[:16]


def client() -> MlflowClient:
    return MlflowClient()


def parse_run_ref(ref: str) -> tuple[str, str | None]:
    """``<id>`` -> (id, None); ``runs:/<id>/<path>`` -> (id, path)."""
    if ref.startswith("runs:/"):
        run_id, _, path = ref[len("runs:/"):].partition("/")
        return run_id, path or None
    return ref, None


def is_run_ref(ref: str) -> bool:
    return ref.startswith("runs:/") or bool(_RUN_ID.match(ref))


@dataclass
class Upstream:
    """A FINISHED upstream run that passed the contract's checks."""

    run_id: str
    stage: str
    params: dict[str, str]
    tags: dict[str, str]

    @property
    def lineage(self) -> dict[str, str]:
        """``{stage: run_id}`` for this run and every ancestor."""
        found = {k[len(UPSTREAM_TAG_PREFIX):]: v for k, v in self.tags.items() if k.startswith(UPSTREAM_TAG_PREFIX)}
        found[self.stage] = self.run_id
        return found

    def download(self, artifact_path: str, dst: str | os.PathLike | None = None) -> Path:
        dst = dst or tempfile.mkdtemp(prefix=f"maskdm-{self.stage}-")
        return Path(mlflow.artifacts.download_artifacts(run_id=self.run_id, artifact_path=artifact_path, dst_path=str(dst)))

    def has_artifact(self, artifact_path: str) -> bool:
        return has_artifact(self.run_id, artifact_path)


def lineage_stages(tags: Mapping[str, str]) -> set[str]:
    """The stages of a run's lineage, its own included, from its tags."""
    stages = {k[len(UPSTREAM_TAG_PREFIX):] for k in tags if k.startswith(UPSTREAM_TAG_PREFIX)}
    if tags.get(STAGE_TAG):
        stages.add(tags[STAGE_TAG])
    return stages


def masks_source_of(stages: Iterable[str]) -> str | None:
    """``train_masks`` or ``extract_masks`` for a finetune run or a run descending from one; else None.

    ``stages`` is the run's lineage (:func:`lineage_stages`). A finetune from learned masks has
    ``train_masks`` in its lineage (and ``extract_masks`` before it); one straight from the pruning
    masks has only ``extract_masks``. So a finetune made by hand is told apart like the driver's.
    """
    stages = set(stages)
    if "finetune" not in stages:
        return None
    return next((source for source in MASKS_SOURCES if source in stages), None)


def replicate_of(stage: str, params: Mapping[str, object]) -> int | None:
    """The replicate a ``stage`` run with these parameters belongs to: its seed's offset from
    replicate 0's (:data:`REPLICATE_SEEDS`); None for a stage without a replicated seed or a seed
    that is not an integer (the stage itself rejects that)."""
    if stage not in REPLICATE_SEEDS:
        return None
    key, base = REPLICATE_SEEDS[stage]
    value = params.get(key)
    try:
        return int(str(base if value in (None, "") else value).strip()) - base
    except ValueError:
        return None


def replicate_seed(base: int | str, replicate: int) -> str:
    """The seed replicate ``replicate`` of a stage runs with when replicate 0 runs with ``base``."""
    return str(int(str(base).strip()) + int(replicate))


def has_artifact(run_id: str, artifact_path: str) -> bool:
    parent, _, _ = artifact_path.rstrip("/").rpartition("/")
    listed = client().list_artifacts(run_id, parent or None)
    return any(f.path.rstrip("/") == artifact_path.rstrip("/") for f in listed)


def get_upstream(
    run_ref: str, accepted_stages: Iterable[str], artifacts: str | Iterable[str] | None, what: str
) -> Upstream:
    """Check that ``run_ref`` names an existing FINISHED run of an accepted stage holding ``artifacts``.

    ``what`` names the parameter in error messages (``prune_run_id``). Every failure is one line.
    """
    accepted = tuple(accepted_stages)
    run_id, _ = parse_run_ref(str(run_ref).strip())
    if not run_id:
        raise MaskDMError(f"{what} is required: pass the MLflow run ID of a {' or '.join(accepted)} run")
    try:
        run = client().get_run(run_id)
    except MlflowException:
        raise MaskDMError(
            f"{what}: run '{run_id}' does not exist in the tracking store {mlflow.get_tracking_uri()}"
        ) from None
    stage = run.data.tags.get(STAGE_TAG, "")
    if stage not in accepted:
        raise MaskDMError(
            f"{what}: run {run_id} is a '{stage or 'non-MaskDM'}' run; expected a {' or '.join(accepted)} run"
        )
    if run.info.status != "FINISHED":
        raise MaskDMError(f"{what}: run {run_id} ({stage}) is {run.info.status}, not FINISHED")
    for artifact in [artifacts] if isinstance(artifacts, str) else artifacts or ():
        if not has_artifact(run_id, artifact):
            raise MaskDMError(f"{what}: run {run_id} ({stage}) has no '{artifact}' artifact")
    return Upstream(run_id, stage, dict(run.data.params), dict(run.data.tags))


def find_runs(
    stage: str, tags: Mapping[str, str] | None = None, status: str = "FINISHED", experiment_ids=None,
    order_by: str = "attributes.start_time DESC",
) -> list:
    """Runs of ``stage`` with the given tags and status, newest first (or in ``order_by``), across the
    given (default: all) experiments."""
    clauses = [f"tags.`{STAGE_TAG}` = '{stage}'", f"attributes.status = '{status}'"]
    clauses += [f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items()]
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client().search_experiments()]
    return client().search_runs(
        experiment_ids, " and ".join(clauses), order_by=[order_by], max_results=50
    )


# --- cached side runs: results shared by many stage runs (FID reference statistics, classifiers) ---


def source_digest(*modules: str) -> str:
    """A digest of these modules' source: a cached side run is remade when the code that made it changes."""
    sha = hashlib.sha256()
    for module in modules:
        sha.update(Path(__import__(module, fromlist=["_"]).__file__).read_bytes())
    return sha.hexdigest()[:16]


def cached_artifact(
    stage_name: str, key_tag: str, key: str, artifact: str, keep_in: str | os.PathLike | None = None
) -> tuple[str, Path] | None:
    """(run ID, downloaded artifact) of the FIRST FINISHED ``stage_name`` run tagged ``key_tag=key``, if any.

    The first to finish, not the newest: two processes that find no cache and both make one (two
    drivers at once) must end up using the same one. Each looks again after logging its own, and
    the run that finished first is the same for both, whatever the order they started in.

    ``keep_in``: download into ``keep_in/<run ID>/`` once and reuse that copy (a run's artifacts
    never change), for artifacts too large to copy again for every stage; else a temporary folder.
    """
    for cached in find_runs(stage_name, {key_tag: key}, order_by="attributes.end_time ASC"):
        run_id = cached.info.run_id
        if has_artifact(run_id, artifact):
            log.info("reusing %s run %s (%s)", stage_name, run_id, key)
            if keep_in is not None:
                return run_id, _kept_copy(run_id, artifact, Path(keep_in))
            dst = tempfile.mkdtemp(prefix=f"maskdm-{stage_name}-")
            return run_id, Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=dst))
    return None


def _kept_copy(run_id: str, artifact: str, keep_in: Path) -> Path:
    folder = keep_in / run_id
    if not folder.is_dir():
        keep_in.mkdir(parents=True, exist_ok=True)
        # Downloaded beside it and renamed when complete: a copy cut off halfway is never taken.
        partial = Path(tempfile.mkdtemp(prefix=f".{run_id}-", dir=keep_in))
        try:
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(partial))
            os.rename(partial, folder)
        except OSError:
            if not folder.is_dir():  # else another process finished the same copy first
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return folder / artifact


@dataclass
class SideRun:
    """What a cache's maker hands :func:`cached_or_made` to log: the side run's params, metrics and files."""

    params: Mapping[str, object]
    metrics: Mapping[str, float]
    files: list[Path]


def cached_or_made(
    stage_name: str, key_tag: str, key: str, artifact: str, make: Callable[[Path], SideRun],
    keep_in: str | os.PathLike | None = None,
) -> tuple[str, Path]:
    """(run ID, local ``artifact``) of the ``stage_name`` cache run for ``key``; ``make(folder)``
    makes it (its files under ``folder``) when there is none, and it is logged as a side run.

    One process per machine and store makes it: the others wait on a lock file, then find it. So a
    ``--parallel`` sweep encodes a dataset or scores a reference once, not once per process.
    Processes on different machines sharing a store may each make one; :func:`cached_artifact`
    keeps them all on the first. A process killed while making it releases the lock (an flock).
    """
    found = cached_artifact(stage_name, key_tag, key, artifact, keep_in)
    if found is not None:
        return found
    with _machine_lock(stage_name, key):
        found = cached_artifact(stage_name, key_tag, key, artifact, keep_in)
        if found is not None:  # made by the process we waited for
            return found
        work = Path(tempfile.mkdtemp(prefix=f"maskdm-{stage_name}-"))
        try:
            made = make(work)
            run_id = log_side_run(stage_name, {key_tag: key}, made.params, made.metrics, made.files)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # the logged copy is the cache
        log.info("cached as %s run %s", stage_name, run_id)
    return cached_artifact(stage_name, key_tag, key, artifact, keep_in)


@contextmanager
def _machine_lock(stage_name: str, key: str):
    from filelock import FileLock, Timeout

    name = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{stage_name}|{key}".encode()).hexdigest()[:32]
    # Per user: a folder another user made first would refuse this one's lock files.
    user = os.getuid() if hasattr(os, "getuid") else getpass.getuser()  # a uid needs no passwd entry
    folder = Path(tempfile.gettempdir()) / f"maskdm-locks-{user}"
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / f"{name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is making this %s; waiting for it", stage_name)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def log_side_run(stage_name: str, tags: Mapping[str, str], params: Mapping[str, object], metrics: Mapping[str, float], files: list[Path]) -> str:
    """A FINISHED run of ``stage_name`` beside the active run (same experiment, not its child).

    Cache runs are shared by every later fid run, so they must not live and die with this one.
    """
    active = mlflow.active_run()
    experiment_id = active.info.experiment_id if active else None
    mlflow_client = client()
    # The process, as on a stage run: a side run whose process dies while logging it is ended by
    # `maskdm reap` (maskdm.liveness) instead of staying RUNNING.
    created = mlflow_client.create_run(experiment_id or "0", tags={STAGE_TAG: stage_name, **liveness.process_tags(), **tags})
    run_id = created.info.run_id
    heartbeat = _heartbeat(run_id).start()
    try:
        for key, value in params.items():
            mlflow_client.log_param(run_id, key, str(value))
        for key, value in metrics.items():
            mlflow_client.log_metric(run_id, key, float(value))
        for path in files:
            mlflow_client.log_artifact(run_id, str(path))
    except KeyboardInterrupt:
        heartbeat.stop()
        mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        heartbeat.stop()
        mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    heartbeat.stop()
    mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run_id


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


def _experiment_id() -> str | None:
    run = mlflow.active_run()
    return run.info.experiment_id if run else None


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
        from maskdm.models import load_ddpm

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
        from maskdm.models import load_ddpm

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
        from maskdm.data import load_dataset
        from maskdm.diffusion import eval_images, eval_loss
        from maskdm.models import save_ddpm

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


# --- runs whose process died ----------------------------------------------------------------------


def _heartbeat(run_id: str) -> liveness.Heartbeat:
    beat_client = client()
    return liveness.Heartbeat(
        lambda: beat_client.set_tag(run_id, liveness.HEARTBEAT_TAG, str(int(time.time()))), liveness.heartbeat_interval()
    )


def running_runs(experiment_ids: Iterable[str] | None = None, filter_string: str = "") -> list:
    """Every RUNNING run of these experiments (default: all) that also matches ``filter_string``."""
    mlflow_client = client()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in mlflow_client.search_experiments()]
    experiment_ids = list(experiment_ids)
    query = " and ".join(["attributes.status = 'RUNNING'", *([filter_string] if filter_string else [])])
    found, token = [], None
    while experiment_ids:
        page = mlflow_client.search_runs(
            experiment_ids, query, order_by=["attributes.start_time ASC"], max_results=1000, page_token=token
        )
        found.extend(page)
        token = page.token
        if not token:
            break
    return found


@dataclass
class RunCheck:
    """A RUNNING run, the verdict on its process, and whether it was marked KILLED for it."""

    run: object
    verdict: liveness.Verdict
    ended: bool = False


def end_dead_runs(
    runs: Iterable, ended_by: str, stale_after: float | None = None, dry_run: bool = False
) -> list[RunCheck]:
    """Judge each RUNNING run (:func:`maskdm.liveness.judge`); mark the dead ones KILLED unless ``dry_run``.

    A run marked KILLED gets the tags ``maskdm.ended_by`` = ``ended_by`` and ``maskdm.killed_reason``,
    and as its end time the moment it was last known alive. Each run is read again just before it
    is marked, and left alone if it has ended or sent a heartbeat meanwhile.
    """
    mlflow_client = client()
    checks = []
    for run in runs:
        check = RunCheck(run, liveness.judge(run.data.tags, run.info.start_time / 1000, stale_after=stale_after))
        checks.append(check)
        if dry_run or not check.verdict.dead:
            continue
        run_id = run.info.run_id
        fresh = mlflow_client.get_run(run_id)
        beat = liveness.HEARTBEAT_TAG
        if fresh.info.status != "RUNNING" or fresh.data.tags.get(beat) != run.data.tags.get(beat):
            check.verdict = liveness.Verdict(False, "it ended or sent a heartbeat while being judged", check.verdict.last_seen)
            continue
        mlflow_client.set_tag(run_id, liveness.ENDED_BY_TAG, ended_by)
        mlflow_client.set_tag(run_id, liveness.KILLED_REASON_TAG, check.verdict.reason)
        end_ms = max(int(check.verdict.last_seen * 1000), run.info.start_time)
        mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED), end_time=end_ms)
        check.ended = True
        log.warning("marked run %s KILLED: %s", run_id, check.verdict.reason)
    return checks


# --- the demo model -------------------------------------------------------------------------------


def demo_model_run_id(experiment_id: str | None = None) -> str:
    """The run of the shipped demo model in this tracking store; registered first if there is none.

    The package ships the demo model (:data:`maskdm.models.DEMO_MODEL_DIR`), so every store and
    machine prunes the same weights; it is logged once per store as a FINISHED ``pretrain`` run
    tagged ``maskdm.demo=true`` and ``maskdm.demo_digest=<digest of the files>``, with its recipe
    as params and the weights as its ``model/`` artifact, so lineage runs back to it as to a trained
    one. Demo runs trained by earlier versions (another digest, or none) are not used.
    ``experiment_id``: where to register it (default: the active run's experiment, else ``0``).
    """
    from maskdm.models import demo_model_digest

    digest = demo_model_digest()
    tags = {DEMO_TAG: "true", DEMO_DIGEST_TAG: digest}
    runs = find_runs("pretrain", tags)
    if runs:
        return runs[0].info.run_id
    with _machine_lock("pretrain", digest):
        runs = find_runs("pretrain", tags)  # registered by the process we waited for
        if runs:
            return runs[0].info.run_id
        return _register_demo_model(digest, experiment_id or _experiment_id() or "0")


def _register_demo_model(digest: str, experiment_id: str) -> str:
    from maskdm.models import DEMO_MODEL_DIR, DEMO_RECIPE_FILE, demo_recipe

    recipe = demo_recipe()
    mlflow_client = client()
    created = mlflow_client.create_run(experiment_id, tags={STAGE_TAG: "pretrain", DEMO_TAG: "true", DEMO_DIGEST_TAG: digest})
    run_id = created.info.run_id
    try:
        params = {**recipe["params"], "torch_threads": recipe["torch_threads"], "model": "demo", "pruning_ratio": 0,
                  "pruner": "none", "pattern": "dense"}
        mlflow_client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        mlflow_client.set_tag(run_id, MODEL_URI_TAG, f"runs:/{run_id}/model")
        for key in ("code_commit", "code_version", "torch_version"):
            mlflow_client.set_tag(run_id, f"maskdm.demo_{key}", str(recipe.get(key, "")))
        for key, value in recipe.get("metrics", {}).items():
            mlflow_client.log_metric(run_id, key, float(value))
        mlflow_client.log_artifacts(run_id, str(DEMO_MODEL_DIR), "model")
        mlflow_client.log_artifact(run_id, str(DEMO_RECIPE_FILE))
    except BaseException:
        mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    log.info("registered the shipped demo model in %s as run %s", mlflow.get_tracking_uri(), run_id)
    return run_id
