"""The MLflow Model Registry side of MaskDM: a finetuned model as a pyfunc image generator.

A registered version is a pyfunc model logged from code (:data:`MODEL_CODE`, so loading it
unpickles nothing) whose artifact ``pipeline`` is the finetune run's diffusers pipeline folder and
whose ``code/`` holds a copy of this ``maskdm`` package, so it loads wherever its pip requirements
are installed, with the code that registered it. ``predict`` takes a DataFrame with integer
columns ``num_images``, ``ddim_steps`` and ``seed`` (one row per request) and returns one uint8
NHWC array: the images of all rows, in row order (row ``i``'s images are those
``sample --seed <seed> --ddim_steps <ddim_steps>`` makes as its first ``num_images`` images).

Versions are keyed by the finetune run they hold (version tag ``finetune_run_id``), so registering
a run twice gives the same version. Whether the alias moves is :func:`decide`'s pure rule.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from maskdm.errors import MaskDMError
from maskdm.report import FidScore, RunRecord, collect_scores, concat_frames, is_fid_metric, run_records, runs_by_id
from maskdm.tracking import STAGE_TAG, UPSTREAM_TAG_PREFIX, get_upstream

log = logging.getLogger(__name__)

PIPELINE_ARTIFACT = "pipeline"
INPUT_COLUMNS = ("num_images", "ddim_steps", "seed")
#: ``model_config`` of a registered model; override at load with ``mlflow.pyfunc.load_model(uri, model_config=...)``.
DEFAULT_MODEL_CONFIG = {"batch_size": 64, "device": "auto"}
#: The version tag that names the finetune run a version holds (the idempotency key).
FINETUNE_RUN_TAG = "finetune_run_id"
RESERVED_ALIASES = ("latest",)
#: The distributions the pyfunc model imports (pinned to the installed versions when logged).
REQUIREMENTS = ("mlflow", "torch", "torchvision", "diffusers", "numpy", "pandas", "pillow", "safetensors", "tqdm")

MODEL_CODE = '''"""MaskDM image generator: the models-from-code entry MLflow executes to load the pyfunc model."""
import mlflow

from maskdm.registry import DDPMImageGenerator

mlflow.models.set_model(DDPMImageGenerator())
'''


# --------------------------------------------------------------------------------------------
# The pyfunc model


@dataclass(frozen=True)
class GenerationRequest:
    num_images: int
    ddim_steps: int
    seed: int


def _as_int(value: object, column: str, row: int) -> int:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        raise MaskDMError(f"row {row}: {column} must be an integer, got {value!r}")
    return int(number)


def parse_requests(model_input: pd.DataFrame | Mapping) -> list[GenerationRequest]:
    """One request per row of a DataFrame with integer columns num_images (>= 1), ddim_steps (>= 1), seed (>= 0)."""
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise MaskDMError(f"the input needs columns {', '.join(INPUT_COLUMNS)}; missing {', '.join(missing)}")
    if frame.empty:
        raise MaskDMError("the input has no rows: pass one row per request (num_images, ddim_steps, seed)")
    requests = []
    for row, values in enumerate(frame[list(INPUT_COLUMNS)].itertuples(index=False)):
        request = GenerationRequest(*(_as_int(v, c, row) for v, c in zip(values, INPUT_COLUMNS)))
        if request.num_images < 1:
            raise MaskDMError(f"row {row}: num_images must be at least 1, got {request.num_images}")
        if request.ddim_steps < 1:
            raise MaskDMError(f"row {row}: ddim_steps must be at least 1, got {request.ddim_steps}")
        if request.seed < 0:
            raise MaskDMError(f"row {row}: seed must be at least 0, got {request.seed}")
        requests.append(request)
    return requests


def generate(ddpm, requests: Sequence[GenerationRequest], batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """The images of all requests as one uint8 NHWC array, in request order."""
    from maskdm.sampling import sample_images

    images = [
        sample_images(
            ddpm.unet, ddpm.scheduler.config, range(r.num_images),
            steps=r.ddim_steps, seed=r.seed, batch_size=min(batch_size, r.num_images), device=device,
        )
        for r in requests
    ]
    return np.concatenate(images)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class DDPMImageGenerator(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame(num_images, ddim_steps, seed) -> uint8 NHWC images (see the module doc)."""

    def load_context(self, context) -> None:
        from maskdm.models import load_ddpm

        config = {**DEFAULT_MODEL_CONFIG, **(context.model_config or {})}
        self.ddpm = load_ddpm(os.path.abspath(context.artifacts[PIPELINE_ARTIFACT]))
        self.batch_size = int(config["batch_size"])
        self.device = resolve_device(str(config["device"]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        return generate(self.ddpm, parse_requests(model_input), self.batch_size, self.device)


def generation_signature(height: int, width: int, channels: int):
    """Input: long columns num_images, ddim_steps, seed. Output: a uint8 tensor (-1, H, W, C)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("long", name) for name in INPUT_COLUMNS]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, height, width, channels))]),
    )


def input_example() -> pd.DataFrame:
    """The smallest request: logged with the model, and run once when it is logged as a check."""
    return pd.DataFrame({"num_images": [1], "ddim_steps": [1], "seed": [0]}, dtype=np.int64)


def pinned_requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            # A local version label (2.5.1+cpu) names a wheel index, not a version pip can resolve.
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_pyfunc_model(pipeline_dir: str | os.PathLike, name: str = "model"):
    """Log the pipeline folder as a pyfunc image generator in the active run; returns the ModelInfo."""
    from diffusers import UNet2DModel

    config = UNet2DModel.load_config(str(pipeline_dir), subfolder="unet")
    size = config["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    with tempfile.TemporaryDirectory(prefix="maskdm-pyfunc-") as tmp:
        code_file = Path(tmp) / "maskdm_generator.py"
        code_file.write_text(MODEL_CODE)
        package = Path(tmp) / "maskdm"
        shutil.copytree(Path(__file__).resolve().parent, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code_file),
            artifacts={PIPELINE_ARTIFACT: str(pipeline_dir)},
            code_paths=[str(package)],
            signature=generation_signature(int(height), int(width), int(config["in_channels"])),
            input_example=input_example(),
            pip_requirements=pinned_requirements(),
            model_config=dict(DEFAULT_MODEL_CONFIG),
        )


# --------------------------------------------------------------------------------------------
# Candidates: finetune runs and their FIDs


@dataclass(frozen=True)
class Candidate:
    """A FINISHED finetune run with a model/ artifact and its FIDs."""

    run_id: str
    fids: Mapping[str, FidScore]
    sparsity: float | None
    params: Mapping[str, str]
    lineage: Mapping[str, str]
    start_time: float = 0.0

    def fid(self, metric: str) -> float | None:
        score = self.fids.get(metric)
        return score.value if score else None


def check_metric(metric: str) -> str:
    metric = metric.strip()
    if not is_fid_metric(metric):
        raise MaskDMError(f"metric must be 'fid' or 'fid_<feature extractor>' (e.g. fid_shapes), got '{metric}'")
    return metric


def _scored_runs(fid_filter: str) -> pd.DataFrame:
    """FINISHED fid runs (any experiment) matching ``fid_filter``, with their sample runs."""
    fids = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{STAGE_TAG}` = 'fid' and attributes.status = 'FINISHED' and {fid_filter}",
    )
    column = f"tags.{UPSTREAM_TAG_PREFIX}sample"
    sample_ids = set(fids[column].dropna()) if column in fids.columns else set()
    return concat_frames([fids, runs_by_id(sample_ids) if sample_ids else None])


def fid_scores(finetune_run_id: str | None = None) -> dict:
    """``{model run id: ModelScores}`` from the fid runs of one finetune run (or of every finetune run)."""
    tag = f"tags.`{UPSTREAM_TAG_PREFIX}finetune`"
    fid_filter = f"{tag} = '{finetune_run_id}'" if finetune_run_id else f"{tag} LIKE '%'"
    return collect_scores(run_records(_scored_runs(fid_filter)))


def candidate(run_ref: str, metric: str) -> Candidate:
    """The finetune run ``run_ref`` as a candidate; a one-line MaskDMError if it cannot be one."""
    up = get_upstream(run_ref, ["finetune"], "model", "finetune_run_id")
    scores = fid_scores(up.run_id).get(up.run_id)
    fids = dict(scores.fids) if scores else {}
    if metric not in fids:
        others = f"; it has {', '.join(sorted(fids))}: pass metric=<one of them>" if fids else ""
        raise MaskDMError(
            f"finetune run {up.run_id} has no FID '{metric}': run `maskdm sample --model_run_id {up.run_id}` "
            f"and `maskdm fid` on that sample run first{others}"
        )
    run = mlflow.MlflowClient().get_run(up.run_id)
    record = RunRecord(up.run_id, up.stage, up.params, dict(run.data.metrics), up.tags, run.info.start_time / 1000, None)
    return _candidate_of(record, fids)


def _candidate_of(record: RunRecord, fids: Mapping[str, FidScore]) -> Candidate:
    return Candidate(
        run_id=record.run_id,
        fids=fids,
        sparsity=record.metrics.get("sparsity"),
        params=dict(record.params),
        lineage=record.lineage,
        start_time=record.start_time,
    )


def best_candidate(experiment_ids: Sequence[str], metric: str, min_sparsity: float = 0.0) -> Candidate:
    """The lowest-``metric`` FINISHED finetune run with sparsity >= ``min_sparsity`` in these experiments.

    Ties go to the sparser, then the newer run. A run that logged no ``sparsity`` counts only
    when ``min_sparsity`` is 0.
    """
    finetunes = run_records(mlflow.search_runs(
        list(experiment_ids), filter_string=f"tags.`{STAGE_TAG}` = 'finetune' and attributes.status = 'FINISHED'"
    ))
    scores = fid_scores()
    pool = []
    for record in finetunes.values():
        score = scores.get(record.run_id)
        sparsity = record.metrics.get("sparsity")
        if score and metric in score.fids and (min_sparsity <= 0 or (sparsity is not None and sparsity >= min_sparsity)):
            pool.append(_candidate_of(record, dict(score.fids)))
    if not pool:
        raise MaskDMError(
            f"no FINISHED finetune run with a '{metric}' FID and sparsity >= {min_sparsity:g} in experiment(s) "
            f"{', '.join(experiment_ids)}: run sample and fid on a finetune run first, or lower min_sparsity"
        )
    best = min(pool, key=lambda c: (c.fid(metric), -(c.sparsity or 0.0), -c.start_time))
    get_upstream(best.run_id, ["finetune"], "model", "finetune_run_id")  # it must hold its model
    return best


# --------------------------------------------------------------------------------------------
# Registering and the alias


def check_names(registered_model: str, alias: str) -> None:
    if not registered_model.strip():
        raise MaskDMError("registered_model must not be empty")
    alias = alias.strip()
    # MLflow reserves these: 'latest' and v<number> name versions, not aliases.
    if not alias or alias.lower() in RESERVED_ALIASES or (alias[:1] in "vV" and alias[1:].isdigit()):
        raise MaskDMError(f"alias '{alias}' is not allowed: it must be non-empty, not 'latest' and not v<number>")


def version_tags(candidate: Candidate, metric: str, promote_run_id: str | None = None) -> dict[str, str]:
    """The tags a version carries: every FID of the run, sparsity, the lineage params and run IDs."""
    tags = {name: repr(score.value) for name, score in candidate.fids.items()}
    primary = candidate.fids[metric]
    tags.update({
        FINETUNE_RUN_TAG: candidate.run_id,
        "fid_run_id": primary.fid_run_id,
        "sample_run_id": primary.sample_run_id or "",
        "mask_training": "true" if "train_masks" in candidate.lineage else "false",
    })
    if candidate.sparsity is not None:
        tags["sparsity"] = repr(candidate.sparsity)
    for key in ("pruning_ratio", "pruner", "pattern", "model", "dataset"):
        if key in candidate.params:
            tags[key] = candidate.params[key]
    for stage, run_id in candidate.lineage.items():
        if stage != "finetune":
            tags[f"{stage}_run_id"] = run_id
    if promote_run_id:
        tags["promote_run_id"] = promote_run_id
    return tags


def _registry_error(exc: MlflowException) -> MaskDMError:
    return MaskDMError(f"model registry: {' '.join(str(exc.message).split())}")


def find_version(registered_model: str, finetune_run_id: str):
    """The (oldest) version of ``registered_model`` tagged with this finetune run, or None."""
    client = mlflow.MlflowClient()
    escaped = registered_model.replace("'", "\\'")
    try:
        versions = client.search_model_versions(f"name = '{escaped}'")
    except MlflowException:
        return None
    matches = [v for v in versions if v.tags.get(FINETUNE_RUN_TAG) == finetune_run_id]
    return min(matches, key=lambda v: int(v.version)) if matches else None


def register(candidate: Candidate, registered_model: str, metric: str, promote_run_id: str | None = None):
    """``(ModelVersion, created)``: the version holding ``candidate``, registered if there is none.

    An existing version gets its FID tags refreshed (a newer fid run may have scored the run) and
    nothing else: no second version, no second logged model. Needs an active run to log into.
    """
    client = mlflow.MlflowClient()
    tags = version_tags(candidate, metric, promote_run_id)
    existing = find_version(registered_model, candidate.run_id)
    try:
        if existing is not None:
            fid_keys = [*candidate.fids, "fid_run_id", "sample_run_id"]
            for key in fid_keys:
                client.set_model_version_tag(registered_model, existing.version, key, tags[key])
            return client.get_model_version(registered_model, existing.version), False
        with tempfile.TemporaryDirectory(prefix="maskdm-promote-") as tmp:
            up = get_upstream(candidate.run_id, ["finetune"], "model", "finetune_run_id")
            info = log_pyfunc_model(up.download("model", tmp))
        return mlflow.register_model(info.model_uri, registered_model, tags=tags), True
    except MlflowException as exc:
        raise _registry_error(exc) from None


@dataclass(frozen=True)
class Holder:
    """The version an alias points at and its FID tag for the metric compared."""

    version: str
    fid: float | None


def alias_holder(registered_model: str, alias: str, metric: str) -> Holder | None:
    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(registered_model, alias)
    except MlflowException:
        return None
    try:
        fid = float(version.tags[metric])
    except (KeyError, ValueError):
        fid = None
    return Holder(str(version.version), fid)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(
    fid: float, metric: str, version: str, holder: Holder | None, max_fid: float | None = None, force: bool = False
) -> Decision:
    """Whether the alias moves to ``version`` (FID ``fid``): the promote rules, in order.

    1. ``max_fid`` given and ``fid > max_fid``: no (force does not lift an explicit bound).
    2. Nobody holds the alias, or ``version`` already does: yes.
    3. ``force``: yes.
    4. The holder has no ``metric`` tag: no (nothing to compare with).
    5. Yes if ``fid <= holder.fid`` (no worse), else no.
    """
    if max_fid is not None and fid > max_fid:
        return Decision(False, f"{metric} {fid:.4g} is above max_fid {max_fid:g}")
    if holder is None:
        return Decision(True, "nobody held the alias")
    if holder.version == version:
        return Decision(True, "it already held the alias")
    if force:
        return Decision(True, f"force (version {holder.version} had {metric} {_show(holder.fid)})")
    if holder.fid is None:
        return Decision(
            False, f"version {holder.version} holds the alias and has no '{metric}' tag to compare with; pass force=true"
        )
    if fid <= holder.fid:
        return Decision(True, f"{metric} {fid:.4g} is no worse than version {holder.version}'s {holder.fid:.4g}")
    return Decision(
        False, f"{metric} {fid:.4g} is worse than version {holder.version}'s {holder.fid:.4g}; pass force=true to promote anyway"
    )


def _show(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def set_alias(registered_model: str, alias: str, version: str) -> None:
    try:
        mlflow.MlflowClient().set_registered_model_alias(registered_model, alias, version)
    except MlflowException as exc:
        raise _registry_error(exc) from None
