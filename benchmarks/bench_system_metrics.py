"""What MLflow's system metrics cost a stage: a fixed CPU workload with them off and on.

The workload is ``--steps`` training steps of the demo UNet (``tiny`` at 16 px, batch 64), timed
inside an MLflow run opened with ``log_system_metrics`` False (A) or True (B) at the stages'
sampling interval (:data:`maskdm.tracking.SYSTEM_METRICS_INTERVAL_S`, or ``--interval``), in the
order A B B A repeated ``--rounds`` times so that drift of a shared machine falls on both arms.
One thread (``OMP_NUM_THREADS=1``). Prints each timing and the mean of each arm, and first what
one sampling cycle of the monitor costs, timed by itself (the A/B difference is smaller than a
shared machine's noise; the cycle's cost bounds it)::

    OMP_NUM_THREADS=1 python benchmarks/bench_system_metrics.py --steps 15 --rounds 2

The tracking store is a temporary SQLite store, like a user's local one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import mlflow  # noqa: E402
import torch  # noqa: E402

from maskdm.ddpm.models import build_unet  # noqa: E402
from maskdm.tracking import SYSTEM_METRICS_INTERVAL_S  # noqa: E402


def workload(steps: int) -> float:
    """Seconds for ``steps`` forward and backward passes of the tiny UNet (fixed seed, fixed data)."""
    torch.manual_seed(0)
    unet = build_unet("tiny", 16)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x = torch.randn(64, 3, 16, 16)
    t = torch.randint(0, 1000, (64,))
    started = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(unet(x, t).sample, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def sample_cost(samples: int = 20) -> tuple[float, float]:
    """(wall ms, CPU ms) of one sampling cycle of MLflow's monitor thread, done by hand: collect
    (psutil), read the run's status (as the monitor does every sample), aggregate, log and flush."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

    with mlflow.start_run() as run:
        monitor = SystemMetricsMonitor(run.info.run_id)  # not started: its cycle is run here
        client = MlflowClient()
        wall, cpu = [], []
        for _ in range(samples):
            w, c = time.perf_counter(), time.thread_time()
            monitor.collect_metrics()
            client.get_run(run.info.run_id)
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
            wall.append(time.perf_counter() - w)
            cpu.append(time.thread_time() - c)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=2, help="A B B A rounds")
    p.add_argument("--interval", type=float, default=SYSTEM_METRICS_INTERVAL_S, help="sampling interval (s) of the on arm")
    args = p.parse_args()
    torch.set_num_threads(1)
    mlflow.set_tracking_uri(f"sqlite:///{tempfile.mkdtemp(prefix='bench-sysmetrics-')}/mlflow.db")
    mlflow.set_system_metrics_sampling_interval(args.interval)
    wall_ms, cpu_ms = sample_cost()
    print(f"one sample (collect, read the run, log): {wall_ms:.1f} ms wall, {cpu_ms:.1f} ms CPU (median of 20); "
          f"at {args.interval:g} s: {100 * cpu_ms / 1000 / args.interval:.3f} % of one core", flush=True)
    workload(5)  # warm-up: first-call allocations are not either arm's cost
    times: dict[bool, list[float]] = {False: [], True: []}
    samples = []
    for _ in range(args.rounds):
        for on in (False, True, True, False):
            with mlflow.start_run(log_system_metrics=on) as run:
                seconds = workload(args.steps)
            times[on].append(seconds)
            logged = len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "system/cpu_utilization_percentage"))
            if on:
                samples.append(logged)
            print(f"system metrics {'on ' if on else 'off'}: {seconds:.2f} s ({logged} samples logged)", flush=True)
    off, on = statistics.mean(times[False]), statistics.mean(times[True])
    print(f"off: mean {off:.2f} s  (min {min(times[False]):.2f})")
    print(f"on at {args.interval:g} s: mean {on:.2f} s  (min {min(times[True]):.2f}); {statistics.mean(samples):.1f} samples per run")
    print(f"difference: {100 * (on - off) / off:+.1f} % of the workload")


if __name__ == "__main__":
    main()
