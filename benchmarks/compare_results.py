"""Two sweeps' results tables, compared in everything but what differs from run to run of the same
sweep (run IDs, wall and CPU times, speed ratios, load times): which columns differ, and how.

    python benchmarks/compare_results.py <A> <B>

Each of A and B is a results.csv, or a folder whose ``mlruns`` holds driver runs (a Quickstart's
folder): then its newest results.csv. Exit status 0 when the compared columns are equal (numbers to
1e-9 relative), 1 when some differ.
"""

from __future__ import annotations

import glob
import os
import sys

import pandas as pd

#: Column suffixes and parts that differ from run to run of one sweep.
RUN_TO_RUN = ("_run_id", "_wall_s", "_cpu_s", "_images_per_s", "_speedup", "_speedup_low", "_speedup_high",
              "_speedup_text", "registered_load_text")


def newest_results(where: str) -> str:
    if where.endswith(".csv"):
        return where
    found = glob.glob(os.path.join(where, "mlruns", "*", "*", "artifacts", "results.csv"))
    if not found:
        sys.exit(f"compare_results: error: no results.csv under {where}/mlruns")
    return max(found, key=os.path.getmtime)


def main() -> int:
    a_path, b_path = (newest_results(where) for where in sys.argv[1:3])
    a, b = pd.read_csv(a_path), pd.read_csv(b_path)
    columns = [c for c in a.columns if not c.endswith(RUN_TO_RUN) and "load" not in c and "served" not in c]
    differing = []
    for column in columns:
        if column not in b.columns:
            differing.append((column, "missing in B"))
            continue
        x, y = a[column], b[column]
        if x.dtype.kind in "fi" and y.dtype.kind in "fi":
            same = (x.isna() == y.isna()).all() and ((x - y).abs().fillna(0) <= 1e-9 * (1 + x.abs().fillna(0))).all()
        else:
            same = (x.astype(str) == y.astype(str)).all()
        if not same:
            differing.append((column, f"{list(x)} vs {list(y)}"))
    print(f"A {a_path}\nB {b_path}\n{len(columns)} columns compared, {len(a)} and {len(b)} rows; differing: {len(differing)}")
    for column, how in differing:
        print(f"  {column}: {how}")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
