"""Is the process behind a RUNNING run still alive? Pure process bookkeeping, no MLflow.

A run records the process that works on it as tags (:func:`process_tags`): the host name, the
host's boot id, the PID and the process's start time. While it works it refreshes a heartbeat tag
(:class:`Heartbeat`). :func:`judge` reads those tags and says whether the run is dead, and why:

1. Recorded on this host (same host name):
   - the host has rebooted since (another boot id): dead;
   - no process has that PID, or only a zombie (exited, not yet waited for): dead;
   - a process has that PID but started at another time (the PID was reused): dead;
   - otherwise the process is alive and the run is left alone.
2. Recorded on another host, or not recorded at all (a run made before these tags existed, or
   killed before its process started): nothing on this machine can prove it dead. It is dead only
   when the caller passes an explicit ``stale_after`` and the last sign of life (the newest
   heartbeat, else the run's start) is older than that. Without ``stale_after`` it is left alone.

:mod:`maskdm.tracking` applies the verdicts to the store (``end_dead_runs``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

HOST_TAG = "maskdm.host"
BOOT_ID_TAG = "maskdm.boot_id"
PID_TAG = "maskdm.pid"
#: The process's start time as this host counts it (``/proc/<pid>/stat`` field 22, clock ticks
#: since boot; elsewhere psutil's create time): with the PID, it names one process.
PID_START_TAG = "maskdm.pid_start"
#: Unix time (seconds) of the newest sign of life of the run's process.
HEARTBEAT_TAG = "maskdm.heartbeat"
#: Set on a run this module's verdict ended: who ended it, and why.
ENDED_BY_TAG = "maskdm.ended_by"
KILLED_REASON_TAG = "maskdm.killed_reason"

#: Seconds between heartbeats; ``MASKDM_HEARTBEAT_S`` overrides it (0 turns heartbeats off).
DEFAULT_HEARTBEAT_S = 60.0


def heartbeat_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("MASKDM_HEARTBEAT_S", DEFAULT_HEARTBEAT_S)))
    except ValueError:
        return DEFAULT_HEARTBEAT_S


def host_name() -> str:
    return socket.gethostname()


def boot_id() -> str:
    """This boot of this host (Linux); empty where the system does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class ProcessState:
    """What this host knows of a PID: whether it runs, and since when."""

    exists: bool
    zombie: bool = False
    start: str = ""


def process_state(pid: int) -> ProcessState:
    """The state of ``pid`` on this host. ``start`` is empty where it cannot be read."""
    if pid <= 0:
        return ProcessState(False)
    # /proc first: its start time is an exact tick count, while psutil's create_time is a float
    # that another process can compute differently (seen: a live process judged "PID reused").
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return ProcessState(False)
    except OSError:
        stat = ""
    if stat:
        # The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        return ProcessState(True, zombie=fields[0] in ("Z", "X"), start=fields[19])
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            return ProcessState(True, zombie=proc.status() == psutil.STATUS_ZOMBIE, start=repr(proc.create_time()))
        except psutil.NoSuchProcess:
            return ProcessState(False)
        except psutil.Error:
            pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return ProcessState(False)
    except PermissionError:
        pass
    return ProcessState(True)


def process_tags(pid: int | None = None) -> dict[str, str]:
    """The tags that name ``pid`` (default: this process) on this host, and a first heartbeat."""
    pid = os.getpid() if pid is None else pid
    return {
        HOST_TAG: host_name(),
        BOOT_ID_TAG: boot_id(),
        PID_TAG: str(pid),
        PID_START_TAG: process_state(pid).start,
        HEARTBEAT_TAG: str(int(time.time())),
    }


@dataclass(frozen=True)
class Verdict:
    dead: bool
    reason: str
    #: Unix time (seconds) the run was last known alive: the newest heartbeat, else its start.
    last_seen: float


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def judge(tags: Mapping[str, str], start_time: float, now: float | None = None, stale_after: float | None = None) -> Verdict:
    """Whether the RUNNING run with these tags (started at unix time ``start_time``) is dead; see the module doc."""
    now = time.time() if now is None else now
    heartbeat = _float(tags.get(HEARTBEAT_TAG))
    last_seen = max(heartbeat or 0.0, start_time)
    host, pid = tags.get(HOST_TAG, ""), tags.get(PID_TAG, "")
    if host and host == host_name() and pid.isdigit():
        recorded_boot, current_boot = tags.get(BOOT_ID_TAG, ""), boot_id()
        if recorded_boot and current_boot and recorded_boot != current_boot:
            return Verdict(True, f"host {host} has rebooted since process {pid} worked on the run", last_seen)
        state = process_state(int(pid))
        if not state.exists:
            return Verdict(True, f"process {pid} on {host} no longer exists", last_seen)
        if state.zombie:
            return Verdict(True, f"process {pid} on {host} has exited (a zombie not yet waited for)", last_seen)
        recorded_start = tags.get(PID_START_TAG, "")
        if recorded_start and state.start and recorded_start != state.start:
            return Verdict(True, f"process {pid} on {host} has ended; the PID now belongs to a process started later", last_seen)
        return Verdict(False, f"process {pid} on {host} is running", last_seen)

    where = f"on host {host} (this is {host_name()})" if host else "without a recorded process"
    age = now - last_seen
    seen = f"last seen alive {age:.0f} s ago" + ("" if heartbeat else " (no heartbeat: its start)")
    if stale_after is not None and stale_after > 0 and age > stale_after:
        return Verdict(True, f"run {where}, {seen}, more than stale_after={stale_after:g} s", last_seen)
    hint = f"within stale_after={stale_after:g} s" if stale_after else "left alone unless stale_after is given"
    return Verdict(False, f"run {where}, {seen}; {hint}", last_seen)


class Heartbeat:
    """Calls ``beat()`` every ``interval`` seconds on a daemon thread until :meth:`stop`.

    A failing beat is logged and retried at the next interval: a tracking store that is busy for a
    moment must not end the stage.
    """

    def __init__(self, beat: Callable[[], None], interval: float):
        self._beat = beat
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maskdm-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        if self._interval > 0:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except Exception as exc:  # noqa: BLE001 - see the class doc
                log.debug("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)


__all__ = [
    "BOOT_ID_TAG", "ENDED_BY_TAG", "HEARTBEAT_TAG", "HOST_TAG", "KILLED_REASON_TAG", "PID_START_TAG", "PID_TAG",
    "Heartbeat", "ProcessState", "Verdict", "heartbeat_interval", "judge", "process_state", "process_tags",
]
