"""What it costs to start one stage of a parallel sweep: MLflow's asynchronous local backend
(``mlflow.projects.run(synchronous=False)``, which runs ``mlflow run --run-id`` per stage) against
the driver's own launch (``maskdm.driver.launch._submit_and_wait``: the local backend's synchronous
start, waited for in the worker thread), side by side, rounds interleaved.

    python benchmarks/bench_parallel_launch.py [--stages 6] [--rounds 3]

Each stage is an entry point of a stand-in MLproject whose command is ``true``, so what is
measured is the launch alone: the CPU seconds of this process (run creation, the launch) and of
the processes it started (their rusage), and the wall seconds until the run ended. Runs in a fresh SQLite store in a temporary folder; prints one
JSON line per round and method, then the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path


def cpu_s() -> float:
    """This process's CPU seconds and those of the processes it started and waited for."""
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench_parallel_launch_"))
    (folder / "MLproject").write_text("name: standin\nentry_points:\n  stage:\n    command: \"true\"\n")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    import mlflow
    from mlflow.tracking import MlflowClient

    from maskdm.driver import launch

    client = MlflowClient()
    client.search_experiments()  # the store made before anything is timed

    def through_mlflow_run(run_id: str) -> None:
        submitted = mlflow.projects.run(uri=str(folder), entry_point="stage", parameters={}, experiment_id="0",
                                        env_manager="local", synchronous=False, run_id=run_id)
        submitted.wait()

    def driver_launch(run_id: str) -> None:
        launch._submit_and_wait("stage", "stage", {}, run_id, "0", folder, {})

    methods = {"mlflow run --run-id (synchronous=False)": through_mlflow_run, "driver launch": driver_launch}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    for round_ in range(args.rounds):
        for name, method in (methods.items() if round_ % 2 == 0 else reversed(list(methods.items()))):
            cpu0, wall0 = cpu_s(), time.perf_counter()
            for _ in range(args.stages):
                method(client.create_run("0").info.run_id)
            per_stage = ((cpu_s() - cpu0) / args.stages, (time.perf_counter() - wall0) / args.stages)
            results[name].append(per_stage)
            print(json.dumps({"round": round_, "method": name, "cpu_s_per_stage": round(per_stage[0], 3),
                              "wall_s_per_stage": round(per_stage[1], 3)}), flush=True)
    print(json.dumps({name: {"median_cpu_s_per_stage": round(statistics.median(c for c, _ in rows), 3),
                             "median_wall_s_per_stage": round(statistics.median(w for _, w in rows), 3)}
                      for name, rows in results.items()}))


if __name__ == "__main__":
    main()
