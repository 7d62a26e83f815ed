"""Is the process behind a RUNNING run still alive? Pure process bookkeeping, no MLflow.

A run records the process that works on it as tags (:func:`process_tags`): the machine (its
machine id, and the boot id of this boot), the PID namespace, the PID and the process's start
time, plus the host name for people to read. While it works it refreshes a heartbeat tag
(:class:`Heartbeat`). :func:`judge` reads those tags and says whether the run is dead, alive or
unknown, and why. It never ends a run whose process might still be working on it:

1. Recorded on this machine (same machine id) in an earlier boot, last seen alive before this
   boot began: dead (the machine rebooted). Seen alive after it began: a machine with a copy of
   this machine id, judged as in 3.
2. Recorded in this boot of this machine (same machine id and boot id; where either side has no
   machine id, the same Linux boot id alone, a random UUID per boot), in this PID namespace:
   - no process has that PID, or only a zombie (exited, not yet waited for): dead;
   - a process has that PID but started at another time (the PID was reused): dead;
   - the process cannot be seen (``/proc`` mounted with ``hidepid``, access denied): unknown,
     left alone whatever ``stale_after`` says;
   - otherwise the process is alive and the run is left alone.
3. Recorded on another machine or in another PID namespace (a container), or by a machine
   that cannot be told from another, or before machine ids were recorded (older runs, which named the
   machine by host name only), or not recorded at all: nothing here can see the process. It is
   dead only when the caller passes an explicit ``stale_after`` and the last sign of life (the
   newest heartbeat, else the run's start) is older than that. Without it the run is left alone.

Process facts come from psutil, which reads them the same way on Linux, macOS and Windows.
:mod:`maskdm.tracking` applies the verdicts to the store (``end_dead_runs``).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)

#: The host name, for people: two machines may share one, so it decides nothing.
HOST_TAG = "maskdm.host"
#: The machine (``/etc/machine-id``, macOS's IOPlatformUUID, Windows's MachineGuid).
MACHINE_ID_TAG = "maskdm.machine_id"
BOOT_ID_TAG = "maskdm.boot_id"
#: The PID namespace the PID is counted in (its inode; empty where the system has none).
PID_NS_TAG = "maskdm.pid_ns"
PID_TAG = "maskdm.pid"
#: The process's start time (psutil's create_time, unix seconds): with the PID, it names one process.
PID_CREATED_TAG = "maskdm.pid_created"
#: Older runs' start time as /proc counted it (clock ticks since boot); read by nothing now.
PID_START_TAG = "maskdm.pid_start"
#: Unix time (seconds) of the newest sign of life of the run's process.
HEARTBEAT_TAG = "maskdm.heartbeat"
#: Set on a run this module's verdict ended: who ended it, and why.
ENDED_BY_TAG = "maskdm.ended_by"
KILLED_REASON_TAG = "maskdm.killed_reason"
#: Every tag this module writes: a run with any of them was made by MaskDM.
PROCESS_TAGS = (HOST_TAG, MACHINE_ID_TAG, BOOT_ID_TAG, PID_NS_TAG, PID_TAG, PID_CREATED_TAG, PID_START_TAG, HEARTBEAT_TAG)

#: Seconds between heartbeats; ``MASKDM_HEARTBEAT_S`` overrides it (0 turns heartbeats off).
DEFAULT_HEARTBEAT_S = 60.0
#: Two readings of one process's start time may differ by a clock step (psutil adds the boot
#: time, which the kernel recomputes when the clock is set); a reused PID is a process started
#: later than this, after the PID counter went all the way round.
START_TOLERANCE_S = 1.0


def heartbeat_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("MASKDM_HEARTBEAT_S", DEFAULT_HEARTBEAT_S)))
    except ValueError:
        return DEFAULT_HEARTBEAT_S


def host_name() -> str:
    return socket.gethostname()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def machine_id() -> str:
    """This machine's id; empty where it cannot be read (then no run is judged by its process)."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        found = _read(path)
        if found:
            return found
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["ioreg", "-rd1", "-c", "IOPlatformExpertDevice"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
        for line in out.splitlines():
            if "IOPlatformUUID" in line:
                return line.split("=")[-1].strip().strip('"')
    if sys.platform == "win32":
        try:
            import winreg

            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SOFTWARE\Microsoft\Cryptography") as key:
                return str(winreg.QueryValueEx(key, "MachineGuid")[0])
        except OSError:
            return ""
    return ""


def boot_id() -> str:
    """This boot of this machine: Linux's boot id, elsewhere the boot time psutil reports."""
    return _read("/proc/sys/kernel/random/boot_id") or f"boot-{int(psutil.boot_time())}"


def pid_namespace(pid: int | None = None) -> str:
    """The PID namespace of ``pid`` (default: this process), as its inode; empty where there is none."""
    try:
        return str(os.stat(f"/proc/{'self' if pid is None else pid}/ns/pid").st_ino)
    except OSError:
        return ""


@dataclass(frozen=True)
class ProcessState:
    """What this machine can see of a PID: whether it runs, and since when (psutil's create_time)."""

    exists: bool
    zombie: bool = False
    #: It exists (the kernel says so) but cannot be looked at: hidepid, or access denied.
    hidden: bool = False
    created: float | None = None


def process_state(pid: int) -> ProcessState:
    """The state of ``pid`` in this PID namespace."""
    if pid <= 0:
        return ProcessState(False)
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            status, created = proc.status(), proc.create_time()
        return ProcessState(True, zombie=status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD), created=created)
    except psutil.ZombieProcess:
        return ProcessState(True, zombie=True)
    except psutil.NoSuchProcess:
        # /proc mounted with hidepid hides other users' processes: ask the kernel (kill 0, which
        # answers "not permitted" for a process that exists) before calling it gone.
        return ProcessState(True, hidden=True) if psutil.pid_exists(pid) else ProcessState(False)
    except psutil.Error:  # AccessDenied
        return ProcessState(True, hidden=True)


def process_tags(pid: int | None = None) -> dict[str, str]:
    """The tags that name ``pid`` (default: this process) on this machine, and a first heartbeat."""
    pid = os.getpid() if pid is None else pid
    created = process_state(pid).created
    return {
        HOST_TAG: host_name(),
        MACHINE_ID_TAG: machine_id(),
        BOOT_ID_TAG: boot_id(),
        PID_NS_TAG: pid_namespace(None if pid == os.getpid() else pid),
        PID_TAG: str(pid),
        PID_CREATED_TAG: "" if created is None else f"{created:.2f}",
        HEARTBEAT_TAG: str(int(time.time())),
    }


@dataclass(frozen=True)
class Verdict:
    dead: bool
    reason: str
    #: Unix time (seconds) the run was last known alive: the newest heartbeat, else its start.
    last_seen: float
    #: Nothing here can tell whether the process lives (it exists but cannot be looked at).
    unknown: bool = False


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
    machine, here = tags.get(MACHINE_ID_TAG, ""), machine_id()
    recorded_boot, current_boot = tags.get(BOOT_ID_TAG, ""), boot_id()
    same_machine = bool(machine and here and machine == here)
    # Without a machine id on one side, a Linux boot id (a random UUID per kernel boot) still names
    # this machine's current boot; psutil's boot time elsewhere ("boot-<seconds>") does not.
    same_boot = bool(recorded_boot and recorded_boot == current_boot
                     and (same_machine or ((not machine or not here) and not recorded_boot.startswith("boot-"))))
    # Runs recorded before machine ids (no PID namespace tag) are judged by their heartbeat only.
    recorded_here = PID_NS_TAG in tags and pid.isdigit()
    where = ""
    if recorded_here and same_machine and not same_boot:
        if recorded_boot and last_seen < psutil.boot_time():
            return Verdict(True, f"this machine has rebooted since process {pid} on {host or 'it'} worked on the run", last_seen)
        # Seen alive after this boot began, under another boot id: a machine with a copy of this
        # one's machine id (a cloned image), not this one.
        where = f"on a machine with this machine id but boot {recorded_boot or '(none)'}"
    elif recorded_here and same_boot and tags.get(PID_NS_TAG, "") != pid_namespace():
        where = f"in another PID namespace ({tags.get(PID_NS_TAG) or 'none recorded'}; this is {pid_namespace() or 'none'})"
    elif recorded_here and same_boot:
        name = f"process {pid} on {host or 'this machine'}"
        state = process_state(int(pid))
        if not state.exists:
            return Verdict(True, f"{name} no longer exists", last_seen)
        if state.zombie:
            return Verdict(True, f"{name} has exited (a zombie not yet waited for)", last_seen)
        if state.hidden:
            return Verdict(False, f"unknown: {name} exists but cannot be looked at (hidepid or access denied); left alone", last_seen, unknown=True)
        recorded = _float(tags.get(PID_CREATED_TAG))
        if recorded is not None and state.created is not None and abs(recorded - state.created) > START_TOLERANCE_S:
            return Verdict(True, f"{name} has ended; the PID now belongs to a process started later", last_seen)
        return Verdict(False, f"{name} is running", last_seen)
    elif recorded_here and machine and here:
        where = f"on another machine ({host or machine})"
    elif recorded_here:
        where = f"on {host or 'a machine'}, another boot, and a machine id is missing (here or there)"
    elif pid:
        where = f"recorded by host name only ({host}, an older run)"
    else:
        where = "without a recorded process"
    where = f"run {where}"
    age = now - last_seen
    seen = f"last seen alive {age:.0f} s ago" + ("" if heartbeat else " (no heartbeat: its start)")
    if stale_after is not None and stale_after > 0 and age > stale_after:
        return Verdict(True, f"{where}, {seen}, more than stale_after={stale_after:g} s", last_seen)
    hint = f"within stale_after={stale_after:g} s" if stale_after else "left alone unless stale_after is given"
    return Verdict(False, f"{where}, {seen}; {hint}", last_seen)


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
    "BOOT_ID_TAG", "ENDED_BY_TAG", "HEARTBEAT_TAG", "HOST_TAG", "KILLED_REASON_TAG", "MACHINE_ID_TAG", "PID_CREATED_TAG",
    "PID_NS_TAG", "PID_START_TAG", "PID_TAG", "PROCESS_TAGS", "Heartbeat", "ProcessState", "Verdict", "boot_id",
    "heartbeat_interval", "judge", "machine_id", "pid_namespace", "process_state", "process_tags",
]
