"""The main driver: presets and overrides, the plan, the stage cache, resume, and whole sweeps.

Two kinds of test:
- fast ones run the driver's machinery (run_stage, run_plan) against a stand-in MLflow project
  whose entry points are shell one-liners, so caching, parenting, resume and lineage wiring are
  checked without starting torch;
- end-to-end ones run ``maskdm main`` on the real stages with a 16x16 model and tiny step counts:
  rerun idempotency, a SIGKILL mid-finetune followed by the same command, a chaos sweep (seven
  SIGKILLs at seeded moments, mid-upload and mid-rotation included, then a table equal to the
  undisturbed one) and four drivers at once against a real ``mlflow server``. Each starts dozens of Python processes, so they take minutes
  on a loaded 2-core machine; ``-m "not e2e"`` skips them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_unet
from maskdm import driver
from maskdm.errors import MaskDMError
from maskdm.tracking import has_artifact

REPO = Path(__file__).resolve().parent.parent

# --- presets, overrides, plan ----------------------------------------------------------------------


def test_paper_preset_is_the_original_recipe():
    config = driver.resolve_config("paper", mask_training="both")
    s = config.stages
    assert config.model == "google/ddpm-cifar10-32" and config.dataset == "cifar10"
    assert config.ratios == (0.3, 0.5, 0.7)
    assert {k: s["baseline_loss"][k] for k in ("dataset_size", "batch_size", "max_batches")} == {
        "dataset_size": "20000", "batch_size": "64", "max_batches": "313"}
    assert {k: s["train_masks"][k] for k in ("lr", "logits", "epoch", "max_step")} == {
        "lr": "1.0", "logits": "5.0", "epoch": "2000", "max_step": "15000"}
    ft = s["finetune"]
    assert (ft["num_iters"], ft["train_batch_size"], ft["learning_rate"], ft["ema_max_decay"], ft["dropout"]) == (
        "100000", "128", "2e-4", "0.9999", "0.1")
    assert (s["sample"]["total_samples"], s["sample"]["ddim_steps"], s["sample"]["seed"]) == ("50000", "100", "42")
    assert s["fid"]["features"] == "inception" and s["fid"]["reference"] == "cifar10"


def test_the_demo_preset_leaves_finetunes_dropout_to_the_model():
    # The paper recipe asks for 0.1 (test above); the demo model was trained without dropout.
    assert "dropout" not in driver.DEMO["stages"]["finetune"]
    assert "dropout" not in driver.resolve_config("demo").stages["finetune"]


def test_explicit_options_override_the_preset_and_set_overrides_stage_params():
    config = driver.resolve_config(
        "demo", pruner="random", ratios="0.5", dataset="cifar10",
        sets=["finetune.num_iters=7,prune.protect=conv_in,conv_out", "sample.ddim_steps=3"],
    )
    assert config.pruner == "random" and config.ratios == (0.5,) and config.dataset == "cifar10"
    assert config.stages["finetune"]["num_iters"] == "7"
    # The comma inside a value stays in the value: only ",stage.key=" starts a new item.
    assert config.stages["prune"]["protect"] == "conv_in,conv_out"
    assert config.stages["sample"]["ddim_steps"] == "3"
    # The preset itself is untouched for the next caller.
    assert driver.DEMO["stages"]["finetune"]["num_iters"] != "7"
    assert driver.resolve_config("demo").pruner == "magnitude"


@pytest.mark.parametrize("bad, message", [
    (dict(sets=["finetune.no_such_param=1"]), "has no parameter"),
    (dict(sets=["nostage.x=1"]), "unknown stage"),
    (dict(sets=["finetune.num_iters"]), "not stage.key=value"),
    (dict(sets=["prune.pruning_ratio=0.2"]), "--ratios"),
    (dict(sets=["sample.model_run_id=abc"]), "upstream"),
    (dict(ratios="0.5,0"), "outside (0, 1)"),
    (dict(ratios="0.5,x"), "not a number"),
    (dict(ratios="0.5,0.5"), "twice"),
    (dict(mask_training="maybe"), "mask_training"),
    (dict(pattern="2:4", ratios="0.3"), "contradict"),
])
def test_user_mistakes_are_one_line_errors(bad, message):
    with pytest.raises(MaskDMError, match=message.replace("(", r"\(").replace(")", r"\)")):
        driver.resolve_config("demo", **bad)
    with pytest.raises(MaskDMError, match="preset"):
        driver.resolve_config("nope")


def test_nm_pattern_without_ratios_takes_the_ratio_it_implies():
    assert driver.resolve_config("demo", pattern="2:4").ratios == (0.5,)


def _stage_counts(plan):
    counts = {}
    for step in plan:
        counts[step.stage] = counts.get(step.stage, 0) + 1
    return counts


@pytest.mark.parametrize("mask_training, finetunes, mask_trainings", [("true", 1, 1), ("false", 1, 0), ("both", 2, 1)])
def test_plan_scores_dense_once_and_every_model_per_ratio(tiny_model_dir, mask_training, finetunes, mask_trainings):
    ratios = (0.3, 0.6)
    config = driver.resolve_config("demo", model=str(tiny_model_dir), ratios="0.3,0.6", mask_training=mask_training)
    plan = driver.build_plan(config)
    counts = _stage_counts(plan)
    n = len(ratios)
    assert "pretrain" not in counts  # a model folder needs no demo model
    assert counts["prune"] == 1 + n and counts["extract_masks"] == n
    assert counts.get("train_masks", 0) == mask_trainings * n and counts.get("baseline_loss", 0) == mask_trainings * n
    assert counts["finetune"] == finetunes * n
    scored = 1 + n * (1 + mask_trainings + finetunes)
    assert counts["sample"] == counts["fid"] == scored

    names = {s.name: s for s in plan}
    position = {s.name: i for i, s in enumerate(plan)}
    for step in plan:
        for needed in step.needs.values():
            assert position[needed] < position[step.name]  # upstream runs first
    for step in plan:
        if step.stage == "finetune":
            source = names[step.needs["masks_run_id"]].stage
            assert source == ("train_masks" if step.variant == "finetuned" else "extract_masks")
    dense = [s for s in plan if s.variant == "dense" and s.stage == "prune"]
    assert len(dense) == 1 and dense[0].params["pruning_ratio"] == "0.0"
    assert {s.params["pruning_ratio"] for s in plan if s.stage == "prune"} == {"0.0", "0.3", "0.6"}
    assert all(s.params["model"] == str(tiny_model_dir) for s in plan if s.stage == "prune")


def test_the_options_read_from_a_stages_source_are_its_commands_options_and_types():
    """The driver checks --set keys and number types from each stage's source (without importing
    torch and diffusers): the same names and types as the imported click commands, every stage."""
    import importlib
    import subprocess

    import click

    kinds = {click.types.IntParamType: "int", click.types.FloatParamType: "float", click.types.BoolParamType: "click.BOOL"}
    for stage in driver.STAGES:
        command = importlib.import_module(f"entrypoints.{stage}").command
        imported = {opt.lstrip("-"): kinds.get(type(param.type)) for param in command.params for opt in param.opts if opt.startswith("--")}
        assert driver.plan.declared_options(stage) == imported, stage
    # And the check imports no stage module (nor torch): in a fresh process.
    code = ("import sys; from maskdm.driver.plan import check_sets, parse_sets; "
            "check_sets(parse_sets(['finetune.num_iters=3,prune.preview_images=4,speed.repeats=2'])); "
            "print(sorted(m for m in sys.modules if m.startswith('entrypoints.') or m == 'torch'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:] + done.stdout


def test_the_constants_the_driver_reads_from_source_are_the_modules():
    """The driver reads the shapes dataset's size from the source of maskdm.ddpm.data (which imports
    torch) instead of importing it: the same value, and one line for a name that is not there."""
    from maskdm.ddpm import data

    assert driver.plan.module_constant("maskdm.ddpm.data", "SHAPES_TRAIN_SIZE") == data.SHAPES_TRAIN_SIZE
    assert driver.plan.dataset_images("shapes") == data.SHAPES_TRAIN_SIZE
    with pytest.raises(MaskDMError, match="assigns no literal NO_SUCH_NAME"):
        driver.plan.module_constant("maskdm.ddpm.data", "NO_SUCH_NAME")


def test_the_dense_reference_is_the_same_whatever_the_pruning_setup(tiny_model_dir):
    def dense(**options):
        plan = driver.build_plan(driver.resolve_config("demo", model=str(tiny_model_dir), **options))
        return next(s.params for s in plan if s.variant == "dense" and s.stage == "prune")

    assert dense() == dense(pruner="random", scope="global", pattern="1:4")
    assert dense()["pruning_ratio"] == "0.0" and dense()["pattern"] == "unstructured"


def test_replicate_zero_is_todays_plan_and_replicate_k_offsets_only_its_seeds(tiny_model_dir):
    from maskdm.tracking import REPLICATE_SEEDS, replicate_of

    def plan(seeds: str | None, **options) -> list:
        extra = {"seeds": seeds} if seeds is not None else {}
        return driver.build_plan(driver.resolve_config("demo", model=str(tiny_model_dir), ratios="0.3,0.6", **options, **extra))

    def shape(steps) -> list:
        return [(s.name, s.stage, s.params, s.needs, s.ratio, s.variant) for s in steps]

    # Seeds 0 (the default) is the plan as it always was: the same steps, names and parameters.
    assert shape(plan(None)) == shape(plan("0"))
    single = {s.name: s for s in plan("0", sets=["sample.seed=7"])}
    several = plan("0,1,2", sets=["sample.seed=7"])
    by_name = {s.name: s for s in several}
    for name, step in single.items():
        if step.stage == "speed":  # once per sweep, timing the first replicate's models
            first = {param: need if need in by_name else f"{need} #0" for param, need in step.needs.items()}
            assert by_name[name].needs == first and by_name[name].params == step.params
            continue
        if step.stage in ("pretrain", "prune", "extract_masks", "baseline_loss"):
            assert by_name[name].params == step.params and by_name[name].needs == step.needs  # shared, once
            continue
        for k in (0, 1, 2):
            replicate = by_name[f"{name} #{k}"]
            if k == 0:
                assert replicate.params == step.params
            else:
                key = REPLICATE_SEEDS[step.stage][0] if step.stage in REPLICATE_SEEDS else None
                expected = dict(step.params)
                if key:  # offset from the preset's (or --set's) seed, else from the MLproject default
                    expected[key] = str(int(step.params.get(key, REPLICATE_SEEDS[step.stage][1])) + k)
                assert replicate.params == expected, replicate.name
                if step.stage in ("train_masks", "finetune"):
                    assert replicate_of(step.stage, replicate.params) == k  # the tag the run will carry
    assert len(several) == len(single) + 2 * sum(s.stage not in ("prune", "extract_masks", "baseline_loss", "speed") for s in single.values())
    # A replicate's steps need the same replicate's upstream steps (or the shared ones).
    for step in several:
        if step.name.endswith(" #1"):
            assert all(n.endswith(" #1") or by_name[n].stage in ("prune", "extract_masks", "baseline_loss") for n in step.needs.values())
    assert by_name["sample r=0.3 (pruned) #2"].params["seed"] == "9"


def test_replicate_seeds_are_the_mlproject_defaults_and_name_the_replicate():
    from maskdm.tracking import REPLICATE_SEEDS, replicate_of

    for stage, (key, base) in REPLICATE_SEEDS.items():
        assert driver.declared_defaults(stage)[key] == str(base), stage
        assert replicate_of(stage, {}) == 0 and replicate_of(stage, {key: base + 3}) == 3
    assert replicate_of("fid", {"seed": 5}) is None and replicate_of("sample", {"seed": "x"}) is None


def test_a_hand_made_run_is_tagged_with_its_replicate(tmp_path):
    from conftest import tracking_store
    from maskdm.tracking import REPLICATE_TAG, client, stage_run

    with tracking_store(tmp_path):
        with stage_run("sample", {"seed": 44, "model_run_id": "x"}) as run:
            sample = run.run_id
        with stage_run("fid", {"sample_run_id": sample}) as run:
            run.upstream(sample, ["sample"], None, "sample_run_id")  # fid has no seed: its sample's replicate
            fid = run.run_id
        with stage_run("prune", {"seed": 5}) as run:
            prune = run.run_id
        tags = {run_id: client().get_run(run_id).data.tags for run_id in (sample, fid, prune)}
    assert tags[sample][REPLICATE_TAG] == "2" and tags[fid][REPLICATE_TAG] == "2"
    assert REPLICATE_TAG not in tags[prune]  # shared by the replicates


@pytest.mark.parametrize("seeds, message", [("0,0", "twice"), ("-1", "negative"), ("a", "not an integer")])
def test_bad_seeds_are_one_line_errors(seeds, message):
    with pytest.raises(MaskDMError, match=message):
        driver.resolve_config("demo", seeds=seeds)


def test_demo_model_is_a_pretrain_step_named_by_run_id():
    plan = driver.build_plan(driver.resolve_config("demo"))
    assert plan[0].stage == "pretrain"
    prunes = [s for s in plan if s.stage == "prune"]
    assert all(s.needs == {"model": plan[0].name} and "model" not in s.params for s in prunes)


def test_relative_model_paths_become_absolute(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tiny_model_dir.parent)
    config = driver.resolve_config("demo", model=tiny_model_dir.name, dataset=f"imagefolder:{tiny_model_dir.name}")
    assert config.model == str(tiny_model_dir.resolve())
    assert config.dataset == f"imagefolder:{tiny_model_dir.resolve()}"


def test_cache_key_changes_with_stage_params_upstream_and_code_version():
    base = driver.cache_key("sample", {"model_run_id": "a" * 32, "ddim_steps": "20"}, "v1")
    assert base == driver.cache_key("sample", {"ddim_steps": "20", "model_run_id": "a" * 32}, "v1")  # order-free
    assert base != driver.cache_key("fid", {"model_run_id": "a" * 32, "ddim_steps": "20"}, "v1")
    assert base != driver.cache_key("sample", {"model_run_id": "b" * 32, "ddim_steps": "20"}, "v1")
    assert base != driver.cache_key("sample", {"model_run_id": "a" * 32, "ddim_steps": "21"}, "v1")
    assert base != driver.cache_key("sample", {"model_run_id": "a" * 32, "ddim_steps": "20"}, "v2")


def _copy_code(dest: Path, source: Path = REPO) -> Path:
    """What code_version digests (maskdm/, entrypoints/, MLproject, conda.yaml), copied into ``dest``."""
    import shutil

    from maskdm.tracking import CODE_VERSION_FILES

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("maskdm", "entrypoints"):
        shutil.copytree(source / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in CODE_VERSION_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, dest / name)
    return dest


def _entry_point_command(project: Path, stage: str) -> str:
    import yaml

    return yaml.safe_load((project / "MLproject").read_text())["entry_points"][stage]["command"]


def test_code_version_digests_the_sources_mlproject_and_conda_yaml(tmp_path, monkeypatch):
    from maskdm import tracking

    # Copies, not the working tree: others may edit it while this runs.
    project = _copy_code(tmp_path / "a")
    version = tracking.code_version(project)
    assert version == tracking.code_version(project)
    assert tracking.code_version(_copy_code(tmp_path / "b", project)) == version  # the contents, not the place
    # Without an argument: the project this maskdm/ is in.
    monkeypatch.setattr(tracking.lineage, "_PACKAGE_ROOT", project / "maskdm")
    assert tracking.code_version() == version

    mlproject = project / "MLproject"
    command = _entry_point_command(project, "finetune")

    def edit_finetune_command(text: str) -> str:
        return text.replace(command, command + " --mixed_precision no", 1)

    edits = {
        "an entry point's command in MLproject": (mlproject, edit_finetune_command),
        "conda.yaml": (project / "conda.yaml", lambda text: text + "  - ffmpeg\n"),
        "a maskdm/ source (in a subpackage)": (project / "maskdm" / "ddpm" / "sampling.py", lambda text: text + "\n# edited\n"),
        "an entrypoints/ source": (project / "entrypoints" / "sample.py", lambda text: text + "\n# edited\n"),
    }
    for what, (path, edit) in edits.items():
        original = path.read_text()
        path.write_text(edit(original))
        assert path.read_text() != original, what
        assert tracking.code_version(project) != version, what
        assert tracking.code_version() != version, what
        path.write_text(original)
        assert tracking.code_version(project) == version, what
    # The MLproject edit above changes that command and nothing else the cache key sees: the
    # parameter defaults are the same, so only the code version tells the two projects apart.
    original = mlproject.read_text()
    mlproject.write_text(edit_finetune_command(original))
    assert _entry_point_command(project, "finetune") == command + " --mixed_precision no"
    assert driver.declared_defaults("finetune", project) == driver.declared_defaults("finetune", tmp_path / "b")
    mlproject.write_text(original)
    assert tracking.code_version(project) == version

    # A new source counts; so does a missing MLproject.
    (project / "maskdm" / "extra.py").write_text("X = 1\n")
    assert tracking.code_version(project) != version
    (project / "maskdm" / "extra.py").unlink()
    mlproject.rename(tmp_path / "MLproject.away")
    assert tracking.code_version(project) != version
    (tmp_path / "MLproject.away").rename(mlproject)
    assert tracking.code_version(project) == version

    # Files that do not run do not count: bytecode, notes, docs.
    (project / "maskdm" / "__pycache__").mkdir(exist_ok=True)
    (project / "maskdm" / "__pycache__" / "sampling.cpython-311.pyc").write_bytes(b"\0\1")
    (project / "maskdm" / "notes.txt").write_text("notes")
    (project / "README.md").write_text("# readme")
    assert tracking.code_version(project) == version


def test_full_params_fill_in_the_mlproject_defaults():
    full = driver.full_params("sample", {"model_run_id": "x", "ddim_steps": "7"})
    assert full["ddim_steps"] == "7" and full["model_run_id"] == "x"
    assert full["total_samples"] == driver.declared_defaults("sample")["total_samples"]


# --- run_stage / run_plan against a stand-in project ---------------------------------------------

FAKE_STAGES = {
    # stage: (declared params with defaults, upstream param)
    "pretrain": ({"num_iters": "3"}, None),
    "prune": ({"pruning_ratio": "0.3", "seed": "0"}, None),
    "extract_masks": ({}, "prune_run_id"),
    "baseline_loss": ({"dataset_size": "8"}, "masks_run_id"),
    "train_masks": ({"max_step": "2"}, "baseline_run_id"),
    "finetune": ({"num_iters": "4"}, "masks_run_id"),
    "sample": ({"ddim_steps": "2"}, "model_run_id"),
    "fid": ({"features": "shapes"}, "sample_run_id"),
    "speed": ({"kernel": "dense", "model_run_ids": ""}, "dense"),
}


def _param_of(params, param: str) -> str:
    """A step's upstream param as the stage got it: ``model_run_ids[i]`` is the i-th of the joined list."""
    listed = driver._LISTED.match(param)
    return params[listed.group(1)].split(",")[int(listed.group(2))] if listed else params[param]


def stand_in_project(folder: Path, name: str, command) -> Path:
    """An MLproject declaring :data:`FAKE_STAGES`' parameters whose stage ``s`` runs ``command(s)``."""
    lines = [f"name: {name}", "entry_points:"]
    for stage, (declared, upstream) in FAKE_STAGES.items():
        lines.append(f"  {stage}:")
        lines.append("    parameters:")
        if upstream:
            lines.append(f"      {upstream}: string")
        for key, default in declared.items():
            lines.append(f"      {key}: {{type: string, default: \"{default}\"}}")
        if not declared and not upstream:
            lines[-1] = "    parameters: {}"
        lines.append(f"    command: \"{command(stage)}\"")
    folder.mkdir()
    (folder / "MLproject").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def fake_project(tmp_path):
    """An MLproject whose stages exit at once: 0, or 3 when FAKE_FAIL names the stage."""
    return stand_in_project(tmp_path / "fake_project", "fake", lambda stage: f"test \\\"$FAKE_FAIL\\\" != {stage} || exit 3")


@pytest.fixture
def parent(tracking):
    import mlflow

    with mlflow.start_run() as run:
        yield run


def _runs(stage=None):
    from mlflow.tracking import MlflowClient

    # Every stage run the driver makes carries a cache key; the driver's own run does not.
    query = f"tags.`maskdm.stage` = '{stage}'" if stage else f"tags.`{driver.CACHE_KEY_TAG}` LIKE '%'"
    return MlflowClient().search_runs(["0"], query, max_results=1000)


def test_run_stage_makes_a_child_run_then_reuses_it(fake_project, parent):
    from mlflow.tracking import MlflowClient

    kwargs = dict(experiment_id="0", parent_run_id=parent.info.run_id, project_dir=fake_project, code_version="v1")
    first = driver.run_stage("prune", {"pruning_ratio": "0.5"}, **kwargs)
    assert not first.reused
    run = MlflowClient().get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["maskdm.stage"] == "prune"
    assert run.data.params == {"pruning_ratio": "0.5", "seed": "0"}  # the MLproject default included
    assert run.data.tags[driver.CACHE_KEY_TAG] == driver.cache_key("prune", {"pruning_ratio": "0.5", "seed": "0"}, "v1")

    again = driver.run_stage("prune", {"pruning_ratio": "0.5"}, **kwargs)
    assert again.reused and again.run_id == first.run_id
    # Spelling out the default is the same stage run.
    assert driver.run_stage("prune", {"pruning_ratio": "0.5", "seed": "0"}, **kwargs).run_id == first.run_id
    assert len(_runs("prune")) == 1

    other = driver.run_stage("prune", {"pruning_ratio": "0.6"}, **kwargs)
    newer_code = driver.run_stage("prune", {"pruning_ratio": "0.5"}, **{**kwargs, "code_version": "v2"})
    assert not other.reused and not newer_code.reused
    assert len({first.run_id, other.run_id, newer_code.run_id}) == 3


def test_a_failed_stage_fails_the_driver_and_is_not_reused(fake_project, parent, monkeypatch):
    from mlflow.tracking import MlflowClient

    kwargs = dict(experiment_id="0", parent_run_id=parent.info.run_id, project_dir=fake_project, code_version="v1")
    monkeypatch.setenv("FAKE_FAIL", "sample")
    with pytest.raises(MaskDMError, match="stage sample failed"):
        driver.run_stage("sample", {"model_run_id": "m" * 32}, **kwargs)
    [failed] = _runs("sample")
    assert failed.info.status == "FAILED"
    monkeypatch.delenv("FAKE_FAIL")
    retry = driver.run_stage("sample", {"model_run_id": "m" * 32}, **kwargs)
    assert not retry.reused and retry.run_id != failed.info.run_id
    assert MlflowClient().get_run(retry.run_id).info.status == "FINISHED"


def _killed_finetune(key: str, with_checkpoint: bool, tmp_path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.create_run("0", tags={driver.CACHE_KEY_TAG: key, "maskdm.stage": "finetune"})
    if with_checkpoint:
        ckpt = tmp_path / "checkpoint-2"
        ckpt.mkdir(exist_ok=True)
        (ckpt / "state.txt").write_text("step 2")
        client.log_artifacts(run.info.run_id, str(ckpt), "checkpoints/checkpoint-2")
    client.set_terminated(run.info.run_id, "KILLED")
    return run.info.run_id


def test_finetune_continues_from_a_killed_run_with_checkpoints(fake_project, parent, tmp_path):
    from mlflow.tracking import MlflowClient

    params = {"masks_run_id": "k" * 32}
    key = driver.cache_key("finetune", {**params, "num_iters": "4"}, "v1")
    _killed_finetune(key, with_checkpoint=False, tmp_path=tmp_path)  # nothing to continue from
    killed = _killed_finetune(key, with_checkpoint=True, tmp_path=tmp_path)
    _killed_finetune(driver.cache_key("finetune", {**params, "num_iters": "5"}, "v1"), True, tmp_path)  # another key

    outcome = driver.run_stage("finetune", params, experiment_id="0", parent_run_id=parent.info.run_id,
                               project_dir=fake_project, code_version="v1")
    assert outcome.resumed_from == killed
    run = MlflowClient().get_run(outcome.run_id)
    assert run.data.params["resume_run_id"] == killed
    # resume_run_id is not part of the key: the continued run is what later reruns reuse.
    assert run.data.tags[driver.CACHE_KEY_TAG] == key
    again = driver.run_stage("finetune", params, experiment_id="0", parent_run_id=parent.info.run_id,
                             project_dir=fake_project, code_version="v1")
    assert again.reused and again.run_id == outcome.run_id


def test_run_plan_wires_upstream_run_ids_and_reruns_nothing(fake_project, parent, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    config = driver.resolve_config("demo", model=str(tiny_model_dir), ratios="0.4", mask_training="both")
    plan = driver.build_plan(config)
    outcomes = driver.run_plan(plan, experiment_id="0", parent_run_id=parent.info.run_id, project_dir=fake_project)
    assert len(_runs()) == len(plan) and not any(o.reused for o in outcomes.values())
    client = MlflowClient()
    by_name = {s.name: s for s in plan}
    for step in plan:
        run = client.get_run(outcomes[step.name].run_id)
        assert run.data.tags["maskdm.stage"] == step.stage
        for param, needed in step.needs.items():
            upstream = client.get_run(_param_of(run.data.params, param))
            assert upstream.info.run_id == outcomes[needed].run_id
            assert upstream.data.tags["maskdm.stage"] == by_name[needed].stage
        if step.variant:
            assert run.data.tags[driver.VARIANT_TAG] == step.variant

    again = driver.run_plan(plan, experiment_id="0", parent_run_id=parent.info.run_id, project_dir=fake_project)
    assert all(o.reused for o in again.values())
    assert {k: o.run_id for k, o in again.items()} == {k: o.run_id for k, o in outcomes.items()}
    assert len(_runs()) == len(plan)

    # A reused run is tagged for the report of the driver that reused it.
    some = outcomes[plan[0].name].run_id
    assert client.get_run(some).data.tags[f"{driver.USED_BY_TAG_PREFIX}{parent.info.run_id}"] == "true"


def _descendants(plan, changed: set[str]) -> set[str]:
    """The steps in ``changed`` and every step that needs one of them, directly or not."""
    affected = set(changed)
    for step in plan:  # upstream steps come first
        if any(needed in affected for needed in step.needs.values()):
            affected.add(step.name)
    return affected


def test_a_changed_stage_parameter_reruns_that_stage_and_its_descendants_only(fake_project, parent, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    options = dict(model=str(tiny_model_dir), ratios="0.4", mask_training="both")
    plan = driver.build_plan(driver.resolve_config("demo", **options))
    run = dict(experiment_id="0", parent_run_id=parent.info.run_id, project_dir=fake_project)
    first = driver.run_plan(plan, **run)
    assert not any(o.reused for o in first.values())

    # One parameter of one stage in the middle of the chain: baseline_loss's dataset_size.
    size = int(driver.DEMO["stages"]["baseline_loss"]["dataset_size"]) // 2
    changed_plan = driver.build_plan(driver.resolve_config("demo", **options, sets=[f"baseline_loss.dataset_size={size}"]))
    assert [s.name for s in changed_plan] == [s.name for s in plan]
    before = {s.name: s for s in plan}
    changed = {s.name for s in changed_plan if s.params != before[s.name].params}
    assert [before[name].stage for name in changed] == ["baseline_loss"]
    affected = _descendants(changed_plan, changed)
    # Not vacuous: one finetune descends from it (learned masks), the other (pruning masks) does not.
    finetunes = {s.name for s in plan if s.stage == "finetune"}
    assert len(finetunes & affected) == 1 and len(finetunes - affected) == 1
    assert {before[name].stage for name in affected} >= {"baseline_loss", "train_masks", "finetune", "sample", "fid"}

    second = driver.run_plan(changed_plan, **run)
    first_ids = {o.run_id for o in first.values()}
    for step in changed_plan:
        outcome = second[step.name]
        if step.name in affected:
            assert not outcome.reused and outcome.run_id not in first_ids, step.name
        else:
            assert outcome.reused and outcome.run_id == first[step.name].run_id, step.name
    # The reruns are wired to the new runs above them and to the reused ones alike.
    client = MlflowClient()
    for name in affected:
        params = client.get_run(second[name].run_id).data.params
        for param, needed in next(s for s in changed_plan if s.name == name).needs.items():
            assert _param_of(params, param) == second[needed].run_id, (name, param)
    assert client.get_run(second[next(iter(changed))].run_id).data.params["dataset_size"] == str(size)
    assert len(_runs()) == len(plan) + len(affected)


def test_a_changed_entry_point_command_reruns_every_stage(fake_project, parent, tiny_model_dir, monkeypatch):
    """The code version digests MLproject: the project run here is made the one the digest reads."""
    from maskdm import tracking

    _copy_code(fake_project / "code")
    for name in ("maskdm", "entrypoints"):
        (fake_project / "code" / name).rename(fake_project / name)
    monkeypatch.setattr(tracking.lineage, "_PACKAGE_ROOT", fake_project / "maskdm")
    plan = driver.build_plan(driver.resolve_config("demo", model=str(tiny_model_dir), ratios="0.4", mask_training="false"))
    run = dict(experiment_id="0", parent_run_id=parent.info.run_id, project_dir=fake_project)
    first = driver.run_plan(plan, **run)
    assert all(o.reused for o in driver.run_plan(plan, **run).values())
    version = tracking.code_version()

    # The fid entry point's command changes (to one that still succeeds); no parameter does.
    mlproject = fake_project / "MLproject"
    command = _entry_point_command(fake_project, "fid")
    lines = [line.replace('command: "', 'command: "true && ', 1) if line.strip().startswith("command:") and "!= fid " in line
             else line for line in mlproject.read_text().splitlines()]
    mlproject.write_text("\n".join(lines) + "\n")
    assert _entry_point_command(fake_project, "fid") == f"true && {command}"
    assert tracking.code_version() != version

    again = driver.run_plan(plan, **run)
    assert not any(o.reused for o in again.values())
    assert not {o.run_id for o in again.values()} & {o.run_id for o in first.values()}
    assert len(_runs()) == 2 * len(plan)


def _prune_models(outcomes, plan, client) -> set[str]:
    return {client.get_run(outcomes[s.name].run_id).data.params["model"] for s in plan if s.stage == "prune"}


def test_the_shipped_demo_model_is_registered_once_then_reused(fake_project, parent):
    from mlflow.tracking import MlflowClient

    from maskdm.ddpm.demo_model import demo_model_digest
    from maskdm.tracking import DEMO_DIGEST_TAG

    client = MlflowClient()
    # A demo pretrain trained by an earlier version (no digest of the shipped files) is not used.
    trained = client.create_run("0", tags={"maskdm.stage": "pretrain", "maskdm.demo": "true"})
    client.set_terminated(trained.info.run_id, "FINISHED")
    plan = driver.build_plan(driver.resolve_config("demo", ratios="0.5", mask_training="false"))
    outcomes = driver.run_plan(plan, experiment_id="0", parent_run_id=parent.info.run_id, project_dir=fake_project)
    demo = outcomes[driver.DEMO_MODEL_STEP]
    assert demo.reused and demo.run_id != trained.info.run_id
    registered = client.get_run(demo.run_id)
    assert registered.info.status == "FINISHED" and registered.data.tags[DEMO_DIGEST_TAG] == demo_model_digest()
    assert "model/model_index.json" in [f.path for f in client.list_artifacts(demo.run_id, "model")]
    assert _prune_models(outcomes, plan, client) == {demo.run_id}

    # Registered once per store, whatever the code version: the next sweep finds the same run.
    again = driver.run_plan(plan, experiment_id="0", parent_run_id=parent.info.run_id, project_dir=fake_project)
    assert again[driver.DEMO_MODEL_STEP].run_id == demo.run_id
    assert len(_runs("pretrain")) == 2  # the old trained one and the shipped one, nothing trained

    # A pretrain configured away from the demo defaults is a stage like any other.
    custom = driver.build_plan(driver.resolve_config("demo", ratios="0.5", mask_training="false", sets=["pretrain.num_iters=3"]))
    custom_outcomes = driver.run_plan(custom, experiment_id="0", parent_run_id=parent.info.run_id, project_dir=fake_project)
    assert not custom_outcomes[driver.DEMO_MODEL_STEP].reused
    assert custom_outcomes[driver.DEMO_MODEL_STEP].run_id != demo.run_id


# --- end to end: `maskdm main` on the real stages ----------------------------------------------------

#: Tiny step counts for a 16x16 model: a whole sweep is ~10 stage processes.
TINY_SETS = ",".join([
    "baseline_loss.dataset_size=32", "baseline_loss.batch_size=16", "baseline_loss.max_batches=2",
    "train_masks.epoch=1", "train_masks.max_step=2", "train_masks.accumulation=1",
    "finetune.num_iters=4", "finetune.train_batch_size=8", "finetune.save_model_steps=2",
    "sample.total_samples=16", "sample.batch_size=16", "sample.ddim_steps=3",
    "fid.batch_size=16",
    # The speed step measures every model of the sweep side by side: its timings are not compared.
    "speed.repeats=3", "speed.warmup=0", "speed.batch_size=4", "speed.ddim_steps=2",
    "prune.preview_images=8", "finetune.preview_images=8",
])
#: For the kill test: long enough to be killed between checkpoints, short enough to finish after.
KILL_SETS = "finetune.num_iters=60,finetune.save_model_steps=10"
DRIVER_TIMEOUT_S = 1500
#: pytest-timeout's limit for one end-to-end test, its fixture's sweep included.
E2E_TIMEOUT_S = 3600


def _main_args(model_dir: Path, mask_training: str = "false", extra_sets: tuple[str, ...] = (), seeds: str = "0",
               ratios: str = "0.5") -> list[str]:
    args = ["main", "--model", str(model_dir), "--dataset", "shapes", "--ratios", ratios,
            "--mask_training", mask_training, "--seeds", seeds, "--set", TINY_SETS]
    for extra in extra_sets:
        args += ["--set", extra]
    return args


def _config(model_dir: Path, mask_training: str = "false", extra_sets: tuple[str, ...] = (), seeds: str = "0", ratios: str = "0.5"):
    return driver.resolve_config("demo", model=str(model_dir), dataset="shapes", ratios=ratios,
                                 mask_training=mask_training, sets=[TINY_SETS, *extra_sets], seeds=seeds)


#: Report columns (by suffix) that differ from run to run of the same sweep: run IDs, wall times,
#: and the speed step's ratios and load times.
TIMING_COLUMNS = ("_run_id", "_wall_s", "_images_per_s", "_speedup", "_speedup_low", "_speedup_high", "_speedup_text",
                  "registered_load_text")

#: The shared sweep's replicates: two, so its runs, cache and report are checked replicate by replicate.
SWEEP_SEEDS = "0,1"


#: Set by the ``code`` fixture: the frozen copy of the project every end-to-end driver runs.
_SNAPSHOT: dict[str, Path] = {}


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    """A frozen copy of the project (maskdm/, entrypoints/, MLproject, conda.yaml) that the drivers
    and stages import.

    The cache key includes the code version, a digest of those. Run from the working tree, a rerun
    would (rightly) reuse nothing whenever a file changed in between, which in a tree being edited
    is any time; a copy keeps the code fixed for the whole module.
    """
    import shutil

    folder = tmp_path_factory.mktemp("code")
    for name in ("maskdm", "entrypoints"):
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("MLproject", "conda.yaml"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, folder / name)
    _SNAPSHOT["dir"] = folder
    return folder


def _env(tracking_uri: str) -> dict:
    # One thread per stage process: several share two cores, and oversubscribed OpenMP threads
    # make a tiny training loop ten times slower.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # PYTHONPATH comes before the editable install, so the driver and every stage import the copy.
    env["PYTHONPATH"] = os.pathsep.join([str(_SNAPSHOT["dir"]), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    return env


def _start_driver(args: list[str], tracking_uri: str, cwd: Path, log_path: Path) -> subprocess.Popen:
    """``maskdm main`` in its own process group, so that a kill reaches its stage processes too."""
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "entrypoints.cli", *args], cwd=cwd, env=_env(tracking_uri),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log_path: Path, timeout: float = DRIVER_TIMEOUT_S) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the driver did not finish in {timeout} s; its output: {log_path}")
    output = log_path.read_text(errors="replace")
    assert proc.returncode == 0, output[-4000:]
    return output


def _driver_run_id(output: str) -> str:
    import re

    found = re.findall(r"driver run ([0-9a-f]{32})", output)
    assert found, output[-3000:]
    return found[-1]


def _stage_runs(driver_run_id: str) -> list[dict]:
    import mlflow

    path = mlflow.artifacts.download_artifacts(run_id=driver_run_id, artifact_path="stage_runs.json")
    return json.loads(Path(path).read_text())


def _count_stage_runs(stage: str | None = None, parent: str | None = None) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    query = f"tags.`{driver.CACHE_KEY_TAG}` LIKE '%'" + (f" and tags.`maskdm.stage` = '{stage}'" if stage else "")
    query += f" and tags.`{driver.PARENT_RUN_TAG}` = '{parent}'" if parent else ""
    experiments = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(experiments, query, max_results=5000))


def _results(driver_run_id: str, name: str = "results.csv"):
    import mlflow
    import pandas as pd

    return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=driver_run_id, artifact_path=name))


def _check_lineage(driver_run_id: str, plan: list) -> dict[str, str]:
    """Every step of the plan has a FINISHED run of its stage, fed by the runs of the steps it needs,
    and its ``maskdm.upstream.*`` tags name exactly its chain of ancestors in this sweep."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    step_runs = {s["step"]: s["run_id"] for s in _stage_runs(driver_run_id)}
    assert set(step_runs) == {s.name for s in plan}
    by_name = {s.name: s for s in plan}

    def chain(step) -> dict[str, str]:
        found = {}
        for needed in step.needs.values():
            found[by_name[needed].stage] = step_runs[needed]
            found.update(chain(by_name[needed]))
        return found

    for step in plan:
        run = client.get_run(step_runs[step.name])
        assert run.info.status == "FINISHED", step.name
        assert run.data.tags["maskdm.stage"] == step.stage
        for param, needed in step.needs.items():
            assert _param_of(run.data.params, param) == step_runs[needed], (step.name, param)
        upstream = {k[len("maskdm.upstream."):]: v for k, v in run.data.tags.items() if k.startswith("maskdm.upstream.")}
        # The speed step measures many models side by side: it takes on no lineage.
        assert upstream == ({} if step.stage == "speed" else chain(step)), step.name
        for stage, run_id in upstream.items():
            assert client.get_run(run_id).data.tags["maskdm.stage"] == stage
    return step_runs


def _assert_table_complete(driver_run_id: str, mask_training: bool, ratio: float = 0.5) -> None:
    table = _results(driver_run_id)
    row = table[(table["pruning_ratio"] == ratio) & (table["mask_training"] == mask_training)]
    assert len(row) == 1, table.to_string()
    stages = ("dense", "pruned", "finetuned") + (("masked",) if mask_training else ())
    for stage in stages:
        assert pd_present(row[f"{stage}_fid_shapes"].iloc[0]), (stage, table.to_string())


def pd_present(value) -> bool:
    import pandas as pd

    return value is not None and not pd.isna(value)


#: The tests on the shared sweep run on one pytest-xdist worker (``--dist loadgroup``, pyproject's
#: addopts): a module fixture is made once per worker that runs a test needing it.
SWEEP_WORKER = pytest.mark.xdist_group("e2e-sweep")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, code):
    """One tracking store shared by the sequential end-to-end tests, and a first complete sweep in it."""
    import mlflow

    from maskdm.ddpm.models import DDPM, default_scheduler, save_ddpm

    folder = tmp_path_factory.mktemp("sweep")
    model_dir = save_ddpm(DDPM(tiny_unet(), default_scheduler()), folder / "tiny_model")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    log_path = folder / "first.log"
    output = _finish(_start_driver(_main_args(model_dir, mask_training="both", seeds=SWEEP_SEEDS), uri, folder, log_path), log_path)
    yield {"folder": folder, "uri": uri, "model_dir": model_dir, "first_driver": _driver_run_id(output), "output": output}
    mlflow.set_tracking_uri(previous)
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.mark.e2e
@pytest.mark.timeout(E2E_TIMEOUT_S)
@SWEEP_WORKER
def test_e2e_rerun_creates_no_stage_runs(sweep):
    plan = driver.build_plan(_config(sweep["model_dir"], mask_training="both", seeds=SWEEP_SEEDS))
    first = _check_lineage(sweep["first_driver"], plan)
    _check_replicates(plan, first, sweep["first_driver"])
    _assert_table_complete(sweep["first_driver"], mask_training=False)
    _assert_table_complete(sweep["first_driver"], mask_training=True)
    assert "fid_shapes" in sweep["output"] and "mlflow ui --backend-store-uri" in sweep["output"]
    # The first sweep made every run of the plan itself. Counted among its own children: the store
    # is shared by the module's end-to-end tests, and any of them may have run before this one.
    assert not any(s["reused"] for s in _stage_runs(sweep["first_driver"]))
    assert _count_stage_runs(parent=sweep["first_driver"]) == len(plan)
    before = _count_stage_runs()

    # The same sweep through `mlflow run` (the other way in): same cache keys, so nothing runs.
    command = ["mlflow", "run", str(_SNAPSHOT["dir"]), "--env-manager", "local", "-P", f"model={sweep['model_dir']}",
               "-P", "dataset=shapes", "-P", "ratios=0.5", "-P", "mask_training=both", "-P", f"seeds={SWEEP_SEEDS}",
               "-P", f"set={TINY_SETS}"]
    log_path = sweep["folder"] / "rerun.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(command, cwd=sweep["folder"], env=_env(sweep["uri"]), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    output = _finish(proc, log_path)
    second_driver = _driver_run_id(output)
    assert second_driver != sweep["first_driver"]
    assert _count_stage_runs() == before
    assert all(s["reused"] for s in _stage_runs(second_driver))
    # No stage ran, so no warm server was started (the first sweep's stages forked from one).
    assert "warm start: stages fork" in sweep["output"] and "warm start: stages fork" not in output
    assert _check_lineage(second_driver, plan) == first
    assert _results(second_driver).equals(_results(sweep["first_driver"]))

    # Once more, in a process that then says what it imported: a driver whose stages are all
    # cached imports neither torch nor diffusers (seconds of CPU per start), where no GPU's device
    # files are (elsewhere it asks torch for the GPUs).
    args = _main_args(sweep["model_dir"], mask_training="both", seeds=SWEEP_SEEDS)
    done = subprocess.run([sys.executable, "-c", _REPORT_IMPORTS, *args], cwd=sweep["folder"], env=_env(sweep["uri"]),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "running as run" not in done.stderr, done.stderr[-3000:]
    imported = json.loads(done.stdout.rsplit("IMPORTED ", 1)[1])
    if not driver.launch.gpu_devices_present():
        assert imported == [], imported


#: `maskdm main <its arguments>`, then one line: which of torch and diffusers the process imported.
_REPORT_IMPORTS = """
import json, runpy, sys
sys.argv = ["maskdm", *sys.argv[1:]]
try:
    runpy.run_module("entrypoints.cli", run_name="__main__")
except SystemExit as exc:
    if exc.code:
        raise
print("IMPORTED", json.dumps(sorted(m for m in ("torch", "diffusers") if m in sys.modules)))
"""


def _check_replicates(plan: list, step_runs: dict[str, str], driver_run: str) -> None:
    """Two replicates: a run of its own per replicate for every stochastic step, tagged with its
    replicate and seeded by it; shared steps (prune, extract_masks, baseline_loss) untagged; and the
    report's means, SEs and paired verdicts are those of the runs' own metrics."""
    import math
    import re

    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from maskdm.tracking import REPLICATE_TAG

    client = MlflowClient()
    base = {"train_masks": ("mask_seed", 0), "finetune": ("seed", 0), "sample": ("seed", 42)}
    steps: dict[int, set[str]] = {0: set(), 1: set()}
    runs: dict[int, set[str]] = {0: set(), 1: set()}
    for step in plan:
        run = client.get_run(step_runs[step.name])
        found = re.search(r" #(\d+)$", step.name)
        if step.stage in ("prune", "extract_masks", "baseline_loss", "pretrain", "speed"):  # shared by the replicates
            assert not found and REPLICATE_TAG not in run.data.tags, step.name
            continue
        k = int(found.group(1))
        assert run.data.tags[REPLICATE_TAG] == str(k), step.name
        if step.stage in base:
            key, seed = base[step.stage]
            assert run.data.params[key] == str(seed + k), step.name
        steps[k].add(step.name[: found.start()])
        runs[k].add(run.info.run_id)
    # The same steps in both replicates (sample + fid of dense and pruned; train_masks, finetune and
    # the plain finetune, each with its sample + fid), each replicate with runs of its own.
    assert steps[0] == steps[1] and len(steps[0]) == len(runs[0]) == len(runs[1]) == 13
    assert not runs[0] & runs[1]

    def metric(step: str, name: str) -> list[float]:
        return [client.get_run(step_runs[f"{step} #{k}"]).data.metrics[name] for k in (0, 1)]

    def mean_se(values: list[float]) -> tuple[float, float]:
        mean = sum(values) / len(values)
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) / math.sqrt(len(values))

    table = _results(driver_run)
    rows = {bool(m): row for m, row in zip(table["mask_training"], table.to_dict("records"))}
    hand = {
        (True, "finetuned_fid_shapes"): metric("fid r=0.5 (finetuned)", "fid_shapes"),
        (False, "finetuned_fid_shapes"): metric("fid r=0.5 (finetuned, no mask training)", "fid_shapes"),
        (True, "masked_fid_shapes"): metric("fid r=0.5 (masked)", "fid_shapes"),
        (True, "pruned_fid_shapes"): metric("fid r=0.5 (pruned)", "fid_shapes"),
        (True, "dense_fid_shapes"): metric("fid dense", "fid_shapes"),
        (True, "finetuned_eval_loss"): metric("finetune r=0.5 (from masked)", "eval_loss"),
        (True, "masked_heldout_loss"): metric("train_masks r=0.5", "heldout_loss_final"),
    }
    for (mask_training, column), values in hand.items():
        mean, se = mean_se(values)
        row = rows[mask_training]
        assert row[column] == pytest.approx(mean) and row[f"{column}_se"] == pytest.approx(se), column
        assert row[f"{column}_n"] == 2 and row["replicates"] == "0,1"
    # The pruned model's eval_loss is one run, shared by the replicates: counted once.
    assert rows[True]["pruned_eval_loss_n"] == 1 and pd.isna(rows[True]["pruned_eval_loss_se"])

    verdicts = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=driver_run, artifact_path="verdicts.csv"))
    (learned,) = verdicts[(verdicts["comparison"].str.startswith("learned")) & (verdicts["metric"] == "fid_shapes")].to_dict("records")
    differences = [a - b for a, b in zip(hand[(True, "finetuned_fid_shapes")], hand[(False, "finetuned_fid_shapes")])]
    mean, se = mean_se(differences)
    assert learned["mean_difference"] == pytest.approx(mean) and learned["se"] == pytest.approx(se) and learned["n"] == 2
    assert learned["verdict"] == ("better" if mean < -2 * se else "worse" if mean > 2 * se else "no difference at 2 SE")
    # The driver run charts the means and their SEs per arm.
    series = client.get_run(driver_run).data.metrics
    assert series["fid_shapes_by_ratio/finetuned"] == pytest.approx(rows[True]["finetuned_fid_shapes"])
    assert series["fid_shapes_se_by_ratio/finetuned"] == pytest.approx(rows[True]["finetuned_fid_shapes_se"])


@pytest.mark.e2e
@pytest.mark.timeout(E2E_TIMEOUT_S)
@SWEEP_WORKER
def test_e2e_sigkill_mid_finetune_then_rerun_finishes(sweep):
    from mlflow.tracking import MlflowClient

    from maskdm.ddpm.training import CHECKPOINT_DONE

    client = MlflowClient()
    args = _main_args(sweep["model_dir"], extra_sets=(KILL_SETS,))
    prunes_before = _count_stage_runs("prune")
    finetunes_before = {r.info.run_id for r in client.search_runs(["0"], "tags.`maskdm.stage` = 'finetune'")}
    log_path = sweep["folder"] / "killed.log"
    proc = _start_driver(args, sweep["uri"], sweep["folder"], log_path)

    def complete_checkpoint() -> str | None:
        for run in client.search_runs(["0"], "tags.`maskdm.stage` = 'finetune' and attributes.status = 'RUNNING'"):
            if run.info.run_id in finetunes_before:
                continue
            for folder in client.list_artifacts(run.info.run_id, "checkpoints"):
                if any(f.path.endswith(CHECKPOINT_DONE) for f in client.list_artifacts(run.info.run_id, folder.path)):
                    return run.info.run_id
        return None

    killed = None
    deadline = time.monotonic() + DRIVER_TIMEOUT_S
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
        killed = complete_checkpoint()
    if killed is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"no finetune checkpoint appeared before the driver ended; output: {log_path.read_text()[-3000:]}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert client.get_run(killed).info.status == "RUNNING"  # a SIGKILL leaves it as it was

    log_path = sweep["folder"] / "after_kill.log"
    output = _finish(_start_driver(args, sweep["uri"], sweep["folder"], log_path), log_path)
    driver_run = _driver_run_id(output)
    plan = driver.build_plan(_config(sweep["model_dir"], extra_sets=(KILL_SETS,)))
    step_runs = _check_lineage(driver_run, plan)
    outcomes = {s["step"]: s for s in _stage_runs(driver_run)}
    finetune_step = next(s.name for s in plan if s.stage == "finetune")
    # Everything before the finetune was reused; the finetune continued from the killed run.
    for step in plan[: [s.name for s in plan].index(finetune_step)]:
        assert outcomes[step.name]["reused"], step.name
    assert outcomes[finetune_step]["resumed_from"] == killed
    resumed = client.get_run(step_runs[finetune_step])
    assert resumed.data.params["resume_run_id"] == killed
    resumed_step = int(resumed.data.tags["maskdm.resumed_from"].split(":")[1])
    assert resumed.data.tags["maskdm.resumed_from"].startswith(killed + ":") and 10 <= resumed_step < 60
    assert _count_stage_runs("prune") == prunes_before
    _assert_table_complete(driver_run, mask_training=False)


#: The chaos sweep: the first sweep's mask_training=false row (same tiny settings), with a finetune
#: that rotates its checkpoints (limit 1: checkpoint-2 is deleted once checkpoint-4 is logged).
CHAOS_SETS = "finetune.checkpoints_total_limit=1"
CHAOS_SEED = 20
CHAOS_SITE = Path(__file__).resolve().parent / "chaos_site"


def _stage_of(process) -> str | None:
    """The stage a process runs: a ``maskdm <stage>`` command, or a stage process forked by the
    driver's warm server (named after its stage, maskdm.warm_start); None for any other."""
    import psutil

    try:
        args = process.cmdline()
        for i, arg in enumerate(args[:-1]):
            if os.path.basename(arg) == "maskdm" and args[i + 1] != "main":
                return args[i + 1]
        parent = process.parent()
        if parent is not None and "maskdm.warm_start.server" in parent.cmdline() and process.name() in driver.STAGES:
            return process.name()
    except psutil.Error:
        pass
    return None


def _stage_processes(root: int, stage: str | None) -> list:
    """The stage processes under ``root`` (its descendants; any stage's if None), by psutil: a
    stage's command and, when it runs warm, the forked process that runs it."""
    import psutil

    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [child for child in children if (found := _stage_of(child)) and stage in (None, found)]


def _sigkill(proc: subprocess.Popen, whole: bool, targets: list) -> None:
    """SIGKILL ``targets`` (stage processes), and with ``whole`` the driver's whole process group."""
    import psutil

    for target in targets:
        with contextlib.suppress(psutil.Error):
            target.send_signal(signal.SIGKILL)
    if whole:
        leftovers = []
        with contextlib.suppress(psutil.Error):
            leftovers = psutil.Process(proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for child in leftovers:  # any that left the group (none expected)
            with contextlib.suppress(psutil.Error):
                child.send_signal(signal.SIGKILL)
    proc.wait(timeout=120)


@pytest.mark.e2e
@pytest.mark.timeout(E2E_TIMEOUT_S)
@SWEEP_WORKER
def test_e2e_chaos_sigkills_at_random_moments_then_the_sweep_finishes_as_undisturbed(sweep):
    """A sweep whose processes are SIGKILLed at seeded random moments of five stages, mid-upload of
    a checkpoint and mid-rotation of checkpoints, rerun after each kill until it finishes: its table
    equals the undisturbed first sweep's (run IDs and timings aside), no run is left RUNNING, no
    cached side run is made twice, and every run the table uses holds complete artifacts."""
    import random
    from collections import Counter

    import pandas as pd
    import psutil
    from mlflow.tracking import MlflowClient

    from maskdm.tracking import running_runs
    from maskdm.ddpm.training import CHECKPOINT_DONE

    client = MlflowClient()
    rng = random.Random(CHAOS_SEED)
    # Another experiment of the first sweep's store: every stage runs again (the stage cache is per
    # experiment) with the same shapes classifier (per store), so the FIDs can match exactly.
    args = [*_main_args(sweep["model_dir"], extra_sets=(CHAOS_SETS,)), "--experiment", "chaos"]
    # (how it is killed, stage): in plan order, so that each target is still ahead of the sweep.
    kills = [("random", "prune"), ("random", "sample"), ("random", "fid"),
             ("upload", "finetune"), ("rotation", "finetune"), ("random", "sample"), ("random", "fid")]
    def side_runs(status: str = "") -> Counter:
        """Cached side runs of the whole store by (stage, key)."""
        experiments = [e.experiment_id for e in client.search_experiments()]
        return Counter(
            (stage, tuple(sorted((k, v) for k, v in r.data.tags.items() if k.endswith("_key"))))
            for stage in ("fid_reference", "shapes_classifier", "latent_cache")
            for r in client.search_runs(experiments, f"tags.`maskdm.stage` = '{stage}'" + status)
        )

    side_runs_before = side_runs()
    done: list[dict] = []
    for attempt, (how, stage) in enumerate(kills):
        env_extra = {}
        if how in ("upload", "rotation"):
            env_extra["MASKDM_CHAOS_STOP"] = f"{how}:checkpoint-2"
        log_path = sweep["folder"] / f"chaos-{attempt}.log"
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env_extra.items():
                patch.setenv(key, value)
            patch.setenv("PYTHONPATH", os.pathsep.join([str(CHAOS_SITE), *filter(None, [os.environ.get("PYTHONPATH")])]))
            proc = _start_driver(args, sweep["uri"], sweep["folder"], log_path)
        # A moment within the stage's process: warm, a tiny stage's lives 0.3 to 3 s (cold it was 8 s
        # and more); one that ends first passes the kill to the next stage's.
        delay = rng.uniform(0.0, 0.3)
        whole = how != "random" or rng.random() < 0.7  # else the stage alone: its run ends FAILED
        seen: dict[int, float] = {}
        deadline = time.monotonic() + DRIVER_TIMEOUT_S
        killed, looking_for = None, stage
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            for target in _stage_processes(proc.pid, looking_for):
                with contextlib.suppress(psutil.Error):
                    started = seen.setdefault(target.pid, time.monotonic())
                    if how == "random" and time.monotonic() - started >= delay:
                        killed = target
                    elif how != "random" and target.status() == psutil.STATUS_STOPPED:
                        killed = target
            if how == "random" and looking_for and any(not psutil.pid_exists(pid) for pid in seen):
                # That stage's process ended before its moment came: the next stage's, whichever.
                looking_for, seen = None, {}
        assert killed is not None, f"attempt {attempt} ({how} {stage}) found nothing to kill: {log_path.read_text()[-3000:]}"
        killed_stage = _stage_of(killed)
        _sigkill(proc, whole, [killed])
        # SIGKILL takes effect when the process next runs, which on a busy machine may be a moment later.
        _, alive = psutil.wait_procs([killed], timeout=30)
        assert all(p.status() == psutil.STATUS_ZOMBIE for p in alive), alive
        done.append({"how": how, "stage": killed_stage, "whole": whole, "delay": round(delay, 2)})
    assert len({k["stage"] for k in done}) >= 4 and len(done) >= 5

    # Rerun, undisturbed, until it finishes (the first undisturbed rerun must).
    log_path = sweep["folder"] / "chaos-final.log"
    output = _finish(_start_driver(args, sweep["uri"], sweep["folder"], log_path), log_path)
    final = _driver_run_id(output)
    experiment = client.get_experiment_by_name("chaos").experiment_id
    plan = driver.build_plan(_config(sweep["model_dir"], extra_sets=(CHAOS_SETS,)))
    step_runs = _check_lineage(final, plan)

    # Nothing left RUNNING: every killed stage run and killed driver run was ended by the reruns.
    assert running_runs([experiment]) == []
    runs = client.search_runs([experiment], "", max_results=1000)
    statuses = Counter(r.info.status for r in runs)
    assert statuses["KILLED"] >= sum(k["whole"] for k in done), statuses  # a group kill leaves >= 1 dead run
    ended = [r for r in runs if r.info.status == "KILLED"]
    assert all(r.data.tags.get("maskdm.ended_by", "").startswith("maskdm main (driver run") for r in ended)
    # The finetune killed mid-upload left a checkpoint without ema.json; the one killed mid-rotation
    # an old one without ema.json beside a complete newer one. The finished finetune continued.
    finetunes = [r for r in runs if r.data.tags.get("maskdm.stage") == "finetune"]
    assert len(finetunes) >= 3

    def logged(run_id: str, folder: str) -> set[str]:
        return {Path(f.path).name for f in client.list_artifacts(run_id, f"checkpoints/{folder}")}

    left = {r.info.run_id: (logged(r.info.run_id, "checkpoint-2"), logged(r.info.run_id, "checkpoint-4")) for r in finetunes}
    # Killed mid-upload: part of checkpoint-2 logged, its ema.json not, nothing newer.
    assert any(two and CHECKPOINT_DONE not in two and not four for two, four in left.values()), left
    # Killed mid-rotation: checkpoint-2's ema.json deleted, its other files not yet; checkpoint-4 complete.
    assert any(two and CHECKPOINT_DONE not in two and CHECKPOINT_DONE in four for two, four in left.values()), left
    finetune_step = next(s.name for s in plan if s.stage == "finetune")
    finished = client.get_run(step_runs[finetune_step])
    assert finished.data.params.get("resume_run_id") in {r.info.run_id for r in finetunes}

    # No cached side run made twice (the chaos sweep found them all made by the first sweep).
    side_after = side_runs(" and attributes.status = 'FINISHED'")
    assert side_after and all(count == 1 for count in side_after.values()), side_after
    assert side_runs() == side_runs_before

    # No half-written artifact in any run the table uses: each holds its stage's outputs, and a
    # finetune's logged checkpoints are complete.
    expected = {"prune": "model", "finetune": "model", "sample": "samples.npz", "fid": "sample_stats.npz"}
    for step in plan:
        run_id = step_runs[step.name]
        if step.stage in expected:
            assert has_artifact(run_id, expected[step.stage]), (step.name, run_id)
    for folder in client.list_artifacts(finished.info.run_id, "checkpoints"):
        assert has_artifact(finished.info.run_id, f"{folder.path}/{CHECKPOINT_DONE}"), folder.path

    # The table equals the undisturbed sweep's row, run IDs and timings aside: replicate by
    # replicate, since the first sweep has two replicates and this one only replicate 0.
    table, reference = _results(final, "replicates.csv"), _results(sweep["first_driver"], "replicates.csv")
    reference = reference[(reference["mask_training"] == False) & (reference["replicate"] == 0)].reset_index(drop=True)  # noqa: E712
    measured = [c for c in table.columns if not c.endswith(TIMING_COLUMNS)]
    assert any(c.endswith("_fid_shapes") for c in measured) and set(measured) <= set(reference.columns)
    # check_dtype off: the reference's columns of what only replicate 0 measured (the speed step's
    # registered size) hold NaN for replicate 1, so they are float there and integer here.
    pd.testing.assert_frame_equal(table[measured].reset_index(drop=True), reference[measured], check_exact=False, rtol=1e-6,
                                  check_dtype=False)
    (sweep["folder"] / "chaos-kills.json").write_text(json.dumps({"kills": done, "statuses": statuses}, indent=1))


@pytest.mark.e2e
@pytest.mark.timeout(E2E_TIMEOUT_S)
@SWEEP_WORKER
def test_e2e_parallel_two_gives_the_sequential_results_table(sweep):
    """The first sweep's mask_training=false row, run again with ``--parallel 2`` in another
    experiment of its store (the stage cache is per experiment, so every stage runs again; the fid
    stage's side caches are found in any experiment): its own lineage, nothing reused, and the
    same table as the sequential sweep's replicate 0, exactly, run IDs and timings aside."""
    import mlflow
    import pandas as pd

    log_path = sweep["folder"] / "parallel.log"
    args = [*_main_args(sweep["model_dir"], mask_training="false"), "--experiment", "parallel", "--parallel", "2"]
    parallel = _driver_run_id(_finish(_start_driver(args, sweep["uri"], sweep["folder"], log_path), log_path))

    plan = driver.build_plan(_config(sweep["model_dir"], mask_training="false"))
    made = set(_check_lineage(parallel, plan).values())
    assert not any(s["reused"] for s in _stage_runs(parallel))
    assert not made & {s["run_id"] for s in _stage_runs(sweep["first_driver"])}  # every stage ran again
    assert mlflow.get_run(sweep["first_driver"]).data.tags.get("maskdm.launch") == "up to 1 stage(s) at once"
    assert mlflow.get_run(parallel).data.tags["maskdm.launch"] == "up to 2 stage(s) at once, 1 CPU thread(s) per stage"

    table, reference = _results(parallel, "replicates.csv"), _results(sweep["first_driver"], "replicates.csv")
    reference = reference[(reference["mask_training"] == False) & (reference["replicate"] == 0)].reset_index(drop=True)  # noqa: E712
    assert len(table) == len(reference) == 1
    measured = [c for c in table.columns if not c.endswith(TIMING_COLUMNS)]
    scored = [c for c in measured if c.endswith("_fid_shapes") and pd.notna(table[c].iloc[0])]
    assert {"dense_fid_shapes", "pruned_fid_shapes", "finetuned_fid_shapes"} <= set(scored)
    assert set(measured) <= set(reference.columns)
    # check_dtype off: the reference's columns of what only replicate 0 measured (the speed step's
    # registered size) hold NaN for replicate 1, so they are float there and integer here.
    pd.testing.assert_frame_equal(table[measured].reset_index(drop=True), reference[measured], check_exact=True, check_dtype=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tracking_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, proxied artifacts), stopped afterwards."""
    import urllib.request

    port = _free_port()
    log_path = tmp_path / "server.log"
    # Without MLflow 3's job runners (seven huey consumer processes, for GenAI jobs MaskDM never
    # submits): they would only take CPU from the drivers.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--serve-artifacts", "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "2"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


#: The load test's four drivers: two with the same sweep, one with another ratio, one with both.
LOAD_RATIOS = ("0.5", "0.5", "0.3", "0.3,0.5")


def _check_drivers(drivers: list[str], plans: list[list], ratios: list[str]) -> dict[str, int]:
    """Every driver's lineage, table and runs, after several drivers ran overlapping sweeps at once;
    the figures for the docs."""
    from collections import Counter

    import pandas as pd
    from mlflow.tracking import MlflowClient

    from maskdm.tracking import running_runs

    client = MlflowClient()
    made, rows = {}, {}
    for driver_run, plan, sweep_ratios in zip(drivers, plans, ratios):
        # Every run it lists is a FINISHED run of the right stage fed by the runs of its own list
        # (no step of one driver reads a run another picked for that step).
        step_runs = _check_lineage(driver_run, plan)
        # Each listed run is the driver's own: made by it (its child), or reused by it and tagged so.
        listed = _stage_runs(driver_run)
        for entry in listed:
            tags = client.get_run(entry["run_id"]).data.tags
            if entry["reused"]:
                assert tags.get(f"{driver.USED_BY_TAG_PREFIX}{driver_run}") == "true", entry
            else:
                assert tags[driver.PARENT_RUN_TAG] == driver_run, entry
        made[driver_run] = {e["run_id"] for e in listed if not e["reused"]}
        # Its table is built from those runs only, and is complete: every ratio, every model scored.
        table = _results(driver_run)
        ids = {v for c in table.columns if c.endswith("_run_id") for v in table[c].dropna()}
        assert ids and ids <= set(step_runs.values()), (ids - set(step_runs.values()))
        for ratio in sweep_ratios.split(","):
            _assert_table_complete(driver_run, mask_training=False, ratio=float(ratio))
        for _, row in table.iterrows():
            rows.setdefault(float(row["pruning_ratio"]), []).append(row)

    # Every stage run in the store was made by exactly one driver and is on its list; every step
    # has at most one run per driver that runs it (two drivers may both start a step at once).
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{driver.CACHE_KEY_TAG}` LIKE '%'", max_results=1000)
    assert {r.info.run_id for r in runs} == set().union(*made.values())
    assert sum(len(m) for m in made.values()) == len(runs)
    per_key = Counter(r.data.tags[driver.CACHE_KEY_TAG] for r in runs)
    sharing = Counter(s.name for p in plans for s in p)
    assert max(per_key.values()) <= len(drivers) and len(per_key) >= max(len(p) for p in plans)
    # No cached side run twice (one machine: one process makes each, the others wait for it),
    # and nothing left RUNNING.
    side = [r for stage in ("fid_reference", "shapes_classifier", "latent_cache")
            for r in client.search_runs(experiments, f"tags.`maskdm.stage` = '{stage}'")]
    side_keys = Counter(tuple(sorted((k, v) for k, v in r.data.tags.items() if k.endswith("_key"))) for r in side)
    assert side and all(n == 1 for n in side_keys.values()), side_keys
    assert running_runs(experiments) == []
    assert all(r.info.status == "FINISHED" for r in runs)

    # Where the sweeps overlap, the tables agree: the same ratio's rows are equal in everything
    # measured (run IDs and timings may differ where two drivers ran a step), dense included.
    columns = [c for c in next(iter(rows.values()))[0].index if not c.endswith(TIMING_COLUMNS)]
    assert any(c.endswith("_fid_shapes") for c in columns)
    for ratio, found in rows.items():
        assert len(found) >= 2, ratio
        frame = pd.DataFrame(found)[columns].reset_index(drop=True)
        for i in range(1, len(frame)):
            pd.testing.assert_series_equal(frame.iloc[i], frame.iloc[0], check_exact=False, rtol=1e-6, check_names=False)
    return {"drivers": len(drivers), "stage_runs": len(runs), "steps": len(per_key), "side_runs": len(side),
            "duplicated_steps": sum(n - 1 for n in per_key.values()), "shared_steps": sum(n > 1 for n in sharing.values())}


@pytest.mark.e2e
@pytest.mark.timeout(E2E_TIMEOUT_S)
def test_e2e_four_drivers_at_once_against_a_tracking_server(code, tracking_server, tmp_path, monkeypatch):
    import mlflow

    from maskdm.ddpm.models import DDPM, default_scheduler, save_ddpm

    model_dir = save_ddpm(DDPM(tiny_unet(), default_scheduler()), tmp_path / "tiny_model")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    mlflow.set_tracking_uri(tracking_server)
    try:
        logs = [tmp_path / f"driver_{i}.log" for i in range(len(LOAD_RATIOS))]
        procs = [_start_driver(_main_args(model_dir, ratios=ratios), tracking_server, tmp_path, path)
                 for ratios, path in zip(LOAD_RATIOS, logs)]
        try:
            outputs = [_finish(proc, path) for proc, path in zip(procs, logs)]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        drivers = [_driver_run_id(output) for output in outputs]
        assert len(set(drivers)) == len(drivers)
        plans = [driver.build_plan(_config(model_dir, ratios=ratios)) for ratios in LOAD_RATIOS]
        figures = _check_drivers(drivers, plans, list(LOAD_RATIOS))
        (tmp_path / "load.json").write_text(json.dumps(figures))
        print("load test:", figures)
    finally:
        mlflow.set_tracking_uri(None)
