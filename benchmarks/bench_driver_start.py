"""What a driver costs to start and walk a sweep: its CPU and wall seconds, and which heavy
libraries it imported, for `maskdm main <arguments>` run once in a fresh process.

    python benchmarks/bench_driver_start.py [maskdm main arguments]

Run it in a folder whose store (MLFLOW_TRACKING_URI, else ./mlflow.db) holds the finished sweep,
so that every stage is reused and what is measured is the driver alone. Prints one JSON line.
"""

from __future__ import annotations

import json
import resource
import runpy
import sys
import time

HEAVY = ("torch", "diffusers", "pandas", "matplotlib", "scipy")


def main() -> None:
    sys.argv = ["maskdm", "main", *sys.argv[1:]]
    started = time.perf_counter()
    code = 0
    try:
        runpy.run_module("entrypoints.cli", run_name="__main__")
    except SystemExit as exc:
        code = exc.code or 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"exit": code, "wall_s": round(time.perf_counter() - started, 2),
                      "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                      "imported": [name for name in HEAVY if name in sys.modules]}))


if __name__ == "__main__":
    main()
