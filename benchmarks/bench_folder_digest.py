"""What identifying an image folder costs: the listing digest (paths, sizes, mtimes) against the
contents digest (every image's bytes) that keys FID reference statistics (docs/details/fid.md).

    python benchmarks/bench_folder_digest.py [folder] [count]

Writes ``count`` (default 50,000) CIFAR-size 32x32 PNGs into ``folder`` (default
/tmp/maskdm-digest-bench) once, in ten class folders, then times each digest twice.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from maskdm.ddpm.data import dataset_identity


def make_folder(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        # Blocky images with noise: PNGs of about 2 KB, as CIFAR-10's are.
        base = rng.integers(0, 240, (8, 8, 3), dtype=np.uint8)
        image = np.kron(base, np.ones((4, 4, 1), dtype=np.uint8)) + rng.integers(0, 16, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / f"c{i % 10}" / f"{i}.png")


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/maskdm-digest-bench")
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 50_000
    if not root.exists():
        make_folder(root, count)
    files = list(root.rglob("*.png"))
    print(f"{len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB in {root}")
    for name, contents in (("listing", False), ("contents", True)):
        for repeat in range(2):
            start = time.perf_counter()
            dataset_identity(f"imagefolder:{root}", contents=contents)
            print(f"{name} digest, run {repeat + 1}: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
