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

import psutil
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from maskdm import driver, liveness
from maskdm.errors import MaskDMError
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

    reused = {**alive, liveness.PID_CREATED_TAG: f"{float(alive[liveness.PID_CREATED_TAG]) - 100:.2f}"}
    verdict = liveness.judge(reused, now - 10, now=now)
    assert verdict.dead and "PID now belongs to a process started later" in verdict.reason

    # Another boot of this machine, last seen before this boot began: it rebooted since.
    booted = psutil.boot_time()
    rebooted = {**alive, liveness.BOOT_ID_TAG: "another-boot", liveness.HEARTBEAT_TAG: str(int(booted - 60))}
    verdict = liveness.judge(rebooted, booted - 120, now=now)
    assert verdict.dead and "rebooted" in verdict.reason
    # Another boot id but seen alive after this boot began: a machine with a copy of this machine id.
    clone = {**dead_process_tags(), liveness.BOOT_ID_TAG: "another-boot"}
    verdict = liveness.judge(clone, now - 10, now=now)
    assert not verdict.dead and "this machine id but boot another-boot" in verdict.reason


def test_judge_by_the_boot_id_where_a_machine_id_is_missing(monkeypatch):
    now = time.time()
    dead = dead_process_tags()
    if dead[liveness.BOOT_ID_TAG].startswith("boot-"):
        pytest.skip("no Linux boot id here")
    # A container without /etc/machine-id: the kernel's boot id (a random UUID per boot) and the
    # PID namespace still say that the PID is counted here.
    monkeypatch.setattr(liveness, "machine_id", lambda: "")
    no_id = {**dead, liveness.MACHINE_ID_TAG: ""}
    assert liveness.judge(no_id, now - 10, now=now).dead
    assert not liveness.judge({**no_id, liveness.BOOT_ID_TAG: "another-boot"}, now - 10, now=now).dead


def test_judge_never_ends_a_process_it_cannot_see(monkeypatch):
    now = time.time()
    dead = dead_process_tags()
    assert liveness.judge(dead, now - 10, now=now).dead
    # The same dead PID recorded by a machine with the same host name but another machine id,
    # in another PID namespace (a container sharing the host's network), or (an older run) by
    # host name only: this machine cannot see that process.
    for tags, words in (
        ({**dead, liveness.MACHINE_ID_TAG: "another-machine"}, "on another machine"),
        ({**dead, liveness.PID_NS_TAG: "4026599999"}, "in another PID namespace"),
        ({k: v for k, v in dead.items() if k not in (liveness.MACHINE_ID_TAG, liveness.PID_NS_TAG)}, "by host name only"),
    ):
        assert tags[liveness.HOST_TAG] == liveness.host_name()
        verdict = liveness.judge(tags, now - 10, now=now)
        assert not verdict.dead and words in verdict.reason, verdict.reason
        stale = {**tags, liveness.HEARTBEAT_TAG: str(int(now - 3600))}
        assert liveness.judge(stale, now - 3600, now=now, stale_after=600).dead  # only its heartbeat can tell
    # A process that exists but cannot be looked at (hidepid, access denied): unknown, even when stale.
    monkeypatch.setattr(liveness, "process_state", lambda pid: liveness.ProcessState(True, hidden=True))
    verdict = liveness.judge({**dead, liveness.HEARTBEAT_TAG: str(int(now - 3600))}, now - 3600, now=now, stale_after=1)
    assert not verdict.dead and verdict.unknown and "unknown" in verdict.reason


def test_process_state_tells_a_hidden_process_from_a_gone_one(monkeypatch):
    import psutil as ps

    pid = os.getppid()
    # What psutil raises for a PID that /proc (mounted with hidepid) does not list: the kernel still knows it.
    def hidden(pid):
        raise ps.NoSuchProcess(pid)

    monkeypatch.setattr(ps, "Process", hidden)
    assert liveness.process_state(pid) == liveness.ProcessState(True, hidden=True)
    monkeypatch.setattr(ps, "pid_exists", lambda pid: False)
    assert liveness.process_state(pid) == liveness.ProcessState(False)


def test_judge_other_hosts_only_by_an_explicit_stale_after():
    now = float(int(time.time()))
    elsewhere = {**liveness.process_tags(), liveness.HOST_TAG: "another-host", liveness.MACHINE_ID_TAG: "another-machine",
                 liveness.HEARTBEAT_TAG: str(int(now - 900))}
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


def test_reap_leaves_a_run_of_another_machine_with_the_same_host_name(tracking):
    client = MlflowClient()
    dead = dead_process_tags()  # this host name, a PID that no longer exists here
    twin = client.create_run("0", tags={STAGE_TAG: "pretrain", **dead, liveness.MACHINE_ID_TAG: "another-machine",
                                        liveness.BOOT_ID_TAG: "its-own-boot"}).info.run_id
    here = client.create_run("0", tags={STAGE_TAG: "pretrain", **dead}).info.run_id
    code, out, err = reap()
    assert code == 0, err
    assert client.get_run(twin).info.status == "RUNNING" and "on another machine" in out
    assert client.get_run(here).info.status == "KILLED"  # the same tags on this machine: dead
    client.set_terminated(twin, "FAILED")


def test_reap_touches_only_maskdm_runs_unless_asked(tracking):
    client = MlflowClient()
    hour_ago = time.time() - 3600
    foreign = client.create_run("0", start_time=int(hour_ago * 1000), tags={"team.job": "etl"}).info.run_id
    ours = client.create_run("0", start_time=int(hour_ago * 1000), tags={STAGE_TAG: "fid"}).info.run_id

    code, out, err = reap("--stale_after", "60", "--dry_run", "true")
    assert code == 0, err
    assert f"{ours} (fid" in out and "would be KILLED" in out and foreign not in out
    assert "1 RUNNING run(s) judged, 1 dead" in out

    code, out, err = reap("--run_id", foreign, "--stale_after", "60")
    assert code == 0, err
    assert "has no MaskDM tags: left alone" in out and client.get_run(foreign).info.status == "RUNNING"

    code, out, err = reap("--stale_after", "60")
    assert code == 0, err
    assert client.get_run(foreign).info.status == "RUNNING"
    assert client.get_run(ours).info.status == "KILLED"

    code, out, err = reap("--stale_after", "60", "--all_runs", "true")
    assert code == 0, err
    assert f"{foreign} (non-MaskDM" in out and client.get_run(foreign).info.status == "KILLED"


def test_a_single_process_stage_sent_sigterm_ends_killed(tracking, tmp_path):
    client = MlflowClient()
    proc = start_stage(tracking, tmp_path)
    try:
        run_id = wait_for_heartbeat(proc, tmp_path).info.run_id
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            sigkill(proc)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert client.list_artifacts(run_id, "model") == []  # a killed run logs none of its outputs


def test_side_runs_record_their_process(tracking, tmp_path):
    from maskdm.tracking import log_side_run

    (tmp_path / "stats.txt").write_text("1\n")
    run_id = log_side_run("fid_reference", {"maskdm.reference_key": "k"}, {"n": 1}, {}, [tmp_path / "stats.txt"])
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[liveness.PID_TAG] == str(os.getpid())
    assert run.data.tags[liveness.MACHINE_ID_TAG] == liveness.machine_id() and liveness.HEARTBEAT_TAG in run.data.tags


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
    remote_tags = {**dead_process_tags(), liveness.HOST_TAG: "another-host", liveness.MACHINE_ID_TAG: "another-machine",
                   liveness.HEARTBEAT_TAG: str(int(hour_ago))}
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


def test_a_rerun_of_the_driver_ends_its_killed_predecessor(tracking, monkeypatch):
    from entrypoints.cli import cli

    client = MlflowClient()

    def stop(*args, **kwargs):  # the sweep itself is not what this test is about
        raise MaskDMError("stopped before any stage")

    monkeypatch.setattr(driver, "run_plan", stop)
    args = ["main", "--ratios", "0.5", "--mask_training", "false"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "stopped before any stage" in result.stderr
    first = client.search_runs(["0"], f"tags.`{STAGE_TAG}` = 'main'")[0]
    key = first.data.tags[driver.DRIVER_KEY_TAG]
    # A driver of the same sweep killed by SIGKILL: its run RUNNING, its process gone.
    killed = client.create_run("0", tags={STAGE_TAG: "main", driver.DRIVER_KEY_TAG: key, **dead_process_tags()}).info.run_id
    # One of another sweep, its process as dead: not this rerun's to end.
    other = client.create_run("0", tags={STAGE_TAG: "main", driver.DRIVER_KEY_TAG: "other", **dead_process_tags()}).info.run_id

    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    rerun = client.search_runs(["0"], f"tags.`{STAGE_TAG}` = 'main'", order_by=["attributes.start_time DESC"])[0]
    ended = client.get_run(killed)
    assert ended.info.status == "KILLED"
    assert ended.data.tags[liveness.ENDED_BY_TAG] == f"maskdm main (driver run {rerun.info.run_id})"
    assert client.get_run(other).info.status == "RUNNING"
    client.set_terminated(other, "FAILED")


# --------------------------------------------------------------------------------------------
# The plan is checked before any run


def test_the_demo_plan_on_64_images_fails_before_any_run(tracking, tmp_path, monkeypatch):
    from PIL import Image

    from entrypoints.cli import cli

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(64):
        Image.new("RGB", (8, 8), (i * 4, 0, 0)).save(folder / f"{i:02d}.png")
    started = []
    monkeypatch.setattr(driver, "run_plan", lambda *a, **k: started.append(a) or {})

    result = CliRunner().invoke(cli, ["main", "--dataset", f"imagefolder:{folder}"])
    assert result.exit_code == 1 and not started
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskdm: error: plan: train_masks.heldout_size=256"), result.stderr
    assert "0 of the dataset's 64 images" in lines[0]
    assert MlflowClient().search_runs(["0"]) == []  # not even the driver's own run

    # The same folder with the held-out scoring off and a smaller baseline subset: the plan passes.
    sets = ["--set", "train_masks.heldout_size=0", "--set", "baseline_loss.dataset_size=32"]
    result = CliRunner().invoke(cli, ["main", "--dataset", f"imagefolder:{folder}", "--dry_run", "true", *sets])
    assert result.exit_code == 0, result.stderr
    # A parameter of the wrong type anywhere in the plan: one line, before any run.
    result = CliRunner().invoke(cli, ["main", "--set", "sample.ddim_steps=ten", "--dry_run", "true"])
    assert result.exit_code == 1 and "sample.ddim_steps=ten" in result.stderr
    # The demo model's resolution against its arch, and DDIM steps against its 1,000 timesteps.
    result = CliRunner().invoke(cli, ["main", "--set", "pretrain.resolution=17", "--dry_run", "true"])
    assert result.exit_code == 1 and "plan: pretrain.resolution=17" in result.stderr, result.stderr
    result = CliRunner().invoke(cli, ["main", "--set", "sample.ddim_steps=1001", "--dry_run", "true"])
    assert result.exit_code == 1 and "more than the model's 1000 training timesteps" in result.stderr
