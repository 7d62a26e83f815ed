"""The warm server: imports the given modules once, then forks one stage process per request.

``python -m maskdm.warm_start.server --socket PATH --preload a,b,c [--ready_after N]`` imports the modules
(with ``--ready_after``, the first N; the rest one at a time whenever no request waits), checks
that a process forked from it can still use torch (its CPU threads, and CUDA where there is a GPU:
this process itself never starts CUDA, which cannot be forked), listens on ``PATH`` and writes one
JSON line to its stdout: ``{"ready": ...}`` or ``{"error": ...}``. It serves until its stdin ends
(the driver that started it ended or let it go), then lets its running stages finish and exits.

Each request (:mod:`.client`) carries a command's argv, working directory, environment and
standard streams. The server refuses one it cannot run exactly as a fresh process would (another
Python or copy of the code, an environment that differs in more than :data:`PER_STAGE_VARIABLES`)
and otherwise forks: the new process takes the streams, directory, environment and argv, sets its
thread count from the environment, names itself after the stage, and runs the command's function.
It exits through Python's normal exit (atexit handlers, flushed streams), as a fresh process would.

What the stage process's parent (this server) sees is relayed to the client: its PID when it
starts, its exit code or the signal that ended it; and to the driver (one JSON line on stdout) each
stage's CPU time, and each refusal with its reason. The client's signals (SIGTERM, SIGHUP, SIGINT) are passed on. If the client
dies, the stage process is SIGKILLed, as the process it stands for would have been; if this server
dies, its stage processes get SIGTERM (``PR_SET_PDEATHSIG``) and end their runs as a stop does.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from maskdm.warm_start import protocol

#: prctl(2) option: the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1
#: Seconds a request may take to arrive once its connection is accepted.
_REQUEST_TIMEOUT_S = 10.0
#: Exit code of a forked process that could not become the stage (its streams, directory, ...).
_SETUP_FAILED = 70


@dataclass
class _Stage:
    pid: int
    pidfd: int
    conn: socket.socket | None
    run_id: str


def code_file(call: str) -> str:
    """The source file of the module of ``call`` (``module:function``), resolved."""
    module = importlib.import_module(call.partition(":")[0])
    return os.path.realpath(module.__file__ or "")


def _import(name: str) -> None:
    """Import ``name``; skip it if it (or its package) is not installed: a preload is an optimisation."""
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if not exc.name or not (name == exc.name or name.startswith(exc.name + ".")):
            raise


def _say(message: dict) -> None:
    """One line to the driver (this process's stdout)."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _probe() -> str | None:
    """Fork a process that uses torch as a stage would; what went wrong, or None.

    A forked process inherits the parent's OpenMP and CUDA state: this checks that the imports left
    neither in a state a child cannot use (one matrix product on the CPU threads; CUDA initialised
    in the child only, if a GPU is visible).
    """
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            import torch

            a = torch.ones(256, 256)
            ok = bool((a @ a)[0, 0].item() == 256.0)
            if ok and torch.cuda.is_available():
                ok = float(torch.ones(4, device="cuda").sum().item()) == 4.0
            code = 0 if ok else 1
        except BaseException:  # noqa: BLE001 - anything at all means "cannot serve"
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return None if code == 0 else f"a forked process could not use torch (exit {code})"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "a forked process hung using torch (OpenMP or CUDA state inherited from the imports)"


def refusal(request: dict, environ: dict[str, str], call_file: str, per_stage: frozenset[str] = frozenset()) -> str | None:
    """Why ``request`` cannot be run here exactly as a fresh process would run it (None: it can).
    ``per_stage``: more variables that may differ, besides :data:`protocol.PER_STAGE_VARIABLES`."""
    if os.path.realpath(request.get("python", "")) != os.path.realpath(sys.executable):
        return f"another Python ({request.get('python')}; the server runs {sys.executable})"
    if request.get("file") != call_file:
        return f"another copy of the code ({request.get('file')}; the server has {call_file})"
    if request.get("package") != protocol.package_file():
        return f"another copy of maskdm ({request.get('package')}; the server has {protocol.package_file()})"
    if request.get("path", [])[1:] != sys.path:
        return "another module search path (PYTHONPATH or installed packages differ)"
    env = request.get("env", {})
    allowed = protocol.PER_STAGE_VARIABLES | per_stage
    differing = sorted(k for k in set(env) | set(environ) if k not in allowed and env.get(k) != environ.get(k))
    if differing:
        return f"its environment differs in {', '.join(differing[:5])}"
    if any(k in env for k in ("WORLD_SIZE", "LOCAL_RANK")):
        return "it is one process of a multi-process launch"
    return None


def _set_threads(env: dict[str, str]) -> None:
    """The stage's CPU threads from its environment, as torch would read them at a fresh start."""
    value = env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS")
    if value and value.strip().isdigit() and int(value) > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(value))


def _become_stage(request: dict, fds: list[int], inherited: list[int], server_pid: int) -> None:
    """In the forked process: take the client's streams, directory and environment, then run the call.

    Returns only by raising SystemExit (the call's own exit), so that the process ends through
    Python's normal exit path. Anything failing before the call ends the process with
    :data:`_SETUP_FAILED`.
    """
    try:
        gc.enable()  # the server runs without it (serve); its objects are frozen, the stage's are collected
        for fd in inherited:
            try:
                os.close(fd)
            except OSError:
                pass
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != server_pid:  # the server died before prctl took effect
            os._exit(_SETUP_FAILED)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        env = dict(request["env"])
        env.pop(protocol.SOCKET_ENV, None)  # processes the stage starts itself start cold
        os.environ.clear()
        os.environ.update(env)
        sys.argv = list(request["argv"])
        sys.path.insert(0, request["path"][0])
        _set_threads(env)
        # Global generators a fresh process seeds from the OS (numpy's; torch's, which an import
        # reseeds) would otherwise be one state shared by every forked stage.
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        if "torch" in sys.modules:
            sys.modules["torch"].seed()
        stage = os.path.basename(sys.argv[1]) if len(sys.argv) > 1 else "stage"
        try:
            with open("/proc/self/comm", "w") as comm:  # what ps and top show: the stage's name
                comm.write(stage[:15])
        except OSError:
            pass
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=stream.isatty() or stream is sys.stderr)
        module, _, function = request["call"].partition(":")
        call = getattr(importlib.import_module(module), function)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        os._exit(_SETUP_FAILED)
    try:
        call()
        code = 0
    except SystemExit as exc:
        code = exc.code
    _exit(code)


def _exit(code) -> None:
    """End the stage process as Python's own exit would, without tearing down every module.

    A fresh process's exit waits for its non-daemon threads, runs the atexit handlers (MLflow's,
    logging's flush, temporary folders' cleanup) and flushes its streams; then it frees each of the
    thousands of modules the server imported, which takes seconds and changes nothing outside the
    process. This does the first three and skips the last. An exception from the call never gets
    here: it goes up to the interpreter, which prints it and exits 1 as in a fresh process.
    """
    import atexit

    # What the interpreter calls at exit: the threading module's exit hooks (a thread pool's
    # workers are told to stop there), then a join of every non-daemon thread.
    threading._shutdown()
    atexit._run_exitfuncs()
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message") prints the message and exits 1
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status & 0xFF)


def serve(socket_path: str, preload: list[str], call: str, per_stage: frozenset[str] = frozenset(),
          ready_after: int | None = None) -> int:
    """Serve until stdin ends. ``ready_after``: serve once the first N modules of ``preload`` are
    imported, and import the rest between requests (a stage forked before one of them imports it
    itself); None imports them all first."""
    server_pid = os.getpid()
    # Python's advice for a process that forks without exec (the gc module's documentation):
    # collection off from the start (the imports' millions of objects set off collections that free
    # nothing: they take about a sixth less CPU without), everything frozen before each fork, and
    # collection back on in the forked process (_become_stage).
    gc.disable()
    # Ctrl-C in a terminal reaches the whole process group, the stages included; this server waits
    # for them to end their runs instead of leaving them orphaned.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    environ = dict(os.environ)
    # torch.cuda.is_available() without initialising CUDA here (NVML instead), so forks may use it.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    # The modules are imported from the installed packages and PYTHONPATH only, not from this
    # process's working directory (which `python -m` puts first); each stage process gets its
    # command's own first entry back (_become_stage).
    if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.realpath(os.getcwd()):
        del sys.path[0]
    started = time.perf_counter()
    now = preload if ready_after is None else preload[:ready_after]
    later = [] if ready_after is None else list(preload[ready_after:])
    try:
        for name in now:
            _import(name)
        call_file = code_file(call)
    except BaseException as exc:  # noqa: BLE001
        _say({"error": f"importing the stages' modules failed: {type(exc).__name__}: {exc}"})
        return 1
    import_s = time.perf_counter() - started
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        _say({"error": "the imports initialised CUDA, which a forked process cannot use"})
        return 1
    problem = _probe()
    if problem:
        _say({"error": problem})
        return 1

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    stages: dict[int, _Stage] = {}
    _say({"ready": True, "pid": server_pid, "import_s": round(import_s, 3)})

    def stop_accepting() -> None:
        selector.unregister(listener)
        listener.close()
        try:
            os.unlink(socket_path)
        except FileNotFoundError:
            pass

    def start_stage(conn: socket.socket) -> None:
        conn.settimeout(_REQUEST_TIMEOUT_S)
        try:
            request, fds = protocol.receive(conn, with_fds=True)
        except (OSError, ValueError):
            conn.close()
            return
        if request is None or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        why = refusal(request, environ, call_file, per_stage)
        if why:
            _say({"refused": why, "command": " ".join(request.get("argv", [])[1:2]),
                  "run_id": str(request.get("env", {}).get("MLFLOW_RUN_ID", ""))})
            for fd in fds:
                os.close(fd)
            try:
                protocol.send(conn, {"refused": why})
            except OSError:
                pass
            conn.close()
            return
        inherited = [selector.fileno(), listener.fileno(), conn.fileno(), sys.stdin.fileno()]
        inherited += [fd for s in stages.values() for fd in (s.pidfd, s.conn.fileno() if s.conn else -1) if fd >= 0]
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            _become_stage({**request, "call": call}, fds, inherited, server_pid)
        for fd in fds:
            os.close(fd)
        stage = _Stage(pid, os.pidfd_open(pid), conn, str(request.get("env", {}).get("MLFLOW_RUN_ID", "")))
        stages[pid] = stage
        conn.settimeout(None)
        try:
            protocol.send(conn, {"started": pid, "pgid": os.getpgid(pid)})
        except OSError:
            pass
        selector.register(stage.pidfd, selectors.EVENT_READ, ("exit", pid))
        selector.register(conn, selectors.EVENT_READ, ("client", pid))

    def client_said(pid: int) -> None:
        stage = stages[pid]
        try:
            message, _ = protocol.receive(stage.conn)
        except (OSError, ValueError):
            message = None
        if message is None:
            # The command that stood for this stage is gone (killed): so is the stage, as it would be.
            selector.unregister(stage.conn)
            stage.conn.close()
            stage.conn = None
            _signal(pid, signal.SIGKILL)
        elif "signal" in message:
            _signal(pid, int(message["signal"]))

    def stage_ended(pid: int) -> None:
        stage = stages.pop(pid)
        selector.unregister(stage.pidfd)
        os.close(stage.pidfd)
        _, status, usage = os.wait4(pid, 0)
        _say({"ended": pid, "run_id": stage.run_id, "cpu_s": round(usage.ru_utime + usage.ru_stime, 3)})
        if stage.conn is not None:
            selector.unregister(stage.conn)
            reply = ({"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status)
                     else {"exit": os.waitstatus_to_exitcode(status)})
            try:
                protocol.send(stage.conn, reply)
            except OSError:
                pass
            stage.conn.close()

    def import_one_later() -> None:
        """The next module of the rest of the preload; a failing one is left to the stage that needs it.
        One that started CUDA would make every later fork unusable: the server takes no more stages."""
        try:
            _import(later.pop(0))
        except Exception:  # noqa: BLE001 - the stage importing it reports its own error
            pass
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
            later.clear()
            _say({"stopped": "a preloaded module initialised CUDA, which a forked process cannot use"})
            stop_accepting()
            raise _StopAccepting

    accepting = True
    try:
        while accepting or stages:
            events = selector.select(0 if later and accepting else None)
            if not events and later:
                try:
                    import_one_later()
                except _StopAccepting:
                    selector.unregister(sys.stdin.fileno())
                    accepting = False
                continue
            for key, _ in events:
                what = key.data
                if what == "accept":
                    try:
                        conn, _ = listener.accept()
                    except OSError:
                        continue
                    start_stage(conn)
                elif what == "stdin":
                    if not os.read(sys.stdin.fileno(), 4096):
                        selector.unregister(sys.stdin.fileno())
                        stop_accepting()
                        accepting = False
                elif what[0] == "client":
                    if what[1] in stages and stages[what[1]].conn is not None:
                        client_said(what[1])
                elif what[0] == "exit":
                    stage_ended(what[1])
    finally:
        if os.getpid() == server_pid and accepting:
            try:
                os.unlink(socket_path)
            except FileNotFoundError:
                pass
    return 0


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


class _StopAccepting(Exception):
    """The server can fork no more stages (see ``import_one_later``)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maskdm.warm_start.server", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="Path of the Unix socket to listen on.")
    parser.add_argument("--preload", default="", help="Comma-separated modules to import once.")
    parser.add_argument("--call", required=True, help="module:function each request runs (a click group).")
    parser.add_argument("--per_stage_env", default="",
                        help="Comma-separated variables a command's environment may set otherwise, besides the built-in ones.")
    parser.add_argument("--ready_after", type=int, default=None,
                        help="Serve once the first N preload modules are imported; import the rest between requests.")
    args = parser.parse_args(argv)
    preload = [m for m in args.preload.split(",") if m]
    return serve(args.socket, preload, args.call, frozenset(v for v in args.per_stage_env.split(",") if v), args.ready_after)


if __name__ == "__main__":
    sys.exit(main())
