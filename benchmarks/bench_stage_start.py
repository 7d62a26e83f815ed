"""A stage run's fixed cost through the driver, started cold (a fresh Python per stage, as before)
and warm (forked from the driver's warm server, maskdm.warm_start), side by side in one process.

    python benchmarks/bench_stage_start.py                  # 8 rounds, cold and warm interleaved
    python benchmarks/bench_stage_start.py --rounds 12 --json /tmp/start.json

Each round runs, through the driver's own ``run_stage`` (run created, parameters logged,
``mlflow.projects.run``, the stage's process, its run ended), in the order cold, warm, warm, cold
(then the next round the other way round):

- ``no work``: ``extract_masks`` given a run that does not exist. The stage starts, opens its run,
  finds the upstream missing, logs its one-line error and ends the run FAILED: process start,
  imports, run creation and final logging, nothing else.
- ``extract_masks``: the demo's own extract_masks on the shipped demo model pruned at 0.5 (made
  once, before timing): load a 0.7M-parameter model, write its masks, log them. The smallest stage
  of the Quickstart.

Nothing is cached between rounds: each run gets its own cache key (the code version passed to
``run_stage`` differs). The warm server is started once, before timing, as a driver does at the
start of a sweep; its start-up (the imports, once per sweep) is reported beside.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8, help="rounds of cold, warm, warm, cold (alternating order)")
    p.add_argument("--json", default=None, help="also write every timing here")
    return p.parse_args()


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def main() -> None:
    args = parse_args()
    folder = Path(tempfile.mkdtemp(prefix="maskdm-bench-start-"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(folder)

    import mlflow

    from maskdm.driver.launch import run_stage, start_warm_server
    from maskdm.errors import MaskDMError
    from maskdm.tracking import demo_model_run_id

    experiment_id = "0"
    with mlflow.start_run(run_name="bench_stage_start") as parent:
        demo = demo_model_run_id(experiment_id)
        prune = run_stage("prune", {"model": demo, "pruning_ratio": "0.5"}, experiment_id=experiment_id,
                          parent_run_id=parent.info.run_id, code_version="bench-setup").run_id
        started = time.perf_counter()
        warm = start_warm_server(["extract_masks"])
        assert warm is not None and warm.environ(), "the warm server did not start"
        server_ready_s = time.perf_counter() - started

        cases = {"no work": {"prune_run_id": "no-such-run"}, "extract_masks": {"prune_run_id": prune}}
        timings: dict[str, dict[str, list[float]]] = {case: {"cold": [], "warm": []} for case in cases}
        count = 0

        def once(case: str, mode: str) -> None:
            nonlocal count
            count += 1
            start = time.perf_counter()
            try:
                run_stage("extract_masks", cases[case], experiment_id=experiment_id, parent_run_id=parent.info.run_id,
                          code_version=f"bench-{count}", warm=warm if mode == "warm" else None)
            except MaskDMError:
                if case != "no work":
                    raise
            timings[case][mode].append(time.perf_counter() - start)

        for round_ in range(args.rounds):
            order = ["cold", "warm", "warm", "cold"] if round_ % 2 == 0 else ["warm", "cold", "cold", "warm"]
            for case in cases:
                for mode in order:
                    once(case, mode)
        warm.close()

    print(f"\n{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.rounds} rounds x 2 per mode; "
          f"warm server ready {server_ready_s:.1f} s after it was started (once per sweep)\n")
    print("| stage run | cold: median [quartiles] s | warm: median [quartiles] s | cold / warm |")
    print("|---|---|---|---|")
    for case, modes in timings.items():
        (cq1, cm, cq3), (wq1, wm, wq3) = quartiles(modes["cold"]), quartiles(modes["warm"])
        print(f"| {case} | {cm:.2f} [{cq1:.2f}, {cq3:.2f}] | {wm:.2f} [{wq1:.2f}, {wq3:.2f}] | {cm / wm:.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"server_ready_s": server_ready_s, "timings": timings}, indent=1))


if __name__ == "__main__":
    main()
