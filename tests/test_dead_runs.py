"""Runs end: a run left RUNNING by a killed process is marked KILLED (maskdm.liveness, maskdm reap, the driver).

The two process tests start a real stage (``maskdm pretrain`` with far more iterations than it
will run), wait until its run records its process and sends a heartbeat, and SIGKILL it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from maskdm import driver, liveness
from maskdm.tracking import STAGE_TAG

REPO = Path(__file__).resolve().parents[1]
#: Seconds the stage process may take to import and open its run on a loaded 2-core machine.
START_TIMEOUT_S = 240


def reap(*args: str) -> tuple[int, str, str]:
    """``maskdm reap`` in-process; (exit code, stdout, stderr)."""
    from entrypoints.cli import cli

    result = CliRunner().invoke(cli, ["reap", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def start_stage(tracking_uri: str, cwd: Path, run_id: str | None = None) -> subprocess.Popen:
    """A real ``maskdm pretrain`` that trains for far longer than the test waits (killed by the test)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MASKDM_HEARTBEAT_S": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    if run_id:
        env["MLFLOW_RUN_ID"] = run_id  # as `mlflow run` and the driver hand a stage its run
    cmd = [sys.executable, "-m", "entrypoints.cli", "pretrain", "--num_iters", "1000000", "--train_batch_size", "2",
           "--save_model_steps", "1000000"]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=open(cwd / "stage.log", "w"))


def wait_for_heartbeat(proc: subprocess.Popen, cwd: Path):
    """The run ``proc`` recorded itself on, once it has sent a heartbeat after its first one."""
    client = MlflowClient()
    deadline = time.monotonic() + START_TIMEOUT_S
    first = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the stage ended early: {(cwd / 'stage.log').read_text()[-3000:]}")
        runs = client.search_runs(["0"], f"tags.`{liveness.PID_TAG}` = '{proc.pid}'")
        if runs:
            beat = runs[0].data.tags[liveness.HEARTBEAT_TAG]
            first = first or beat
            if beat != first:
                return runs[0]
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"no run with a heartbeat from process {proc.pid}: {(cwd / 'stage.log').read_text()[-3000:]}")


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def dead_process_tags() -> dict[str, str]:
    """The process tags of a real process that has been SIGKILLed (and waited for)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        tags = liveness.process_tags(proc.pid)
    finally:
        sigkill(proc)
    return tags


# --------------------------------------------------------------------------------------------
# The verdicts (no store)


def test_judge_same_host_by_pid_start_time_and_boot():
    now = time.time()
    alive = liveness.process_tags()
    verdict = liveness.judge(alive, now - 10, now=now, stale_after=1)
    assert not verdict.dead and "is running" in verdict.reason  # a live process here wins over any timeout

    verdict = liveness.judge(dead_process_tags(), now - 10, now=now)
    assert verdict.dead and "no longer exists" in verdict.reason

    reused = {**alive, liveness.PID_START_TAG: str(int(alive[liveness.PID_START_TAG]) - 1)}
    verdict = liveness.judge(reused, now - 10, now=now)
    assert verdict.dead and "PID now belongs to a process started later" in verdict.reason

    if alive[liveness.BOOT_ID_TAG]:
        rebooted = {**alive, liveness.BOOT_ID_TAG: "another-boot"}
        verdict = liveness.judge(rebooted, now - 10, now=now)
        assert verdict.dead and "rebooted" in verdict.reason


def test_judge_other_hosts_only_by_an_explicit_stale_after():
    now = float(int(time.time()))
    elsewhere = {**liveness.process_tags(), liveness.HOST_TAG: "another-host", liveness.HEARTBEAT_TAG: str(int(now - 900))}
    quiet = liveness.judge(elsewhere, now - 3600, now=now)
    assert not quiet.dead and "another-host" in quiet.reason and "unless stale_after" in quiet.reason
    assert quiet.last_seen == pytest.approx(now - 900, abs=1)
    assert not liveness.judge(elsewhere, now - 3600, now=now, stale_after=1800).dead
    stale = liveness.judge(elsewhere, now - 3600, now=now, stale_after=600)
    assert stale.dead and "last seen alive 900 s ago" in stale.reason and "stale_after=600" in stale.reason

    # No recorded process (an older run): its start is its last sign of life.
    assert not liveness.judge({}, now - 3600, now=now).dead
    verdict = liveness.judge({}, now - 3600, now=now, stale_after=600)
    assert verdict.dead and "without a recorded process" in verdict.reason and "no heartbeat" in verdict.reason


# --------------------------------------------------------------------------------------------
# maskdm reap on a real stage process


def test_reap_leaves_a_live_stage_alone_and_marks_it_killed_once_sigkilled(tracking, tmp_path):
    client = MlflowClient()
    proc = start_stage(tracking, tmp_path)
    try:
        run = wait_for_heartbeat(proc, tmp_path)
        run_id = run.info.run_id
        assert run.data.tags[liveness.HOST_TAG] == liveness.host_name() and run.data.tags[STAGE_TAG] == "pretrain"

        code, out, err = reap("--stale_after", "0.001")  # a process seen alive here wins over any timeout
        assert code == 0, err
        assert f"{run_id} (pretrain" in out and "left RUNNING" in out and "is running" in out
        assert "1 RUNNING run(s) judged, 0 dead, 0 marked KILLED" in out
        assert client.get_run(run_id).info.status == "RUNNING"
    finally:
        sigkill(proc)
    assert client.get_run(run_id).info.status == "RUNNING"  # a SIGKILL leaves it as it was

    code, out, err = reap("--dry_run", "true")
    assert code == 0, err
    assert f"{run_id} (pretrain" in out and "would be KILLED" in out and "no longer exists" in out
    assert "dry run, nothing changed" in out
    assert client.get_run(run_id).info.status == "RUNNING"

    code, out, err = reap()
    assert code == 0, err
    assert f"{run_id} (pretrain" in out and ": KILLED:" in out and "1 marked KILLED" in out
    ended = client.get_run(run_id)
    assert ended.info.status == "KILLED"
    assert ended.data.tags[liveness.ENDED_BY_TAG].startswith("maskdm reap (run ")
    assert ended.data.tags[liveness.KILLED_REASON_TAG] == f"process {proc.pid} on {liveness.host_name()} no longer exists"
    # Its end is when it was last seen alive: its newest heartbeat, not the moment of the reap.
    assert ended.info.end_time == int(ended.data.tags[liveness.HEARTBEAT_TAG]) * 1000
    reaps = client.search_runs(["0"], f"tags.`{STAGE_TAG}` = 'reap'")
    assert len(reaps) == 3 and all(r.info.status == "FINISHED" for r in reaps)
    assert {r.data.metrics["runs_ended"] for r in reaps} == {0.0, 1.0}

    code, out, err = reap()
    assert code == 0, err
    assert run_id not in out and "0 RUNNING run(s) judged" in out


def test_reap_bad_input_is_one_line():
    code, _, err = reap("--stale_after", "-5")
    assert code == 1 and err.strip().splitlines() == [
        "maskdm: error: stale_after must be a number of seconds >= 0 (0: never), got -5"
    ]


# --------------------------------------------------------------------------------------------
# The driver's rerun


@pytest.fixture
def fake_project(tmp_path):
    """An MLproject whose ``pretrain`` entry point exits at once."""
    folder = tmp_path / "fake_project"
    folder.mkdir()
    (folder / "MLproject").write_text("name: fake\nentry_points:\n  pretrain:\n    parameters: {}\n    command: \"true\"\n")
    return folder


def test_driver_rerun_marks_the_killed_run_of_its_step_and_leaves_live_ones(tracking, tmp_path, fake_project):
    import mlflow

    client = MlflowClient()
    key = driver.cache_key("pretrain", {}, "v1")
    # As a driver makes a stage run: created with the key, then continued by the stage's process.
    killed = client.create_run("0", tags={driver.CACHE_KEY_TAG: key, STAGE_TAG: "pretrain", **liveness.process_tags()}).info.run_id
    proc = start_stage(tracking, tmp_path, run_id=killed)
    try:
        assert wait_for_heartbeat(proc, tmp_path).info.run_id == killed
    finally:
        sigkill(proc)
    # Another run of the step whose process (this one) is alive, and one from another host.
    live = client.create_run("0", tags={driver.CACHE_KEY_TAG: key, STAGE_TAG: "pretrain", **liveness.process_tags()}).info.run_id
    hour_ago = time.time() - 3600
    remote_tags = {**dead_process_tags(), liveness.HOST_TAG: "another-host", liveness.HEARTBEAT_TAG: str(int(hour_ago))}
    remote = client.create_run("0", start_time=int(hour_ago * 1000),
                               tags={driver.CACHE_KEY_TAG: key, STAGE_TAG: "pretrain", **remote_tags}).info.run_id
    other_key = client.create_run("0", tags={driver.CACHE_KEY_TAG: "other", **dead_process_tags()}).info.run_id

    with mlflow.start_run() as parent:
        outcome = driver.run_stage("pretrain", {}, experiment_id="0", parent_run_id=parent.info.run_id,
                                   project_dir=fake_project, code_version="v1")
    assert not outcome.reused and outcome.run_id not in (killed, live, remote)
    ended = client.get_run(killed)
    assert ended.info.status == "KILLED"
    assert ended.data.tags[liveness.ENDED_BY_TAG] == f"maskdm main (driver run {parent.info.run_id})"
    assert ended.data.tags[liveness.KILLED_REASON_TAG] == f"process {proc.pid} on {liveness.host_name()} no longer exists"
    assert client.get_run(live).info.status == "RUNNING"
    assert client.get_run(remote).info.status == "RUNNING"  # another host's run: only an explicit stale_after ends it
    assert client.get_run(other_key).info.status == "RUNNING"  # not a step this driver runs
    made = client.get_run(outcome.run_id)
    assert made.info.status == "FINISHED" and made.data.tags[liveness.PID_TAG] == str(os.getpid())

    code, out, err = reap("--run_id", remote, "--stale_after", "600")
    assert code == 0, err
    assert client.get_run(remote).info.status == "KILLED"
    assert "another-host" in client.get_run(remote).data.tags[liveness.KILLED_REASON_TAG]
    for run_id in (live, other_key):
        client.set_terminated(run_id, "FAILED")


# --------------------------------------------------------------------------------------------
# report leaves them out


def test_report_leaves_out_killed_and_running_runs(tracking):
    from mlflow.entities import Metric, Param

    from maskdm import report

    client = MlflowClient()
    lineage = {"model": "tiny", "dataset": "shapes", "pruner": "magnitude", "pattern": "unstructured"}
    clock = [1_700_000_000_000]

    def make(stage, status, upstream, params, metrics=None):
        clock[0] += 60_000
        tags = {STAGE_TAG: stage, **{f"maskdm.upstream.{s}": rid for s, rid in upstream.items()}}
        run_id = client.create_run("0", start_time=clock[0], tags=tags).info.run_id
        client.log_batch(run_id, metrics=[Metric(k, v, clock[0], 0) for k, v in (metrics or {}).items()],
                         params=[Param(k, str(v)) for k, v in params.items()])
        if status != "RUNNING":
            client.set_terminated(run_id, status, end_time=clock[0] + 1000)
        return run_id

    def scored(model_stage, model_run, params, fid, status="FINISHED"):
        up = {model_stage: model_run}
        sample = make("sample", status, up, {**params, "model_run_id": model_run, "ddim_steps": "10"}, {"images_per_s": 1.0})
        return make("fid", status, {**up, "sample": sample}, {**params, "sample_run_id": sample}, {"fid": fid})

    dense_params = {**lineage, "pruning_ratio": "0"}
    dense = make("prune", "FINISHED", {}, dense_params, {"sparsity": 0.0})
    finished_fid = scored("prune", dense, dense_params, 10.0)
    # Newer scores of the same model by runs that were killed or never ended: not results.
    killed_fid = scored("prune", dense, dense_params, 1.0, status="KILLED")
    running_fid = scored("prune", dense, dense_params, 2.0, status="RUNNING")
    # A whole ratio whose prune was killed (and one still running): no row.
    for status, ratio in (("KILLED", "0.5"), ("RUNNING", "0.7")):
        params = {**lineage, "pruning_ratio": ratio}
        pruned = make("prune", status, {}, params, {"sparsity": float(ratio)})
        scored("prune", pruned, params, 5.0)

    frame = report.runs_frame(["0"])
    records = report.run_records(frame)
    for run_id in (killed_fid, running_fid):
        assert run_id in set(frame["run_id"]) and run_id not in records
    table = report.build_table(frame)
    assert len(table) == 1 and float(table.iloc[0]["pruning_ratio"]) == 0.0  # no row for the killed or running prune
    cells = {str(v) for v in table.to_numpy().ravel()}
    assert finished_fid in cells and killed_fid not in cells and running_fid not in cells
    # Whatever the FID columns are called: the FINISHED run's 10, not the newer 1 or 2.
    fids = [c for c in table.columns if "fid" in c and not c.endswith(("_run_id", "_wall_s", "_se", "_n")) and not c.startswith("protocol")]
    assert fids and {float(v) for c in fids for v in table[c] if report._present(v)} == {10.0}
