#!/usr/bin/env bash
# One short GPU session for the paper-scale fast paths (about 6 minutes on an H100): a smoke test
# that mask learning's replay stays exact on CUDA under bf16 + channels_last + compile with grouped
# forward passes; the paper-sweep projection, fast path against stock settings
# (benchmarks/project_paper_sweep.py); and 2:4 semi-structured kernels against dense
# (benchmarks/bench_semistructured.py). Run from the repository root on a GPU machine with torch
# installed; diffusers, mlflow, pytorch-fid and their dependencies may come as wheels in .whl/.
# Results go to $OUT (or ./gpu-results); each step has its own time limit so one failure does not
# cost the others.
set -uo pipefail
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/tests" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

# The replay across two processes, as the stages run it: the baseline in one, training in the next.
cat > /tmp/smoke_replay.py <<'PY'
import os, sys, numpy as np, torch
from conftest import tiny_unet
from maskdm.fastpath import resolve
from maskdm.maskpro import (MaskTrainer, ReplayBatches, ReplayedLosses, ReplaySpec, TrainConfig, compute_baseline_losses,
                            make_policy, replay_model, select_targets)
from maskdm.masks import prunable_modules, set_masks
from maskdm.models import DDPM, default_scheduler
fast = resolve("auto", "auto", "auto", device="cuda", batch_size=64)
torch.manual_seed(0)
ddpm = DDPM(tiny_unet(), default_scheduler())
masks = {n: torch.rand(m.weight.shape) < 0.5 for n, m in prunable_modules(ddpm.unet).items()}
gen = torch.Generator().manual_seed(0)
batches = ReplayBatches(torch.utils.data.TensorDataset(torch.rand(64, 3, 16, 16, generator=gen) * 2 - 1), ReplaySpec(64, 8, 0, seed=1))
unet = ddpm.unet.cuda()
path = os.path.join(os.environ["OUT"], "smoke_baseline.npy")
if sys.argv[1] == "baseline":
    print("torch", torch.__version__, torch.cuda.get_device_name(), "| auto fast path on cuda:", fast.describe())
    np.save(path, compute_baseline_losses(unet, ddpm.scheduler, masks, batches, "cuda", progress=False, fast=fast, group=4))
else:
    baseline = np.load(path)
    model = replay_model(unet, masks, fast)
    policy = make_policy("unstructured", masks, select_targets(masks, "all"), 30.0)
    losses = ReplayedLosses(model, ddpm.scheduler, batches, "cuda", fast, 4)
    config = TrainConfig(lr=0.0, epoch=0, max_step=3, accumulation=4, seed=1)
    history = MaskTrainer(unet, masks, policy, losses, baseline, config).run(progress=False)
    print("improvement at the initial mask, baseline from another process (must be exactly 0):", [h.improvement for h in history])
    set_masks(unet, {k: ~m for k, m in masks.items()})
    print("loss with the inverted masks (must differ from the baseline):", losses.losses([0, 1, 2, 3])[:2], baseline[:2])
PY
export OUT
{ timeout 60 python3 /tmp/smoke_replay.py baseline && timeout 60 python3 /tmp/smoke_replay.py train; } 2>&1 | tee "$OUT/smoke_maskpro_fastpath.txt"

timeout 300 python3 benchmarks/project_paper_sweep.py --device cuda --steps 100 --warmup 10 --gpus 4 \
  --json "$OUT/projection.json" 2>&1 | tee "$OUT/projection.txt" | grep -v "it/s" | tail -25

timeout 60 python3 benchmarks/bench_semistructured.py --batch 256 --repeats 20 --json "$OUT/semistructured.json" 2>&1 | tee "$OUT/semistructured.txt"
