"""The fid stage: through `mlflow run`, its cached reference and classifier runs, and bad input.

Inception runs with planted random weights (inception_fixture.py) at dims=64, its first block,
so a fid run costs seconds; the values check the wiring, not sample quality. Sample runs are
made in-process with a handful of 32x32 images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from entrypoints.fid import BATCH_SIZE_TAG
from inception_fixture import _planted_torch_home  # noqa: F401
from mlflow.tracking import MlflowClient
from PIL import Image

from maskdm.evaluation import fid
from maskdm.report import FID_PROTOCOL_ID_TAG, FID_PROTOCOL_PART_PREFIX, FID_PROTOCOL_TAG, FidProtocol
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


def make_sample_run(images: np.ndarray | None, dataset: str = "shapes", params: dict | None = None, **saved) -> str:
    """A FINISHED sample run with lineage params (and ``params``), holding ``images`` as samples.npz
    (none if None) with the ``saved`` settings beside them, as the sample stage writes them."""
    with stage_run("sample", {"model": "tiny-test", "dataset": dataset, "pruning_ratio": 0.5, **(params or {})}) as run:
        if images is not None:
            np.savez(run.out / "samples.npz", images=images, indices=np.arange(len(images)), **saved)
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


def assert_failed_with_one_line(result, message: str) -> None:
    """A bad fid input: exit 1, one `maskdm: error:` line naming ``message``, a FAILED run, no statistics."""
    assert result.exit_code == 1
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    run = runs_of("fid")[0]
    assert run.info.status == "FAILED"
    assert not has_artifact(run.info.run_id, "sample_stats.npz")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("maskdm: error:")]


def protocol_of(run) -> dict[str, str]:
    """The protocol parts a fid run recorded, checked against its key and id tags."""
    tags = run.data.tags
    parts = {k[len(FID_PROTOCOL_PART_PREFIX):]: v for k, v in tags.items() if k.startswith(FID_PROTOCOL_PART_PREFIX)}
    protocol = FidProtocol.parse(tags[FID_PROTOCOL_TAG])
    assert protocol is not None and dict(protocol.parts) == parts
    assert tags[FID_PROTOCOL_ID_TAG] == protocol.id
    return parts


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
    from maskdm.ddpm.data import dataset_identity

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
    # `fid` is Inception pool3's only: 64 dims log a metric that says so.
    assert run.data.metrics["fid_inception_64"] == pytest.approx(expected, rel=1e-6)
    assert "fid" not in run.data.metrics and "fid_shapes" not in run.data.metrics
    weights = fid.weights_digest(fid.default_weights_path())
    assert protocol_of(run) == {
        "features": "inception", "dims": "64", "samples": "8", "reference": f"{dataset_identity(dataset, contents=True)}:train",
        "resolution": "32",
        "weights": weights, "sampler": "ddim", "steps": "unknown", "skip": "unknown", "eta": "unknown",
        "clip": "unknown", "seed": "unknown",
    }
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
    assert second.data.metrics["fid_inception_64"] == pytest.approx(run.data.metrics["fid_inception_64"], rel=1e-6)
    # batch_size is no part of the protocol: the two FIDs compare.
    assert second.data.tags[FID_PROTOCOL_ID_TAG] == run.data.tags[FID_PROTOCOL_ID_TAG]
    assert (run.data.tags[BATCH_SIZE_TAG], second.data.tags[BATCH_SIZE_TAG]) == ("3", "5")

    # batch_size=auto (the default) on this CPU: 50 images a pass, recorded beside the "auto" param.
    third = invoke(sample_run_id=sample_run, dims=64)
    assert third.exit_code == 0, third.output
    auto = fid_runs_of(sample_run)[0]
    assert auto.data.params["batch_size"] == "auto" and auto.data.tags[BATCH_SIZE_TAG] == "50"
    assert auto.data.metrics["fid_inception_64"] == pytest.approx(run.data.metrics["fid_inception_64"], rel=1e-6)


def test_auto_batch_size_follows_the_device():
    from entrypoints.fid import resolve_batch_size

    assert resolve_batch_size("auto", "cpu") == fid.AUTO_BATCH_SIZE["cpu"] == 50
    assert resolve_batch_size(" Auto ", "cuda") == fid.auto_batch_size("cuda:1") == 200
    assert resolve_batch_size("16", "cuda") == 16


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
    sample_run = make_sample_run(images)
    result = invoke(sample_run_id=sample_run, reference=stats_file, dims=64)
    assert result.exit_code == 0, result.output
    run = runs_of("fid")[0]
    assert run.data.metrics["fid_inception_64"] == pytest.approx(expected_fid(images, reference_images), rel=1e-6)
    assert run.data.tags["maskdm.fid_reference"] == str(stats_file.resolve())
    assert len(runs_of("fid_reference")) == before  # a file needs no cache
    # A stats file is named in the protocol by its content: a copy elsewhere is the same protocol,
    # other statistics are not.
    assert protocol_of(run)["reference"] == f"sha256:{fid.weights_digest(stats_file)}"
    copy = tmp_path / "elsewhere" / "copy.npz"
    copy.parent.mkdir()
    copy.write_bytes(stats_file.read_bytes())
    other = fid.save_stats(tmp_path / "other.npz", *fid.statistics(fid.inception_features(random_images(5, seed=4), model)))
    ids = []
    for reference in (copy, other):
        assert invoke(sample_run_id=sample_run, reference=reference, dims=64).exit_code == 0
        ids.append(runs_of("fid")[0].data.tags[FID_PROTOCOL_ID_TAG])
    assert ids[0] == run.data.tags[FID_PROTOCOL_ID_TAG] != ids[1]


def _write_folder(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        # Uncompressed: the file's size depends on the image's shape only, not its pixels.
        Image.fromarray(image).save(folder / f"{i}.png", compress_level=0)


def test_reference_statistics_follow_the_folders_contents_not_its_listing(store, tmp_path):
    """Images rewritten in place with the same size and modification time (a restore, ``cp -p``)
    keep the folder's listing (path, size, mtime) but are new statistics and a new protocol; the
    same images in another folder are the same statistics and protocol."""
    import os

    from maskdm.ddpm.data import dataset_identity

    before, after = random_images(4, seed=20), random_images(4, seed=21)
    root = tmp_path / "refs"
    _write_folder(root / "all", before)
    dataset = f"imagefolder:{root}"
    sample_run = make_sample_run(random_images(6, seed=22), dataset=dataset)
    references = len(runs_of("fid_reference"))
    assert invoke(sample_run_id=sample_run, dims=64).exit_code == 0
    first = fid_runs_of(sample_run)[0]
    assert len(runs_of("fid_reference")) == references + 1

    listing = dataset_identity(dataset)
    stats = {p: p.stat() for p in (root / "all").iterdir()}
    _write_folder(root / "all", after)
    for path, stat in stats.items():
        assert path.stat().st_size == stat.st_size
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # What keyed the statistics before: unchanged, so they would have been reused.
    assert dataset_identity(dataset) == listing
    assert invoke(sample_run_id=sample_run, dims=64).exit_code == 0
    second = fid_runs_of(sample_run)[0]
    assert len(runs_of("fid_reference")) == references + 2
    assert second.data.tags["maskdm.fid_reference_run"] != first.data.tags["maskdm.fid_reference_run"]
    images = random_images(6, seed=22)
    assert second.data.metrics["fid_inception_64"] == pytest.approx(expected_fid(images, after), rel=1e-6)
    assert first.data.metrics["fid_inception_64"] == pytest.approx(expected_fid(images, before), rel=1e-6)
    assert protocol_of(second)["reference"] != protocol_of(first)["reference"]

    # The original images again, in another folder: the first statistics and protocol.
    moved = tmp_path / "moved"
    _write_folder(moved / "all", before)
    elsewhere = make_sample_run(images, dataset=f"imagefolder:{moved}")
    assert invoke(sample_run_id=elsewhere, dims=64).exit_code == 0
    third = fid_runs_of(elsewhere)[0]
    assert len(runs_of("fid_reference")) == references + 2
    assert third.data.tags["maskdm.fid_reference_run"] == first.data.tags["maskdm.fid_reference_run"]
    assert third.data.tags[FID_PROTOCOL_ID_TAG] == first.data.tags[FID_PROTOCOL_ID_TAG]


@pytest.mark.parametrize("change", ["transform", "pytorch-fid", "code"])
def test_reference_statistics_made_another_way_are_not_reused(store, tmp_path, monkeypatch, change):
    """Another resize (transform), another pytorch-fid, or other code in maskdm.evaluation.fid / maskdm.ddpm.data:
    the statistics are made again, not taken from the cache."""
    from importlib import metadata

    import maskdm.ddpm.data
    from maskdm import tracking

    _write_folder(tmp_path / "refs" / "all", random_images(4, seed=30))
    sample_run = make_sample_run(random_images(5, seed=31), dataset=f"imagefolder:{tmp_path / 'refs'}")
    assert invoke(sample_run_id=sample_run, dims=64).exit_code == 0
    references = len(runs_of("fid_reference"))
    assert invoke(sample_run_id=sample_run, dims=64).exit_code == 0
    assert len(runs_of("fid_reference")) == references  # unchanged: reused

    if change == "transform":
        from torchvision import transforms

        original = maskdm.ddpm.data._transform
        monkeypatch.setattr(maskdm.ddpm.data, "_transform", lambda resolution, train: transforms.Compose(
            [transforms.Resize(resolution, interpolation=transforms.InterpolationMode.NEAREST), *original(resolution, train).transforms[1:]]))
    elif change == "pytorch-fid":
        version = metadata.version
        monkeypatch.setattr(metadata, "version", lambda name: "0.0.1" if name == "pytorch-fid" else version(name))
    else:
        digest = tracking.source_digest
        monkeypatch.setattr("entrypoints.fid.source_digest", lambda *modules: digest(*modules) + ("x" if "maskdm.evaluation.fid" in modules else ""))
    assert invoke(sample_run_id=sample_run, dims=64).exit_code == 0
    assert len(runs_of("fid_reference")) == references + 1


def test_protocol_records_the_sampling_settings(store, image_folder):
    """Steps, skip type, eta and seed from the sample run's params (else its samples.npz); x0 clipping
    from its clip_sample param, else from the sampled model's scheduler config."""
    import json

    with stage_run("prune", {"pruning_ratio": 0.5}) as model_run:
        (model_run.out / "model" / "scheduler").mkdir(parents=True)
        (model_run.out / "model" / "scheduler" / "scheduler_config.json").write_text(json.dumps({"clip_sample": False}))
    images = random_images(4, seed=5)
    sampling = {"model_run_id": model_run.run_id, "ddim_steps": 25, "skip_type": "quad", "eta": "0.0", "seed": 7}
    parts = {}
    for case, params, saved in [
        ("config", sampling, {}),
        ("param", {**sampling, "clip_sample": "true"}, {}),
        ("npz", {}, {"seed": np.int64(3), "ddim_steps": np.int64(10), "skip_type": np.str_("uniform"), "eta": np.float64(0.5),
                     "clip_sample": np.bool_(True)}),
    ]:
        result = invoke(sample_run_id=make_sample_run(images, params=params, **saved), reference=image_folder[0], dims=64)
        assert result.exit_code == 0, result.output
        parts[case] = protocol_of(runs_of("fid")[0])
    assert {k: parts["config"][k] for k in ("sampler", "steps", "skip", "eta", "clip", "seed")} == {
        "sampler": "ddim", "steps": "25", "skip": "quad", "eta": "0", "clip": "false", "seed": "7"}
    assert parts["param"] == {**parts["config"], "clip": "true"}
    assert {k: parts["npz"][k] for k in ("steps", "skip", "eta", "clip", "seed")} == {
        "steps": "10", "skip": "uniform", "eta": "0.5", "clip": "true", "seed": "3"}


def test_shapes_features_train_and_reuse_their_classifier(store, monkeypatch):
    import entrypoints.fid as fid_stage
    import maskdm.ddpm.data

    # A few steps of training and a small training split keep this test at seconds; the stage's
    # own settings are the ones test_fid.py's accuracy test scales down from.
    monkeypatch.setattr(fid_stage, "CLASSIFIER_TRAINING", {"epochs": 1, "batch_size": 32, "max_images": 320, "seed": 0})
    monkeypatch.setattr(maskdm.ddpm.data, "SHAPES_TRAIN_SIZE", 400)
    from maskdm.ddpm.data import render_shapes

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
    # Trained here: the shipped classifier was made under other settings (its key is not this one).
    assert "made_by" not in classifier_run.data.params
    assert first.data.tags["maskdm.fid_weights_digest"] != json.loads(fid_stage.SHIPPED_CLASSIFIER_RECIPE.read_text())["weights_digest"]
    assert len(runs_of("fid_reference")) == references_before + 1
    assert stats_of(first.info.run_id)[0].shape == (64,)
    parts = protocol_of(first)
    assert (parts["features"], parts["dims"], parts["samples"], parts["reference"]) == ("shapes", "64", "80", "shapes:train")
    assert parts["weights"] == first.data.tags["maskdm.fid_weights_digest"]
    assert second.data.tags[FID_PROTOCOL_ID_TAG] == first.data.tags[FID_PROTOCOL_ID_TAG]


def test_a_store_without_a_classifier_registers_the_shipped_one_untrained(tmp_path, monkeypatch):
    import entrypoints.fid as fid_stage
    import maskdm.ddpm.data
    import maskdm.evaluation.shapes_features as shapes_features
    from conftest import tracking_store
    from maskdm.ddpm.data import render_shapes

    def no_training(*args, **kwargs):
        raise AssertionError("the shipped classifier is current: nothing should be trained")

    monkeypatch.setattr(shapes_features, "train_shapes_classifier", no_training)
    monkeypatch.setattr(maskdm.ddpm.data, "SHAPES_TRAIN_SIZE", 400)  # the reference statistics: seconds
    recipe = json.loads(fid_stage.SHIPPED_CLASSIFIER_RECIPE.read_text())
    with tracking_store(tmp_path) as _:
        result = invoke(sample_run_id=make_sample_run(render_shapes(40, seed=3)[0]), features="shapes")
        assert result.exit_code == 0, result.output
        (classifier_run,) = runs_of("shapes_classifier")
        (scored,) = runs_of("fid")
        params = classifier_run.data.params
        assert params["made_by"] == recipe["command"] and params["torch_threads"] == str(recipe["torch_threads"])
        assert classifier_run.data.metrics["eval_accuracy"] == pytest.approx(recipe["metrics"]["eval_accuracy"])
        logged = mlflow.artifacts.download_artifacts(run_id=classifier_run.info.run_id, artifact_path="shapes_classifier.safetensors")
        assert fid.weights_digest(logged) == recipe["weights_digest"] == scored.data.tags["maskdm.fid_weights_digest"]
        assert has_artifact(classifier_run.info.run_id, fid_stage.SHIPPED_CLASSIFIER_RECIPE.name)


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
        ("zero_batch_size", "batch_size must be an integer >= 1, not '0'"),
        ("batch_size_not_a_number", "batch_size must be an integer >= 1, not 'big'"),
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
    elif case == "zero_batch_size":
        options["batch_size"] = 0
    elif case == "batch_size_not_a_number":
        options["batch_size"] = "big"

    result = invoke(**options)
    assert_failed_with_one_line(result, message)
