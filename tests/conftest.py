"""Shared test fixtures: tiny models saved with save_pretrained, an isolated tracking store."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

# Two cores on CI, two pytest workers: one thread per process, children (`mlflow run`) included.
# Oversubscribed OpenMP threads on a busy 2-core machine run 10-100x slower, not 2x.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def tiny_unet(resolution: int = 16, channels: int = 3):
    """A UNet2DModel of a few thousand parameters with the block types of the real ones."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=None,
    )


@pytest.fixture
def tiny_ddpm():
    from maskdm.ddpm.models import DDPM, default_scheduler

    return DDPM(tiny_unet(), default_scheduler())


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_ddpm):
    """A diffusers pipeline folder holding a tiny random DDPM."""
    from maskdm.ddpm.models import save_ddpm

    return save_ddpm(tiny_ddpm, tmp_path / "tiny_model")


REPO = Path(__file__).resolve().parents[1]


def mlflow_run(entry_point: str, tracking_uri: str, cwd, **params) -> subprocess.CompletedProcess:
    """``mlflow run . -e <entry_point> --env-manager local -P k=v ...`` as a user types it."""
    cmd = ["mlflow", "run", str(REPO), "-e", entry_point, "--env-manager", "local"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def shapes_image_folder(folder: Path, count: int, resolution: int) -> str:
    """``count`` embedded shapes at ``resolution`` as PNGs in ``folder``/all; returns the dataset name."""
    from PIL import Image

    from maskdm.ddpm.data import render_shapes

    (folder / "all").mkdir(parents=True)
    for i, image in enumerate(render_shapes(count, seed=5, resolution=resolution)[0]):
        Image.fromarray(image).save(folder / "all" / f"{i:03d}.png")
    return f"imagefolder:{folder}"


def projects_run(entry_point: str, **params) -> str:
    """This project's entry point run by ``mlflow.projects.run(env_manager="local", synchronous=True)``
    in this process, against the tracking URI set here: MLflow Projects as ``mlflow run`` runs it
    (the MLproject's parameter checks, the entry point's command, the run ended FINISHED or FAILED
    by MLflow) without a second Python importing MLflow's CLI (about 2.8 s of CPU each). For chains
    of stages; each entry point's typed ``mlflow run`` has a test of its own (:func:`mlflow_run`).
    Returns the run ID; a stage that fails raises MLflow's ExecutionException (its error is in the
    test's captured stderr)."""
    import mlflow

    return mlflow.projects.run(uri=str(REPO), entry_point=entry_point, parameters=params, env_manager="local",
                               synchronous=True).run_id


def run_whole_chain(model, dataset: str, tracking_uri: str) -> dict[str, str]:
    """prune -> extract_masks -> baseline_loss -> train_masks -> finetune -> sample -> fid through
    MLflow Projects (:func:`projects_run`) with tiny settings (fid: Inception at dims 64, so
    TORCH_HOME must hold planted weights); stage -> run ID, each checked FINISHED and of its stage."""
    import mlflow
    from mlflow.tracking import MlflowClient

    assert mlflow.get_tracking_uri() == tracking_uri  # the store the stages and these checks use
    steps = [
        ("prune", lambda ids: {"model": model, "dataset": dataset, "pruning_ratio": "0.5", "preview_images": "4"}),
        ("extract_masks", lambda ids: {"prune_run_id": ids["prune"]}),
        ("baseline_loss", lambda ids: {"masks_run_id": ids["extract_masks"], "dataset_size": "32", "batch_size": "8"}),
        ("train_masks", lambda ids: {"baseline_run_id": ids["baseline_loss"], "max_step": "4", "accumulation": "2",
                                     "heldout_size": "8", "eval_every": "2"}),
        ("finetune", lambda ids: {"masks_run_id": ids["train_masks"], "num_iters": "4", "train_batch_size": "8", "save_model_steps": "4",
                                  "preview_images": "4"}),
        ("sample", lambda ids: {"model_run_id": ids["finetune"], "total_samples": "8", "batch_size": "4", "ddim_steps": "2"}),
        ("fid", lambda ids: {"sample_run_id": ids["sample"], "features": "inception", "dims": "64"}),
    ]
    client = MlflowClient(tracking_uri)
    ids: dict[str, str] = {}
    for stage, params in steps:
        run = client.get_run(projects_run(stage, **params(ids)))
        assert run.info.status == "FINISHED" and run.data.tags["maskdm.stage"] == stage, stage
        ids[stage] = run.info.run_id
    return ids


@pytest.fixture
def warm_stages(monkeypatch):
    """For a test that runs a chain of stages through MLflow Projects: its stage commands fork from a
    warm server, as a driver's stages do (maskdm.warm_start), instead of importing torch, diffusers
    and MLflow again each (about 7 s a stage). Started in the test's environment as it is when the
    fixture runs; a test's later changes may only be those a stage may have (TORCH_HOME, the
    tracking URI, ...). Fails the test if the server refused a command (so it ran cold).
    ``MASKDM_WARM_START=0`` runs them cold. test_warm_start.py compares a stage's run warm and cold."""
    from maskdm.driver.launch import start_warm_server
    from maskdm.driver.plan import STAGES

    # pytest sets PYTEST_CURRENT_TEST per test phase; nothing reads it at import.
    warm = start_warm_server(STAGES, per_stage_env=("PYTEST_CURRENT_TEST",))
    if warm is None:
        yield None
        return
    try:
        for key, value in warm.environ().items():
            monkeypatch.setenv(key, value)
        yield warm
    finally:
        warm.close()
    assert not warm.refusals, f"stage commands the warm server refused (they ran cold): {warm.refusals}"


#: An empty SQLite store as MLflow makes it (its schema migrated), made once per test process.
_EMPTY_STORE: list[Path] = []


def empty_store_copy(folder: Path) -> str:
    """``sqlite:///<folder>/mlflow.db``: a copy of an empty store, as MLflow would make it there
    from ``folder`` (its Default experiment's artifacts under ``folder/mlruns``), unless one is there.

    MLflow makes a new store by running its schema migrations, 1 to 2 s each time on this machine;
    the tests make many stores, so they copy one made once per process.
    """
    import contextlib
    import shutil
    import sqlite3
    import tempfile

    from mlflow.tracking import MlflowClient

    db = Path(folder) / "mlflow.db"
    if not db.exists():
        if not _EMPTY_STORE:
            made = Path(tempfile.mkdtemp(prefix="maskdm-empty-store-")) / "mlflow.db"
            MlflowClient(f"sqlite:///{made}").search_experiments()
            _EMPTY_STORE.append(made)
        shutil.copyfile(_EMPTY_STORE[0], db)
        with contextlib.closing(sqlite3.connect(db)) as connection:
            connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                               (str(Path(folder).resolve() / "mlruns" / "0"),))
            connection.commit()
    return f"sqlite:///{db}"


@contextmanager
def tracking_store(folder):
    """A SQLite tracking store (and artifact root) in ``folder``, for in-process and child runs.

    Module-scoped fixtures share one (creating a store costs seconds); each yields its URI.
    """
    import mlflow
    from mlflow.tracking import fluent

    uri = empty_store_copy(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(folder)
        mlflow.set_tracking_uri(uri)
        # mlflow.set_experiment in one test would otherwise pick the experiment of every later
        # in-process run of the same pytest worker (MLflow keeps it in a module global).
        fluent._active_experiment_id = None
        try:
            yield uri
        finally:
            fluent._active_experiment_id = None
            mlflow.set_tracking_uri(None)


@pytest.fixture
def tracking(tmp_path):
    """A fresh tracking store in tmp_path."""
    with tracking_store(tmp_path) as uri:
        yield uri
