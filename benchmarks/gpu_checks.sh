#!/usr/bin/env bash
# One short GPU session: a smoke test of masked bf16 training and sampling on CUDA, then the
# sampling and training benchmarks the issues name. Run from the repository root on a GPU machine
# with torch installed; diffusers (and its importlib_metadata) may come as wheels in .whl/.
# Results go to $OUT (or ./gpu-results).
set -uo pipefail
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY' 2>&1 | tee "$OUT/smoke.txt"
import torch, diffusers
from maskdm.ddpm.models import DDPM, build_unet, default_scheduler
from maskdm.masks import prunable_modules
from maskdm.ddpm.training import TrainConfig, train_ddpm
from maskdm.ddpm.sampling import sample_images
print("torch", torch.__version__, "diffusers", diffusers.__version__, torch.cuda.get_device_name())
ddpm = DDPM(build_unet("tiny", 32), default_scheduler())
gen = torch.Generator().manual_seed(0)
masks = {n: torch.rand(m.weight.shape, generator=gen) < 0.5 for n, m in prunable_modules(ddpm.unet).items()}
data = torch.utils.data.TensorDataset(torch.rand(256, 3, 32, 32) * 2 - 1)
res = train_ddpm(ddpm, data, TrainConfig(num_iters=20, train_batch_size=32, learning_rate=1e-3, mixed_precision="bf16"), masks=masks)
mods = prunable_modules(res.ddpm.unet)
leaks = sum(int((mods[n].weight[~m] != 0).sum()) for n, m in masks.items())
print("masked bf16 finetune on cuda: steps", res.steps, "loss", round(res.last_loss, 4), "nonzero where masked:", leaks)
a = sample_images(res.ddpm.unet, res.ddpm.scheduler.config, range(8), steps=10, seed=1, batch_size=8, device="cuda", mixed_precision="no")
b = sample_images(res.ddpm.unet, res.ddpm.scheduler.config, range(8), steps=10, seed=1, batch_size=3, device="cuda", mixed_precision="no")
print("cuda sampling, image i independent of batch size: max uint8 diff", int(abs(a.astype(int) - b.astype(int)).max()))
PY
python3 benchmarks/bench_sample.py --device cuda --arch ddpm-cifar10 --batch 256 --steps 20 --repeats 2 --json "$OUT/sample_b256.json"
python3 benchmarks/bench_train.py --device cuda --arch ddpm-cifar10 --batch 128 --mixed_precision no,bf16 --steps 20 --warmup 5 --repeats 2 --json "$OUT/train.json"
python3 benchmarks/bench_sample.py --device cuda --arch ddpm-cifar10 --batch 1024 --steps 20 --repeats 2 --compile --json "$OUT/sample_b1024_compile.json"
