"""The whole chain at 64 pixels: every stage of a sweep on a tiny UNet at 64x64, through `maskdm main`.

The other end-to-end sweeps run at 16 pixels; nothing else would notice a stage that assumes the
demo's size (a hard-coded resolution, a grid, the shapes classifier's input, the reference
statistics' key).
"""

from __future__ import annotations

import os

import mlflow
import numpy as np
import pytest

from conftest import tiny_unet
from test_driver import (  # noqa: F401 - fixtures and helpers of the driver's tests
    E2E_TIMEOUT_S,
    _driver_run_id,
    _finish,
    _main_args,
    _results,
    _stage_runs,
    _start_driver,
    code,
)


@pytest.mark.e2e
@pytest.mark.skipif(not os.environ.get("MASKDM_SLOW_TESTS"), reason="18 stage runs at 64 pixels (minutes): set MASKDM_SLOW_TESTS=1")
@pytest.mark.timeout(E2E_TIMEOUT_S)
def test_every_stage_runs_at_64_pixels(code, tmp_path, monkeypatch):
    from maskdm.models import DDPM, default_scheduler, save_ddpm

    model_dir = save_ddpm(DDPM(tiny_unet(resolution=64), default_scheduler()), tmp_path / "tiny64")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    log_path = tmp_path / "driver.log"
    output = _finish(_start_driver(_main_args(model_dir, mask_training="both"), uri, tmp_path, log_path), log_path)
    driver_run = _driver_run_id(output)

    runs = {(r["stage"], r.get("step")): r["run_id"] for r in _stage_runs(driver_run)}
    stages = {stage for stage, _ in runs}
    assert {"prune", "extract_masks", "baseline_loss", "train_masks", "finetune", "sample", "fid"} <= stages
    # Every sample is 64x64, from the dense model to the finetuned ones.
    for (stage, step), run_id in runs.items():
        if stage != "sample":
            continue
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="samples.npz")
        with np.load(path, allow_pickle=False) as f:
            assert f["images"].shape[1:] == (64, 64, 3), step
    table = _results(driver_run)
    assert (table["pruning_ratio"] == 0.5).any()
    assert table.filter(like="fid_shapes").notna().any().any(), table.to_string()
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
