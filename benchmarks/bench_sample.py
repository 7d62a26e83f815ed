"""DDIM sampling: maskdm.ddpm.sampling against stock diffusers DDIMPipeline, same model, batch and steps.

Both sides start from a random UNet of the chosen architecture (the weights do not change the
cost), produce the same number of images with the same number of UNet calls, and end with uint8
(ours) / float numpy (stock) images on the host. Stock is run as the library documents it:
fp32, NCHW, eager. Ours uses channels_last, bf16 autocast on CUDA, optionally torch.compile.
Runs are interleaved (stock, ours, stock, ours, ...) so that drift on a shared machine hits both.

    python benchmarks/bench_sample.py                                   # CPU, tiny arch
    python benchmarks/bench_sample.py --arch ddpm-cifar10 --batch 8 --steps 5
    python benchmarks/bench_sample.py --device cuda --arch ddpm-cifar10 --batch 256 --steps 20 --compile
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskdm.ddpm.models import build_unet, default_scheduler  # noqa: E402
from maskdm.ddpm.sampling import generate_uint8, make_run, prepare_unet  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="tiny", choices=["tiny", "ddpm-cifar10"])
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps; should divide 1000 so both use the same timesteps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"])
    p.add_argument("--channels-last", default="auto", choices=["auto", "yes", "no"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    return p.parse_args()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    mixed_precision = ("bf16" if on_cuda else "no") if args.mixed_precision == "auto" else args.mixed_precision
    # channels_last pays on CPUs too (oneDNN convolutions run NHWC natively): on unless told.
    channels_last = args.channels_last != "no"

    torch.manual_seed(0)
    unet = build_unet(args.arch, args.resolution).eval()
    scheduler = default_scheduler()

    stock = DDIMPipeline(unet=copy.deepcopy(unet), scheduler=scheduler).to(device)
    stock.set_progress_bar_config(disable=True)
    generator = torch.Generator(device).manual_seed(0)

    def run_stock():
        stock(batch_size=args.batch, generator=generator, num_inference_steps=args.steps, output_type="np")

    run = make_run(
        unet,
        scheduler,
        steps=args.steps,
        seed=0,
        batch_size=args.batch,
        device=device,
        mixed_precision=mixed_precision,
        channels_last=channels_last,
        compile=args.compile,
        compile_mode=args.compile_mode,
    )
    stock.scheduler.set_timesteps(args.steps)
    if stock.scheduler.timesteps.tolist() != run.schedule.timesteps:
        print("warning: --steps does not divide 1000; the two sides use different timesteps", file=sys.stderr)
    model = prepare_unet(unet, run)
    indices = range(args.batch)

    def run_ours():
        generate_uint8(model, run, indices)

    warmup_stock_s = timed(run_stock)
    warmup_ours_s = timed(run_ours)  # includes compilation with --compile
    stock_s, ours_s = [], []
    for _ in range(args.repeats):
        stock_s.append(timed(run_stock))
        ours_s.append(timed(run_ours))

    stock_rate = args.batch * args.steps / statistics.median(stock_s)
    ours_rate = args.batch * len(run.schedule.steps) / statistics.median(ours_s)
    result = {
        "device": torch.cuda.get_device_name(device) if on_cuda else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "arch": args.arch,
        "resolution": args.resolution,
        "batch": args.batch,
        "steps": args.steps,
        "mixed_precision": mixed_precision,
        "channels_last": channels_last,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "warmup_stock_s": round(warmup_stock_s, 2),
        "warmup_ours_s": round(warmup_ours_s, 2),
        "stock_s": [round(s, 4) for s in stock_s],
        "ours_s": [round(s, 4) for s in ours_s],
        "stock_image_steps_per_s": round(stock_rate, 2),
        "ours_image_steps_per_s": round(ours_rate, 2),
        "speedup": round(ours_rate / stock_rate, 3),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
