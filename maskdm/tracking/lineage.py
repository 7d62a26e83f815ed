"""Lineage: the tags and params every stage run carries, the code version it was made by, run
references, and upstream resolution (:func:`get_upstream`): the one place that looks runs up by
lineage."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from maskdm.errors import MaskDMError


STAGE_TAG = "maskdm.stage"
UPSTREAM_TAG_PREFIX = "maskdm.upstream."
#: The original dense model every run descends from, as something :func:`load_model_ref` opens.
MODEL_URI_TAG = "maskdm.model_uri"
CODE_VERSION_TAG = "maskdm.code_version"
#: Marks a ``pretrain`` run made with the demo configuration; ``model=demo`` resolves to the one
#: holding the shipped demo model (:func:`demo_model_run_id`).
DEMO_TAG = "maskdm.demo"
#: On the run of the shipped demo model: the digest of its files (:func:`maskdm.ddpm.demo_model.demo_model_digest`).
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
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # maskdm/ (this file: maskdm/tracking/lineage.py)


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


def _experiment_id() -> str | None:
    run = mlflow.active_run()
    return run.info.experiment_id if run else None
