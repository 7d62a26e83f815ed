"""finetune and pretrain as two processes (``torchrun --nproc_per_node 2``, gloo on the CPU).

One MLflow run per stage whatever the process count; every rank's RNG state in the logged
checkpoint; a rank that dies or fails ends the whole job (non-zero exit, the run not left RUNNING)
within a bounded time. Each test starts torchrun (``--standalone``: a free port, so two pytest
workers do not collide) and is a few tiny optimizer steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from test_finetune_stage import QUICK, chain, listed, store  # noqa: F401
from maskdm.tracking import STAGE_TAG

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
#: How long a failed job may take to end (imports and process-group teardown on a loaded 2-core machine).
END_WITHIN_S = 180


def env(tracking_uri: str) -> dict:
    # conftest set OMP_NUM_THREADS=1, which the children inherit; the project on the path for `-m entrypoints.cli`.
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def runs_of(stage: str) -> list:
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{STAGE_TAG}` = '{stage}'", output_format="list")


def new_run(stage: str, before: set[str]):
    """The one run of ``stage`` made since ``before`` (asserting there is exactly one)."""
    made = [r for r in runs_of(stage) if r.info.run_id not in before]
    assert len(made) == 1, [(r.info.run_id, r.info.status) for r in made]
    return made[0]


def assert_every_rank_state_in_checkpoints(run_id: str) -> None:
    for path in listed(run_id, "checkpoints"):
        files = set(listed(run_id, path))
        assert {f"{path}/random_states_0.pkl", f"{path}/random_states_1.pkl", f"{path}/ema.json"} <= files, files
    path = listed(run_id, "checkpoints")[-1]
    # Two ranks, two noise streams (seeded per process): the files are not one state twice.
    zero, one = (Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{path}/random_states_{r}.pkl")).read_bytes() for r in (0, 1))
    assert zero != one


def finetune_on_two_ranks(root: Path, uri: str, masks_run_id: str, num_iters: int):
    """Run finetune under torchrun (2 processes, a checkpoint every 2 steps); its one new run."""
    before = {r.info.run_id for r in runs_of("finetune")}
    done = subprocess.run(
        [*TORCHRUN, "-m", "entrypoints.cli", "finetune", "--masks_run_id", masks_run_id,
         "--num_iters", str(num_iters), "--save_model_steps", "2", *QUICK],
        cwd=root, env=env(uri), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return new_run("finetune", before)


def test_finetune_under_torchrun_is_one_run_with_every_rank_state(store, chain):
    root, uri = store
    _, masks_run, _ = chain
    run = finetune_on_two_ranks(root, uri, masks_run.info.run_id, num_iters=4)
    assert run.info.status == "FINISHED"
    assert run.data.tags["maskdm.num_processes"] == "2" and run.data.tags["maskdm.fast_path"] == "fp32"
    assert listed(run.info.run_id, "checkpoints") == ["checkpoints/checkpoint-2", "checkpoints/checkpoint-4"]
    assert_every_rank_state_in_checkpoints(run.info.run_id)
    assert "model" in {Path(p).name for p in listed(run.info.run_id)}


def test_pretrain_under_torchrun_is_one_run_with_every_rank_state(store):
    root, uri = store
    before = {r.info.run_id for r in runs_of("pretrain")}
    done = subprocess.run(
        [*TORCHRUN, "-m", "entrypoints.cli", "pretrain", "--num_iters", "2", "--save_model_steps", "2",
         "--train_batch_size", "4", "--mixed_precision", "no"],
        cwd=root, env=env(uri), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = new_run("pretrain", before)
    assert run.info.status == "FINISHED" and run.data.tags["maskdm.num_processes"] == "2"
    assert run.data.tags["maskdm.demo"] == "false"
    assert listed(run.info.run_id, "checkpoints") == ["checkpoints/checkpoint-2"]
    assert_every_rank_state_in_checkpoints(run.info.run_id)


def rank_process(launcher: subprocess.Popen, rank: int, timeout_s: float = 300) -> int:
    """The PID of the worker of ``rank`` under a torchrun launcher (from /proc: psutil is not a dependency)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        parents, environs = {}, {}
        for proc in Path("/proc").iterdir():
            try:
                stat = (proc / "stat").read_text()
                parents[int(proc.name)] = int(stat[stat.rfind(")") + 2:].split()[1])
                environs[int(proc.name)] = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
        descendants, frontier = set(), {launcher.pid}
        while frontier:
            frontier = {pid for pid, parent in parents.items() if parent in frontier} - descendants
            descendants |= frontier
        for pid in descendants:
            try:
                is_worker = b"entrypoints.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if is_worker and f"RANK={rank}".encode() in environs.get(pid, []):
                return pid
        assert launcher.poll() is None, "torchrun ended before its workers started"
        time.sleep(0.5)
    raise AssertionError(f"no rank {rank} worker within {timeout_s} s")


def wait_for_checkpoint(before: set[str], timeout_s: float = 300) -> str:
    """The new finetune run's ID once it has logged a complete checkpoint (both ranks are training)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in runs_of("finetune"):
            if run.info.run_id not in before and complete_checkpoint_logged(run.info.run_id):
                return run.info.run_id
        time.sleep(0.5)
    raise AssertionError("no complete checkpoint within the timeout")


def complete_checkpoint_logged(run_id: str) -> bool:
    return any(f"{p}/ema.json" in listed(run_id, p) for p in listed(run_id, "checkpoints"))


def test_a_killed_rank_ends_the_whole_job_and_its_run(store, chain):
    root, uri = store
    _, masks_run, _ = chain
    before = {r.info.run_id for r in runs_of("finetune")}
    launcher = subprocess.Popen(
        [*TORCHRUN, "-m", "entrypoints.cli", "finetune", "--masks_run_id", masks_run.info.run_id,
         "--num_iters", "100000", "--save_model_steps", "2", *QUICK],
        cwd=root, env=env(uri), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        run_id = wait_for_checkpoint(before)
        os.kill(rank_process(launcher, 1), signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = launcher.communicate(timeout=END_WITHIN_S)
        took = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode != 0, stderr[-2000:]
    assert took < END_WITHIN_S
    status = MlflowClient().get_run(run_id).info.status
    assert status in ("KILLED", "FAILED"), (status, stderr[-2000:])
    assert new_run("finetune", before).info.run_id == run_id


#: Runs the stage CLI under torchrun with a failure that only rank 1 meets (a dataset missing on
#: one machine, say): its data loading raises the stage's user error.
ONE_RANK_FAILS = '''
import os, sys
import entrypoints.finetune as finetune
from maskdm.errors import MaskDMError

if os.environ["RANK"] == "1":
    def stage_dataset(*args, **kwargs):
        raise MaskDMError("dataset 'shapes' cannot be read on this machine")
    finetune.stage_dataset = stage_dataset

from entrypoints.cli import cli
sys.exit(cli(sys.argv[1:]))
'''


def test_an_error_on_one_rank_is_its_one_line_and_ends_the_job(store, chain, tmp_path):
    root, uri = store
    _, masks_run, _ = chain
    script = tmp_path / "one_rank_fails.py"
    script.write_text(ONE_RANK_FAILS)
    before = {r.info.run_id for r in runs_of("finetune")}
    started = time.monotonic()
    done = subprocess.run(
        [*TORCHRUN, str(script), "finetune", "--masks_run_id", masks_run.info.run_id, "--num_iters", "4", *QUICK],
        cwd=root, env=env(uri), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode != 0
    assert time.monotonic() - started < 2 * END_WITHIN_S
    assert "maskdm: error: dataset 'shapes' cannot be read on this machine" in done.stderr.splitlines(), done.stderr[-3000:]
    run = new_run("finetune", before)
    assert run.info.status in ("KILLED", "FAILED"), (run.info.status, done.stderr[-3000:])


def test_a_latent_model_under_torchrun_encodes_its_training_latents_once(store, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from entrypoints.cli import cli
    from test_latent import tiny_latent_ddpm
    from maskdm.ddpm.models import save_ddpm

    root, uri = store
    # Local copies of the latents here, for this process and the ranks alike.
    monkeypatch.setenv("MASKDM_DATA_DIR", str(tmp_path / "data"))
    model_dir = save_ddpm(tiny_latent_ddpm(), tmp_path / "tiny_ldm")
    before_prunes = {r.info.run_id for r in runs_of("prune")}
    done = CliRunner().invoke(cli, ["prune", "--model", str(model_dir), "--dataset", "shapes", "--pruning_ratio", "0.5"])
    assert done.exit_code == 0, done.output
    prune_run = new_run("prune", before_prunes)
    before_masks = {r.info.run_id for r in runs_of("extract_masks")}
    done = CliRunner().invoke(cli, ["extract_masks", "--prune_run_id", prune_run.info.run_id])
    assert done.exit_code == 0, done.output
    masks_run = new_run("extract_masks", before_masks)

    # prune encoded the eval split; the training split has no cache yet, so the job must make one.
    caches_before = {r.info.run_id for r in runs_of("latent_cache")}
    run = finetune_on_two_ranks(root, uri, masks_run.info.run_id, num_iters=2)
    assert run.info.status == "FINISHED" and run.data.tags["maskdm.num_processes"] == "2"
    # One training-latent cache for the two ranks (the main process made it; the other found it).
    (made,) = [r for r in runs_of("latent_cache") if r.info.run_id not in caches_before]
    assert made.data.params["split"] == "train" and made.data.params["dataset"] == "shapes"
    assert run.data.tags["maskdm.latent_cache.train"] == made.info.run_id
    assert run.data.tags["maskdm.latent_cache.eval"] == prune_run.data.tags["maskdm.latent_cache.eval"]
    assert_every_rank_state_in_checkpoints(run.info.run_id)
