"""The command's side of a warm start: hand the stage to the server named in the environment, wait,
and exit as the stage process exits.

:func:`run_warm` returns None when there is no server to hand to (no ``MASKDM_WARM_SOCKET``, the
server gone, or its refusal, which the server reports to the driver); the command then runs the
stage itself. It
imports nothing heavy, so a command that hands its stage over costs a bare Python start.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from maskdm.warm_start import protocol

#: Signals the command passes on to the stage process. SIGINT only when the stage is in another
#: process group: Ctrl-C in a terminal reaches every process of the foreground group at once, and a
#: second SIGINT would interrupt the stage while it ends its run.
_FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def run_warm(call_file: str) -> int | None:
    """Run this command (``sys.argv``) in a process forked by the warm server; its exit code, or
    None when it must run here. ``call_file`` is the source file of the command's module, which the
    server checks against its own."""
    path = os.environ.get(protocol.SOCKET_ENV)
    if not path or not protocol.supported():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        protocol.send(sock, {
            "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "python": sys.executable,
            "path": sys.path, "file": os.path.realpath(call_file), "package": protocol.package_file(),
        }, fds=[0, 1, 2])
        reply, _ = protocol.receive(sock)
    except OSError:
        sock.close()
        return None
    if reply is None or "refused" in reply:
        # The server tells the driver why (it logs it); the stage's own output stays as a cold start's.
        sock.close()
        return None
    return _wait(sock, int(reply["started"]), int(reply["pgid"]))


def _wait(sock: socket.socket, pid: int, pgid: int) -> int:
    """Pass signals on to the stage process until the server says how it ended."""
    same_group = pgid == os.getpgid(0)

    def forward(signum, frame):
        if signum == signal.SIGINT and same_group:
            return  # the terminal sent it to the stage too
        try:
            protocol.send(sock, {"signal": int(signum)})
        except OSError:
            pass

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    while True:
        try:
            reply, _ = protocol.receive(sock)
            break
        except InterruptedError:
            continue
        except OSError:
            reply = None
            break
    sock.close()
    if reply is None:
        print(f"maskdm: error: the warm server stopped while stage process {pid} ran", file=sys.stderr, flush=True)
        return 1
    if "signal" in reply:
        # End as the stage process ended, so whoever waits for this command sees the same status.
        signum = int(reply["signal"])
        if signum not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be caught anyway
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum
    return int(reply["exit"])
