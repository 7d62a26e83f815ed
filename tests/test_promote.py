"""promote: registering finetune runs as pyfunc image generators, the alias rules, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from conftest import tiny_unet, tracking_store
from tests.test_report import FakeStore, build_pipeline, fake_protocol, fid_of

from maskdm import registry
from maskdm.errors import MaskDMError
from maskdm.ddpm.models import DDPM, default_scheduler, load_ddpm, save_ddpm
from maskdm.ddpm.sampling import sample_images
from maskdm.tracking import STAGE_TAG

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds); tests use their own model names."""
    folder = tmp_path_factory.mktemp("promote-store")
    with tracking_store(folder) as uri, pytest.MonkeyPatch.context() as patch:
        experiment_id = mlflow.create_experiment("promote")
        patch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
        model_dir = save_ddpm(DDPM(tiny_unet(), default_scheduler()), folder / "tiny_model")
        made = build_pipeline(FakeStore(experiment_id), model_dir=model_dir)
        yield dict(uri=uri, experiment_id=experiment_id, made=made, model_dir=model_dir, folder=folder)


def finetune(store, ratio: float, mask_training: bool = True) -> str:
    return store["made"][ratio]["finetune" if mask_training else "finetune_nomt"].run_id


def promote(*args: str) -> tuple[int, str, str]:
    """Run ``maskdm promote`` in-process; (exit code, stdout, stderr)."""
    from entrypoints.cli import cli

    result = CliRunner().invoke(cli, ["promote", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def versions(name: str) -> list:
    return sorted(MlflowClient().search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def champion(name: str, alias: str = "champion") -> str:
    return str(MlflowClient().get_model_version_by_alias(name, alias).version)


# --------------------------------------------------------------------------------------------
# Registering, idempotency, best, and the pyfunc model


def test_register_alias_idempotent_best_and_predict(store):
    run_05 = finetune(store, 0.5)
    code, out, err = promote("--finetune_run_id", run_05, "--registered_model", "gen", "--metric", "fid")
    assert code == 0, err
    assert "gen version 1: registered" in out and "gen@champion -> version 1" in out
    assert f"under FID protocol {fake_protocol('fid').id}" in out
    assert champion("gen") == "1"

    tags = versions("gen")[0].tags
    assert tags["finetune_run_id"] == run_05
    assert float(tags["fid"]) == pytest.approx(fid_of("finetuned", 0.5))
    assert float(tags["fid_shapes"]) == pytest.approx(1.5)
    # Each FID tag comes with the protocol it was measured under.
    assert tags["fid.protocol"] == fake_protocol("fid").key and tags["fid.protocol_id"] == fake_protocol("fid").id
    assert tags["fid_shapes.protocol"] == fake_protocol("fid_shapes").key
    assert float(tags["sparsity"]) == pytest.approx(0.5) and tags["pruning_ratio"] == "0.5"
    assert tags["prune_run_id"] == store["made"][0.5]["prune"].run_id
    assert tags["train_masks_run_id"] == store["made"][0.5]["train"].run_id
    assert tags["fid_run_id"] == store["made"][0.5]["finetuned_scores"][1].run_id
    assert tags["mask_training"] == "true"

    # The same run again, directly and as `best` at sparsity >= 0.4: the same version, no second one.
    code, out, err = promote("--finetune_run_id", run_05, "--registered_model", "gen", "--metric", "fid")
    assert code == 0, err
    assert "already registered" in out
    code, out, err = promote("--finetune_run_id", "best", "--min_sparsity", "0.4", "--registered_model", "gen",
                             "--metric", "fid", "--protocol", fake_protocol("fid").id)
    assert code == 0, err
    assert f"already registered finetune run {run_05}" in out
    assert len(versions("gen")) == 1 and champion("gen") == "1"

    model = mlflow.pyfunc.load_model("models:/gen@champion")
    images = model.predict(pd.DataFrame({"num_images": [2], "ddim_steps": [2], "seed": [0]}))
    assert isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
    # They are the images the sample stage would make of this model with this seed and step count.
    ddpm = load_ddpm(str(store["model_dir"]))
    expected = sample_images(ddpm.unet, ddpm.scheduler.config, range(2), steps=2, seed=0, batch_size=2, clip_sample=False)
    np.testing.assert_array_equal(images, expected)
    # Several rows: their images one after the other, in row order.
    both = model.predict(pd.DataFrame({"num_images": [1, 2], "ddim_steps": [2, 2], "seed": [5, 0]}))
    assert both.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(both[1:], expected)
    assert not np.array_equal(both[0], expected[0])

    signature = model.metadata.signature
    assert signature.inputs.input_names() == list(registry.INPUT_COLUMNS)
    assert signature.outputs.inputs[0].shape == (-1, 16, 16, 3)


def test_find_version_filters_in_the_registry_and_takes_names_with_quotes(store):
    """find_version asks the registry for name and finetune tag at once. A name holding a quote
    used to be searched as 'it\\'s' (the filter grammar has no escapes), found nothing, and a second
    promote of the same run registered a second version."""
    client = MlflowClient()
    name = "it's gen"
    client.create_registered_model(name)
    run_id = mlflow.search_runs(search_all_experiments=True, max_results=1)["run_id"][0]
    for finetune_run in ("run-a", "run-b", "run-a"):
        client.create_model_version(name, "file:///nowhere", run_id=run_id, tags={registry.FINETUNE_RUN_TAG: finetune_run})
    assert str(registry.find_version(name, "run-a").version) == "1"  # the oldest of two
    assert str(registry.find_version(name, "run-b").version) == "2"
    assert registry.find_version(name, "run-c") is None
    assert registry.find_version("no such model", "run-a") is None
    with pytest.raises(MaskDMError, match="both ' and \""):
        registry.find_version("it's \"odd\"", "run-a")

    # Promoting one run twice under a quoted name keeps one version.
    run_03 = finetune(store, 0.3)
    for _ in range(2):
        code, _, err = promote("--finetune_run_id", run_03, "--registered_model", "gen's", "--metric", "fid")
        assert code == 0, err
    assert len(client.search_model_versions('name = "gen\'s"')) == 1


# --------------------------------------------------------------------------------------------
# The alias rules


def test_worse_model_keeps_alias_force_moves_it_max_fid_bounds_both(store):
    name = "gate"
    code, out, err = promote("--finetune_run_id", finetune(store, 0.3), "--registered_model", name, "--metric", "fid")  # fid 16
    assert code == 0, err
    assert champion(name) == "1"

    worse = finetune(store, 0.5, mask_training=False)  # fid 25; its only FID, so metric=auto takes it
    code, out, err = promote("--finetune_run_id", worse, "--registered_model", name)
    assert code == 0, err  # not an error: registered, alias kept
    assert "gate version 2: registered" in out and "gate@champion not moved (stays on version 1)" in out
    assert "worse than version 1" in out and champion(name) == "1"

    code, out, err = promote("--finetune_run_id", worse, "--registered_model", name, "--force", "true")
    assert code == 0, err
    assert champion(name) == "2"
    assert len(versions(name)) == 2

    better = finetune(store, 0.5)  # fid 20: better than the holder (25) but above max_fid 18
    for force in ("false", "true"):
        code, out, err = promote("--finetune_run_id", better, "--registered_model", name, "--max_fid", "18",
                                 "--force", force, "--metric", "fid")
        assert code == 0, err
        assert "above max_fid 18" in out and champion(name) == "2"
    code, out, err = promote("--finetune_run_id", better, "--registered_model", name, "--max_fid", "21", "--metric", "fid")
    assert code == 0, err
    assert champion(name) == "3" and len(versions(name)) == 3

    promote_run = MlflowClient().search_runs([store["experiment_id"]], f"tags.`{STAGE_TAG}` = 'promote'",
                                             order_by=["attributes.start_time DESC"])[0]
    assert promote_run.info.status == "FINISHED"
    assert promote_run.data.tags["maskdm.promoted"] == "true" and promote_run.data.tags["maskdm.model_version"] == "3"
    assert promote_run.data.params["pruning_ratio"] == "0.5"  # it took on the finetune run's lineage


def test_decide_rules():
    holder = registry.Holder("1", 20.0)
    assert registry.decide(19.0, "fid", "2", None).promote
    assert registry.decide(19.0, "fid", "2", holder).promote
    assert registry.decide(20.0, "fid", "2", holder).promote  # no worse is enough
    assert not registry.decide(21.0, "fid", "2", holder).promote
    assert registry.decide(21.0, "fid", "2", holder, force=True).promote
    assert not registry.decide(21.0, "fid", "2", None, max_fid=20.0).promote
    assert not registry.decide(21.0, "fid", "2", holder, max_fid=20.0, force=True).promote
    assert registry.decide(21.0, "fid", "1", holder).promote  # it already holds the alias
    no_tag = registry.Holder("1", None)
    assert not registry.decide(1.0, "fid", "2", no_tag).promote
    assert registry.decide(1.0, "fid", "2", no_tag, force=True).promote


def test_best_picks_lowest_fid_at_or_above_min_sparsity(store):
    experiments = [store["experiment_id"]]
    assert registry.best_candidate(experiments, "fid", 0.0)[0].run_id == finetune(store, 0.3)
    assert registry.best_candidate(experiments, "fid", 0.4)[0].run_id == finetune(store, 0.5)
    assert registry.best_candidate(experiments, "fid", 0.5)[0].run_id == finetune(store, 0.5)  # "at or above"
    # Only the mask-trained runs have fid_shapes, so the metric changes the pool.
    shapes, scoring = registry.best_candidate(experiments, "fid_shapes", 0.0)
    assert shapes.run_id == finetune(store, 0.3) and shapes.fid(scoring) == pytest.approx(1.3)
    assert scoring.protocol == fake_protocol("fid_shapes")
    with pytest.raises(MaskDMError, match="sparsity >= 0.9"):
        registry.best_candidate(experiments, "fid", 0.9)
    # The store holds fid and fid_shapes: metric=auto cannot choose, and says what there is.
    with pytest.raises(MaskDMError, match="FIDs of 2 protocols") as error:
        registry.best_candidate(experiments, "auto", 0.0)
    assert fake_protocol("fid").key in str(error.value) and fake_protocol("fid_shapes").id in str(error.value)
    # A protocol id alone selects the metric too.
    by_id, scoring = registry.best_candidate(experiments, "auto", 0.0, fake_protocol("fid_shapes").id)
    assert by_id.run_id == finetune(store, 0.3) and scoring.metric == "fid_shapes"


def test_replicated_finetunes_compare_under_replicate_zeros_protocol(store):
    """After `main --seeds 0,1,2` each replicate's finetune is sampled with seed 42+k, so each has its
    own protocol; promote compares them under replicate 0's, as the report's columns do, and finds
    the best of all replicates (it used to stop: "FIDs of 3 protocols")."""
    from maskdm.tracking import REPLICATE_TAG

    made = store["made"][0.3]
    fake = FakeStore(mlflow.create_experiment("replicated"), clock_ms=1_950_000_000_000)
    runs = {}
    for k, value in enumerate((6.0, 4.0, 5.0)):
        tag = {REPLICATE_TAG: str(k)}
        run = fake.make("finetune", made["train"], {"seed": str(k)}, {"sparsity": 0.3}, tags=tag,
                        artifacts={"model": store["model_dir"]})
        sample = fake.make("sample", run, {"model_run_id": run.run_id, "seed": str(42 + k)}, {"images_per_s": 1.0}, tags=tag)
        fake.make("fid", sample, {"sample_run_id": sample.run_id}, {"fid_shapes": value},
                  tags={**fake_protocol("fid_shapes", seed=42 + k).tags(), **tag})
        runs[k] = run.run_id
    replicate_zero = fake_protocol("fid_shapes", seed=42)
    best, scoring = registry.best_candidate([fake.experiment_id])  # metric and protocol: auto
    assert best.run_id == runs[1] and best.fid(scoring) == pytest.approx(4.0)
    assert scoring.protocol_id == replicate_zero.id
    # A replicate's run on its own is judged under replicate 0's protocol too, so it compares with
    # a champion of another replicate.
    one, scoring = registry.candidate(runs[2])
    assert scoring.protocol_id == replicate_zero.id and one.fid(scoring) == pytest.approx(5.0)
    tags = registry.version_tags(best, scoring)
    assert tags["fid_shapes.protocol_id"] == replicate_zero.id and tags["replicate"] == "1"
    # A protocol that differs in more than the replicate's seed offset still does not compare.
    other = fake.make("finetune", made["train"], {"seed": "0"}, {"sparsity": 0.3}, artifacts={"model": store["model_dir"]})
    sample = fake.make("sample", other, {"model_run_id": other.run_id, "seed": "42"}, {"images_per_s": 1.0})
    fake.fid(sample, "fid_shapes", 3.0, samples=64)
    with pytest.raises(MaskDMError, match="FIDs of 2 protocols"):
        registry.best_candidate([fake.experiment_id])


# --------------------------------------------------------------------------------------------
# Bad input


def test_parse_requests_rejects_bad_rows():
    good = registry.parse_requests(pd.DataFrame({"num_images": [2], "ddim_steps": [3], "seed": [4]}))
    assert good == [registry.GenerationRequest(2, 3, 4)]
    for frame, message in [
        ({"ddim_steps": [1], "seed": [0]}, "needs the column num_images"),  # ddim_steps and seed are optional
        ({"num_images": [0], "ddim_steps": [1], "seed": [0]}, "num_images must be at least 1"),
        ({"num_images": [1.5], "ddim_steps": [1], "seed": [0]}, "num_images must be an integer"),
        ({"num_images": [1], "ddim_steps": [0], "seed": [0]}, "ddim_steps must be at least 1"),
        ({"num_images": [1], "ddim_steps": [1], "seed": [-1]}, "seed must be at least 0"),
        ({"num_images": [], "ddim_steps": [], "seed": []}, "no rows"),
    ]:
        with pytest.raises(MaskDMError, match=message):
            registry.parse_requests(pd.DataFrame(frame))


@pytest.fixture(scope="module")
def two_protocols(store):
    """Experiment protocol-gate: two finetune runs whose fid is measured under two protocols (16, 64 samples)."""
    made = store["made"][0.3]
    fake = FakeStore(mlflow.create_experiment("protocol-gate"), clock_ms=1_900_000_000_000)
    runs = {}
    for samples, value in ((16, 19.0), (64, 5.0)):
        run = fake.make("finetune", made["train"], {}, {"sparsity": 0.3}, artifacts={"model": store["model_dir"]})
        sample = fake.make("sample", run, {"model_run_id": run.run_id}, {"images_per_s": 1.0})
        fake.fid(sample, "fid", value, samples=samples)
        runs[samples] = run.run_id
    return runs


def test_the_gate_compares_only_under_one_protocol(store, two_protocols):
    name = "proto"
    code, out, err = promote("--finetune_run_id", two_protocols[16], "--registered_model", name)
    assert code == 0, err
    assert champion(name) == "1"
    # A lower FID, but of 64 samples against the holder's 16: refused, nothing registered, run FAILED.
    code, out, err = promote("--finetune_run_id", two_protocols[64], "--registered_model", name)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskdm: error: proto@champion not moved"), err
    assert "samples 64 vs 16" in lines[0] and "steps" not in lines[0] and "force=true" in lines[0]
    assert fake_protocol("fid", samples=16).id in lines[0] and fake_protocol("fid", samples=64).id in lines[0]
    assert len(versions(name)) == 1 and champion(name) == "1"
    failed = MlflowClient().search_runs([store["experiment_id"]], f"tags.`{STAGE_TAG}` = 'promote'",
                                        order_by=["attributes.start_time DESC"])[0]
    assert failed.info.status == "FAILED"
    # force still overrides: registered and moved.
    code, out, err = promote("--finetune_run_id", two_protocols[64], "--registered_model", name, "--force", "true")
    assert code == 0, err
    assert champion(name) == "2" and versions(name)[1].tags["fid.protocol"] == fake_protocol("fid", samples=64).key


def test_choose_scoring_auto_skips_fids_of_no_recorded_protocol():
    from maskdm.report import FidScore

    main, other = fake_protocol("fid_shapes"), fake_protocol("fid_shapes", samples=64)

    def run(*scores: FidScore) -> registry.Candidate:
        return registry.Candidate("r", {(s.metric, s.protocol_id): s for s in scores}, 0.5, {}, {})

    recorded = FidScore(2.0, "f1", "s1", "fid_shapes", main)
    legacy = FidScore(1.0, "f0", "s0", "fid_shapes", None)
    chosen = registry.choose_scoring([run(recorded), run(legacy)], "auto", "auto", "the runs")
    assert (chosen.metric, chosen.protocol_id) == ("fid_shapes", main.id)
    # Explicitly, the unrecorded ones can still be chosen; alone, auto takes them.
    assert registry.choose_scoring([run(recorded, legacy)], "auto", "unrecorded", "x").protocol is None
    assert registry.choose_scoring([run(legacy)], "auto", "auto", "x").protocol_id == "unrecorded"
    with pytest.raises(MaskDMError, match="have FIDs of 2 protocols"):
        registry.choose_scoring([run(recorded, legacy), run(FidScore(3.0, "f2", "s2", "fid_shapes", other))],
                                "auto", "auto", "the runs")


def test_protocol_conflict_rules():
    main, big = fake_protocol("fid"), fake_protocol("fid", samples=64, steps=20)
    same = registry.Scoring("fid", main.id, main)
    assert registry.protocol_conflict(same, registry.Holder("1", 20.0, main.key, main.id)) is None
    assert registry.protocol_conflict(same, registry.Holder("1", None)) is None  # rule 4 decides: nothing to compare
    message = registry.protocol_conflict(same, registry.Holder("1", 20.0, big.key, big.id))
    assert "samples 16 vs 64" in message and "steps 10 vs 20" in message and "seed" not in message
    # A version registered before protocols were recorded compares with nothing, and so does a run without one.
    assert "not both measured" in registry.protocol_conflict(same, registry.Holder("1", 20.0))
    unrecorded = registry.Scoring("fid", "unrecorded", None)
    assert registry.protocol_conflict(unrecorded, registry.Holder("1", 20.0, "unrecorded", "unrecorded"))


@pytest.fixture(scope="module")
def unscored_finetune(store):
    """A FINISHED finetune run with a model but no sample/fid run."""
    made = store["made"][0.3]
    fake = FakeStore(store["experiment_id"], clock_ms=1_800_000_000_000)
    return fake.make("finetune", made["train"], {}, {"sparsity": 0.3},
                     artifacts={"model": store["model_dir"]}).run_id


@pytest.mark.parametrize("args, message", [
    (["--finetune_run_id", "0" * 32], "does not exist"),
    (["--finetune_run_id", "PRUNE"], "is a 'prune' run; expected a finetune run"),
    (["--finetune_run_id", "UNSCORED"], "has no FID: run `maskdm sample"),
    (["--finetune_run_id", "NOMT", "--metric", "fid_shapes"], "has no FID 'fid_shapes', only fid under protocol"),
    (["--finetune_run_id", "NOMT", "--protocol", "0123456789"], "has no FID under protocol '0123456789'"),
    (["--metric", "loss"], "metric must be auto, 'fid' (Inception pool3) or 'fid_<name>'"),
    (["--experiment", "protocol-gate", "--metric", "fid"], "have FIDs of 2 protocols"),  # 16 and 64 samples
    (["--alias", "latest"], "alias 'latest' is not allowed"),
    (["--min_sparsity", "2"], "min_sparsity must be between 0 and 1"),
    (["--min_sparsity", "0.99"], "no FINISHED finetune run with an FID and sparsity >= 0.99"),
    (["--experiment", "nope"], "experiment 'nope' does not exist"),
])
def test_promote_bad_input(store, unscored_finetune, two_protocols, args, message):
    ids = {"PRUNE": store["made"][0.3]["prune"].run_id, "UNSCORED": unscored_finetune,
           "NOMT": finetune(store, 0.3, mask_training=False)}
    args = [ids.get(a, a) for a in args]
    code, out, err = promote(*args, "--registered_model", "bad")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskdm: error:") and message in lines[0], err
    assert not versions("bad")
    failed = MlflowClient().search_runs([store["experiment_id"]], f"tags.`{STAGE_TAG}` = 'promote'",
                                        order_by=["attributes.start_time DESC"])[0]
    assert failed.info.status == "FAILED"


# --------------------------------------------------------------------------------------------
# Through MLflow Projects, and loading the result where maskdm is not installed

# One child interpreter for both checks: starting one costs tens of seconds on a loaded CPU.
# It runs the promote entry point as `mlflow run` does (mlflow.projects.run, which spawns
# `maskdm promote`), then, never having imported maskdm, hides the installed copy and loads the
# registered model: it must run on the copy of maskdm it carries (code_paths).
PROJECT_AND_PORTABLE_LOAD = """
import json, sys
import mlflow
import pandas as pd

repo, experiment_id, run_id = sys.argv[1:4]
submitted = mlflow.projects.run(
    repo, entry_point="promote", env_manager="local", experiment_id=experiment_id, synchronous=True,
    parameters={"finetune_run_id": run_id, "registered_model": "e2e", "max_fid": "100"},
)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if p not in ("", ".", repo)]
model = mlflow.pyfunc.load_model("models:/e2e@champion")
images = model.predict(pd.DataFrame({"num_images": [1], "ddim_steps": [1], "seed": [0]}))
import maskdm
print(json.dumps({"run_id": submitted.run_id, "shape": list(images.shape), "dtype": str(images.dtype),
                  "maskdm": maskdm.__file__}))
"""


def test_promote_through_mlflow_projects_and_portable_load(store, tmp_path):
    import json

    run_id = finetune(store, 0.3, mask_training=False)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"]}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    done = subprocess.run(
        [sys.executable, "-c", PROJECT_AND_PORTABLE_LOAD, str(REPO), store["experiment_id"], run_id],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=500,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "e2e@champion -> version 1" in done.stdout
    result = json.loads(done.stdout.strip().splitlines()[-1])

    (version,) = versions("e2e")
    assert version.tags["finetune_run_id"] == run_id and champion("e2e") == "1"
    run = MlflowClient().get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[STAGE_TAG] == "promote"
    assert run.data.params["max_fid"] == "100" and run.data.params["metric"] == "auto"
    assert run.data.tags["maskdm.fid_metric"] == "fid" and run.data.tags["maskdm.fid_protocol_id"] == fake_protocol("fid").id

    assert result["shape"] == [1, 16, 16, 3] and result["dtype"] == "uint8"
    assert not result["maskdm"].startswith(str(REPO))
    assert f"{os.sep}code{os.sep}maskdm{os.sep}" in result["maskdm"]
