"""Warm stage processes (maskdm.warm_start): a command handed to the server runs in a forked
process exactly as it would in a fresh one (its argv, directory, environment, streams, threads,
exit status), signals pass both ways, and a kill on either side ends the other as it would have.

The command here is tests/warm_helper.py, which hands itself over as ``maskdm <stage>`` does; the
stages themselves run warm in every driver test, and a stage's run warm and cold is compared in
test_driver.py.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from maskdm.warm_start import protocol
from maskdm.warm_start.handle import WarmServer

pytestmark = pytest.mark.skipif(not protocol.supported(), reason="warm starts need Linux")

TESTS = Path(__file__).resolve().parent
HELPER = TESTS / "warm_helper.py"


@pytest.fixture(scope="module")
def server():
    """One server for the module, importing the helper (and torch, for the thread count)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent)]))
        patch.delenv(protocol.WARM_START_ENV, raising=False)
        warm = WarmServer.launch(["torch", "warm_helper"], "warm_helper:main", per_stage_env=("PYTEST_CURRENT_TEST",))
        assert warm is not None
        env = warm.environ()
        assert env, "the server did not become ready"
        yield warm, {**os.environ, **env}
    warm.close()


def command(env, *args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HELPER), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def echo(env, cwd) -> tuple[dict, str]:
    proc = command(env, "echo", "x y", cwd=cwd)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out), err


def test_a_command_runs_in_a_forked_process_as_it_would_in_a_fresh_one(server, tmp_path):
    warm, env = server
    env = {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["MLFLOW_RUN_ID"] = "r1"
    seen, err = echo(env, tmp_path)
    assert seen["ppid"] == warm.pid  # forked by the server, not run by the command itself
    assert seen["argv"][1:] == ["echo", "x y"] and seen["cwd"] == str(tmp_path)
    assert seen["env"]["MLFLOW_RUN_ID"] == "r1" and protocol.SOCKET_ENV not in seen["env"]
    assert seen["path0"] == str(TESTS)  # the command's own first module path (its script's folder)
    assert seen["comm"] == "echo"  # named after what it runs, for ps and top
    assert err.strip() == "to stderr"  # its streams are the command's
    assert seen["gc"] is True  # the server runs without the cyclic collector; the stage has it back
    # Threads follow the command's environment, where a fresh process's torch would read them: a
    # count other than the server's own default.
    env["OMP_NUM_THREADS"] = str(seen["threads"] + 1)
    assert echo(env, tmp_path)[0]["threads"] == seen["threads"] + 1


def test_exit_codes_and_errors_come_back(server, tmp_path):
    _, env = server
    proc = command(env, "exit", "3", cwd=tmp_path)
    proc.communicate(timeout=60)
    assert proc.returncode == 3
    proc = command(env, "raise", cwd=tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "RuntimeError: a bug" in err


def test_a_stage_ends_as_a_fresh_process_ends(server, tmp_path):
    """Its thread pool's idle workers stopped and its atexit handlers run (as Python's own exit does),
    then its exit code, without a teardown of every module the server imported."""
    _, env = server
    proc = command(env, "pool", "4", cwd=tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, err
    assert out.splitlines() == ["pool ran", "atexit ran"]


def test_an_environment_the_server_was_not_started_with_is_refused_and_runs_fresh(server, tmp_path):
    """A variable an import may have read at the server's start: the command runs the stage itself,
    its output that of a cold start, and the driver hears why."""
    warm, env = server
    seen, err = echo({**env, "SOME_SETTING": "1", "MLFLOW_RUN_ID": "r2"}, tmp_path)
    assert seen["ppid"] == os.getpid()  # the command ran it itself
    assert err.strip() == "to stderr"
    deadline = time.monotonic() + 10
    while not warm.refusals and time.monotonic() < deadline:
        time.sleep(0.05)
    assert warm.refusals[-1] == {"refused": "its environment differs in SOME_SETTING", "command": "echo", "run_id": "r2"}
    # What is read only when used may differ: the stage runs warm.
    assert echo({**env, "TORCH_HOME": str(tmp_path)}, tmp_path)[0]["ppid"] == warm.pid, warm.refusals


def _wait_sleeping(proc) -> int:
    line = proc.stdout.readline()
    assert line.startswith("sleeping"), line + proc.stderr.read()
    return int(line.split()[1])


def test_sigterm_to_the_command_reaches_the_stage(server, tmp_path):
    _, env = server
    marker = tmp_path / "stopped"
    proc = command(env, "sleep", str(marker), cwd=tmp_path)
    _wait_sleeping(proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert marker.read_text() == "SIGTERM" and proc.returncode == 5


def test_a_killed_command_takes_its_stage_with_it(server, tmp_path):
    _, env = server
    marker = tmp_path / "stopped"
    proc = command(env, "sleep", str(marker), cwd=tmp_path)
    stage = psutil.Process(_wait_sleeping(proc))
    proc.kill()
    proc.communicate(timeout=60)
    stage.wait(timeout=30)  # SIGKILLed by the server, as the process it stood for would have been
    assert not marker.exists()


def test_a_killed_stage_ends_its_command_with_the_same_signal(server, tmp_path):
    _, env = server
    proc = command(env, "sleep", str(tmp_path / "stopped"), cwd=tmp_path)
    os.kill(_wait_sleeping(proc), signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err


def test_the_servers_cpu_report_counts_the_stage(server, tmp_path):
    warm, env = server
    proc = command({**env, "MLFLOW_RUN_ID": "spinner"}, "spin", "0.5", cwd=tmp_path)
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert 0.4 <= warm.cpu_s("spinner") < 30


def test_a_dead_server_stops_its_stages_as_a_stop_does(tmp_path, monkeypatch):
    """The server SIGKILLed: its stage gets SIGTERM (ends its run KILLED), its command fails with one line."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    warm = WarmServer.launch(["warm_helper"], "warm_helper:main")
    env = {**os.environ, **warm.environ()}
    marker = tmp_path / "stopped"
    proc = command(env, "sleep", str(marker), cwd=tmp_path)
    _wait_sleeping(proc)
    os.kill(warm.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == "SIGTERM"
    assert proc.returncode == 1 and "maskdm: error: the warm server stopped while stage process" in err
    warm.close()


def test_a_server_let_go_finishes_its_running_stage_first(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    warm = WarmServer.launch(["warm_helper"], "warm_helper:main")
    env = {**os.environ, **warm.environ()}
    proc = command(env, "spin", "1.5", cwd=tmp_path)
    time.sleep(0.5)
    warm.close()  # returns once the server has exited
    assert proc.wait(timeout=60) == 0
    assert not warm.socket_path.exists()
    # Later commands find no server and run the stage themselves.
    seen, _ = echo(env, tmp_path)
    assert seen["ppid"] == os.getpid()


def _later_server(tmp_path, monkeypatch, cuda: bool = False) -> tuple[WarmServer, dict, Path]:
    """A server that serves after importing warm_helper and imports warm_later between requests."""
    go = tmp_path / "go"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    monkeypatch.setenv("WARM_LATER_GO", str(go))
    monkeypatch.setenv("WARM_LATER_CUDA", "1" if cuda else "0")
    warm = WarmServer.launch(["warm_helper", "warm_later"], "warm_helper:main", ready_after=1)
    # Ready while warm_later cannot have been imported: its import waits for `go`, written below.
    env = warm.environ()
    assert env, "the server did not become ready before the rest of its preload"
    deadline = time.monotonic() + 60
    while not Path(f"{go}.importing").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert Path(f"{go}.importing").exists(), "the server did not import the rest of its preload while idle"
    go.write_text("")
    return warm, {**os.environ, **env}, go


def modules(env, cwd, *names) -> dict:
    proc = command(env, "modules", *names, cwd=cwd)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out)


def test_a_server_serves_before_the_rest_of_its_preload_and_imports_it_between_requests(tmp_path, monkeypatch):
    warm, env, _ = _later_server(tmp_path, monkeypatch)
    try:
        # Served once that import ended: forked from the server, with warm_later imported by it
        # (the command itself never imports it).
        seen = modules(env, tmp_path, "warm_later", "warm_helper")
        assert seen == {"ppid": warm.pid, "imported": {"warm_later": True, "warm_helper": True}}
    finally:
        warm.close()


def test_a_later_import_that_starts_cuda_stops_the_server_and_stages_start_fresh(tmp_path, monkeypatch, caplog):
    warm, env, _ = _later_server(tmp_path, monkeypatch, cuda=True)
    try:
        # The server exits (it runs no stage) and the command runs itself, as without a server.
        warm._proc.wait(timeout=60)
        seen = modules(env, tmp_path, "warm_later")
        assert seen == {"ppid": os.getpid(), "imported": {"warm_later": False}}
    finally:
        warm.close()
    assert "takes no more stages" in caplog.text


def test_a_server_wanted_when_needed_starts_with_the_first_command_that_needs_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    never = WarmServer.launch(["warm_helper"], "warm_helper:main", when_needed=True)
    assert never.pid is None and never.cpu_s("any run") == 0.0  # nothing started: nothing to wait for
    never.close()
    assert not never.socket_path.parent.exists()
    warm = WarmServer.launch(["warm_helper"], "warm_helper:main", when_needed=True)
    try:
        env = {**os.environ, **warm.environ()}
        assert warm.pid is not None and psutil.pid_exists(warm.pid)
        assert echo(env, tmp_path)[0]["ppid"] == warm.pid
    finally:
        warm.close()


def test_warm_start_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv(protocol.WARM_START_ENV, "0")
    assert WarmServer.launch(["warm_helper"], "warm_helper:main") is None


def test_a_real_stage_logs_the_same_run_warm_as_cold(tiny_model_dir, tracking, tmp_path):
    """``maskdm prune`` on a tiny model, once in a fresh Python and once forked from a driver's warm
    server: the same parameters, metrics, tags (its process aside) and artifacts."""
    from mlflow.tracking import MlflowClient

    from maskdm.driver.launch import start_warm_server
    from maskdm.liveness import PROCESS_TAGS

    warm = start_warm_server(["prune"])
    assert warm is not None
    try:
        warm_env = warm.environ()
        assert warm_env
        client = MlflowClient()
        runs = {}
        for mode, extra in (("cold", {}), ("warm", warm_env)):
            run_id = client.create_run("0").info.run_id
            env = {**os.environ, **extra, "MLFLOW_RUN_ID": run_id}
            done = subprocess.run(["maskdm", "prune", "--model", str(tiny_model_dir), "--dataset", "shapes", "--pruning_ratio", "0.5"],
                                  env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            runs[mode] = client.get_run(run_id)
        assert warm.cpu_s(runs["warm"].info.run_id) > 0  # forked (not refused), its CPU reported to the driver
        assert not warm.refusals
    finally:
        warm.close()

    cold, hot = runs["cold"], runs["warm"]
    assert int(hot.data.tags["maskdm.pid"]) != int(cold.data.tags["maskdm.pid"])
    assert cold.data.params == hot.data.params and cold.data.metrics == hot.data.metrics
    varying = set(PROCESS_TAGS) | {"mlflow.runName"}
    assert {k: v for k, v in cold.data.tags.items() if k not in varying} == {k: v for k, v in hot.data.tags.items() if k not in varying}

    def files(run) -> dict[str, bytes]:
        root = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    def content(name: str, data: bytes):
        """A safetensors file by its tensors and metadata: its header's key order is not fixed from
        one process to the next (warm or cold); every other file byte for byte."""
        if not name.endswith(".safetensors"):
            return data
        from safetensors import safe_open
        from safetensors.torch import load

        path = tmp_path / "one.safetensors"
        path.write_bytes(data)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        return metadata, {k: v.numpy().tobytes() for k, v in load(data).items()}

    cold_files, warm_files = files(cold), files(hot)
    assert set(cold_files) == set(warm_files) and any(name.startswith("model") for name in cold_files)
    assert [n for n in cold_files if content(n, cold_files[n]) != content(n, warm_files[n])] == []


def test_a_cold_command_imports_its_stage_with_the_collector_paused_then_back_as_it_was(tmp_path, monkeypatch):
    """``maskdm <stage>`` started cold imports its stage module with the cyclic collector off (a
    sixth less CPU, docs/design.md), freezes what the import made, then has the collector as it
    was. The module here makes enough cycles to set off collections, as torch's import does."""
    import gc

    from entrypoints.cli import import_frozen

    (tmp_path / "cyclic_import.py").write_text("made = []\nfor _ in range(50000):\n    a = []\n    a.append(a)\n    made.append(a)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    phases: list[str] = []

    def seen(phase, info):
        phases.append(phase)

    gc.callbacks.append(seen)
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            frozen_before = gc.get_freeze_count()
            phases.clear()
            module = import_frozen("cyclic_import")
            assert phases == [] and len(module.made) == 50000  # no collection during the import
            assert gc.get_freeze_count() >= frozen_before + 50000  # what it made is frozen
            assert gc.isenabled() is enabled
            sys.modules.pop("cyclic_import")
        # The same import with the collector on sets off collections: the check above can fail.
        gc.enable()
        phases.clear()
        importlib.import_module("cyclic_import")
        assert "start" in phases
    finally:
        gc.callbacks.remove(seen)
        sys.modules.pop("cyclic_import", None)
        gc.unfreeze()
        gc.enable()
