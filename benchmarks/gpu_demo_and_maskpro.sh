#!/usr/bin/env bash
# One short GPU session: the demo model's configuration trained on CUDA (bf16; the cosine noise and
# lr schedules), its preview grid, then MaskPro's mask-update share at the paper's batch (64 x 16).
# Run from the repository root on a GPU machine with torch and accelerate installed; diffusers (and
# its importlib_metadata) may come as wheels in .whl/. Results go to $OUT (or ./gpu-results).
set -uo pipefail
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY' 2>&1 | tee "$OUT/demo_on_cuda.txt"
import os, time, torch
from maskdm.ddpm.data import load_dataset
from maskdm.ddpm.models import DDPM, build_unet, default_scheduler
from maskdm.ddpm.sampling import sample_images, save_grid
from maskdm.ddpm.training import DEMO_PRETRAIN as DEMO, TrainConfig, train_ddpm
print("torch", torch.__version__, torch.cuda.get_device_name())
ddpm = DDPM(build_unet(DEMO["arch"], DEMO["resolution"]), default_scheduler(beta_schedule=DEMO["beta_schedule"]))
config = TrainConfig(**{k: DEMO[k] for k in TrainConfig.__dataclass_fields__ if k in DEMO})
start = time.perf_counter()
result = train_ddpm(ddpm, load_dataset(DEMO["dataset"], DEMO["resolution"], split="train"), config)
print(f"demo configuration on cuda ({config.mixed_precision}): {result.steps} steps in {time.perf_counter() - start:.1f} s, "
      f"{result.steps_per_s:.1f} steps/s, last loss {result.last_loss:.4f}")
images = sample_images(result.ddpm.unet, result.ddpm.scheduler.config, range(64), steps=25, seed=0, batch_size=64, device="cuda")
save_grid(images, os.path.join(os.environ["OUT"], "demo_preview_cuda.png"))
print("preview grid:", images.shape, images.dtype)
PY
[ "${SKIP_MASKPRO:-0}" = 1 ] || python3 benchmarks/bench_maskpro.py --device cuda --batch_size 64 --accumulation 16 --updates 5 2>&1 | tee "$OUT/maskpro_cuda.txt" | tail -40
