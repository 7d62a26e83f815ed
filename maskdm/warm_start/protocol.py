"""What the warm server and its clients say to each other: length-prefixed JSON messages over a
Unix socket, the first one carrying the client's standard streams (``SCM_RIGHTS``)."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

#: In a stage command's environment: the server's socket. Set by the driver, never by a user.
SOCKET_ENV = "MASKDM_WARM_SOCKET"
#: ``0`` (or false/no/off) turns warm starts off for a driver: every stage starts its own Python.
WARM_START_ENV = "MASKDM_WARM_START"

#: Variables a stage's environment may hold that the server's does not, or with another value:
#: what mlflow's local backend sets per run, what the driver sets per slot (GPU, threads; applied
#: to the forked process by the server), what a shell sets for the command it runs, the session
#: ID MLflow's telemetry puts in its process's environment once it logs, and the cache folders
#: read only when used (torch hub's and MaskDM's datasets), never at import. Any other
#: difference could change what an import did at the server's start, so it makes the server refuse.
PER_STAGE_VARIABLES = frozenset({
    "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_TRACKING_URI",
    "CUDA_VISIBLE_DEVICES", "_MLFLOW_TELEMETRY_SESSION_ID", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "TORCH_HOME", "MASKDM_DATA_DIR",
    SOCKET_ENV, "_", "SHLVL", "PWD", "OLDPWD",
})

_LENGTH = struct.Struct("!I")
#: The most standard streams a request carries (stdin, stdout, stderr).
MAX_FDS = 3


def package_file() -> str:
    """Where this process imported maskdm from (a server and its commands must agree on it)."""
    import maskdm

    return os.path.realpath(maskdm.__file__ or "")


def supported() -> bool:
    """Warm starts need fork, Unix sockets that pass descriptors, pidfds and prctl: Linux."""
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open") and hasattr(socket, "send_fds")


def disabled_by_env(environ=os.environ) -> bool:
    return str(environ.get(WARM_START_ENV, "")).strip().lower() in ("0", "false", "no", "off")


def send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    payload = _LENGTH.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [payload], fds)
        payload = payload[sent:]
    if payload:
        sock.sendall(payload)


def _recv_exactly(sock: socket.socket, size: int, buffer: bytearray) -> bool:
    while len(buffer) < size:
        chunk = sock.recv(size - len(buffer))
        if not chunk:
            return False
        buffer += chunk
    return True


def receive(sock: socket.socket, with_fds: bool = False) -> tuple[dict | None, list[int]]:
    """One message (None at end of stream) and the descriptors that came with it."""
    fds: list[int] = []
    buffer = bytearray()
    if with_fds:
        data, fds, _flags, _addr = socket.recv_fds(sock, 65536, MAX_FDS)
        if not data:
            return None, fds
        buffer += data
    if not _recv_exactly(sock, _LENGTH.size, buffer):
        return None, fds
    (size,) = _LENGTH.unpack(bytes(buffer[: _LENGTH.size]))
    if not _recv_exactly(sock, _LENGTH.size + size, buffer):
        return None, fds
    return json.loads(bytes(buffer[_LENGTH.size:])), fds
