"""The MLflow Model Registry side of MaskDM: a finetuned model as a pyfunc image generator.

A registered version is a pyfunc model logged from code (:data:`MODEL_CODE`, so loading it
unpickles nothing) whose artifact ``pipeline`` is the finetune run's diffusers pipeline folder with
its weights stored sparse (``unet/diffusion_pytorch_model.sparse.safetensors``: kept values plus a
bitmask, :mod:`maskdm.sparse_storage`; ``load_context`` rebuilds the dense UNet bit for bit, and
``python -m maskdm.sparse_storage export <pipeline> <out>`` writes a dense diffusers folder) and
whose ``code/`` holds a copy of this ``maskdm`` package, so it loads wherever its pip requirements
are installed, with the code that registered it. ``predict`` takes a DataFrame with integer
columns ``num_images`` and, optionally, ``ddim_steps`` (default 100) and ``seed`` (default 42), one
row per request, and returns one uint8 NHWC array: the images of all rows, in row order (row
``i``'s images are those ``sample --seed <seed> --ddim_steps <ddim_steps>`` makes as its first
``num_images`` images). One call may ask for at most ``max_image_steps`` image-steps (num_images x
the DDIM steps each row runs, summed over its rows; :data:`DEFAULT_MAX_IMAGE_STEPS` unless set when registering), so
a served request cannot hold the server for hours.

Versions are keyed by the finetune run they hold (version tag ``finetune_run_id``), so registering
a run twice gives the same version. A promote ranks and compares by one FID metric under one FID
protocol (:class:`Scoring`, chosen by :func:`choose_scoring`); each FID tag of a version comes with
its protocol (``<metric>.protocol``, ``<metric>.protocol_id``), and a holder scored under another
protocol is not compared with (:func:`protocol_conflict`). Replicates of a sweep (``main --seeds``)
sample with seed + k: their FIDs compare under replicate 0's protocol, as the report's columns do
(``ModelScores.comparable``; the version's tag ``replicate`` says which one it holds). Whether the alias moves is
:func:`decide`'s pure rule.
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
from maskdm.report import (
    UNRECORDED,
    FidProtocol,
    FidScore,
    RunRecord,
    collect_scores,
    concat_frames,
    describe_protocol,
    is_fid_metric,
    run_records,
    runs_by_id,
)
from maskdm.tracking import STAGE_TAG, UPSTREAM_TAG_PREFIX, get_upstream

log = logging.getLogger(__name__)

PIPELINE_ARTIFACT = "pipeline"
INPUT_COLUMNS = ("num_images", "ddim_steps", "seed")
#: The optional input columns and their defaults: the ``sample`` stage's, so that a request for
#: ``num_images`` alone gives the first images ``maskdm sample`` makes of the model by default.
COLUMN_DEFAULTS = {"ddim_steps": 100, "seed": 42}
#: The most image-steps (num_images x ddim_steps, summed over the rows) one predict call may ask
#: for, unless set when registering: one batch of 64 images at the default 100 steps.
DEFAULT_MAX_IMAGE_STEPS = 6400
#: The version tag recording a version's ``max_image_steps``.
MAX_IMAGE_STEPS_TAG = "max_image_steps"
#: ``model_config`` of a registered model; override at load with ``mlflow.pyfunc.load_model(uri, model_config=...)``.
DEFAULT_MODEL_CONFIG = {"batch_size": 64, "device": "auto", "max_image_steps": DEFAULT_MAX_IMAGE_STEPS, "kernel": "dense"}
#: The version tag recording the kernel the served model runs with (``promote --kernel``, :mod:`maskdm.speed`).
KERNEL_TAG = "kernel"
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
    """One request per row: integer columns num_images (>= 1) and, optional, ddim_steps (>= 1) and seed (>= 0).

    A missing optional column, or an empty value in one, takes :data:`COLUMN_DEFAULTS`.
    """
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns and c not in COLUMN_DEFAULTS]
    if missing:
        optional = ", ".join(f"{c} (default {v})" for c, v in COLUMN_DEFAULTS.items())
        raise MaskDMError(f"the input needs the column {', '.join(missing)} (optional: {optional})")
    if frame.empty:
        raise MaskDMError("the input has no rows: pass one row per request (num_images, ddim_steps, seed)")
    requests = []
    for row, record in enumerate(frame.to_dict("records")):
        values = [record.get(c) for c in INPUT_COLUMNS]
        values = [COLUMN_DEFAULTS[c] if c in COLUMN_DEFAULTS and _empty(v) else v for v, c in zip(values, INPUT_COLUMNS)]
        request = GenerationRequest(*(_as_int(v, c, row) for v, c in zip(values, INPUT_COLUMNS)))
        if request.num_images < 1:
            raise MaskDMError(f"row {row}: num_images must be at least 1, got {request.num_images}")
        if request.ddim_steps < 1:
            raise MaskDMError(f"row {row}: ddim_steps must be at least 1, got {request.ddim_steps}")
        if request.seed < 0:
            raise MaskDMError(f"row {row}: seed must be at least 0, got {request.seed}")
        requests.append(request)
    return requests


def _empty(value: object) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def check_max_image_steps(value: object) -> int:
    """A cap as given to promote or in a model_config: an integer >= 1."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number) or number < 1:
        raise MaskDMError(f"max_image_steps must be an integer >= 1, got {value!r}")
    return int(number)


def steps_run(ddim_steps: int, num_train_timesteps: int) -> int:
    """The UNet calls ``ddim_steps`` uniform DDIM steps really make: every ``T // S``-th timestep,
    so more than ``S`` when ``S`` does not divide ``T`` (501 of 1,000 run 1,000)."""
    from maskdm.sampling import ddim_timesteps

    return len(ddim_timesteps(num_train_timesteps, ddim_steps, "uniform"))


def check_budget(requests: Sequence[GenerationRequest], max_image_steps: int, num_train_timesteps: int | None = None) -> int:
    """The image-steps the requests ask for (num_images x the steps each row runs, summed); an error
    above the cap. With the model's ``num_train_timesteps``, each row's steps are those its sampler
    runs (:func:`steps_run`), and a step count it cannot run is an error, before any row runs."""
    if num_train_timesteps is None:
        total = sum(r.num_images * r.ddim_steps for r in requests)
    else:
        total = 0
        for row, r in enumerate(requests):
            try:
                total += r.num_images * steps_run(r.ddim_steps, num_train_timesteps)
            except MaskDMError as exc:
                raise MaskDMError(f"row {row}: {exc}") from None
    if total > max_image_steps:
        raise MaskDMError(
            f"the request asks for {total} image-steps (num_images x the DDIM steps each row runs, summed over its rows); "
            f"this model serves at most max_image_steps={max_image_steps} per request: ask for fewer images "
            f"or steps, or split the request"
        )
    return total


def generate(
    ddpm, requests: Sequence[GenerationRequest], batch_size: int = 64, device: str = "cpu", mixed_precision: str = "no"
) -> np.ndarray:
    """The images of all requests as one uint8 NHWC array, in request order."""
    from maskdm.sampling import sample_images

    images = [
        sample_images(
            ddpm.unet, ddpm.scheduler.config, range(r.num_images),
            steps=r.ddim_steps, seed=r.seed, batch_size=min(batch_size, r.num_images), device=device,
            clip_sample=False,  # as the sample stage's default (the original DDIM code never clips x0)
            codec=ddpm.codec, mixed_precision=mixed_precision,
        )
        for r in requests
    ]
    return np.concatenate(images)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class BadRequest(MlflowException, MaskDMError):
    """A request predict refuses. ``mlflow models serve`` answers it with HTTP 400 and this message
    (any other exception is a 400 whose message is generic, the reason only in its stack trace)."""

    def __init__(self, message: str):
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class DDPMImageGenerator(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame(num_images, ddim_steps, seed) -> uint8 NHWC images (see the module doc)."""

    def load_context(self, context) -> None:
        from maskdm.models import load_ddpm

        from maskdm.sparse_storage import dense_folder

        config = {**DEFAULT_MODEL_CONFIG, **(context.model_config or {})}
        # A sparse pipeline (every version registered since weights are stored sparse) is rebuilt
        # dense in a temporary folder, loaded, and the folder dropped; an older dense one loads as is.
        with dense_folder(os.path.abspath(context.artifacts[PIPELINE_ARTIFACT])) as pipeline:
            self.ddpm = load_ddpm(str(pipeline))
        self.batch_size = int(config["batch_size"])
        self.device = resolve_device(str(config["device"]))
        self.max_image_steps = check_max_image_steps(config["max_image_steps"])
        self.kernel = str(config["kernel"])
        self.mixed_precision = "no"
        if self.kernel != "dense":
            from maskdm.speed import prepare_kernel

            # 2:4 layers compressed once at load (bf16, on the GPU; one line where there is none).
            prepare_kernel(self.ddpm.unet, self.kernel, self.device, "auto")
            self.mixed_precision = "bf16"

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        # Checked before any work: a refused request costs the server nothing.
        try:
            requests = parse_requests(model_input)
            check_budget(requests, self.max_image_steps, int(self.ddpm.scheduler.config.num_train_timesteps))
        except MaskDMError as exc:
            raise BadRequest(str(exc)) from None
        return generate(self.ddpm, requests, self.batch_size, self.device, self.mixed_precision)


def generation_signature(height: int, width: int, channels: int):
    """Input: long columns num_images (required), ddim_steps and seed (optional). Output: a uint8 tensor (-1, H, W, C)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("long", name, required=name not in COLUMN_DEFAULTS) for name in INPUT_COLUMNS]),
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


def log_pyfunc_model(
    pipeline_dir: str | os.PathLike, name: str = "model", max_image_steps: int = DEFAULT_MAX_IMAGE_STEPS, kernel: str = "dense"
):
    """Log the pipeline folder as a pyfunc image generator in the active run; returns the ModelInfo.

    The logged copy of the folder stores its weights sparse (:func:`maskdm.sparse_storage.pack_pipeline_copy`);
    ``pipeline_dir`` itself is left as it is.
    """
    from maskdm.models import pipeline_image_shape
    from maskdm.sparse_storage import pack_pipeline_copy

    channels, height, width = pipeline_image_shape(pipeline_dir)
    with tempfile.TemporaryDirectory(prefix="maskdm-pyfunc-") as tmp:
        pipeline = Path(tmp) / PIPELINE_ARTIFACT
        for packed in pack_pipeline_copy(pipeline_dir, pipeline):
            log.info("registered copy stores %s sparse: %d of %d bytes", packed.dense, packed.sparse_bytes, packed.dense_bytes)
        code_file = Path(tmp) / "maskdm_generator.py"
        code_file.write_text(MODEL_CODE)
        package = Path(tmp) / "maskdm"
        shutil.copytree(Path(__file__).resolve().parent, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code_file),
            artifacts={PIPELINE_ARTIFACT: str(pipeline)},
            code_paths=[str(package)],
            signature=generation_signature(height, width, channels),
            input_example=input_example(),
            pip_requirements=pinned_requirements(),
            model_config={**DEFAULT_MODEL_CONFIG, "max_image_steps": check_max_image_steps(max_image_steps), "kernel": kernel},
        )


# --------------------------------------------------------------------------------------------
# Candidates: finetune runs and their FIDs


#: ``metric``/``protocol`` value meaning: the one present (an error naming them when there are several).
AUTO = "auto"


@dataclass(frozen=True)
class Scoring:
    """The FID a promote ranks and compares by: one metric under one FID protocol."""

    metric: str
    protocol_id: str
    protocol: FidProtocol | None

    def describe(self) -> str:
        return f"{self.metric} under protocol {describe_protocol(self.protocol)}"


@dataclass(frozen=True)
class Candidate:
    """A FINISHED finetune run with a model/ artifact and its FIDs (per metric and protocol)."""

    run_id: str
    fids: Mapping[tuple[str, str], FidScore]
    sparsity: float | None
    params: Mapping[str, str]
    lineage: Mapping[str, str]
    start_time: float = 0.0

    def score(self, scoring: Scoring) -> FidScore | None:
        return self.fids.get((scoring.metric, scoring.protocol_id))

    def fid(self, scoring: Scoring) -> float | None:
        score = self.score(scoring)
        return score.value if score else None

    def newest_per_metric(self) -> dict[str, FidScore]:
        newest: dict[str, FidScore] = {}
        for score in sorted(self.fids.values(), key=lambda s: s.start_time, reverse=True):
            newest.setdefault(score.metric, score)
        return newest


def check_metric(metric: str) -> str:
    metric = metric.strip()
    if metric.lower() == AUTO:
        return AUTO
    if not is_fid_metric(metric):
        raise MaskDMError(
            f"metric must be auto, 'fid' (Inception pool3) or 'fid_<name>' (e.g. fid_shapes, fid_inception_64), got '{metric}'"
        )
    return metric


def check_protocol(protocol: str) -> str:
    protocol = protocol.strip()
    if not protocol:
        raise MaskDMError("protocol must be auto, a protocol id (tag maskdm.fid_protocol_id of a fid run) or its full key")
    return AUTO if protocol.lower() == AUTO else protocol


def _protocol_matches(protocol_id: str, protocol: FidProtocol | None, wanted: str) -> bool:
    return wanted == AUTO or wanted == protocol_id or (protocol is not None and wanted == protocol.key)


def choose_scoring(candidates: Sequence[Candidate], metric: str, protocol: str, where: str) -> Scoring:
    """The one (metric, protocol) of the candidates' FIDs that ``metric`` and ``protocol`` select.

    ``auto`` selects any (``protocol=auto`` skips FIDs of no recorded protocol when there are
    others); exactly one must remain, else a one-line MaskDMError naming those present.
    """
    present: dict[tuple[str, str], FidProtocol | None] = {}
    for c in candidates:
        for key, score in c.fids.items():
            present.setdefault(key, score.protocol)
    matching = [k for k in present if (metric == AUTO or k[0] == metric) and _protocol_matches(k[1], present[k], protocol)]
    if protocol == AUTO and any(k[1] != UNRECORDED for k in matching):
        # fid runs made before protocols were recorded compare with nothing: auto skips them.
        matching = [k for k in matching if k[1] != UNRECORDED]
    if len(matching) == 1:
        (metric_, protocol_id), = matching
        return Scoring(metric_, protocol_id, present[matching[0]])
    listing = "; ".join(f"{m} under protocol {describe_protocol(present[(m, i)])}" for m, i in sorted(present))
    has = "have" if where.startswith("the ") else "has"
    if not matching:
        wanted = "FID" if metric == AUTO else f"FID '{metric}'"
        if protocol != AUTO:
            wanted += f" under protocol '{protocol}'"
        raise MaskDMError(f"{where} {has} no {wanted}, only {listing}; pass metric=<name> and protocol=<id> of one of them")
    raise MaskDMError(
        f"{where} {has} FIDs of {len(matching)} protocols, which do not compare: "
        + "; ".join(f"{m} under protocol {describe_protocol(present[(m, i)])}" for m, i in sorted(matching))
        + "; pass metric=<name> and protocol=<id> to choose one"
    )


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


def candidate(run_ref: str, metric: str = AUTO, protocol: str = AUTO) -> tuple[Candidate, Scoring]:
    """The finetune run ``run_ref`` as a candidate, and the FID it is judged by; one-line MaskDMErrors."""
    up = get_upstream(run_ref, ["finetune"], "model", "finetune_run_id")
    scores = fid_scores(up.run_id).get(up.run_id)
    fids = scores.comparable() if scores else {}
    if not fids:
        wanted = "no FID" if metric == AUTO else f"no FID '{metric}'"
        raise MaskDMError(
            f"finetune run {up.run_id} has {wanted}: run `maskdm sample --model_run_id {up.run_id}` "
            f"and `maskdm fid` on that sample run first"
        )
    run = mlflow.MlflowClient().get_run(up.run_id)
    record = RunRecord(up.run_id, up.stage, up.params, dict(run.data.metrics), up.tags, run.info.start_time / 1000, None)
    chosen = _candidate_of(record, fids)
    return chosen, choose_scoring([chosen], metric, protocol, f"finetune run {up.run_id}")


def _candidate_of(record: RunRecord, fids: Mapping[tuple[str, str], FidScore]) -> Candidate:
    return Candidate(
        run_id=record.run_id,
        fids=fids,
        sparsity=record.metrics.get("sparsity"),
        params=dict(record.params),
        lineage=record.lineage,
        start_time=record.start_time,
    )


def best_candidate(
    experiment_ids: Sequence[str], metric: str = AUTO, min_sparsity: float = 0.0, protocol: str = AUTO
) -> tuple[Candidate, Scoring]:
    """The lowest-FID FINISHED finetune run with sparsity >= ``min_sparsity`` in these experiments.

    The FID is one metric under one protocol (:func:`choose_scoring` over the scored runs that
    pass ``min_sparsity``). Ties go to the sparser, then the newer run. A run that logged no
    ``sparsity`` counts only when ``min_sparsity`` is 0.
    """
    finetunes = run_records(mlflow.search_runs(
        list(experiment_ids), filter_string=f"tags.`{STAGE_TAG}` = 'finetune' and attributes.status = 'FINISHED'"
    ))
    scores = fid_scores()
    scored = []
    for record in finetunes.values():
        score = scores.get(record.run_id)
        sparsity = record.metrics.get("sparsity")
        if score and score.fids and (min_sparsity <= 0 or (sparsity is not None and sparsity >= min_sparsity)):
            scored.append(_candidate_of(record, score.comparable()))
    where = f"experiment(s) {', '.join(experiment_ids)}"
    if not scored:
        wanted = "an FID" if metric == AUTO else f"a '{metric}' FID"
        raise MaskDMError(
            f"no FINISHED finetune run with {wanted} and sparsity >= {min_sparsity:g} in {where}: "
            "run sample and fid on a finetune run first, or lower min_sparsity"
        )
    scoring = choose_scoring(scored, metric, protocol, f"the finetune runs with sparsity >= {min_sparsity:g} in {where}")
    pool = [c for c in scored if c.score(scoring)]
    best = min(pool, key=lambda c: (c.fid(scoring), -(c.sparsity or 0.0), -c.start_time))
    get_upstream(best.run_id, ["finetune"], "model", "finetune_run_id")  # it must hold its model
    return best, scoring


# --------------------------------------------------------------------------------------------
# Registering and the alias


def check_names(registered_model: str, alias: str) -> None:
    if not registered_model.strip():
        raise MaskDMError("registered_model must not be empty")
    alias = alias.strip()
    # MLflow reserves these: 'latest' and v<number> name versions, not aliases.
    if not alias or alias.lower() in RESERVED_ALIASES or (alias[:1] in "vV" and alias[1:].isdigit()):
        raise MaskDMError(f"alias '{alias}' is not allowed: it must be non-empty, not 'latest' and not v<number>")


PROTOCOL_TAG_SUFFIX = ".protocol"
PROTOCOL_ID_TAG_SUFFIX = ".protocol_id"


def version_tags(candidate: Candidate, scoring: Scoring, promote_run_id: str | None = None) -> dict[str, str]:
    """The tags a version carries: its FIDs (with protocols), sparsity, the lineage params and run IDs.

    ``<metric>`` = value, ``<metric>.protocol`` = the protocol's key and ``<metric>.protocol_id`` its
    id: ``scoring``'s score for its metric, the newest score for each other metric of the run.
    """
    chosen = candidate.score(scoring)
    tags = {}
    for metric, score in {**candidate.newest_per_metric(), scoring.metric: chosen}.items():
        tags[metric] = repr(score.value)
        tags[metric + PROTOCOL_TAG_SUFFIX] = score.protocol.key if score.protocol else UNRECORDED
        tags[metric + PROTOCOL_ID_TAG_SUFFIX] = score.protocol_id
    tags.update({
        FINETUNE_RUN_TAG: candidate.run_id,
        "fid_run_id": chosen.fid_run_id,
        "sample_run_id": chosen.sample_run_id or "",
        "mask_training": "true" if "train_masks" in candidate.lineage else "false",
        # A replicate-k FID is tagged with replicate 0's protocol (its seed minus k): the one it compares under.
        "replicate": str(chosen.replicate),
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
    """The (oldest) version of ``registered_model`` tagged with this finetune run, or None.

    The registry does the filtering (name and tag in one ``search_model_versions`` query)."""
    query = f"name = {_filter_literal(registered_model)} and tags.`{FINETUNE_RUN_TAG}` = {_filter_literal(finetune_run_id)}"
    try:
        versions = mlflow.MlflowClient().search_model_versions(query)
    except MlflowException:
        return None
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _filter_literal(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter. The filter grammar has no escape
    character (``'a\\'b'`` matches nothing): a value holding one kind of quote is written in the other."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise MaskDMError(f"registered_model '{value}' holds both ' and \": the model registry cannot search for it; rename it")


def register(
    candidate: Candidate, registered_model: str, scoring: Scoring, promote_run_id: str | None = None,
    max_image_steps: int | None = None, kernel: str | None = None,
):
    """``(ModelVersion, created)``: the version holding ``candidate``, registered if there is none.

    An existing version gets its FID tags refreshed (a newer fid run may have scored the run) and
    nothing else: no second version, no second logged model. Needs an active run to log into.
    ``max_image_steps`` (default :data:`DEFAULT_MAX_IMAGE_STEPS`) is fixed when a version is
    registered: given for an existing version with another cap, it is an error. So is ``kernel``
    (default ``dense``; ``semi_structured``: the served model runs 2:4 layers with sparse kernels).
    """
    client = mlflow.MlflowClient()
    tags = version_tags(candidate, scoring, promote_run_id)
    existing = find_version(registered_model, candidate.run_id)
    cap = DEFAULT_MAX_IMAGE_STEPS if max_image_steps is None else check_max_image_steps(max_image_steps)
    tags[MAX_IMAGE_STEPS_TAG] = str(cap)
    tags[KERNEL_TAG] = kernel or "dense"
    try:
        if existing is not None:
            _check_same_cap(registered_model, existing, max_image_steps)
            held = existing.tags.get(KERNEL_TAG, "dense")
            if kernel is not None and held != kernel:
                raise MaskDMError(
                    f"{registered_model} version {existing.version} holds this run with kernel={held}, fixed when it "
                    f"was registered; kernel={kernel} would need another version: register under another name"
                )
            metrics = {score.metric for score in candidate.fids.values()}
            fid_keys = [k for k in tags if k.split(".")[0] in metrics] + ["fid_run_id", "sample_run_id"]
            for key in fid_keys:
                client.set_model_version_tag(registered_model, existing.version, key, tags[key])
            return client.get_model_version(registered_model, existing.version), False
        with tempfile.TemporaryDirectory(prefix="maskdm-promote-") as tmp:
            up = get_upstream(candidate.run_id, ["finetune"], "model", "finetune_run_id")
            info = log_pyfunc_model(up.download("model", tmp), max_image_steps=cap, kernel=kernel or "dense")
        return mlflow.register_model(info.model_uri, registered_model, tags=tags), True
    except MlflowException as exc:
        raise _registry_error(exc) from None


def _check_same_cap(registered_model: str, existing, max_image_steps: int | None) -> None:
    """An explicit ``max_image_steps`` must be the existing version's: a logged model cannot change."""
    if max_image_steps is None:
        return
    held = existing.tags.get(MAX_IMAGE_STEPS_TAG)
    if held != str(check_max_image_steps(max_image_steps)):
        raise MaskDMError(
            f"{registered_model} version {existing.version} already holds finetune run {existing.tags.get(FINETUNE_RUN_TAG)} "
            f"with max_image_steps {held or 'unset (registered before the cap existed: no cap)'}; a version's cap is "
            f"fixed when it is registered: pass another registered_model to serve this run with max_image_steps {max_image_steps}"
        )


@dataclass(frozen=True)
class Holder:
    """The version an alias points at, its FID tag for the metric compared, and that FID's protocol."""

    version: str
    fid: float | None
    protocol_key: str | None = None
    protocol_id: str | None = None


def alias_holder(registered_model: str, alias: str, metric: str) -> Holder | None:
    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(registered_model, alias)
    except MlflowException:
        return None
    try:
        fid = float(version.tags[metric])
    except (KeyError, ValueError):
        fid = None
    return Holder(
        str(version.version), fid, version.tags.get(metric + PROTOCOL_TAG_SUFFIX), version.tags.get(metric + PROTOCOL_ID_TAG_SUFFIX)
    )


def protocol_conflict(scoring: Scoring, holder: Holder) -> str | None:
    """Why ``scoring``'s FID and the holder's do not compare; None when they do, or when the holder
    has no FID for the metric (then :func:`decide`'s rule 4 applies). A protocol that was not
    recorded matches none, itself included."""
    if holder.fid is None:
        return None
    if scoring.protocol is not None and holder.protocol_id == scoring.protocol_id:
        return None
    theirs = FidProtocol.parse(holder.protocol_key)
    if scoring.protocol is None or theirs is None:
        return (
            f"version {holder.version}'s {scoring.metric} and this run's were not both measured under a recorded FID "
            f"protocol (this run: {describe_protocol(scoring.protocol)}; version {holder.version}: "
            f"{describe_protocol(theirs)}), so they do not compare; pass force=true to promote anyway"
        )
    differences = ", ".join(f"{part} {mine} vs {other}" for part, mine, other in scoring.protocol.differences(theirs))
    return (
        f"version {holder.version}'s {scoring.metric} was measured under another FID protocol "
        f"({theirs.id}, this run's is {scoring.protocol.id}; they differ in {differences}, this run vs version "
        f"{holder.version}), so the two do not compare: score this run under that protocol, or pass force=true"
    )


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
