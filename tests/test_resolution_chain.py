"""The whole chain at 64 pixels: every stage on a tiny UNet at 64x64.

The other end-to-end runs are at 16 pixels; nothing else would notice a stage that assumes the
demo's size (a hard-coded resolution, a grid, the shapes classifier's input, the reference
statistics' key). The default test runs each stage once through MLflow Projects
(`mlflow.projects.run`, conftest.projects_run) on a 64-pixel image folder; the opt-in one runs a whole `maskdm main` sweep (18 stage runs, fid_shapes).
"""

from __future__ import annotations

import os

import mlflow
import numpy as np
import pytest

from conftest import run_whole_chain, shapes_image_folder, tiny_unet, tracking_store
from inception_fixture import _planted_torch_home  # noqa: F401
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
@pytest.mark.timeout(900)
def test_every_stage_through_mlflow_projects_at_64_pixels(tmp_path, _planted_torch_home, monkeypatch, warm_stages):
    from mlflow.tracking import MlflowClient

    from maskdm.ddpm.models import DDPM, default_scheduler, load_ddpm, save_ddpm

    model_dir = save_ddpm(DDPM(tiny_unet(resolution=64), default_scheduler()), tmp_path / "tiny64")
    dataset = shapes_image_folder(tmp_path / "shapes64", 48, 64)
    monkeypatch.setenv("TORCH_HOME", str(_planted_torch_home))
    with tracking_store(tmp_path) as uri:
        ids = run_whole_chain(model_dir, dataset, uri)
        client = MlflowClient(uri)
        for stage in ("prune", "train_masks", "finetune"):
            folder = mlflow.artifacts.download_artifacts(run_id=ids[stage], artifact_path="model", dst_path=str(tmp_path / stage))
            assert load_ddpm(folder).resolution == 64, stage
        path = mlflow.artifacts.download_artifacts(run_id=ids["sample"], artifact_path="samples.npz", dst_path=str(tmp_path / "s"))
        with np.load(path, allow_pickle=False) as f:
            assert f["images"].shape == (8, 64, 64, 3)
        fid_run = client.get_run(ids["fid"])
        assert fid_run.data.tags["maskdm.fid_protocol.resolution"] == "64"
        assert np.isfinite(fid_run.data.metrics["fid_inception_64"])
        reference = client.get_run(fid_run.data.tags["maskdm.fid_reference_run"])
        assert reference.data.params["resolution"] == "64" and reference.data.metrics["num_images"] == 48


@pytest.mark.e2e
@pytest.mark.skipif(not os.environ.get("MASKDM_SLOW_TESTS"), reason="18 stage runs at 64 pixels (minutes): set MASKDM_SLOW_TESTS=1")
@pytest.mark.timeout(E2E_TIMEOUT_S)
def test_every_stage_runs_at_64_pixels(code, tmp_path, monkeypatch):
    from maskdm.ddpm.models import DDPM, default_scheduler, save_ddpm

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
