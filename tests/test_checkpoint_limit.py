"""Bounded checkpoints in the artifact store: finetune keeps ``checkpoints_total_limit`` of them.

The store never holds more than the limit (2 by default), even while a new one uploads; a
deletion removes ``ema.json`` first, so whatever a kill leaves, resume takes the newest complete
checkpoint. Uses the same tiny chain as tests/test_finetune_stage.py (its fixtures).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import entrypoints.finetune as finetune_stage
from test_finetune_stage import QUICK, assert_zero_exactly_where_masked, chain, invoke, listed, metric_steps, model_of, newest_run, store  # noqa: F401
from maskdm.tracking import STAGE_TAG, StageRun
from maskdm.ddpm.training import CHECKPOINT_DONE


def complete_steps(run_id: str) -> list[int]:
    return [step for step, _, done in finetune_stage.logged_checkpoints(run_id) if done]


def local_artifacts(run_id: str) -> Path:
    uri = MlflowClient().get_run(run_id).info.artifact_uri
    return Path(uri.removeprefix("file://"))


@pytest.fixture(scope="module")
def limited_run(store, chain):
    """A finetune of 8 steps, a checkpoint every 2 (4 in all), limit 2; with the store's checkpoint
    count seen before and after each upload."""
    _, masks_run, _ = chain
    seen: list[int] = []
    original = finetune_stage.log_checkpoint

    def counting(run, path):
        seen.append(len(finetune_stage.logged_checkpoints(run.run_id)))
        original(run, path)
        seen.append(len(finetune_stage.logged_checkpoints(run.run_id)))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune_stage, "log_checkpoint", counting)
        done = invoke("finetune", "--masks_run_id", masks_run.info.run_id, "--num_iters", "8", "--save_model_steps", "2",
                      "--checkpoints_total_limit", "2", *QUICK)
    assert done.exit_code == 0, done.output
    return newest_run("finetune"), seen


def test_finetune_keeps_exactly_the_limit_of_complete_checkpoints(limited_run):
    run, seen = limited_run
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.data.params["checkpoints_total_limit"] == "2"
    # Four checkpoints were written (4 uploads), the store never held more than 2, even mid-upload.
    assert len(seen) == 8 and max(seen) == 2, seen
    assert listed(run_id, "checkpoints") == ["checkpoints/checkpoint-6", "checkpoints/checkpoint-8"]
    assert complete_steps(run_id) == [6, 8]
    # Deleted from the store's files, not just hidden: the local artifact folder holds only those two.
    on_disk = sorted(p.name for p in (local_artifacts(run_id) / "checkpoints").iterdir())
    assert on_disk == ["checkpoint-6", "checkpoint-8"]
    # The sample grids and metrics of the deleted checkpoints stay.
    assert listed(run_id, "samples") == [f"samples/step-{s}.png" for s in (2, 4, 6, 8)]
    assert {2, 4, 6, 8} <= set(metric_steps(run_id, "eval_loss"))


def fake_finetune_with(checkpoints: dict[str, Path], masks_run_id: str, drop: dict[str, set[str]]) -> str:
    """A finetune run (RUNNING, as a kill leaves it) whose ``checkpoints/<name>`` are copies of
    ``checkpoints[name]`` less the files in ``drop[name]``."""
    client = MlflowClient()
    run = client.create_run("0", tags={STAGE_TAG: "finetune"})
    client.log_param(run.info.run_id, "masks_run_id", masks_run_id)
    for name, source in checkpoints.items():
        for item in sorted(source.iterdir()):
            if item.name not in drop.get(name, set()):
                client.log_artifact(run.info.run_id, str(item), f"checkpoints/{name}")
    return run.info.run_id


def test_resume_takes_the_newest_complete_checkpoint_when_the_newest_is_partial_or_an_old_one_half_deleted(
    limited_run, chain, tmp_path
):
    run, _ = limited_run
    _, masks_run, masks = chain
    six = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoints/checkpoint-6", dst_path=str(tmp_path / "a")))
    eight = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoints/checkpoint-8", dst_path=str(tmp_path / "b")))
    # checkpoint-4: an old one whose deletion was cut off after ema.json (and the EMA weights) went;
    # checkpoint-8: the newest, its upload cut off before ema.json.
    killed = fake_finetune_with(
        {"checkpoint-4": six, "checkpoint-6": six, "checkpoint-8": eight}, masks_run.info.run_id,
        {"checkpoint-4": {CHECKPOINT_DONE, "ema.sparse.safetensors"}, "checkpoint-8": {CHECKPOINT_DONE, "optimizer.sparse.safetensors"}},
    )
    assert complete_steps(killed) == [6]
    found = finetune_stage.find_resume(killed, masks_run.info.run_id, tmp_path / "resume")
    assert found is not None and found.step == 6 and (found.checkpoint / CHECKPOINT_DONE).exists()

    # A resumed run continues from it: steps after 6 only, its own checkpoints 8 and 10.
    done = invoke("finetune", "--masks_run_id", masks_run.info.run_id, "--num_iters", "10", "--save_model_steps", "2",
                  "--resume_run_id", killed, *QUICK)
    assert done.exit_code == 0, done.output
    resumed = newest_run("finetune")
    assert resumed.data.tags["maskdm.resumed_from"] == f"{killed}:6"
    assert metric_steps(resumed.info.run_id, "loss") == [10]
    assert complete_steps(resumed.info.run_id) == [8, 10]
    assert_zero_exactly_where_masked(model_of(resumed.info.run_id), masks)


class Killed(Exception):
    """Stands in for a SIGKILL between two artifact deletions."""


class KilledAfter:
    """A StageRun stand-in whose artifact deletions stop (as if killed) after ``allowed`` of them."""

    def __init__(self, run_id: str, allowed: int):
        self.run_id, self.allowed, self.deleted = run_id, allowed, []

    def delete_artifacts(self, path: str) -> None:
        if len(self.deleted) == self.allowed:
            raise Killed
        StageRun.delete_artifacts(self, path)
        self.deleted.append(path)

    @property
    def run(self):  # what StageRun.delete_artifacts reads the artifact URI from
        return MlflowClient().get_run(self.run_id)


@pytest.mark.parametrize("allowed", [0, 1, 2, 3, 4])
def test_a_kill_at_any_point_of_the_deletions_leaves_the_newest_complete_checkpoint_to_resume(limited_run, chain, tmp_path, allowed):
    run, _ = limited_run
    _, masks_run, _ = chain
    six = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoints/checkpoint-6", dst_path=str(tmp_path / "a")))
    small = tmp_path / "small"  # the JSON and one weights file are enough to tell complete from not
    small.mkdir()
    for name in (CHECKPOINT_DONE, "ema.sparse.safetensors"):
        shutil.copy(six / name, small / name)
    run_id = fake_finetune_with({"checkpoint-2": small, "checkpoint-4": small, "checkpoint-6": six}, masks_run.info.run_id, {})
    stand_in = KilledAfter(run_id, allowed)
    try:
        finetune_stage.drop_logged_checkpoints(stand_in, keep=1)
        finished = True
    except Killed:
        finished = False
    # ema.json of each old checkpoint is the first thing deleted: 2/ema.json, 2/, 4/ema.json, 4/.
    assert stand_in.deleted == ["checkpoints/checkpoint-2/ema.json", "checkpoints/checkpoint-2",
                                "checkpoints/checkpoint-4/ema.json", "checkpoints/checkpoint-4"][:allowed]
    assert finished == (allowed >= 4)
    # A checkpoint is complete until its ema.json goes (deletion 1 for checkpoint-2, 3 for checkpoint-4).
    expected = [step for step, gone_at in ((2, 1), (4, 3)) if allowed < gone_at] + [6]
    assert complete_steps(run_id) == expected
    assert finetune_stage.find_resume(run_id, masks_run.info.run_id, tmp_path / "resume").step == 6


def test_checkpoints_total_limit_below_one_is_a_user_error(chain):
    _, masks_run, _ = chain
    done = invoke("finetune", "--masks_run_id", masks_run.info.run_id, "--checkpoints_total_limit", "0", *QUICK)
    assert done.exit_code == 1 and "maskdm: error: checkpoints_total_limit must be at least 1, got 0" in done.stderr
    assert newest_run("finetune").info.status == "FAILED"


def test_pretrain_keeps_its_limit_of_checkpoints_with_ema_json_last(tmp_path, monkeypatch):
    """pretrain: 5 checkpoints written, at most ``checkpoints_total_limit`` (2) in the store at any
    time, and each uploaded with ``ema.json`` last."""
    from click.testing import CliRunner

    from conftest import tracking_store
    from entrypoints.cli import cli

    uploads: list[str] = []
    seen: list[int] = []
    original = StageRun.log_artifact_now

    def recording(self, local_path, artifact_path=None):
        if str(artifact_path or "").startswith("checkpoints/"):
            seen.append(len(finetune_stage.logged_checkpoints(self.run_id)))
            uploads.append(f"{artifact_path}/{Path(local_path).name}")
        original(self, local_path, artifact_path)

    with tracking_store(tmp_path):
        monkeypatch.setattr(StageRun, "log_artifact_now", recording)
        done = CliRunner().invoke(cli, ["pretrain", "--num_iters", "5", "--save_model_steps", "1", "--train_batch_size", "4",
                                        "--checkpoints_total_limit", "2", "--lr_warmup_steps", "0"])
        assert done.exit_code == 0, done.output
        run_id = MlflowClient().search_runs(["0"], f"tags.`{STAGE_TAG}` = 'pretrain'")[0].info.run_id
        assert complete_steps(run_id) == [4, 5]
        assert len(finetune_stage.logged_checkpoints(run_id)) == 2
    assert max(seen) <= 2, seen
    # Per checkpoint, ema.json is the last file uploaded.
    for step in range(1, 6):
        mine = [u for u in uploads if u.startswith(f"checkpoints/checkpoint-{step}/")]
        assert mine and mine[-1].endswith(f"/{CHECKPOINT_DONE}") and len(mine) > 1, mine
