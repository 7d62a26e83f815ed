"""A stand-in command for the warm server's tests: what a stage does to its process, in milliseconds.

``python tests/warm_helper.py <what> ...`` (the repository and tests/ on PYTHONPATH) hands itself to the server named by MASKDM_WARM_SOCKET
exactly as ``maskdm <stage>`` does (maskdm.warm_start.client), or runs here when it cannot.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time


def main() -> None:
    what = sys.argv[1]
    if what == "echo":  # what the process it runs in is
        import torch

        print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "pid": os.getpid(),
                          "ppid": os.getppid(), "threads": torch.get_num_threads(), "path0": sys.path[0],
                          "comm": open("/proc/self/comm").read().strip(), "gc": gc.isenabled()}))
        print("to stderr", file=sys.stderr)
    elif what == "modules":  # which of the named modules this process has imported
        print(json.dumps({"ppid": os.getppid(), "imported": {name: name in sys.modules for name in sys.argv[2:]}}))
    elif what == "exit":
        sys.exit(int(sys.argv[2]))
    elif what == "sleep":  # until a signal: SIGTERM is written down (as a stage ends its run KILLED)
        marker = sys.argv[2]

        def stopped(signum, frame):
            with open(marker, "w") as out:
                out.write(signal.Signals(signum).name)
            sys.exit(5)

        signal.signal(signal.SIGTERM, stopped)
        print(f"sleeping {os.getpid()}", flush=True)
        time.sleep(120)
    elif what == "spin":  # CPU seconds for the server's report
        end = time.process_time() + float(sys.argv[2])
        while time.process_time() < end:
            pass
    elif what == "raise":
        raise RuntimeError("a bug")
    elif what == "pool":  # ends as a stage does, with a thread pool never shut down and an atexit handler
        import atexit
        from concurrent.futures import ThreadPoolExecutor

        atexit.register(lambda: print("atexit ran", flush=True))
        pool = ThreadPoolExecutor(2)
        print(pool.submit(lambda: "pool ran").result(), flush=True)
        sys.exit(int(sys.argv[2]))


if __name__ == "__main__":
    from maskdm.warm_start.client import run_warm

    code = run_warm(__file__)
    if code is not None:
        sys.exit(code)
    main()
