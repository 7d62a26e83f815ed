"""The sweep's configuration and plan: options and presets resolved into a :class:`SweepConfig`, the
steps each ratio and replicate needs (:func:`build_plan`), the MLproject's parameters of each stage
and their cache key, and the checks made before any run starts."""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from maskdm.driver.presets import PRESETS
from maskdm.errors import MaskDMError

#: One logger for the whole driver, as before it was a package (its lines read "maskdm.driver: ...").
log = logging.getLogger("maskdm.driver")

REPO_DIR = Path(__file__).resolve().parents[2]
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


@functools.lru_cache(maxsize=None)
def _module_source(module: str):
    """The parsed source (``ast.Module``) of ``module``, found as an import would find it but not
    run; None if there is none."""
    import ast

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return ast.parse(Path(spec.origin).read_text(encoding="utf-8"))


def module_constant(module: str, name: str):
    """The literal a module assigns to ``name`` at its top level (``SIZE = 20000``), read from its
    source without importing it: the driver's checks need a few constants of modules that import
    torch (seconds of CPU, which the driver never needs). tests/test_driver.py compares each one
    the driver reads with the imported module's."""
    import ast

    tree = _module_source(module)
    for node in tree.body if tree is not None else ():
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return ast.literal_eval(node.value)
    raise MaskDMError(f"{module} assigns no literal {name} at its top level")


def declared_options(stage: str) -> dict[str, str | None]:
    """The options the stage's click command declares (``--num_iters`` -> ``num_iters``), each with
    its ``type=`` as written (``int``, ``float``, ``click.BOOL``; None for text).

    Read from the ``@click.option("--...")`` decorators of its ``command`` in the module's source,
    not by importing it: a stage module imports torch and diffusers (about 5 s), and the driver
    checks a plan before anything runs. tests/test_driver.py compares this with the imported
    commands' options and types.
    """
    import ast

    tree = _module_source(f"entrypoints.{stage}")
    if tree is None:
        raise MaskDMError(f"stage '{stage}' has no entry point (entrypoints/{stage}.py) in this checkout")
    options: dict[str, str | None] = {}
    for node in tree.body:
        if not (isinstance(node, ast.FunctionDef) and node.name == "command"):
            continue
        for decorator in node.decorator_list:
            if not (isinstance(decorator, ast.Call) and ast.unparse(decorator.func).endswith("option")):
                continue
            kind = next((ast.unparse(k.value) for k in decorator.keywords if k.arg == "type"), None)
            for arg in decorator.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--"):
                    options[arg.value.lstrip("-")] = kind
    return options


def stage_options(stage: str) -> set[str]:
    """The option names the stage's click command accepts (:func:`declared_options`)."""
    return set(declared_options(stage))


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

    from maskdm.method.patterns import pattern_ratio  # validates the pattern's spelling too

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


def _mlproject(project_dir: Path) -> dict:
    """The project's MLproject, parsed once per content (the driver reads it for every step, and
    the pure-Python YAML parser takes 60 ms a time)."""
    return _parse_mlproject((Path(project_dir) / "MLproject").read_text())


@functools.lru_cache(maxsize=8)
def _parse_mlproject(text: str) -> dict:
    return yaml.safe_load(text)


def declared_defaults(stage: str, project_dir: Path = REPO_DIR) -> dict[str, str]:
    """The MLproject defaults of ``stage``'s declared parameters (those without one are left out)."""
    spec = _mlproject(project_dir)
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
    if name == "shapes":
        return module_constant("maskdm.ddpm.data", "SHAPES_TRAIN_SIZE")
    if name.startswith("imagefolder:"):
        # The stages' own listing; it comes with torch, which only an image-folder sweep pays for here.
        from maskdm.ddpm import data

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
        types = declared_options(step.stage)
        for key, value in params.items():
            number_type = {"int": click.INT, "float": click.FLOAT}.get(types.get(key) or "")
            if number_type is not None and value != "":
                try:
                    number_type.convert(value, None, None)
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
    timesteps = None
    pretrain = full.get("pretrain")
    if pretrain is not None:
        from maskdm.ddpm.archs import ARCHS, check_resolution

        arch = pretrain.get("arch", "")
        if arch not in ARCHS:
            raise MaskDMError(f"plan: pretrain.arch={arch} is not one of {', '.join(ARCHS)}")
        try:
            check_resolution(int(pretrain["resolution"]), ARCHS[arch]["block_out_channels"], f"arch '{arch}'")
        except MaskDMError as exc:
            raise MaskDMError(f"plan: pretrain.resolution={pretrain['resolution']}: {exc}") from None
        timesteps = 1000  # pretrain's scheduler (maskdm.ddpm.models.default_scheduler)
    elif os.path.isdir(config.model):
        try:
            scheduler = json.loads((Path(config.model) / "scheduler" / "scheduler_config.json").read_text())
            timesteps = int(scheduler["num_train_timesteps"])
        except (OSError, ValueError, KeyError, TypeError):
            timesteps = None  # the prune stage says what is wrong with the folder
    sample = full.get("sample")
    if sample is not None and timesteps is not None and int(sample["ddim_steps"]) > timesteps:
        raise MaskDMError(f"plan: sample.ddim_steps={sample['ddim_steps']} is more than the model's {timesteps} training timesteps")
