"""Wall time of the demo sweep, stage by stage: `maskdm main --preset demo` in a fresh tracking store.

Each stage's wall time is its run's end minus start time in the tracking store; its CPU time
(user + system, all its processes) is what the driver measured around it (stage_runs.json). On a
machine shared with other work the wall times stretch while the CPU times barely move, so the
CPU column is the better predictor of an unloaded machine (a single-threaded stage's wall time
there is about its CPU time; a stage using both cores of a 2-core machine takes less).

    python benchmarks/bench_demo_sweep.py                        # the whole demo sweep
    python benchmarks/bench_demo_sweep.py -- --ratios 0.5        # extra args go to `maskdm main`
    python benchmarks/bench_demo_sweep.py --keep /tmp/demo-store -- --ratios 0.5
    python benchmarks/bench_demo_sweep.py --quickstart           # the README's `mlflow run . --env-manager local`

The store is a fresh SQLite file in a temporary folder (or --keep FOLDER), so nothing is cached:
the demo model is pretrained, the shapes classifier and reference statistics are computed once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", default=None, help="use (and keep) this folder for the tracking store and the log")
    p.add_argument("--quickstart", action="store_true",
                   help="run the README's Quickstart job, `mlflow run <repo> --env-manager local`, instead of `maskdm main`")
    p.add_argument("--json", default=None, help="also write the per-stage timings here as JSON")
    p.add_argument("main_args", nargs="*", help="extra arguments for `maskdm main` (after --)")
    return p.parse_args()


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def sweep_command(main_args: list[str], quickstart: bool) -> list[str]:
    if quickstart:
        return ["mlflow", "run", str(REPO), "--env-manager", "local", *(f"-P{a}" for a in main_args)]
    return [sys.executable, "-m", "entrypoints.cli", "main", "--preset", "demo", *main_args]


def run_sweep(folder: Path, command: list[str]) -> tuple[str, float, str]:
    """Run the driver; return (tracking URI, driver wall seconds, driver run ID)."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    env["MLFLOW_TRACKING_URI"] = uri
    log_path = folder / "sweep.log"
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        done = subprocess.run(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"the sweep failed (exit {done.returncode}); its output: {log_path}")

    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    [driver] = MlflowClient().search_runs(["0"], "tags.`maskdm.stage` = 'main'", order_by=["attributes.start_time DESC"], max_results=1)
    return uri, wall, driver.info.run_id


def stage_timings(driver_run_id: str) -> list[dict]:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    steps = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=driver_run_id, artifact_path="stage_runs.json")).read_text())
    for step in steps:
        info = client.get_run(step["run_id"]).info
        step["run_wall_s"] = (info.end_time - info.start_time) / 1000
    return steps


def markdown(steps: list[dict], driver_wall: float) -> str:
    lines = ["| # | step | stage | wall s (run) | CPU s |", "|---|---|---|---|---|"]
    for i, s in enumerate(steps, 1):
        lines.append(f"| {i} | {s['step']} | {s['stage']} | {s['run_wall_s']:.1f} | {s['cpu_s']:.1f} |")
    lines.append(f"| | **sum of stages** | | **{sum(s['run_wall_s'] for s in steps):.0f}** | **{sum(s['cpu_s'] for s in steps):.0f}** |")
    lines.append(f"| | **driver, end to end** | | **{driver_wall:.0f}** | |")
    by_stage: dict[str, list[dict]] = defaultdict(list)
    for s in steps:
        by_stage[s["stage"]].append(s)
    lines += ["", "| stage | runs | wall s (sum) | CPU s (sum) | CPU s (mean) |", "|---|---|---|---|---|"]
    for stage, group in by_stage.items():
        cpu = sum(s["cpu_s"] for s in group)
        lines.append(f"| {stage} | {len(group)} | {sum(s['run_wall_s'] for s in group):.0f} | {cpu:.0f} | {cpu / len(group):.1f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="maskdm-bench-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    command = sweep_command(args.main_args, args.quickstart)
    uri, wall, driver_run_id = run_sweep(folder, command)
    steps = stage_timings(driver_run_id)
    print(" ".join(command))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average before {load_before}, after {load_average()}")
    print(f"store: {uri}  driver run: {driver_run_id}\n")
    print(markdown(steps, wall))
    if args.json:
        Path(args.json).write_text(json.dumps({"driver_wall_s": wall, "steps": steps}, indent=1))


if __name__ == "__main__":
    main()
