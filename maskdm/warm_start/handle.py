"""The starting side of a warm server: start it, wait until it is ready, read what it reports, stop it.

:class:`WarmServer` is what the driver holds: :meth:`WarmServer.launch` runs
``python -m maskdm.warm_start.server`` with the driver's own environment (less the thread
variables, which the server applies per stage), :meth:`WarmServer.environ` waits until it is
ready and gives its socket for the stage commands' environment, and collects each stage process's CPU seconds as the server reports them.
Closing its stdin lets the server go: it takes no new stage and exits once its stages have ended.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from maskdm.warm_start import protocol

log = logging.getLogger(__name__)

#: Variables the server must not inherit from its starter: a stage's own values come with its
#: request (a slot's thread count, GPU), and torch reads the thread count once, at import.
_PER_STAGE_ONLY = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "MLFLOW_RUN_ID", protocol.SOCKET_ENV)
#: Seconds to wait for the server's imports and its fork check.
READY_TIMEOUT_S = 300.0


class WarmServer:
    """A server being started (:meth:`launch`), ready once :meth:`environ` has waited for it."""

    def __init__(self, preload: list[str], call: str, per_stage_env: list[str], ready_after: int | None):
        self._launch_args = (preload, call, per_stage_env, ready_after)
        self._proc: subprocess.Popen | None = None
        self._folder = Path(tempfile.mkdtemp(prefix="maskdm-warm-"))
        self.socket_path = self._folder / "socket"
        #: The server's process ID, once started.
        self.pid: int | None = None
        self._started = 0.0
        #: None until the server answered; then whether it is ready.
        self._ready: bool | None = None
        self._cpu: dict[str, float] = {}
        #: The server's refusals, as it reported them (``refused``: why; ``command``; ``run_id``).
        self.refusals: list[dict] = []
        self._lock = threading.Condition()
        self._reader: threading.Thread | None = None

    @classmethod
    def launch(cls, preload: Iterable[str], call: str, per_stage_env: Iterable[str] = (),
               ready_after: int | None = None, when_needed: bool = False) -> WarmServer | None:
        """Start a server that imports ``preload`` and runs ``call`` per request; None where warm
        starts are off or impossible (why is logged). It imports in the background: :meth:`environ`
        waits for it. ``per_stage_env``: variables a command may set otherwise than this process
        has them now, besides the server's own list (a test runner's per-test variable, say).
        ``ready_after``: it is ready once the first N modules are imported, and imports the rest
        between requests. ``when_needed``: started by the first :meth:`environ` instead of now (a
        sweep whose every stage is cached never starts one)."""
        if not protocol.supported():
            log.info("warm start: not on this platform (it needs Linux); every stage starts a fresh Python")
            return None
        if protocol.disabled_by_env():
            log.info("warm start: off (%s=%s); every stage starts a fresh Python", protocol.WARM_START_ENV,
                     os.environ[protocol.WARM_START_ENV])
            return None
        server = cls(list(preload), call, list(per_stage_env), ready_after)
        if not when_needed:
            server._start()
        return server

    def _start(self, first: str | None = None) -> None:
        preload, call, per_stage_env, ready_after = self._launch_args
        if first in preload and ready_after:
            # The module of the stage that asked first is among those imported before it serves.
            rest = [m for m in preload if m != first]
            preload = [*rest[: ready_after - 1], first, *rest[ready_after - 1 :]]
        env = {k: v for k, v in os.environ.items() if k not in _PER_STAGE_ONLY}
        self._started = time.perf_counter()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "maskdm.warm_start.server", "--socket", str(self.socket_path),
             "--preload", ",".join(preload), "--call", call, "--per_stage_env", ",".join(per_stage_env),
             *(["--ready_after", str(ready_after)] if ready_after is not None else [])],
            # Started in its own empty folder, so that it imports every module from where the stage
            # commands will (the installed packages, PYTHONPATH), never from a working directory.
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=self._folder, env=env, text=True,
        )
        self.pid = self._proc.pid

    def environ(self, first: str | None = None) -> dict[str, str]:
        """What a stage command's environment needs to be handed to this server, once it is ready
        (started and waited for here, the first time; ``first``: the module of the stage asking,
        imported before the server serves); ``{}`` if it could not start (logged once)."""
        with self._lock:
            if self._proc is None:
                self._start(first)
            if self._ready is None:
                first = _read_line(self._proc, READY_TIMEOUT_S)
                self._ready = bool(first and "ready" in first)
                if self._ready:
                    log.info("warm start: stages fork from server process %d (its imports took %.1f s, ready %.1f s after it started)",
                             self.pid, first["import_s"], time.perf_counter() - self._started)
                    self._reader = threading.Thread(target=self._read_reports, name="maskdm-warm-reports", daemon=True)
                    self._reader.start()
                else:
                    why = (first or {}).get("error") or "it did not start"
                    log.warning("warm start: unavailable (%s); every stage starts a fresh Python", why)
            return {protocol.SOCKET_ENV: str(self.socket_path)} if self._ready else {}

    def _read_reports(self) -> None:
        for line in self._proc.stdout:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if "ended" in report and report.get("run_id"):
                with self._lock:
                    self._cpu[report["run_id"]] = float(report["cpu_s"])
                    self._lock.notify_all()
            elif "stopped" in report:
                log.warning("warm start: the server takes no more stages (%s); the rest start a fresh Python", report["stopped"])
            elif "refused" in report:
                self.refusals.append(report)
                log.warning("warm start: %s%s starts in a fresh Python: %s", report.get("command") or "a command",
                            f" (run {report['run_id']})" if report.get("run_id") else "", report["refused"])

    def cpu_s(self, run_id: str, wait_s: float = 2.0) -> float:
        """CPU seconds (user + system) of the stage process that ran ``run_id`` here; 0 if none did.

        The server reports a stage before it tells the stage's command, so by the time the command
        has exited the report is on its way; ``wait_s`` covers reading it.
        """
        deadline = time.monotonic() + wait_s
        with self._lock:
            if not self._ready:
                return 0.0
            while run_id not in self._cpu and time.monotonic() < deadline and self._reader.is_alive():
                self._lock.wait(0.05)
            return self._cpu.pop(run_id, 0.0)

    def close(self) -> None:
        """Let the server go (it finishes running stages first) and remove its socket folder."""
        if self._proc is not None:
            _stop(self._proc)
        if self._reader is not None:
            self._reader.join(timeout=5)
        _remove(self._folder)


def _read_line(proc: subprocess.Popen, timeout_s: float) -> dict | None:
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            return None
    line = proc.stdout.readline()
    try:
        return json.loads(line) if line else None
    except ValueError:
        return None


def _stop(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
