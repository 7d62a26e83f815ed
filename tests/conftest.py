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
    from maskdm.models import DDPM, default_scheduler

    return DDPM(tiny_unet(), default_scheduler())


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_ddpm):
    """A diffusers pipeline folder holding a tiny random DDPM."""
    from maskdm.models import save_ddpm

    return save_ddpm(tiny_ddpm, tmp_path / "tiny_model")


REPO = Path(__file__).resolve().parents[1]


def mlflow_run(entry_point: str, tracking_uri: str, cwd, **params) -> subprocess.CompletedProcess:
    """``mlflow run . -e <entry_point> --env-manager local -P k=v ...`` as a user types it."""
    cmd = ["mlflow", "run", str(REPO), "-e", entry_point, "--env-manager", "local"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@contextmanager
def tracking_store(folder):
    """A SQLite tracking store (and artifact root) in ``folder``, for in-process and child runs.

    Module-scoped fixtures share one (creating a store costs seconds); each yields its URI.
    """
    import mlflow
    from mlflow.tracking import fluent

    uri = f"sqlite:///{folder / 'mlflow.db'}"
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
