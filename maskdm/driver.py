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

The plan is a graph (each step ``needs`` the steps whose run IDs it takes): :func:`schedule`
starts a step once those have ended, up to ``parallel`` at once, each in a slot of its own that
may carry a GPU (CUDA_VISIBLE_DEVICES) and a CPU thread count (:class:`Launch`); ``parallel`` 1
is the plan in order, as it always ran. A ``backend`` other than ``local`` (kubernetes, ...)
runs the stages through that MLflow Projects backend. None of this enters a cache key.

This module owns the cache search and therefore talks to MLflow directly (an exception to the
library rule, like :mod:`maskdm.tracking`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import hashlib
import importlib
import json
import logging
import math
import os
import re
import resource
import subprocess
import threading
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

STAGES = ("pretrain", "prune", "extract_masks", "baseline_loss", "train_masks", "finetune", "sample", "fid", "speed")

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
    "speed": {"model_run_ids": None, "dense": None, "run_id": None},
}

#: Parameters that may name a local file or folder: made absolute, because stages run in the
#: project directory, not in the caller's.
PATH_PARAMS = ("model", "dataset", "reference", "weights", "original_model")

MASK_TRAINING_CHOICES = ("true", "false", "both")
#: The step that provides the demo model when ``model`` is ``demo``.
DEMO_MODEL_STEP = "pretrain demo"

# --- presets -------------------------------------------------------------------------------------

#: ``demo``: the shipped model and the embedded dataset; step counts sized so the whole sweep (3
#: ratios, mask_training=both, 45 stage runs) fits 15 minutes on an unloaded 2-core CPU (the demo
#: model ships with the package, nothing is pretrained). How that was measured and
#: estimated: docs/details/main.md.
DEMO = {
    "model": "demo",
    "dataset": "shapes",
    "ratios": "0.3,0.5,0.7",
    "pruner": "magnitude",
    "pattern": "unstructured",
    "scope": "layer",
    "stages": {
        # Empty: the shipped demo model, made by the pretrain entry point's defaults.
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
            # No dropout: the finetune takes the model's own (the demo model was trained without any).
            "num_iters": "40", "train_batch_size": "32", "learning_rate": "2e-4", "lr_warmup_steps": "0",
            "ema_max_decay": "0.99", "gradient_accumulation_steps": "1",
            "save_model_steps": "40", "mixed_precision": "auto", "seed": "0",
        },
        # 512 images, 8x the 64 feature dimensions of fid_shapes: a 64x64 covariance from 128
        # images is a rough estimate. Every model gets the same seeds, so the scores compare model
        # against model on the same starting noise.
        "sample": {"total_samples": "512", "batch_size": "256", "ddim_steps": "10", "skip_type": "uniform", "eta": "0.0", "seed": "42"},
        "fid": {"features": "shapes", "dims": "2048", "batch_size": "auto"},
        # The side-by-side timing of the sweep's 13 models (80 s for 3 on a shared 2-core CPU; docs/details/speed.md).
        "speed": {"batch_size": "16", "ddim_steps": "10", "repeats": "7", "warmup": "1", "kernel": "dense"},
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
        "fid": {"features": "inception", "dims": "2048", "batch_size": "auto", "reference": "cifar10"},
        "speed": {"batch_size": "256", "ddim_steps": "10", "repeats": "9", "warmup": "2", "kernel": "dense"},
    },
}

#: ``ldm-celebahq``: the latent diffusion model of Rombach et al. (2022) on CelebA-HQ 256, as
#: published on the hub (a UNet over the 64x64x3 latents of a frozen VQ-f4 autoencoder). Only the
#: UNet is pruned, masked and finetuned; the stages train on the autoencoder's latents of the
#: dataset (cached once as a ``latent_cache`` run) and ``sample`` decodes. CelebA-HQ is not
#: downloadable by a library, so the dataset is an image folder the user gives
#: (``dataset=imagefolder:<folder>``). Stage settings are the paper preset's recipe on the latents
#: (they were not tuned for this model); FID against the same folder, as the LDM paper scores
#: CelebA-HQ against its 30,000 training images.
LDM_CELEBAHQ = copy.deepcopy(PAPER) | {"model": "CompVis/ldm-celebahq-256", "dataset": ""}
LDM_CELEBAHQ["stages"]["fid"] = {"features": "inception", "dims": "2048", "batch_size": "auto"}

PRESETS = {"demo": DEMO, "paper": PAPER, "ldm-celebahq": LDM_CELEBAHQ}


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
    #: The replicates (``--seeds``): each re-runs every stochastic stage of every arm with seeds
    #: offset by its number (:func:`build_plan`); (0,) is the one draw of the preset's seeds.
    seeds: tuple[int, ...] = (0,)


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


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> (0, 1, 2): the replicates to run, each an integer >= 0, no duplicates."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            seed = int(part)
        except ValueError:
            raise MaskDMError(f"seeds: '{part}' is not an integer; pass e.g. --seeds 0,1,2 (three replicates)") from None
        if seed < 0:
            raise MaskDMError(f"seeds: {seed} is negative; replicates are numbered 0, 1, 2, ...")
        if seed in seeds:
            raise MaskDMError(f"seeds: {seed} is given twice")
        seeds.append(seed)
    return tuple(seeds)


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
    seeds: str = "0",
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
    if not base["dataset"]:
        raise MaskDMError(f"preset '{preset}' has no dataset of its own: pass dataset=imagefolder:<folder of the images>")

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

    parsed_seeds = parse_seeds(seeds)
    overrides = parse_sets(sets)
    check_sets(overrides)
    stages = base["stages"]
    for stage, values in overrides.items():
        stages.setdefault(stage, {}).update(values)
    return SweepConfig(
        preset=preset, model=_abs_if_path(base["model"]), dataset=_abs_if_path(base["dataset"]),
        ratios=parsed_ratios, pruner=base["pruner"], pattern=base["pattern"], scope=base["scope"],
        mask_training=mask_training, stages={s: {k: _abs_if_path(v, k) for k, v in p.items()} for s, p in stages.items()},
        seeds=parsed_seeds,
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
    #: The replicate (its offset in ``--seeds``) a replicated model step belongs to; 0 for shared steps.
    replicate: int = 0


def build_plan(config: SweepConfig) -> list[Step]:
    """The steps in the order they run: the dense reference first, then ratio after ratio.

    Per ratio the cheap pruned score comes first and each finetune right after what it needs, so
    a sweep stopped early has complete rows for what it reached.

    Replicates (``config.seeds``): prune, extract_masks and baseline_loss run once per ratio (prune
    is deterministic for magnitude; the baseline's subset is shared, see docs/details/main.md);
    every stochastic stage after them runs once per replicate ``k`` with its seed offset by ``k``
    (:data:`maskdm.tracking.REPLICATE_SEEDS`: train_masks' ``mask_seed``, finetune's and sample's
    ``seed``), and so does the scoring of the dense and pruned models. Replicate 0 runs the
    preset's parameters unchanged; step names get `` #k`` when there is more than one replicate.
    """
    from maskdm.tracking import REPLICATE_SEEDS, replicate_seed

    p = config.stages
    plan: list[Step] = []
    several = len(config.seeds) > 1

    def add(step: Step) -> Step:
        plan.append(step)
        return step

    def named(name: str, k: int) -> str:
        return f"{name} #{k}" if several else name

    def params_of(stage: str, k: int) -> dict[str, str]:
        params = dict(p.get(stage, {}))
        if k:  # replicate 0 is the preset as it always ran, so its runs stay cached
            key, _ = REPLICATE_SEEDS[stage]
            params[key] = replicate_seed(params.get(key, declared_defaults(stage)[key]), k)
        return params

    def score(model_step: Step, variant: str, ratio: float, label: str, k: int) -> None:
        sample = add(Step(named(f"sample {label}", k), "sample", params_of("sample", k), {"model_run_id": model_step.name}, ratio, variant))
        add(Step(named(f"fid {label}", k), "fid", dict(p.get("fid", {})), {"sample_run_id": sample.name}, ratio, variant))

    prune_base = {**p.get("prune", {}), "dataset": config.dataset}
    needs_model: dict[str, str] = {}
    model = config.model
    if model == "demo":
        # The demo model as a step of its own: the shipped weights, registered once per store (see
        # run_plan; a pretrain configured with `set` trains as a child run instead), named by run ID
        # downstream so that the cache keys pin exactly which demo model was pruned.
        add(Step(DEMO_MODEL_STEP, "pretrain", dict(p.get("pretrain", {}))))
        needs_model = {"model": DEMO_MODEL_STEP}
        model = ""

    def prune_params(ratio: float, pruner: str, pattern: str, scope: str) -> dict[str, str]:
        params = {**prune_base, "pruning_ratio": format_ratio(ratio), "pruner": pruner, "pattern": pattern, "scope": scope}
        if model:
            params["model"] = model
        return params

    # The dense reference is pruning_ratio 0 whatever the pruner, pattern and scope: one run (and
    # one score per replicate) shared by every sweep of the same model.
    dense = add(Step("prune dense", "prune", prune_params(0.0, "magnitude", "unstructured", "layer"), dict(needs_model), 0.0, "dense"))
    for k in config.seeds:
        score(dense, "dense", 0.0, "dense", k)

    for ratio in config.ratios:
        r = f"r={format_ratio(ratio)}"
        pruned = add(Step(f"prune {r}", "prune", prune_params(ratio, config.pruner, config.pattern, config.scope), dict(needs_model), ratio, "pruned"))
        for k in config.seeds:
            score(pruned, "pruned", ratio, f"{r} (pruned)", k)
        masks = add(Step(f"extract_masks {r}", "extract_masks", {}, {"prune_run_id": pruned.name}, ratio))
        baseline = None
        if config.mask_training in ("true", "both"):
            baseline = add(Step(f"baseline_loss {r}", "baseline_loss", dict(p.get("baseline_loss", {})), {"masks_run_id": masks.name}, ratio))
        for k in config.seeds:
            if baseline is not None:
                trained = add(Step(named(f"train_masks {r}", k), "train_masks", params_of("train_masks", k), {"baseline_run_id": baseline.name}, ratio, "masked", k))
                score(trained, "masked", ratio, f"{r} (masked)", k)
                tuned = add(Step(named(f"finetune {r} (from masked)", k), "finetune", params_of("finetune", k), {"masks_run_id": trained.name}, ratio, "finetuned", k))
                score(tuned, "finetuned", ratio, f"{r} (finetuned)", k)
            if config.mask_training in ("false", "both"):
                plain = add(Step(named(f"finetune {r} (from pruned)", k), "finetune", params_of("finetune", k), {"masks_run_id": masks.name}, ratio, "finetuned_no_mask_training", k))
                score(plain, "finetuned_no_mask_training", ratio, f"{r} (finetuned, no mask training)", k)
    add(speed_step(plan, p.get("speed", {})))
    return plan


#: ``<param>[<i>]`` in a step's needs: the i-th run ID of a comma-separated list parameter.
_LISTED = re.compile(r"^(\w+)\[(\d+)\]$")


def speed_step(plan: list[Step], params: Mapping[str, str]) -> Step:
    """The side-by-side timing of every model the plan makes against the dense one, once they exist.

    Replicates of an arm share its architecture and sparsity, so only the first replicate's models
    are timed: the others would cost the same again and measure the same kernels.
    """
    models = [s for s in plan if s.variant and s.stage in ("prune", "train_masks", "finetune")]
    first = min(s.replicate for s in models)
    models = [s for s in models if s.replicate == first]
    dense = next(s.name for s in models if s.variant == "dense")
    needs = {"dense": dense, **{f"model_run_ids[{i}]": s.name for i, s in enumerate(m for m in models if m.name != dense)}}
    return Step("speed", "speed", dict(params), needs)


def join_listed(params: Mapping[str, str]) -> dict[str, str]:
    """``{"ids[0]": a, "ids[1]": b}`` -> ``{"ids": "a,b"}`` (other keys as they are)."""
    joined: dict[str, str] = {k: v for k, v in params.items() if not _LISTED.match(k)}
    listed = sorted((m.group(1), int(m.group(2)), v) for k, v in params.items() if (m := _LISTED.match(k)))
    for name, _, value in listed:
        joined[name] = f"{joined[name]},{value}" if name in joined else value
    return joined


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


#: On a driver (``main``) run: a digest of what it sweeps (its parameters and experiment). A rerun
#: of the same sweep ends the runs of its predecessors with the same key whose process is dead.
DRIVER_KEY_TAG = "maskdm.driver_key"


def driver_key(params: Mapping[str, object], experiment_id: str) -> str:
    payload = json.dumps([experiment_id, sorted((str(k), str(v)) for k, v in params.items())])
    return hashlib.sha256(payload.encode()).hexdigest()


def end_dead_driver_runs(experiment_id: str, key: str, driver_run_id: str) -> list[str]:
    """Mark KILLED the RUNNING driver runs of this sweep (``key``) whose process is dead; their IDs.

    A driver killed by SIGKILL cannot end its own run; the stage runs it left are ended step by
    step (:func:`end_dead_runs_of_step`), and its own run here, by the driver that reruns the sweep.
    The same rules as there: only what this machine can prove.
    """
    from maskdm.tracking import STAGE_TAG, end_dead_runs, running_runs

    running = [r for r in running_runs([experiment_id], f"tags.`{DRIVER_KEY_TAG}` = '{key}' and tags.`{STAGE_TAG}` = 'main'")
               if r.info.run_id != driver_run_id]
    checks = end_dead_runs(running, ended_by=f"maskdm main (driver run {driver_run_id})") if running else []
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
    launch: Launch | None = None,
    env: Mapping[str, str] | None = None,
    concurrent: bool = False,
) -> StageOutcome:
    """Reuse the FINISHED run with this stage's cache key, or run the stage as a child MLflow Project run.

    ``env`` (a GPU, a thread count) is added to the stage process's environment only. By default
    the stage runs as ``mlflow.projects.run(synchronous=True)`` in this thread; ``concurrent``
    (other stages start from other threads meanwhile) submits it instead (:func:`_submit_and_wait`).
    ``launch.backend`` other than ``local`` hands it to that MLflow Projects backend.
    """
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

    tags = {
        PARENT_RUN_TAG: parent_run_id,
        CACHE_KEY_TAG: key,
        STAGE_TAG: stage,
        STEP_TAG: step,
        MLFLOW_RUN_NAME: step,
        # This (driver) process until the stage's own process records itself: a run whose
        # driver is killed before the stage starts is still judged dead (maskdm.liveness).
        **process_tags(),
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    if launch is not None and launch.backend != "local":
        return _run_on_backend(stage, step, passed, tags, experiment_id, project_dir, launch, resumed_from)

    client = _client()
    # The run is made here, not by mlflow.projects.run, so that the cache key and the parent are on
    # it from its first moment: a run killed at any point is still found by find_resumable_run.
    # Given run_id, mlflow.projects.run neither creates a run nor logs parameters, so they are
    # logged here as `mlflow run` would; it still marks the run FAILED if the command fails.
    run = client.create_run(
        experiment_id,
        tags={
            **tags,
            MLFLOW_SOURCE_TYPE: "PROJECT",
            MLFLOW_SOURCE_NAME: str(project_dir),
            MLFLOW_PROJECT_ENTRY_POINT: stage,
        },
    )
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in passed.items()])
    log.info("%s: running as run %s%s", step, run_id, f" ({describe_env(env)})" if env else "")
    if concurrent:
        wall_s, cpu_s = _submit_and_wait(stage, step, passed, run_id, experiment_id, project_dir, env or {})
        return StageOutcome(step, stage, run_id, reused=False, resumed_from=resumed_from, wall_s=wall_s, cpu_s=cpu_s)
    wall_start, cpu_start = time.perf_counter(), _children_cpu_s()
    try:
        # One stage at a time: nothing else spawns while os.environ carries this stage's env.
        with _environ(env or {}):
            mlflow.projects.run(
                uri=str(project_dir), entry_point=stage, parameters=passed, experiment_id=experiment_id,
                env_manager="local", synchronous=True, run_id=run_id,
            )
    except ExecutionException:
        raise MaskDMError(f"stage {stage} failed in run {run_id} ({step}); its error is printed above") from None
    return StageOutcome(step, stage, run_id, reused=False, resumed_from=resumed_from,
                        wall_s=time.perf_counter() - wall_start, cpu_s=_children_cpu_s() - cpu_start)


# --- where and how many stages run at once -------------------------------------------------------

#: Backends mlflow.projects.run knows without plugins (plugins add ``mlflow.project_backend`` entry points).
BUILTIN_BACKENDS = ("local", "kubernetes", "databricks")
#: What mlflow's kubernetes backend reads from backend_config (``kube-context`` is optional).
KUBERNETES_KEYS = ("kube-job-template-path", "repository-uri")
#: The variables that size a stage process's CPU thread pools (torch reads OMP_NUM_THREADS at start).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Launch:
    """How the plan's stages are started: how many at once, on which GPUs, with how many threads.

    ``gpus`` None leaves CUDA_VISIBLE_DEVICES as the driver has it; ``()`` hides every GPU; a
    tuple of IDs makes one slot per GPU, and each running stage holds one slot, so no two running
    stages share a GPU. ``threads`` None leaves the thread variables alone.
    """

    parallel: int = 1
    gpus: tuple[str, ...] | None = None
    threads: int | None = None
    backend: str = "local"
    backend_config: dict = field(default_factory=dict)

    def slot_envs(self) -> list[dict[str, str]]:
        """The environment each of the ``parallel`` slots adds to the stage processes it runs."""
        envs = []
        for slot in range(self.parallel):
            env = {}
            if self.gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot] if self.gpus else ""
            if self.threads is not None:
                env.update({name: str(self.threads) for name in THREAD_VARS})
            envs.append(env)
        return envs

    def describe(self) -> str:
        if self.backend != "local":
            return f"up to {self.parallel} stage(s) at once on the MLflow Projects backend '{self.backend}'"
        parts = [f"up to {self.parallel} stage(s) at once"]
        if self.gpus == ():
            parts.append("on the CPU (GPUs hidden)")
        elif self.gpus:
            parts.append(f"on GPU(s) {','.join(self.gpus[: self.parallel])}, one each")
        if self.threads:
            parts.append(f"{self.threads} CPU thread(s) per stage")
        return ", ".join(parts)


def visible_gpus() -> tuple[str, ...]:
    """The GPUs this process may use, as IDs for CUDA_VISIBLE_DEVICES: the driver's own mask if it
    has one (so ``CUDA_VISIBLE_DEVICES=2,3 maskdm main`` uses GPUs 2 and 3), else 0..n-1."""
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is not None:
        ids = []
        for item in mask.split(","):
            item = item.strip()
            if not item or item.startswith("-"):
                break  # CUDA ignores the rest of the list from an invalid entry on
            ids.append(item)
        return tuple(ids)
    import torch

    return tuple(str(i) for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else ()


def known_backends() -> list[str]:
    from mlflow.utils.plugins import get_entry_points

    plugins = [e.name for e in get_entry_points("mlflow.project_backend")]
    return [*BUILTIN_BACKENDS, *(p for p in plugins if p not in BUILTIN_BACKENDS)]


def load_backend_config(value: str | Mapping | None) -> dict:
    """``backend_config``: a path to a JSON file or inline JSON, an object either way ("" = none)."""
    if value is None or isinstance(value, Mapping):
        return dict(value or {})
    text = str(value).strip()
    if not text:
        return {}
    if text.startswith(("{", "[")):
        source, what = text, "inline JSON"
    else:
        path = Path(os.path.expanduser(text))
        if not path.is_file():
            raise MaskDMError(f"backend_config: '{text}' is neither a JSON file that exists nor inline JSON ({{...}})")
        source, what = path.read_text(), str(path)
    try:
        config = json.loads(source)
    except ValueError as exc:
        raise MaskDMError(f"backend_config: {what} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise MaskDMError(f"backend_config: {what} must be a JSON object, e.g. {{\"repository-uri\": \"...\"}}")
    return config


def _positive(name: str, value: object, hint: str) -> int | None:
    """``auto`` (or empty) -> None; otherwise an integer >= 1."""
    text = str(value).strip().lower() if value is not None else "auto"
    if text in ("", "auto"):
        return None
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise MaskDMError(f"{name} must be an integer >= 1 or auto, not '{value}'; {hint}")
    return number


def parse_gpus(value: object) -> tuple[str, ...] | None:
    """``auto`` -> None (decided later), ``none`` -> (), ``0,1,3`` (indices or GPU-/MIG- UUIDs) -> a tuple."""
    text = str(value).strip() if value is not None else "auto"
    if text.lower() in ("", "auto"):
        return None
    if text.lower() in ("none", "cpu"):
        return ()
    ids = tuple(item.strip() for item in text.split(","))
    for item in ids:
        if not (item.isdigit() or re.fullmatch(r"(GPU|MIG)-[0-9A-Za-z/-]+", item)):
            raise MaskDMError(f"gpus: '{item}' is not a GPU index or UUID; pass e.g. --gpus 0,1 (or auto, none)")
    if len(set(ids)) != len(ids):
        raise MaskDMError(f"gpus: {text} names a GPU twice; each running stage gets a GPU of its own")
    return ids


def resolve_launch(
    parallel: object = "auto",
    gpus: object = "auto",
    threads: object = "auto",
    backend: str | None = "local",
    backend_config: str | Mapping | None = None,
    *,
    cores: int | None = None,
    detect_gpus: Callable[[], tuple[str, ...]] = visible_gpus,
) -> Launch:
    """Check the options and decide the slots.

    - ``parallel`` auto: one stage per GPU slot (1 with none: the sequential driver as it was).
    - ``gpus`` auto: the visible GPUs when ``parallel`` > 1 (one each); with ``parallel`` 1 the
      environment is left as it is. A list pins every stage to one of its GPUs; ``none`` hides them.
    - ``threads`` auto: with ``parallel`` > 1, cores // parallel CPU threads per stage (two stages
      on two cores would otherwise each start two threads); with 1, torch's own choice.
    - ``backend``: ``local`` or an MLflow Projects backend (``kubernetes``, ``databricks``, a
      plugin) with its ``backend_config``; that backend places the stages, so gpus and threads stay auto.
    """
    backend = str(backend or "local").strip()
    if backend not in known_backends():
        raise MaskDMError(f"backend '{backend}' is not one of {', '.join(known_backends())} (mlflow.projects backends)")
    config = load_backend_config(backend_config)
    count = _positive("parallel", parallel, "it is how many stages run at once")
    pinned_threads = _positive("threads", threads, "it is the CPU threads of each stage process")
    listed = parse_gpus(gpus)
    if backend != "local":
        if listed is not None or pinned_threads is not None:
            raise MaskDMError(f"gpus and threads apply to the local backend; the '{backend}' backend places stages itself (set resources in its backend_config)")
        if backend == "kubernetes":
            missing = [key for key in KUBERNETES_KEYS if key not in config]
            if missing:
                raise MaskDMError(f"backend_config for kubernetes needs {', '.join(missing)} (see docs/details/main.md#a-cluster)")
            template = Path(os.path.expanduser(str(config["kube-job-template-path"])))
            if not template.is_file():
                raise MaskDMError(f"backend_config: kube-job-template-path {template} is not a file")
        return Launch(parallel=count or 1, backend=backend, backend_config=config)
    if config:
        raise MaskDMError("backend_config is for a cluster backend (e.g. --backend kubernetes); the local backend takes none")

    # No GPU found: None, not (): the stages' environment keeps whatever CUDA_VISIBLE_DEVICES it has.
    slots = listed if listed is not None else ((detect_gpus() or None) if count != 1 else None)
    parallel_n = count or (len(slots) if slots else 1)
    if slots and parallel_n > len(slots):
        raise MaskDMError(
            f"parallel {parallel_n} needs {parallel_n} GPUs, one per running stage, but gpus gives {len(slots)} "
            f"({','.join(slots)}); lower parallel or pass --gpus none to run on the CPU"
        )
    if listed is None and parallel_n == 1:
        slots = None  # one stage at a time, in the environment the driver was given: as before
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    thread_count = pinned_threads or (max(1, cores // parallel_n) if parallel_n > 1 else None)
    return Launch(parallel=parallel_n, gpus=slots, threads=thread_count)


def describe_env(env: Mapping[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items() if k != "MKL_NUM_THREADS")


@contextlib.contextmanager
def _environ(env: Mapping[str, str]):
    """``env`` set in os.environ for the block (which copies it into a child process), then undone."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _Submitted:
    """The stage processes running now (run ID -> mlflow SubmittedRun), to cancel them on an interrupt."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: dict[str, object] = {}
        self.cancelled = False

    def add(self, run_id: str, submitted) -> None:
        with self.lock:
            self.runs[run_id] = submitted
            cancelled = self.cancelled
        if cancelled:  # started while the driver was being interrupted
            _cancel(run_id, submitted)

    def remove(self, run_id: str) -> None:
        with self.lock:
            self.runs.pop(run_id, None)

    def cancel_all(self) -> None:
        with self.lock:
            self.cancelled = True
            runs = list(self.runs.items())
        for run_id, submitted in runs:
            _cancel(run_id, submitted)


_SUBMITTED = _Submitted()
#: mlflow's local backend copies os.environ when it starts a stage's process; holding this while
#: os.environ carries one stage's GPU and threads keeps every other stage's process from seeing them.
_SPAWN_LOCK = threading.Lock()


def _cancel(run_id: str, submitted) -> None:
    """Stop a submitted stage (its whole process group) and mark its run FAILED, as mlflow does on Ctrl-C."""
    log.error("cancelling run %s", run_id)
    try:
        submitted.cancel()
    finally:
        _mark_ended(run_id, "FAILED")


def _mark_ended(run_id: str, status: str) -> None:
    """Set the run's end status unless the stage (or the `mlflow run` around it) already did."""
    from mlflow.entities import RunStatus

    client = _client()
    if not RunStatus.is_terminated(client.get_run(run_id).info.status):
        client.set_terminated(run_id, status)


def _wait(submitted) -> tuple[bool, float]:
    """Wait for a submitted stage: (succeeded, CPU seconds of its process tree).

    The process's own rusage (os.wait4), not RUSAGE_CHILDREN's difference, which would also count
    the stages that ended meanwhile in other threads.
    """
    proc = getattr(submitted, "command_proc", None)
    if isinstance(proc, subprocess.Popen) and hasattr(os, "wait4"):
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except ChildProcessError:  # reaped already (cancelled)
            return submitted.wait(), 0.0
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode == 0, usage.ru_utime + usage.ru_stime
    return bool(submitted.wait()), 0.0


def _submit_and_wait(stage, step, passed, run_id, experiment_id, project_dir, env) -> tuple[float, float]:
    """Run a stage from a worker thread: submitted (``synchronous=False``) with ``env`` in its
    environment, then waited for. Returns (wall seconds, CPU seconds)."""
    import mlflow

    wall_start = time.perf_counter()
    with _SPAWN_LOCK, _environ(env):
        # The local backend starts `mlflow run --run-id <run_id>` in a process group of its own,
        # with a copy of os.environ; that process runs the entry point and ends the run FINISHED
        # or FAILED. The copy is made before this returns, so the lock can go at once.
        submitted = mlflow.projects.run(
            uri=str(project_dir), entry_point=stage, parameters=passed, experiment_id=experiment_id,
            env_manager="local", synchronous=False, run_id=run_id,
        )
    _SUBMITTED.add(run_id, submitted)
    try:
        ok, cpu_s = _wait(submitted)
    finally:
        _SUBMITTED.remove(run_id)
    _mark_ended(run_id, "FINISHED" if ok else "FAILED")
    if not ok:
        raise MaskDMError(f"stage {stage} failed in run {run_id} ({step}); its error is printed above")
    return time.perf_counter() - wall_start, cpu_s


#: On a stage run a cluster backend made: the backend, and the job it runs as (kubernetes:
#: ``<namespace>/<job name>``; databricks: its run ID), for people and for a rerun of the driver.
LAUNCHED_ON_TAG = "maskdm.launched_on"
BACKEND_JOB_TAG = "maskdm.backend_job"
#: Seconds between looks at the store while a rerun waits for a run a cluster still holds.
REMOTE_POLL_S = 30.0


def _backend_job(submitted) -> str:
    """What the cluster calls the submitted stage (MLflow's SubmittedRun attributes; empty if unknown)."""
    if getattr(submitted, "_job_name", None):
        return f"{getattr(submitted, '_job_namespace', '')}/{submitted._job_name}"
    return str(getattr(submitted, "_databricks_run_id", "") or "")


def _wait_for_remote_run(step, experiment_id, key, backend) -> str | None:
    """A RUNNING run of this step that a cluster backend holds (launched by an earlier driver, its
    pod perhaps still pending): wait until it ends; its ID if it ended FINISHED, else None.

    Such a run records no process here (the driver records what it launched, not itself), so no
    driver can prove it dead: starting the step again would run it twice. ``maskdm reap --run_id
    <id> --stale_after <s>`` ends one whose job is gone for good.
    """
    from mlflow.entities import RunStatus

    from maskdm.tracking import running_runs

    held = running_runs([experiment_id], f"tags.`{CACHE_KEY_TAG}` = '{key}' and tags.`{LAUNCHED_ON_TAG}` = '{backend}'")
    if not held:
        return None
    run_id = held[0].info.run_id
    log.info("%s: run %s is still held by backend %s (job %s); waiting for it instead of starting the step again",
             step, run_id, backend, held[0].data.tags.get(BACKEND_JOB_TAG) or "unknown")
    while not RunStatus.is_terminated(RunStatus.from_string(status := _client().get_run(run_id).info.status)):
        time.sleep(REMOTE_POLL_S)
    return run_id if status == "FINISHED" else None


def _run_on_backend(stage, step, passed, tags, experiment_id, project_dir, launch: Launch, resumed_from) -> StageOutcome:
    """Run a stage on a cluster backend. Such a backend makes the run itself (mlflow passes a given
    run ID to the local backend only), so the driver's tags go on it as soon as it exists.

    The run records what was launched (backend and job), never the driver's process: the stage's
    process is elsewhere (or not started: a pending pod), so the driver's death says nothing about
    it, and a rerun waits for such a run instead of ending it and running the step twice.
    """
    import mlflow

    from maskdm.liveness import PROCESS_TAGS

    wall_start = time.perf_counter()
    held = _wait_for_remote_run(step, experiment_id, tags[CACHE_KEY_TAG], launch.backend)
    if held:
        _client().set_tag(held, f"{USED_BY_TAG_PREFIX}{tags[PARENT_RUN_TAG]}", "true")
        return StageOutcome(step, stage, held, reused=True)
    try:
        submitted = mlflow.projects.run(
            uri=str(project_dir), entry_point=stage, parameters=passed, experiment_id=experiment_id,
            backend=launch.backend, backend_config=dict(launch.backend_config), synchronous=False,
        )
    except Exception as exc:  # noqa: BLE001 - mlflow raises several kinds; one line for the user
        raise MaskDMError(f"backend {launch.backend} could not start stage {stage} ({step}): {' '.join(str(exc).split())}") from None
    run_id = submitted.run_id
    client = _client()
    launched = {k: v for k, v in tags.items() if k not in PROCESS_TAGS}
    launched.update({LAUNCHED_ON_TAG: launch.backend, BACKEND_JOB_TAG: _backend_job(submitted)})
    for key, value in launched.items():
        client.set_tag(run_id, key, value)
    log.info("%s: running as run %s on backend %s", step, run_id, launch.backend)
    _SUBMITTED.add(run_id, submitted)
    try:
        ok = bool(submitted.wait())
    finally:
        _SUBMITTED.remove(run_id)
    _mark_ended(run_id, "FINISHED" if ok else "FAILED")
    if not ok:
        raise MaskDMError(f"stage {stage} failed in run {run_id} ({step}) on backend {launch.backend}; see its logs there")
    return StageOutcome(step, stage, run_id, reused=False, resumed_from=resumed_from, wall_s=time.perf_counter() - wall_start)


# --- the scheduler ---------------------------------------------------------------------------------


def check_plan(plan: list[Step]) -> None:
    """Every step's needs name an earlier step (so plan order is a valid sequential order)."""
    seen: set[str] = set()
    for step in plan:
        if step.name in seen:
            raise MaskDMError(f"plan: step '{step.name}' appears twice")
        missing = [needed for needed in step.needs.values() if needed not in seen]
        if missing:
            raise MaskDMError(f"plan: step '{step.name}' needs {', '.join(missing)}, which no earlier step is")
        seen.add(step.name)


#: Ranges of stage parameters the stages check inside their runs, checked on the whole plan first:
#: (stage, key) -> (the least integer, or None for any number; whether ``auto`` is allowed).
PARAM_RANGES = {
    ("baseline_loss", "dataset_size"): (1, False), ("baseline_loss", "batch_size"): (1, False),
    ("baseline_loss", "max_batches"): (0, False), ("baseline_loss", "seed"): (0, False),
    ("train_masks", "epoch"): (0, False), ("train_masks", "max_step"): (0, False), ("train_masks", "accumulation"): (1, False),
    ("train_masks", "samples"): (1, False), ("train_masks", "heldout_size"): (0, True), ("train_masks", "eval_every"): (0, True),
    ("train_masks", "lr"): (None, False), ("train_masks", "logits"): (None, False), ("train_masks", "temperature"): (None, False),
    ("finetune", "num_iters"): (1, False), ("finetune", "train_batch_size"): (1, False),
    ("finetune", "gradient_accumulation_steps"): (1, False), ("finetune", "save_model_steps"): (1, False),
    ("finetune", "lr_warmup_steps"): (0, False),
    ("sample", "total_samples"): (2, False), ("sample", "batch_size"): (1, False), ("sample", "ddim_steps"): (1, False),
}

#: Training images of the datasets that have a fixed size (an image folder is counted).
KNOWN_DATASET_SIZES = {"cifar10": 50000}


def dataset_images(name: str) -> int | None:
    """How many training images ``name`` holds, without reading any; None where that is not known here."""
    from maskdm import data

    if name == "shapes":
        return data.SHAPES_TRAIN_SIZE
    if name.startswith("imagefolder:"):
        return len(data.image_paths(Path(os.path.expanduser(name.split(":", 1)[1]))))
    return KNOWN_DATASET_SIZES.get(name)


def _checked_number(stage: str, key: str, value: str) -> float | None:
    least, auto = PARAM_RANGES[(stage, key)]
    text = str(value).strip()
    if auto and text.lower() == "auto":
        return None
    try:
        number = float(text) if least is None else int(text)
    except ValueError:
        kind = "a number" if least is None else f"an integer >= {least}"
        raise MaskDMError(f"plan: {stage}.{key}={value} is not {kind}{' or auto' if auto else ''}") from None
    if least is not None and number < least:
        raise MaskDMError(f"plan: {stage}.{key}={value} must be >= {least}")
    if least is None and not math.isfinite(number):
        raise MaskDMError(f"plan: {stage}.{key}={value} must be a finite number")
    return number


def check_plan_inputs(config: SweepConfig, plan: list[Step], project_dir: Path = REPO_DIR) -> None:
    """What can be known of the whole plan before any stage runs, checked so that a sweep does not
    fail hours in: each parameter's type and range (the click command's type, :data:`PARAM_RANGES`),
    and the sizes that must fit the dataset (baseline_loss's subset and batch, train_masks'
    held-out images). Raises :class:`MaskDMError` with one line."""
    import click

    full = {}
    for step in plan:
        if step.stage in full:
            continue
        params = full_params(step.stage, step.params, project_dir)
        full[step.stage] = params
        options = {opt.lstrip("-"): param for param in importlib.import_module(f"entrypoints.{step.stage}").command.params
                   for opt in param.opts if opt.startswith("--")}
        for key, value in params.items():
            option = options.get(key)
            if option is not None and isinstance(option.type, (click.types.IntParamType, click.types.FloatParamType)) and value != "":
                try:
                    option.type.convert(value, option, None)
                except click.BadParameter as exc:
                    raise MaskDMError(f"plan: {step.stage}.{key}={value}: {exc.message}") from None
            if (step.stage, key) in PARAM_RANGES and value != "":
                _checked_number(step.stage, key, value)

    _check_model_fits(config, full)
    images = dataset_images((full.get("baseline_loss") or {}).get("dataset") or config.dataset)
    if images is None:
        return
    base = full.get("baseline_loss")
    if base is not None:
        subset = min(int(base["dataset_size"]), images)
        batch = int(base["batch_size"])
        if subset < batch:
            raise MaskDMError(
                f"plan: baseline_loss takes {subset} of the dataset's {images} images, fewer than one batch of "
                f"batch_size={batch}: lower baseline_loss.batch_size"
            )
        masks = full.get("train_masks")
        if masks is not None:
            for key in ("dataset", "dataset_size", "batch_size", "seed"):
                if masks.get(key) and masks[key] != base.get(key, masks[key]):
                    raise MaskDMError(f"plan: train_masks.{key}={masks[key]} differs from baseline_loss.{key}={base.get(key)}; "
                                      f"leave train_masks.{key} unset (it takes the baseline's)")
            heldout = _checked_number("train_masks", "heldout_size", masks.get("heldout_size", "auto"))
            outside = images - subset
            if heldout and outside < max(heldout, batch):
                raise MaskDMError(
                    f"plan: train_masks.heldout_size={heldout:g} needs that many images (and at least a batch of {batch}) "
                    f"outside baseline_loss's subset, but {outside} of the dataset's {images} images lie outside its "
                    f"{subset}; lower train_masks.heldout_size or baseline_loss.dataset_size, or set train_masks.heldout_size=0"
                )


def _check_model_fits(config: SweepConfig, full: Mapping[str, Mapping[str, str]]) -> None:
    """The demo model's arch against its resolution, and sample's ddim_steps against the model's
    training timesteps, where they are known without loading a model (the demo model, a local folder)."""
    from maskdm.models import ARCHS, check_resolution

    timesteps = None
    pretrain = full.get("pretrain")
    if pretrain is not None:
        arch = pretrain.get("arch", "")
        if arch not in ARCHS:
            raise MaskDMError(f"plan: pretrain.arch={arch} is not one of {', '.join(ARCHS)}")
        try:
            check_resolution(int(pretrain["resolution"]), ARCHS[arch]["block_out_channels"], f"arch '{arch}'")
        except MaskDMError as exc:
            raise MaskDMError(f"plan: pretrain.resolution={pretrain['resolution']}: {exc}") from None
        timesteps = 1000  # pretrain's scheduler (maskdm.models.default_scheduler)
    elif os.path.isdir(config.model):
        try:
            scheduler = json.loads((Path(config.model) / "scheduler" / "scheduler_config.json").read_text())
            timesteps = int(scheduler["num_train_timesteps"])
        except (OSError, ValueError, KeyError, TypeError):
            timesteps = None  # the prune stage says what is wrong with the folder
    sample = full.get("sample")
    if sample is not None and timesteps is not None and int(sample["ddim_steps"]) > timesteps:
        raise MaskDMError(f"plan: sample.ddim_steps={sample['ddim_steps']} is more than the model's {timesteps} training timesteps")


def schedule(
    plan: list[Step],
    start: Callable[[Step, int, Mapping[str, StageOutcome]], StageOutcome],
    *,
    parallel: int = 1,
    on_outcome: Callable[[StageOutcome], None] | None = None,
) -> dict[str, StageOutcome]:
    """Run ``start(step, slot, outcomes so far)`` for every step once the steps it needs are done,
    at most ``parallel`` at once, each in a slot (0..parallel-1) no other running step holds.

    Ready steps start in plan order, so ``parallel`` 1 runs the plan in order, in this thread.
    ``on_outcome`` is called in this thread as each step ends. A failure starts nothing new, waits
    for the running steps (their outcomes are kept) and raises the first error. An interrupt
    (Ctrl-C, SIGTERM) cancels the running stages. Returns the outcomes in plan order.
    """
    check_plan(plan)
    outcomes: dict[str, StageOutcome] = {}

    def record(outcome: StageOutcome, step: Step) -> None:
        outcomes[step.name] = outcome
        if on_outcome:
            on_outcome(outcome)

    if parallel <= 1:
        for step in plan:
            record(start(step, 0, outcomes), step)
        return outcomes

    pending = list(plan)
    free = list(range(parallel))
    running: dict[concurrent.futures.Future, tuple[Step, int]] = {}
    failure: BaseException | None = None
    _SUBMITTED.cancelled = False
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="maskdm-stage") as pool:
        try:
            while pending or running:
                if failure is None:
                    for step in list(pending):
                        if not free:
                            break
                        if all(needed in outcomes for needed in step.needs.values()):
                            pending.remove(step)
                            slot = free.pop(0)
                            running[pool.submit(start, step, slot, outcomes)] = (step, slot)
                if not running:
                    break  # a failure with nothing left running (check_plan rules out a stuck plan)
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: plan.index(running[f][0])):
                    step, slot = running.pop(future)
                    free.append(slot)
                    free.sort()
                    try:
                        outcome = future.result()
                    except Exception as exc:  # noqa: BLE001 - re-raised once the running steps end
                        log.error("%s failed; starting no further stages, waiting for the %d running", step.name, len(running))
                        failure = failure or exc
                        continue
                    record(outcome, step)
        except BaseException:
            _SUBMITTED.cancel_all()
            raise
    if failure is not None:
        raise failure
    return {step.name: outcomes[step.name] for step in plan}


def _children_cpu_s() -> float:
    """User + system CPU of every finished child process (a stage's own children are counted in it)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def find_demo_model(experiment_id: str | None = None) -> str:
    """The run of the shipped demo model in this tracking store, as ``model=demo`` resolves it.

    The package ships the demo model's weights; the first use in a store registers them as a
    ``pretrain`` run (:func:`maskdm.tracking.demo_model_run_id`, in ``experiment_id``), every later
    one reuses that run whatever the code version, so no store trains its own.
    """
    from maskdm.tracking import demo_model_run_id

    return demo_model_run_id(experiment_id)


def run_plan(
    plan: list[Step],
    *,
    experiment_id: str,
    parent_run_id: str,
    project_dir: Path = REPO_DIR,
    on_outcome: Callable[[StageOutcome], None] | None = None,
    launch: Launch | None = None,
) -> dict[str, StageOutcome]:
    """Run (or reuse) every step, filling upstream run IDs from the steps it needs.

    ``launch`` (default: one stage at a time, in plan order, as the driver always ran) says how
    many independent steps run at once, on which GPU and with how many threads (:func:`schedule`).
    """
    from maskdm.tracking import code_version

    launch = launch or Launch()
    version = code_version()
    envs = launch.slot_envs()
    position = {step.name: index for index, step in enumerate(plan, 1)}
    concurrent_stages = launch.parallel > 1
    if launch != Launch():
        log.info("running %s", launch.describe())

    def start(step: Step, slot: int, done: Mapping[str, StageOutcome]) -> StageOutcome:
        params = join_listed({**step.params, **{param: done[needed].run_id for param, needed in step.needs.items()}})
        tags = {VARIANT_TAG: step.variant} if step.variant else {}
        log.info("[%d/%d] %s", position[step.name], len(plan), step.name)
        demo = find_demo_model(experiment_id) if step.name == DEMO_MODEL_STEP and not step.params else None
        if demo:
            log.info("%s: the shipped demo model, run %s", step.name, demo)
            _client().set_tag(demo, f"{USED_BY_TAG_PREFIX}{parent_run_id}", "true")
            return StageOutcome(step.name, step.stage, demo, reused=True)
        return run_stage(
            step.stage, params, experiment_id=experiment_id, parent_run_id=parent_run_id, step=step.name,
            tags=tags, project_dir=project_dir, code_version=version,
            launch=launch if launch.backend != "local" else None, env=envs[slot], concurrent=concurrent_stages,
        )

    return schedule(plan, start, parallel=launch.parallel, on_outcome=on_outcome)


# --- results ---------------------------------------------------------------------------------------


def used_run_ids(outcomes: Mapping[str, StageOutcome]) -> list[str]:
    return list(dict.fromkeys(o.run_id for o in outcomes.values()))


@dataclass
class Results:
    markdown: str
    rows: int
    #: ``{metric key: {step: value}}``: the FID curves (means over replicates, and their standard
    #: errors) as MLflow metrics (step = ratio in percent).
    series: dict[str, dict[int, float]]


def write_results(run_ids: list[str], folder: Path, title: str) -> Results:
    """The report files (results.md / .csv, fid_vs_sparsity.png, replicates.csv, verdicts.csv) of
    exactly these stage runs (and their ancestors)."""
    from maskdm import report

    replicates = report.build_replicate_table(report.runs_frame(run_ids=run_ids))
    table = report.summarize_table(replicates)
    files = report.write_table_report(table, folder, title=title, replicates=replicates)
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
