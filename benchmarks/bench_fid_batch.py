"""Peak memory and speed of fid's Inception pass by batch size on the CPU: why ``batch_size=auto`` is 50 there.

Each setting runs as a fresh process computing the features of the same N random 256x256 uint8
images (what the fid stage hands Inception: it resizes them to 299x299) with ``maskdm.evaluation.fid``; its
peak RSS is read by a launcher process (``ru_maxrss``, as in bench_memory.py) and its feature pass
is timed inside it (imports and weight loading excluded). Settings alternate (A B B A) so a change
of machine load falls on both. Weights are random, planted in pytorch-fid's format: speed and memory
do not depend on their values.

    OMP_NUM_THREADS=1 python benchmarks/bench_fid_batch.py --images 400
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

WORKER = """
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from maskdm.evaluation import fid
count, dims, batch_size = map(int, sys.argv[2:5])
images = np.random.default_rng(0).integers(0, 256, (count, 256, 256, 3), dtype=np.uint8)
model = fid.load_inception(dims=dims)
start = time.perf_counter()
fid.inception_features(images, model, batch_size)
print(json.dumps({"features_s": time.perf_counter() - start}))
"""


def run_setting(images: int, dims: int, batch_size: int, folder: Path, env: dict) -> dict:
    from bench_memory import LAUNCHER

    usage = folder / f"d{dims}_b{batch_size}.rusage.json"
    command = [sys.executable, "-c", WORKER, str(REPO), str(images), str(dims), str(batch_size)]
    done = subprocess.run([sys.executable, "-c", LAUNCHER, str(usage), *command], env=env, capture_output=True, text=True)
    result = json.loads(usage.read_text())
    if done.returncode != 0 or result["exit"] != 0:
        sys.exit(f"dims={dims} batch_size={batch_size} failed:\n{done.stderr[-2000:]}")
    seconds = json.loads(done.stdout.strip().splitlines()[-1])["features_s"]
    return {"peak_rss_gib": result["maxrss_kib"] / 1024**2, "features_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--dims", default="64,2048", help="Inception feature sizes, comma-separated")
    parser.add_argument("--batch_sizes", default="50,200", help="two batch sizes, comma-separated (run A B B A)")
    args = parser.parse_args()
    small, large = (int(b) for b in args.batch_sizes.split(","))

    from inception_fixture import plant_inception_weights

    folder = Path(tempfile.mkdtemp(prefix="maskdm-fid-batch-"))
    torch_home = folder / "torch_home"
    plant_inception_weights(torch_home)
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    rows = []
    for dims in (int(d) for d in args.dims.split(",")):
        for repeat, batch_size in enumerate((small, large, large, small)):
            measured = run_setting(args.images, dims, batch_size, folder, env)
            rows.append({"dims": dims, "batch_size": batch_size, "repeat": repeat // 2, **measured})
            print(f"dims {dims:5d}  batch {batch_size:4d}  peak RSS {measured['peak_rss_gib']:5.2f} GiB  "
                  f"features {measured['features_s']:7.1f} s  ({args.images / measured['features_s']:.1f} images/s)", flush=True)
    print(json.dumps({"images": args.images, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
