"""The fid stage: through `mlflow run`, its cached reference and classifier runs, and bad input.

Inception runs with planted random weights (inception_fixture.py) at dims=64, its first block,
so a fid run costs seconds; the values check the wiring, not sample quality. Sample runs are
made in-process with a handful of 32x32 images.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from inception_fixture import _planted_torch_home  # noqa: F401
from mlflow.tracking import MlflowClient
from PIL import Image

from maskdm import fid
from maskdm.tracking import STAGE_TAG, UPSTREAM_TAG_PREFIX, has_artifact, stage_run

REPO = Path(__file__).resolve().parents[1]
slow = pytest.mark.skipif(not os.environ.get("MASKDM_SLOW_TESTS"), reason="child processes: set MASKDM_SLOW_TESTS=1")


@pytest.fixture(scope="module")
def store(tmp_path_factory, _planted_torch_home):
    """One SQLite store and the planted Inception weights for the module, in-process and for children."""
    folder = tmp_path_factory.mktemp("fid-stage")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("TORCH_HOME", str(_planted_torch_home))
        patch.chdir(folder)
        mlflow.set_tracking_uri(uri)
        yield folder
    mlflow.set_tracking_uri(None)


def random_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def make_sample_run(images: np.ndarray | None, dataset: str = "shapes") -> str:
    """A FINISHED sample run with lineage params, holding ``images`` as samples.npz (none if None)."""
    with stage_run("sample", {"model": "tiny-test", "dataset": dataset, "pruning_ratio": 0.5}) as run:
        if images is not None:
            np.savez(run.out / "samples.npz", images=images, indices=np.arange(len(images)))
        else:
            (run.out / "grid.png").write_bytes(b"")
    return run.run_id


def runs_of(stage: str, status: str | None = None) -> list:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, f"tags.`{STAGE_TAG}` = '{stage}'", order_by=["attributes.start_time DESC"])
    return [r for r in found if status is None or r.info.status == status]


def fid_runs_of(sample_run: str) -> list:
    """The fid runs that scored ``sample_run``, newest first."""
    return [r for r in runs_of("fid") if r.data.tags.get(f"{UPSTREAM_TAG_PREFIX}sample") == sample_run]


def invoke(**options):
    from entrypoints.fid import command

    args = [arg for key, value in options.items() for arg in (f"--{key}", str(value))]
    return CliRunner().invoke(command, args)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("maskdm: error:")]


def stats_of(run_id: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="sample_stats.npz")) as f:
        return f["mu"], f["sigma"]


def expected_fid(images: np.ndarray, reference_images: np.ndarray, dims: int = 64) -> float:
    model = fid.load_inception(dims=dims)
    ours = fid.statistics(fid.inception_features(images, model))
    return fid.fid_from_stats(*ours, *fid.statistics(fid.inception_features(reference_images, model)))


@pytest.fixture(scope="module")
def image_folder(store) -> tuple[str, np.ndarray]:
    """An imagefolder dataset of 6 PNGs: a reference dataset small enough to score in a test."""
    images = random_images(6, seed=100)
    folder = store / "reference_images" / "all"
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    return f"imagefolder:{folder.parent}", images


# --- through mlflow run ---------------------------------------------------------------------------


def test_fid_through_mlflow_run_then_reused_reference(store, image_folder):
    dataset, reference_images = image_folder
    images = random_images(8, seed=1)
    sample_run = make_sample_run(images, dataset=dataset)
    references_before = len(runs_of("fid_reference"))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "fid", "--env-manager", "local"]
    args += ["-P", f"sample_run_id={sample_run}", "-P", "dims=64", "-P", "batch_size=3"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    (run,) = fid_runs_of(sample_run)
    assert run.info.status == "FINISHED"
    assert run.data.tags[f"{UPSTREAM_TAG_PREFIX}sample"] == sample_run
    assert run.data.params["pruning_ratio"] == "0.5" and run.data.params["dataset"] == dataset
    expected = expected_fid(images, reference_images)
    assert run.data.metrics["fid"] == pytest.approx(expected, rel=1e-6)
    assert "fid_shapes" not in run.data.metrics
    np.testing.assert_allclose(stats_of(run.info.run_id)[0], fid.statistics(fid.inception_features(images, fid.load_inception(64)))[0], rtol=1e-6)

    assert len(runs_of("fid_reference")) == references_before + 1
    reference_run = runs_of("fid_reference")[0]
    assert reference_run.info.status == "FINISHED"
    assert run.data.tags["maskdm.fid_reference_run"] == reference_run.info.run_id
    assert has_artifact(reference_run.info.run_id, "reference_stats.npz")
    assert reference_run.data.metrics["num_images"] == 6

    # The second run finds the cached statistics by key: no second fid_reference run, same value.
    again = invoke(sample_run_id=sample_run, dims=64, batch_size=5)
    assert again.exit_code == 0, again.output
    assert len(runs_of("fid_reference")) == references_before + 1
    second = fid_runs_of(sample_run)[0]
    assert second.info.run_id != run.info.run_id
    assert second.data.tags["maskdm.fid_reference_run"] == reference_run.info.run_id
    assert second.data.metrics["fid"] == pytest.approx(run.data.metrics["fid"], rel=1e-6)


@slow
def test_bad_input_through_mlflow_run(store):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    sample_run = make_sample_run(None)
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "fid", "--env-manager", "local", "-P", f"sample_run_id={sample_run}"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    (error,) = error_lines(done.stderr)
    assert "has no 'samples.npz' artifact" in error
    assert "Traceback" not in done.stderr
    assert runs_of("fid")[0].info.status == "FAILED"


# --- in process -----------------------------------------------------------------------------------


def test_npz_reference_in_pytorch_fid_format(store, tmp_path):
    images, reference_images = random_images(5, seed=2), random_images(5, seed=3)
    model = fid.load_inception(dims=64)
    stats_file = fid.save_stats(tmp_path / "reference.npz", *fid.statistics(fid.inception_features(reference_images, model)))
    before = len(runs_of("fid_reference"))
    result = invoke(sample_run_id=make_sample_run(images), reference=stats_file, dims=64)
    assert result.exit_code == 0, result.output
    run = runs_of("fid")[0]
    assert run.data.metrics["fid"] == pytest.approx(expected_fid(images, reference_images), rel=1e-6)
    assert run.data.tags["maskdm.fid_reference"] == str(stats_file.resolve())
    assert len(runs_of("fid_reference")) == before  # a file needs no cache


def test_shapes_features_train_and_reuse_their_classifier(store, monkeypatch):
    import entrypoints.fid as fid_stage
    import maskdm.data

    # A few steps of training and a small training split keep this test at seconds; the stage's
    # own settings are the ones test_fid.py's accuracy test scales down from.
    monkeypatch.setattr(fid_stage, "CLASSIFIER_TRAINING", {"epochs": 1, "batch_size": 32, "max_images": 320, "seed": 0})
    monkeypatch.setattr(maskdm.data, "SHAPES_TRAIN_SIZE", 400)
    from maskdm.data import render_shapes

    sample_run = make_sample_run(render_shapes(80, seed=7)[0], dataset="shapes")
    references_before = len(runs_of("fid_reference"))
    for _ in range(2):
        result = invoke(sample_run_id=sample_run, features="shapes")
        assert result.exit_code == 0, result.output
    second, first = fid_runs_of(sample_run)
    assert "fid" not in first.data.metrics and "fid" not in second.data.metrics
    assert first.data.metrics["fid_shapes"] == pytest.approx(second.data.metrics["fid_shapes"], rel=1e-9)
    assert first.data.metrics["fid_shapes"] > 0
    (classifier_run,) = runs_of("shapes_classifier")
    assert has_artifact(classifier_run.info.run_id, "shapes_classifier.safetensors")
    assert 0 <= classifier_run.data.metrics["eval_accuracy"] <= 1
    assert len(runs_of("fid_reference")) == references_before + 1
    assert stats_of(first.info.run_id)[0].shape == (64,)


# --- bad input ------------------------------------------------------------------------------------


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "case,message",
    [
        ("no_samples", "has no 'samples.npz' artifact"),
        ("one_sample", "at least 2 images"),
        ("reference_without_mu", "lack mu"),
        ("reference_of_wrong_dims", "dims=64 needs mu (64,)"),
        ("unknown_features", "unknown features 'clip'"),
        ("shapes_features_on_cifar10", "features=shapes scores the shapes dataset only"),
        ("missing_weights", "does not exist"),
        ("unknown_dims", "dims=100"),
        ("not_a_sample_run", "expected a sample run"),
    ],
)
def test_bad_input_fails_the_run_with_one_line(store, tmp_path, case, message):
    options = {"sample_run_id": None, "dims": 64}
    if case == "no_samples":
        options["sample_run_id"] = make_sample_run(None)
    elif case == "one_sample":
        options["sample_run_id"] = make_sample_run(random_images(1, seed=0))
    elif case == "not_a_sample_run":
        with stage_run("prune", {}) as other:
            np.savez(other.out / "samples.npz", images=random_images(2, seed=0))
        options["sample_run_id"] = other.run_id
    else:
        options["sample_run_id"] = make_sample_run(random_images(3, seed=0))
    if case == "reference_without_mu":
        options["reference"] = write_npz(tmp_path / "ref.npz", sigma=np.eye(64))
    elif case == "reference_of_wrong_dims":
        options["reference"] = write_npz(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    elif case == "unknown_features":
        options["features"] = "clip"
    elif case == "shapes_features_on_cifar10":
        options.update(features="shapes", reference="cifar10")
    elif case == "missing_weights":
        options["weights"] = tmp_path / "nowhere.pth"
    elif case == "unknown_dims":
        options["dims"] = 100

    result = invoke(**options)
    assert result.exit_code == 1
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    run = runs_of("fid")[0]
    assert run.info.status == "FAILED"
    assert not has_artifact(run.info.run_id, "sample_stats.npz")
