"""The sample stage: through `mlflow run`, on several processes (torchrun, gloo), and its bad-input boundary."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import tiny_unet, tracking_store

from maskdm.ddpm.models import DDPM, default_scheduler, save_ddpm
from maskdm.ddpm.sampling import sample_images
from maskdm.tracking import STAGE_TAG, UPSTREAM_TAG_PREFIX, has_artifact, stage_run

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(total_samples="5", batch_size="2", ddim_steps="4", seed="3")
#: Each child process imports torch, diffusers and mlflow (20 s idle, a minute on a loaded pair of
#: cores): beyond the one `mlflow run` that proves the MLproject wiring and the two torchrun jobs
#: (the multi-process contract: same images, one run, a failure ends the job), they run on request.
slow = pytest.mark.skipif(not os.environ.get("MASKDM_SLOW_TESTS"), reason="child processes: set MASKDM_SLOW_TESTS=1")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module: creating one costs seconds, and each test finds its own runs."""
    with tracking_store(tmp_path_factory.mktemp("sample-stage")) as uri:
        yield uri


@pytest.fixture(scope="module")
def model_run(store):
    """A FINISHED pretrain run holding the tiny model at model/, with lineage params."""
    with stage_run("pretrain", {"model": "tiny-test", "dataset": "shapes", "pruning_ratio": 0}) as run:
        save_ddpm(DDPM(tiny_unet(), default_scheduler()), run.out / "model")
    return run.run_id


def sample_run_ids() -> set[str]:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id for r in client.search_runs(experiments, f"tags.`{STAGE_TAG}` = 'sample'")}


@pytest.fixture
def new_sample_run():
    """Call it after the stage ran: the one sample run made since the test started."""
    before = sample_run_ids()

    def find():
        (run_id,) = sample_run_ids() - before
        return MlflowClient().get_run(run_id)

    return find


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    # One thread per child: two cores are shared by the whole test session.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return env


def mlflow_run_sample(**params) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "sample", "--env-manager", "local"]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    return subprocess.run(args, env=child_env(), capture_output=True, text=True, timeout=600)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("maskdm: error:")]


def load_samples(run_id: str) -> np.lib.npyio.NpzFile:
    return np.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="samples.npz"))


def test_sample_through_mlflow_run(model_run, new_sample_run):
    done = mlflow_run_sample(model_run_id=model_run, save_png="true", **SMALL)
    assert done.returncode == 0, done.stderr[-3000:]

    run = new_sample_run()
    assert run.info.status == "FINISHED"
    assert run.data.tags[f"{UPSTREAM_TAG_PREFIX}pretrain"] == model_run
    assert run.data.params["pruning_ratio"] == "0" and run.data.params["model"] == "tiny-test"
    assert run.data.metrics["images_per_s"] > 0

    samples = load_samples(run.info.run_id)
    images = samples["images"]
    assert images.dtype == np.uint8 and images.shape == (5, 16, 16, 3)
    assert samples["indices"].tolist() == list(range(5)) and int(samples["seed"]) == 3
    # x0 clipping is off by default, though the model's scheduler config says clip_sample=True.
    assert default_scheduler().config.clip_sample
    assert run.data.params["clip_sample"] == "false" and samples["clip_sample"].dtype == np.bool_
    assert not bool(samples["clip_sample"])
    # The stage's images are the library's images for (seed, index), whatever the batching.
    options = dict(steps=4, seed=3, batch_size=5, channels_last=True)
    expected = sample_images(tiny_unet(), default_scheduler(), range(5), clip_sample=False, **options)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    clipped = sample_images(tiny_unet(), default_scheduler(), range(5), clip_sample=True, **options)
    assert np.abs(images.astype(int) - clipped.astype(int)).max() > 10

    grid = np.asarray(Image.open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="grid.png")))
    # 5 images of 16 px, enlarged 4x to 64 px, in one row of 8, 2 px padding
    assert grid.shape == (2 + 66, 2 + 5 * 66, 3)
    assert (grid[2:66, 2:66] == images[0].repeat(4, axis=0).repeat(4, axis=1)).all()
    pngs = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="pngs"))
    assert sorted(p.name for p in pngs.iterdir()) == [f"{i:06d}.png" for i in range(5)]
    assert (np.asarray(Image.open(pngs / "000004.png")) == images[4]).all()


@slow
def test_bad_input_through_mlflow_run(model_run, new_sample_run):
    done = mlflow_run_sample(model_run_id=model_run, skip_type="cubic", **SMALL)
    assert done.returncode != 0
    assert len(error_lines(done.stderr)) == 1 and "skip_type" in error_lines(done.stderr)[0]
    assert "Traceback" not in done.stderr
    run = new_sample_run()
    assert run.info.status == "FAILED"
    assert not has_artifact(run.info.run_id, "samples.npz")


needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")


def torchrun(*args: str) -> list[str]:
    # --standalone: a free rendezvous port, so parallel test workers' jobs never meet.
    return ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "entrypoints.cli", "sample", *args]


@needs_torchrun
def test_two_processes_make_one_run_with_the_same_images_as_one(model_run, new_sample_run):
    # batch_size 1: every image is its own UNet call in both runs, so they must agree to the bit.
    options = {**SMALL, "batch_size": "1"}
    result = invoke(model_run_id=model_run, **options)
    assert result.exit_code == 0, result.output
    single = load_samples(new_sample_run().info.run_id)["images"]

    before = sample_run_ids()
    args = ["--model_run_id", model_run, *[arg for key, value in options.items() for arg in (f"--{key}", value)]]
    two = subprocess.run(torchrun(*args), env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    (run_id,) = sample_run_ids() - before  # one run for the two processes
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["maskdm.num_processes"] == "2"
    assert "process 1 of 2" in two.stderr and "images 3..4" in two.stderr  # the second block was made by rank 1
    double = load_samples(run_id)["images"]
    assert double.shape == (5, 16, 16, 3)
    assert np.array_equal(single, double)  # image i depends on (seed, i) only
    assert np.abs(double[0].astype(int) - double[4].astype(int)).max() > 10  # ... and the images differ


@needs_torchrun
def test_a_process_killed_mid_sampling_ends_the_job_and_fails_the_run(model_run):
    """SIGKILL rank 1 while it samples: torchrun stops rank 0, whose run ends FAILED with one line."""
    before = sample_run_ids()
    args = ["--model_run_id", model_run, "--total_samples", "4000", "--batch_size", "1", "--ddim_steps", "100"]
    job = subprocess.Popen(torchrun(*args), env=child_env(), cwd=REPO, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    sampling = threading.Event()

    def read() -> None:
        for line in job.stderr:
            lines.append(line)
            if "process 1 of 2 (pid" in line:
                sampling.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert sampling.wait(240), "".join(lines)[-3000:]
        (rank1_line,) = [line for line in lines if "process 1 of 2 (pid" in line]
        os.kill(int(rank1_line.split("(pid ")[1].split(")")[0]), signal.SIGKILL)
        started = time.monotonic()
        returncode = job.wait(timeout=120)  # no hang: torch's default would wait 30 minutes
        ended_s = time.monotonic() - started
    finally:
        if job.poll() is None:
            job.kill()
        reader.join(10)
    stderr = "".join(lines)
    assert returncode != 0 and ended_s < 120
    (run_id,) = sample_run_ids() - before
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED", stderr[-3000:]  # not left RUNNING
    assert not has_artifact(run_id, "samples.npz")
    errors = error_lines(stderr)
    assert len(errors) == 1 and "another process of this job" in errors[0], stderr[-3000:]


# --------------------------------------------------------------------------------------------
# In process (the same code path as the console script): clip_sample, and the bad-input boundary


def invoke(**options):
    from entrypoints.sample import command

    args = [arg for key, value in options.items() for arg in (f"--{key}", str(value))]
    return CliRunner().invoke(command, args)


@pytest.mark.parametrize("clip", [True, False])
def test_clip_sample_is_a_logged_param_recorded_in_samples_npz(model_run, new_sample_run, clip):
    result = invoke(model_run_id=model_run, clip_sample=str(clip).lower(), **SMALL)
    assert result.exit_code == 0, result.output
    run = new_sample_run()
    assert run.info.status == "FINISHED" and run.data.params["clip_sample"] == str(clip).lower()
    samples = load_samples(run.info.run_id)
    assert bool(samples["clip_sample"]) is clip
    assert int(samples["ddim_steps"]) == 4 and str(samples["skip_type"]) == "uniform" and float(samples["eta"]) == 0.0
    options = dict(steps=4, seed=3, batch_size=5, channels_last=True)
    same = sample_images(tiny_unet(), default_scheduler(), range(5), clip_sample=clip, **options)
    other = sample_images(tiny_unet(), default_scheduler(), range(5), clip_sample=not clip, **options)
    images = samples["images"].astype(int)
    assert np.abs(images - same.astype(int)).max() <= 1
    assert np.abs(images - other.astype(int)).max() > 10  # the setting changed these images


def test_clip_sample_that_is_not_a_boolean_is_one_line(model_run):
    from entrypoints.cli import cli

    before = sample_run_ids()
    result = CliRunner().invoke(cli, ["sample", "--model_run_id", model_run, "--clip_sample", "maybe"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == error_lines(result.stderr)
    assert len(error_lines(result.stderr)) == 1 and "clip_sample" in result.stderr
    assert sample_run_ids() == before  # refused before any run was opened


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(total_samples=1), "total_samples must be at least 2"),
        (dict(ddim_steps=1001), "ddim_steps must be between 1 and the model's 1000 training timesteps"),
        (dict(ddim_steps=0), "ddim_steps"),
        (dict(skip_type="cubic"), "unknown skip_type 'cubic'"),
        (dict(eta=2.0), "eta"),
        (dict(mixed_precision="fp8"), "mixed_precision"),
        (dict(model_run_id="0" * 32), "does not exist"),
    ],
)
def test_bad_input_fails_the_run_with_one_line(model_run, new_sample_run, options, message):
    params = dict(model_run_id=model_run, **SMALL)
    params.update(options)
    result = invoke(**params)
    assert result.exit_code == 1
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    run = new_sample_run()
    assert run.info.status == "FAILED"
    assert not has_artifact(run.info.run_id, "samples.npz")


def test_fast_path_tag_on_the_cpu(model_run, new_sample_run):
    """Defaults on a CPU: float32, channels_last (measured fastest there too), compile=auto is eager."""
    result = invoke(model_run_id=model_run, **SMALL)
    assert result.exit_code == 0, result.output
    run = new_sample_run()
    assert run.data.params["compile"] == "auto" and run.data.params["channels_last"] == "true"
    assert run.data.tags["maskdm.fast_path"] == "fp32,channels_last"
    before = sample_run_ids()
    result = invoke(model_run_id=model_run, channels_last="auto", mixed_precision="bf16", **SMALL)
    assert result.exit_code == 0, result.output
    (run_id,) = sample_run_ids() - before
    assert MlflowClient().get_run(run_id).data.tags["maskdm.fast_path"] == "bf16"  # auto: NHWC on CUDA only


@pytest.mark.parametrize("option", ["compile", "channels_last"])
def test_a_bad_fast_path_choice_fails_the_run_with_one_line(model_run, new_sample_run, option):
    result = invoke(model_run_id=model_run, **{option: "maybe"}, **SMALL)
    assert result.exit_code == 1
    (error,) = error_lines(result.stderr)
    assert f"{option} must be one of auto, true, false" in error
    assert new_sample_run().info.status == "FAILED"


def test_upstream_without_a_model_is_refused(store, new_sample_run):
    with stage_run("extract_masks", {}) as upstream:
        (upstream.out / "masks.safetensors").write_bytes(b"")
    result = invoke(model_run_id=upstream.run_id, **SMALL)
    assert result.exit_code == 1
    (error,) = error_lines(result.stderr)
    assert "'extract_masks' run" in error
    run = new_sample_run()
    assert run.info.status == "FAILED"
