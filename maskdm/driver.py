"""The ``main`` driver: a pruning-ratio sweep run as MLflow Project child runs, with a stage cache.

For each ratio the driver chains prune -> extract_masks -> baseline_loss -> train_masks ->
finetune, and samples and scores (sample -> fid) the dense model once and, per ratio, the pruned,
mask-trained and finetuned models. ``mask_training`` picks which finetune runs are made: from the
learned masks (``true``), straight from the pruning masks (``false``: the plain pruning +
finetuning baseline) or both, so MaskPro's gain is measured rather than assumed.

Every stage runs through :func:`run_stage`: its cache key is the sha256 of the stage name, its
complete parameters (the MLproject defaults filled in, upstream run IDs included) and
:func:`maskdm.tracking.code_version`. A FINISHED run in the experiment with that key is reused;
otherwise a new run, a child of the driver run, is made with ``mlflow.projects.run``. A finetune
run that was killed after logging checkpoints is continued (``resume_run_id``), not restarted.

This module owns the cache search and therefore talks to MLflow directly (an exception to the
library rule, like :mod:`maskdm.tracking`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import math
import os
import re
import resource
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from maskdm.errors import MaskDMError

log = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parent.parent
CACHE_KEY_TAG = "maskdm.cache_key"
#: Which row of the results table a run belongs to (model, sample and fid runs).
VARIANT_TAG = "maskdm.variant"
#: The step of the sweep plan a stage run was made for, e.g. ``finetune r=0.5 (masked)``.
STEP_TAG = "maskdm.step"
PARENT_RUN_TAG = "mlflow.parentRunId"
#: Set to ``true`` on a run the driver reused (the convention of :mod:`maskdm.report`).
USED_BY_TAG_PREFIX = "maskdm.used_by."

STAGES = ("pretrain", "prune", "extract_masks", "baseline_loss", "train_masks", "finetune", "sample", "fid")

#: What a model (and its sample and fid runs) is, named as in :mod:`maskdm.report`: ``masked`` is
#: the train_masks model, ``finetuned`` starts from the learned (MaskPro) masks and
#: ``finetuned_no_mask_training`` from the pruning masks (mask_training=false).
VARIANTS = ("dense", "pruned", "masked", "finetuned", "finetuned_no_mask_training")

#: Parameters the driver fills in itself; ``--set`` may not name them.
DRIVER_OWNED = {
    "prune": {"model": "--model", "pruning_ratio": "--ratios", "pruner": "--pruner", "pattern": "--pattern", "scope": "--scope"},
    "extract_masks": {"prune_run_id": None},
    "baseline_loss": {"masks_run_id": None},
    "train_masks": {"baseline_run_id": None},
    "finetune": {"masks_run_id": None, "resume_run_id": None},
    "sample": {"model_run_id": None},
    "fid": {"sample_run_id": None},
}

#: Parameters that may name a local file or folder: made absolute, because stages run in the
#: project directory, not in the caller's.
PATH_PARAMS = ("model", "dataset", "reference", "weights", "original_model")

MASK_TRAINING_CHOICES = ("true", "false", "both")
#: The step that provides the demo model when ``model`` is ``demo``.
DEMO_MODEL_STEP = "pretrain demo"

# --- presets -------------------------------------------------------------------------------------

#: ``demo``: the embedded model and dataset; step counts sized so the whole sweep (3 ratios,
#: mask_training=both, 45 stage runs) fits 15 minutes on an unloaded 2-core CPU, once the demo
#: model exists (training it is a one-time cost per tracking store). How that was measured and
#: estimated: docs/details/main.md.
DEMO = {
    "model": "demo",
    "dataset": "shapes",
    "ratios": "0.3,0.5,0.7",
    "pruner": "magnitude",
    "pattern": "unstructured",
    "scope": "layer",
    "stages": {
        # Empty: the pretrain entry point's defaults are the demo model's configuration.
        "pretrain": {},
        "prune": {"protect": "conv_in,conv_out,time_emb,class_emb", "seed": "0"},
        # 1,024 images in 32 batches; an update measures 2 of them, so the stream passes over the
        # subset about 9 times in 150 updates.
        "baseline_loss": {"dataset_size": "1024", "batch_size": "32", "max_batches": "0", "targets": "all", "seed": "0"},
        # The best configuration of the study in docs/details/maskpro.md that fits the demo's budget:
        # logits from the magnitude score, normalised advantages, one sample per update.
        "train_masks": {
            "lr": "0.05", "epoch": "1000", "logits": "5.0", "max_step": "150", "accumulation": "2", "init": "magnitude",
            "temperature": "0.05", "samples": "1", "reward_baseline": "delta", "normalize": "true", "heldout_size": "256",
            "eval_every": "auto",
        },
        "finetune": {
            "num_iters": "40", "train_batch_size": "32", "learning_rate": "2e-4", "lr_warmup_steps": "0",
            "ema_max_decay": "0.99", "dropout": "0.1", "gradient_accumulation_steps": "1",
            "save_model_steps": "40", "mixed_precision": "auto", "seed": "0",
        },
        # 512 images, 8x the 64 feature dimensions of fid_shapes: a 64x64 covariance from 128
        # images is a rough estimate. Every model gets the same seeds, so the scores compare model
        # against model on the same starting noise.
        "sample": {"total_samples": "512", "batch_size": "256", "ddim_steps": "10", "skip_type": "uniform", "eta": "0.0", "seed": "42"},
        "fid": {"features": "shapes", "dims": "2048", "batch_size": "200"},
    },
}

#: ``paper``: google/ddpm-cifar10-32 on CIFAR-10 with the original recipe
#: (/work/shared/reference: baseline 20000 x 64 x 313 batches; masks lr 1.0, logits 5.0,
#: epoch 2000, max_step 15000; finetune 100k iterations at batch 128, lr 2e-4, EMA 0.9999,
#: dropout 0.1; 50000 samples with 100 uniform DDIM steps, seed 42; Inception FID against the
#: CIFAR-10 training set). Needs a GPU and the network (or a populated cache) for the model,
#: the dataset and the Inception weights.
PAPER = {
    "model": "google/ddpm-cifar10-32",
    "dataset": "cifar10",
    "ratios": "0.3,0.5,0.7",
    "pruner": "magnitude",
    "pattern": "unstructured",
    "scope": "layer",
    "stages": {
        "pretrain": {},
        "prune": {"protect": "conv_in,conv_out,time_emb,class_emb", "seed": "0"},
        "baseline_loss": {"dataset_size": "20000", "batch_size": "64", "max_batches": "313", "targets": "all", "seed": "0"},
        "train_masks": {"lr": "1.0", "epoch": "2000", "logits": "5.0", "max_step": "15000", "accumulation": "16"},
        "finetune": {
            "num_iters": "100000", "train_batch_size": "128", "learning_rate": "2e-4", "lr_warmup_steps": "0",
            "ema_max_decay": "0.9999", "dropout": "0.1", "gradient_accumulation_steps": "1",
            "save_model_steps": "1000", "mixed_precision": "auto", "seed": "0",
        },
        "sample": {"total_samples": "50000", "batch_size": "256", "ddim_steps": "100", "skip_type": "uniform", "eta": "0.0", "seed": "42"},
        "fid": {"features": "inception", "dims": "2048", "batch_size": "200", "reference": "cifar10"},
    },
}

PRESETS = {"demo": DEMO, "paper": PAPER}


# --- configuration ---------------------------------------------------------------------------------


@dataclass
class SweepConfig:
    """Everything the plan is built from: a preset with the explicit options and ``--set`` applied."""

    preset: str
    model: str
    dataset: str
    ratios: tuple[float, ...]
    pruner: str
    pattern: str
    scope: str
    mask_training: str
    stages: dict[str, dict[str, str]]


def parse_ratios(text: str) -> tuple[float, ...]:
    """``"0.3,0.5"`` -> (0.3, 0.5); each in (0, 1), no duplicates. The dense model is always included."""
    ratios = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            ratio = float(part)
        except ValueError:
            raise MaskDMError(f"ratios: '{part}' is not a number; pass e.g. --ratios 0.3,0.5,0.7") from None
        if not 0.0 < ratio < 1.0 or math.isnan(ratio):
            raise MaskDMError(f"ratios: {part} is outside (0, 1); the dense model (ratio 0) is always scored")
        if ratio in ratios:
            raise MaskDMError(f"ratios: {part} is given twice")
        ratios.append(ratio)
    if not ratios:
        raise MaskDMError("ratios: give at least one pruning ratio, e.g. --ratios 0.5")
    return tuple(ratios)


def format_ratio(ratio: float) -> str:
    """The one spelling of a ratio in parameters (and so in cache keys): 0.5, not 0.50."""
    return repr(float(ratio))


#: Splits ``a.x=1,b.y=2`` at commas that start another ``stage.key=``, so values may hold commas
#: (``prune.protect=conv_in,conv_out``).
_SET_ITEM = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*\s*=)")


def parse_sets(values: Iterable[str] | str | None) -> dict[str, dict[str, str]]:
    """``--set stage.key=value[,stage.key=value...]`` (repeatable) -> ``{stage: {key: value}}``."""
    if isinstance(values, str):
        values = [values]
    found: dict[str, dict[str, str]] = {}
    for value in values or ():
        if not str(value).strip():
            continue
        for item in _SET_ITEM.split(str(value).strip()):
            name, eq, setting = item.partition("=")
            stage, dot, key = name.strip().partition(".")
            if not eq or not dot or not stage or not key:
                raise MaskDMError(f"--set: '{item}' is not stage.key=value (e.g. finetune.num_iters=500)")
            found.setdefault(stage, {})[key] = setting.strip()
    return found


def stage_options(stage: str) -> set[str]:
    """The option names the stage's click command accepts (``--num_iters`` -> ``num_iters``)."""
    try:
        module = importlib.import_module(f"entrypoints.{stage}")
    except ModuleNotFoundError:
        raise MaskDMError(f"stage '{stage}' has no entry point (entrypoints/{stage}.py) in this checkout") from None
    return {opt.lstrip("-") for param in module.command.params for opt in param.opts if opt.startswith("--")}


def check_sets(sets: Mapping[str, Mapping[str, str]]) -> None:
    for stage, values in sets.items():
        if stage not in STAGES:
            raise MaskDMError(f"--set: unknown stage '{stage}'; stages are {', '.join(STAGES)}")
        known = stage_options(stage)
        for key in values:
            owner = DRIVER_OWNED.get(stage, {})
            if key in owner:
                hint = f"use {owner[key]}" if owner[key] else "the driver sets it from the upstream run"
                raise MaskDMError(f"--set: {stage}.{key} cannot be set this way: {hint}")
            if key not in known:
                raise MaskDMError(f"--set: stage {stage} has no parameter '{key}'; it takes {', '.join(sorted(known))}")


def resolve_config(
    preset: str = "demo",
    *,
    model: str | None = None,
    dataset: str | None = None,
    ratios: str | None = None,
    pruner: str | None = None,
    pattern: str | None = None,
    scope: str | None = None,
    mask_training: str = "both",
    sets: Iterable[str] | str | None = None,
) -> SweepConfig:
    """The preset, then the explicit options (None = not given), then ``--set`` on top."""
    if preset not in PRESETS:
        raise MaskDMError(f"preset '{preset}' is unknown; use one of {', '.join(PRESETS)}")
    mask_training = str(mask_training).strip().lower()
    if mask_training not in MASK_TRAINING_CHOICES:
        raise MaskDMError(f"mask_training '{mask_training}' is not one of {', '.join(MASK_TRAINING_CHOICES)}")
    base = copy.deepcopy(PRESETS[preset])
    explicit = {"model": model, "dataset": dataset, "pruner": pruner, "pattern": pattern, "scope": scope}
    for key, value in explicit.items():
        if value is not None and str(value).strip():
            base[key] = str(value).strip()

    from maskdm.pruning import pattern_ratio  # validates the pattern's spelling too

    implied = pattern_ratio(base["pattern"])
    if implied is not None and not (ratios and str(ratios).strip()):
        # An N:M pattern fixes the ratio; the preset's ratios would all but one be rejected.
        ratios = format_ratio(implied)
    parsed_ratios = parse_ratios(ratios if ratios and str(ratios).strip() else base["ratios"])
    if implied is not None:
        wrong = [r for r in parsed_ratios if abs(r - implied) > 1e-3]
        if wrong:
            raise MaskDMError(f"pattern {base['pattern']} prunes {implied:g} of the weights; ratios {wrong} contradict it")

    overrides = parse_sets(sets)
    check_sets(overrides)
    stages = base["stages"]
    for stage, values in overrides.items():
        stages.setdefault(stage, {}).update(values)
    return SweepConfig(
        preset=preset, model=_abs_if_path(base["model"]), dataset=_abs_if_path(base["dataset"]),
        ratios=parsed_ratios, pruner=base["pruner"], pattern=base["pattern"], scope=base["scope"],
        mask_training=mask_training, stages={s: {k: _abs_if_path(v, k) for k, v in p.items()} for s, p in stages.items()},
    )


def _abs_if_path(value: str, key: str = "model") -> str:
    """Local paths made absolute (stages run in the project directory); anything else unchanged."""
    if key not in PATH_PARAMS:
        return value
    text = str(value)
    prefix = ""
    if text.startswith("imagefolder:"):
        prefix, text = "imagefolder:", text[len("imagefolder:"):]
    expanded = os.path.expanduser(text)
    if text and os.path.exists(expanded):
        return prefix + os.path.abspath(expanded)
    return value


# --- the plan --------------------------------------------------------------------------------------


@dataclass
class Step:
    """One stage run of the sweep. ``needs`` maps a parameter to the step whose run ID fills it."""

    name: str
    stage: str
    params: dict[str, str]
    needs: dict[str, str] = field(default_factory=dict)
    ratio: float = 0.0
    variant: str | None = None


def build_plan(config: SweepConfig) -> list[Step]:
    """The steps in the order they run: the dense reference first, then ratio after ratio.

    Per ratio the cheap pruned score comes first and each finetune right after what it needs, so
    a sweep stopped early has complete rows for what it reached.
    """
    p = config.stages
    plan: list[Step] = []

    def add(step: Step) -> Step:
        plan.append(step)
        return step

    def score(model_step: Step, variant: str, ratio: float, label: str) -> None:
        sample = add(Step(f"sample {label}", "sample", dict(p.get("sample", {})), {"model_run_id": model_step.name}, ratio, variant))
        add(Step(f"fid {label}", "fid", dict(p.get("fid", {})), {"sample_run_id": sample.name}, ratio, variant))

    prune_base = {**p.get("prune", {}), "dataset": config.dataset}
    needs_model: dict[str, str] = {}
    model = config.model
    if model == "demo":
        # The demo model as a step of its own (an existing demo model is reused, see run_plan;
        # otherwise it is trained as a child run, timed like the rest), named by run ID downstream
        # so that the cache keys pin exactly which demo model was pruned.
        add(Step(DEMO_MODEL_STEP, "pretrain", dict(p.get("pretrain", {}))))
        needs_model = {"model": DEMO_MODEL_STEP}
        model = ""

    def prune_params(ratio: float, pruner: str, pattern: str, scope: str) -> dict[str, str]:
        params = {**prune_base, "pruning_ratio": format_ratio(ratio), "pruner": pruner, "pattern": pattern, "scope": scope}
        if model:
            params["model"] = model
        return params

    # The dense reference is pruning_ratio 0 whatever the pruner, pattern and scope: one run (and
    # one score) shared by every sweep of the same model.
    dense = add(Step("prune dense", "prune", prune_params(0.0, "magnitude", "unstructured", "layer"), dict(needs_model), 0.0, "dense"))
    score(dense, "dense", 0.0, "dense")

    for ratio in config.ratios:
        r = f"r={format_ratio(ratio)}"
        pruned = add(Step(f"prune {r}", "prune", prune_params(ratio, config.pruner, config.pattern, config.scope), dict(needs_model), ratio, "pruned"))
        score(pruned, "pruned", ratio, f"{r} (pruned)")
        masks = add(Step(f"extract_masks {r}", "extract_masks", {}, {"prune_run_id": pruned.name}, ratio))
        if config.mask_training in ("true", "both"):
            baseline = add(Step(f"baseline_loss {r}", "baseline_loss", dict(p.get("baseline_loss", {})), {"masks_run_id": masks.name}, ratio))
            trained = add(Step(f"train_masks {r}", "train_masks", dict(p.get("train_masks", {})), {"baseline_run_id": baseline.name}, ratio, "masked"))
            score(trained, "masked", ratio, f"{r} (masked)")
            tuned = add(Step(f"finetune {r} (from masked)", "finetune", dict(p.get("finetune", {})), {"masks_run_id": trained.name}, ratio, "finetuned"))
            score(tuned, "finetuned", ratio, f"{r} (finetuned)")
        if config.mask_training in ("false", "both"):
            plain = add(Step(f"finetune {r} (from pruned)", "finetune", dict(p.get("finetune", {})), {"masks_run_id": masks.name}, ratio, "finetuned_no_mask_training"))
            score(plain, "finetuned_no_mask_training", ratio, f"{r} (finetuned, no mask training)")
    return plan


# --- parameters and the cache key ------------------------------------------------------------------


def declared_defaults(stage: str, project_dir: Path = REPO_DIR) -> dict[str, str]:
    """The MLproject defaults of ``stage``'s declared parameters (those without one are left out)."""
    spec = yaml.safe_load((project_dir / "MLproject").read_text())
    entry = (spec.get("entry_points") or {}).get(stage)
    if entry is None:
        raise MaskDMError(f"MLproject declares no entry point '{stage}'")
    defaults = {}
    for key, decl in (entry.get("parameters") or {}).items():
        if isinstance(decl, Mapping) and decl.get("default") is not None:
            defaults[key] = str(decl["default"])
    return defaults


def full_params(stage: str, params: Mapping[str, str], project_dir: Path = REPO_DIR) -> dict[str, str]:
    """What the stage will actually run with: its MLproject defaults, then ``params``."""
    return {**declared_defaults(stage, project_dir), **{k: str(v) for k, v in params.items()}}


def cache_key(stage: str, params: Mapping[str, str], code_version: str) -> str:
    """sha256 of (stage, sorted parameters with upstream run IDs, code version)."""
    payload = json.dumps([stage, sorted((str(k), str(v)) for k, v in params.items()), code_version])
    return hashlib.sha256(payload.encode()).hexdigest()


# --- running stages --------------------------------------------------------------------------------


@dataclass
class StageOutcome:
    step: str
    stage: str
    run_id: str
    reused: bool
    resumed_from: str | None = None
    #: Wall and CPU seconds of the stage's processes (CPU summed over all of them; 0 when reused).
    wall_s: float = 0.0
    cpu_s: float = 0.0


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def find_cached_run(experiment_id: str, key: str) -> str | None:
    """The newest FINISHED run of the experiment with cache key ``key``."""
    runs = _client().search_runs(
        [experiment_id], f"tags.`{CACHE_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0].info.run_id if runs else None


def find_resumable_run(experiment_id: str, key: str) -> str | None:
    """The newest unfinished (killed, failed or still running) run with ``key`` that logged checkpoints.

    A run still running elsewhere is as good a start as a killed one: resuming only reads its
    checkpoints, and the new run writes its own.
    """
    from maskdm.tracking import has_artifact

    runs = _client().search_runs(
        [experiment_id], f"tags.`{CACHE_KEY_TAG}` = '{key}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=20,
    )
    for run in runs:
        if has_artifact(run.info.run_id, "checkpoints"):
            return run.info.run_id
    return None


def end_dead_runs_of_step(experiment_id: str, key: str, parent_run_id: str) -> list[str]:
    """Mark KILLED every RUNNING run with cache key ``key`` whose process is dead; their IDs.

    Only what this host can prove (:func:`maskdm.liveness.judge` without ``stale_after``): a run
    recorded by a process on another host is left alone, and the stage is run again beside it, as
    with two drivers at once. ``maskdm reap --stale_after`` ends those.
    """
    from maskdm.tracking import end_dead_runs, running_runs

    running = running_runs([experiment_id], f"tags.`{CACHE_KEY_TAG}` = '{key}'")
    checks = end_dead_runs(running, ended_by=f"maskdm main (driver run {parent_run_id})") if running else []
    return [c.run.info.run_id for c in checks if c.ended]


def run_stage(
    stage: str,
    params: Mapping[str, str],
    *,
    experiment_id: str,
    parent_run_id: str,
    step: str | None = None,
    tags: Mapping[str, str] | None = None,
    project_dir: Path = REPO_DIR,
    code_version: str | None = None,
) -> StageOutcome:
    """Reuse the FINISHED run with this stage's cache key, or run the stage as a child MLflow Project run."""
    import mlflow
    from mlflow.entities import Param
    from mlflow.exceptions import ExecutionException
    from mlflow.utils.mlflow_tags import (
        MLFLOW_PROJECT_ENTRY_POINT,
        MLFLOW_RUN_NAME,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
    )

    from maskdm.liveness import process_tags
    from maskdm.tracking import STAGE_TAG
    from maskdm.tracking import code_version as current_code_version

    step = step or stage
    full = full_params(stage, params, project_dir)
    key = cache_key(stage, full, code_version or current_code_version())
    cached = find_cached_run(experiment_id, key)
    if cached:
        log.info("%s: reusing FINISHED run %s", step, cached)
        # Lets `maskdm report --run_id <driver>` find runs this driver reused but did not make.
        _client().set_tag(cached, f"{USED_BY_TAG_PREFIX}{parent_run_id}", "true")
        return StageOutcome(step, stage, cached, reused=True)

    end_dead_runs_of_step(experiment_id, key, parent_run_id)
    passed = dict(full)
    resumed_from = find_resumable_run(experiment_id, key) if stage == "finetune" else None
    if resumed_from:
        log.info("%s: continuing from the checkpoints of unfinished run %s", step, resumed_from)
        passed["resume_run_id"] = resumed_from

    client = _client()
    # The run is made here, not by mlflow.projects.run, so that the cache key and the parent are on
    # it from its first moment: a run killed at any point is still found by find_resumable_run.
    # Given run_id, mlflow.projects.run neither creates a run nor logs parameters, so they are
    # logged here as `mlflow run` would; it still marks the run FAILED if the command fails.
    run = client.create_run(
        experiment_id,
        tags={
            PARENT_RUN_TAG: parent_run_id,
            CACHE_KEY_TAG: key,
            STAGE_TAG: stage,
            STEP_TAG: step,
            MLFLOW_RUN_NAME: step,
            MLFLOW_SOURCE_TYPE: "PROJECT",
            MLFLOW_SOURCE_NAME: str(project_dir),
            MLFLOW_PROJECT_ENTRY_POINT: stage,
            # This (driver) process until the stage's own process records itself: a run whose
            # driver is killed before the stage starts is still judged dead (maskdm.liveness).
            **process_tags(),
            **{k: str(v) for k, v in (tags or {}).items()},
        },
    )
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in passed.items()])
    log.info("%s: running as run %s", step, run_id)
    wall_start, cpu_start = time.perf_counter(), _children_cpu_s()
    try:
        mlflow.projects.run(
            uri=str(project_dir), entry_point=stage, parameters=passed, experiment_id=experiment_id,
            env_manager="local", synchronous=True, run_id=run_id,
        )
    except ExecutionException:
        raise MaskDMError(f"stage {stage} failed in run {run_id} ({step}); its error is printed above") from None
    return StageOutcome(step, stage, run_id, reused=False, resumed_from=resumed_from,
                        wall_s=time.perf_counter() - wall_start, cpu_s=_children_cpu_s() - cpu_start)


def _children_cpu_s() -> float:
    """User + system CPU of every finished child process (a stage's own children are counted in it)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def find_demo_model() -> str | None:
    """The newest FINISHED demo ``pretrain`` run of any experiment, as ``model=demo`` resolves it.

    The demo model is trained once per tracking store and then reused whatever the code version
    (the contract's rule for ``demo``), so editing the code does not retrain it.
    """
    from maskdm.tracking import DEMO_TAG, find_runs

    runs = find_runs("pretrain", {DEMO_TAG: "true"})
    return runs[0].info.run_id if runs else None


def run_plan(
    plan: list[Step],
    *,
    experiment_id: str,
    parent_run_id: str,
    project_dir: Path = REPO_DIR,
    on_outcome: Callable[[StageOutcome], None] | None = None,
) -> dict[str, StageOutcome]:
    """Run (or reuse) every step in order, filling upstream run IDs from earlier steps."""
    from maskdm.tracking import code_version

    version = code_version()
    outcomes: dict[str, StageOutcome] = {}
    for index, step in enumerate(plan, 1):
        params = {**step.params, **{param: outcomes[needed].run_id for param, needed in step.needs.items()}}
        tags = {VARIANT_TAG: step.variant} if step.variant else {}
        log.info("[%d/%d] %s", index, len(plan), step.name)
        demo = find_demo_model() if step.name == DEMO_MODEL_STEP and not step.params else None
        if demo:
            log.info("%s: reusing the demo model, run %s", step.name, demo)
            _client().set_tag(demo, f"{USED_BY_TAG_PREFIX}{parent_run_id}", "true")
            outcome = StageOutcome(step.name, step.stage, demo, reused=True)
        else:
            outcome = run_stage(
                step.stage, params, experiment_id=experiment_id, parent_run_id=parent_run_id, step=step.name,
                tags=tags, project_dir=project_dir, code_version=version,
            )
        outcomes[step.name] = outcome
        if on_outcome:
            on_outcome(outcome)
    return outcomes


# --- results ---------------------------------------------------------------------------------------


def used_run_ids(outcomes: Mapping[str, StageOutcome]) -> list[str]:
    return list(dict.fromkeys(o.run_id for o in outcomes.values()))


@dataclass
class Results:
    markdown: str
    rows: int
    #: ``{metric key: {step: value}}``: the FID curves as MLflow metrics (step = ratio in percent).
    series: dict[str, dict[int, float]]


def write_results(run_ids: list[str], folder: Path, title: str) -> Results:
    """results.md / results.csv / fid_vs_sparsity.png of exactly these stage runs (and their ancestors)."""
    from maskdm import report

    table = report.build_table(report.runs_frame(run_ids=run_ids))
    files = report.write_table_report(table, folder, title=title)
    return Results(files.markdown.read_text(), len(table), report.ui_series(table))


def pin_tracking_uri() -> str:
    """Make a relative tracking URI absolute and set it: stage processes run in the project directory."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    elif uri.startswith("file:") and not uri.startswith("file:/"):
        uri = Path(uri[len("file:"):]).resolve().as_uri()
    elif "://" not in uri and not uri.startswith("databricks"):
        uri = Path(uri).resolve().as_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def ui_hint(tracking_uri: str, experiment_id: str, experiment_name: str, driver_run_id: str) -> str:
    """Where to look: the command that opens the UI on this store, and the filters that show the sweep."""
    lines = [
        f"MLflow UI:  mlflow ui --backend-store-uri {tracking_uri}"
        if not tracking_uri.startswith(("http://", "https://"))
        else f"MLflow UI:  {tracking_uri}",
        f"  experiment '{experiment_name}' (id {experiment_id}); driver run {driver_run_id}: results.md, results.csv, fid_vs_sparsity.png, stage_runs.json",
        f"  stage runs it made:    tags.`{PARENT_RUN_TAG}` = '{driver_run_id}'",
        f"  stage runs it reused:  tags.`{USED_BY_TAG_PREFIX}{driver_run_id}` = 'true'   (all of them: stage_runs.json)",
        "  scores of every sweep: tags.`maskdm.stage` = 'fid'  (chart fid against params.pruning_ratio, grouped by tags.`maskdm.model_stage`)",
    ]
    return "\n".join(lines)
