"""Side-by-side demo-model candidates: train each at equal CPU cost, save their preview grids in one picture.

How the demo configuration (``maskdm.ddpm.training.DEMO_PRETRAIN``) was chosen: every variant trains the
``tiny`` UNet at 16x16 on ``shapes`` with the library's trainer, then draws the same 64-image,
25-step DDIM preview that ``pretrain`` logs. Two variants run at a time, one thread each (on a
2-core CPU that is twice the throughput of one two-thread run), so a pair shares the machine
equally. Results and the picture: docs/details/pretrain.md.

    python benchmarks/demo_model_variants.py --out /tmp/variants                 # all variants
    python benchmarks/demo_model_variants.py --out /tmp/variants --only E,D      # some of them
    python benchmarks/demo_model_variants.py --out /tmp/spacing --spacing <model folder>  # preview step spacing

Variant letters:
  A  shapes radius 0.15-0.3, linear noise schedule, batch 64 x 1700 steps
  B  radius 0.25-0.4,        linear,                 batch 64 x 1700
  C  radius 0.25-0.4,        cosine noise schedule,  batch 64 x 1700
  D  radius 0.25-0.4,        linear,                 batch 32 x 3000
  E  radius 0.25-0.4,        cosine,                 batch 32 x 3000   (the demo configuration)
  F  radius 0.25-0.4,        cosine,                 batch 16 x 5000
All: lr 2e-3 with 100 warm-up steps then cosine decay, EMA 0.995, seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "A": dict(radius=(0.15, 0.3), beta_schedule="linear", batch=64, steps=1700),
    "B": dict(radius=(0.25, 0.4), beta_schedule="linear", batch=64, steps=1700),
    "C": dict(radius=(0.25, 0.4), beta_schedule="squaredcos_cap_v2", batch=64, steps=1700),
    "D": dict(radius=(0.25, 0.4), beta_schedule="linear", batch=32, steps=3000),
    "E": dict(radius=(0.25, 0.4), beta_schedule="squaredcos_cap_v2", batch=32, steps=3000),
    "F": dict(radius=(0.25, 0.4), beta_schedule="squaredcos_cap_v2", batch=16, steps=5000),
}


def train_one(letter: str, out: Path) -> None:
    """Train one variant in this process (one thread) and write <letter>.png and <letter>.json."""
    import torch

    torch.set_num_threads(1)
    from entrypoints.common import save_preview
    from maskdm.ddpm.data import ArrayImageDataset, SHAPE_CLASSES, render_shapes
    from maskdm.ddpm.models import DDPM, build_unet, default_scheduler
    from maskdm.ddpm.training import TrainConfig, train_ddpm

    v = VARIANTS[letter]
    images, labels = render_shapes(20000, seed=0, resolution=16, radius=v["radius"])
    dataset = ArrayImageDataset(images, labels, train=True, classes=SHAPE_CLASSES)
    ddpm = DDPM(build_unet("tiny", 16), default_scheduler(beta_schedule=v["beta_schedule"]))
    config = TrainConfig(
        num_iters=v["steps"], train_batch_size=v["batch"], learning_rate=2e-3, lr_warmup_steps=100,
        lr_scheduler="cosine", ema_max_decay=0.995, save_model_steps=10**9, log_every=50,
    )
    last: dict = {}
    start = time.perf_counter()
    result = train_ddpm(ddpm, dataset, config, on_log=lambda metrics, step: last.update(metrics, step=step))
    train_s = time.perf_counter() - start
    save_preview(result.ddpm, out / f"{letter}.png")
    (out / f"{letter}.json").write_text(json.dumps({"variant": letter, **v, "train_s": train_s, "last_log": last}))


def side_by_side(letters: list[str], out: Path) -> Path:
    from PIL import Image, ImageDraw

    grids = [Image.open(out / f"{letter}.png").convert("RGB") for letter in letters]
    width, height = grids[0].size
    sheet = Image.new("RGB", (len(grids) * (width + 8), height + 14), "white")
    for i, (letter, grid) in enumerate(zip(letters, grids)):
        sheet.paste(grid, (i * (width + 8), 14))
        ImageDraw.Draw(sheet).text((i * (width + 8) + 2, 1), letter, fill="black")
    path = out / "variants.png"
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(path)
    return path


SPACINGS = (("uniform", 25), ("quad", 25), ("uniform", 100))


def compare_spacing(model_dir: str, out: Path) -> Path:
    """One model's 64-image preview (seed 0) with 25 uniform, 25 quad and 100 uniform DDIM steps."""
    from maskdm.ddpm.models import load_ddpm
    from maskdm.ddpm.sampling import sample_images, save_grid

    ddpm = load_ddpm(model_dir)
    letters = []
    for skip_type, steps in SPACINGS:
        start = time.perf_counter()
        images = sample_images(ddpm.unet, ddpm.scheduler.config, range(64), steps=steps, skip_type=skip_type, seed=0, batch_size=64)
        name = f"{steps}-{skip_type}"
        save_grid(images, out / f"{name}.png")
        print(f"{name}: {time.perf_counter() - start:.1f} s")
        letters.append(name)
    return side_by_side(letters, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the grids, the timings and variants.png")
    p.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variant letters")
    p.add_argument("--spacing", default=None, metavar="MODEL", help="instead: compare preview step spacings of one model folder")
    p.add_argument("--train", default=None, help=argparse.SUPPRESS)  # internal: train one variant here
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.spacing:
        print(f"side by side: {compare_spacing(args.spacing, out)}")
        return
    if args.train:
        train_one(args.train, out)
        return
    letters = [x.strip().upper() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in letters if x not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for i in range(0, len(letters), 2):  # two at a time, one thread each
        procs = [subprocess.Popen([sys.executable, __file__, "--out", str(out), "--train", x], env=env) for x in letters[i:i + 2]]
        if any(proc.wait() for proc in procs):
            sys.exit("a variant failed")
    print("| variant | radius | noise schedule | batch x steps | train s (one thread, two at a time) | last logged loss |")
    print("|---|---|---|---|---|---|")
    for letter in letters:
        r = json.loads((out / f"{letter}.json").read_text())
        print(f"| {letter} | {r['radius'][0]}-{r['radius'][1]} | {r['beta_schedule']} | {r['batch']} x {r['steps']} | "
              f"{r['train_s']:.0f} | {r['last_log'].get('loss', float('nan')):.4f} |")
    print(f"\npreview grids side by side: {side_by_side(letters, out)}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
