#!/usr/bin/env bash
# One short GPU session for the paper-scale fast paths (about 6 minutes on an H100): a smoke test
# that mask learning's replay stays exact on CUDA under bf16 + channels_last + compile with grouped
# forward passes; the paper-sweep projection, fast path against stock settings
# (benchmarks/project_paper_sweep.py); and 2:4 semi-structured kernels against dense
# (benchmarks/bench_semistructured.py); the speed stage side by side with and without them. Run from the repository root on a GPU machine with torch
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
from maskdm.ddpm.fastpath import resolve
from maskdm.method.maskpro import (MaskTrainer, ReplayBatches, ReplayedLosses, ReplaySpec, TrainConfig, compute_baseline_losses,
                            make_policy, replay_model, select_targets)
from maskdm.masks import prunable_modules, set_masks
from maskdm.ddpm.models import DDPM, default_scheduler
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

# Side by side in one process (maskdm speed, docs/details/speed.md): the ddpm-cifar10 UNet dense
# against its 2:4 magnitude-pruned copy (random init: speeds, not quality), with dense kernels and
# with semi-structured ones, batch 256, 10 DDIM steps, bf16; speed-up = dense time / model time
# (median of A B B A rounds, 95% bootstrap interval). Runs stand in for prune runs in a scratch store.
cat > /tmp/speed_side_by_side.py <<'PY'
import os, sys, tempfile, mlflow, torch
from mlflow.tracking import MlflowClient
from maskdm.ddpm.models import DDPM, build_unet, default_scheduler, save_ddpm
from maskdm.method.pruning import PruneConfig, prune
root = tempfile.mkdtemp(prefix="speed-gpu-")
mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
client = MlflowClient()
experiment = client.create_experiment("speed-gpu")
ids = []
for ratio, pattern in (("0", "unstructured"), ("0.5", "2:4")):
    torch.manual_seed(0)
    unet = build_unet("ddpm-cifar10")
    if pattern == "2:4":
        prune(unet, PruneConfig(ratio=0.5, pattern="2:4"))
    folder = save_ddpm(DDPM(unet, default_scheduler()), f"{root}/model-{ratio}")
    run = client.create_run(experiment, tags={"maskdm.stage": "prune"})
    client.log_param(run.info.run_id, "pruning_ratio", ratio)
    client.log_param(run.info.run_id, "pattern", pattern)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    ids.append(run.info.run_id)
print(f"export MLFLOW_TRACKING_URI=sqlite:///{root}/mlflow.db MLFLOW_EXPERIMENT_ID={experiment} SPEED_IDS={','.join(ids)} SPEED_PRUNED={ids[1]}")
PY
eval "$(timeout 120 python3 /tmp/speed_side_by_side.py | tail -1)"
for kernel in dense semi_structured; do
  timeout 240 python3 -m entrypoints.cli speed --model_run_ids "$SPEED_IDS" --kernel "$kernel" --batch_size 256 --ddim_steps 10 \
    --repeats 9 --warmup 2 --served false 2>&1 | tee "$OUT/speed_$kernel.txt" | grep -v "it/s" | tail -4
done
python3 - <<'PY' | tee "$OUT/speed_side_by_side.txt"
import os, mlflow
runs = mlflow.search_runs([os.environ["MLFLOW_EXPERIMENT_ID"]], "tags.`maskdm.stage` = 'speed'")
p = os.environ["SPEED_PRUNED"]
for _, r in runs.iterrows():
    print(f"kernel={r['params.kernel']} {r['params.device']} torch {r['params.version_torch']}: 2:4 model speed-up "
          f"{r[f'metrics.speedup/{p}']:.3f} [{r[f'metrics.speedup_low/{p}']:.3f}, {r[f'metrics.speedup_high/{p}']:.3f}], "
          f"{r[f'metrics.semi_structured_layers/{p}']:.0f} layers on 2:4 kernels, status {r['status']}")
PY
