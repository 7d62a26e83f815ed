"""Copy a finished ``pretrain`` run's model into the package as the shipped demo model, with its recipe.

The demo model is made once, by ``pretrain`` with its defaults, and shipped (maskdm/assets/); see
docs/details/pretrain.md#the-shipped-demo-model for the command that made it. Usage, in the
tracking store of that run::

    python scripts/make_demo_model.py --run_id <pretrain run> --code_commit <git commit it ran at> \
        [--check_model <the model/ folder of a second run of the same command, compared bit for bit>]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import diffusers
import mlflow
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from maskdm.ddpm.demo_model import DEMO_MODEL_DIR, DEMO_RECIPE_FILE, demo_model_digest  # noqa: E402
from maskdm.tracking import CODE_VERSION_TAG  # noqa: E402
from maskdm.ddpm.training import DEMO_PRETRAIN  # noqa: E402

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def weights_of(run_id: str, dst: Path) -> tuple[Path, dict]:
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model", dst_path=str(dst)))
    return folder, load_file(str(folder / WEIGHTS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run_id", required=True)
    ap.add_argument("--code_commit", required=True)
    ap.add_argument("--check_model", default=None)
    args = ap.parse_args()
    run = MlflowClient().get_run(args.run_id)
    params = run.data.params
    if run.info.status != "FINISHED" or any(params.get(k) != str(v) for k, v in DEMO_PRETRAIN.items()):
        sys.exit("make_demo_model: the run must be a FINISHED pretrain with pretrain's defaults")
    work = Path(DEMO_MODEL_DIR.parent / ".make_demo_model")
    shutil.rmtree(work, ignore_errors=True)
    folder, weights = weights_of(args.run_id, work / "a")
    check = None
    if args.check_model:
        again = load_file(str(Path(args.check_model) / WEIGHTS))
        identical = weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
        largest = max(float((weights[k] - again[k]).abs().max()) for k in weights)
        check = {"bit_identical": identical, "max_abs_difference": largest}
    shutil.rmtree(DEMO_MODEL_DIR, ignore_errors=True)
    shutil.copytree(folder, DEMO_MODEL_DIR)
    shutil.rmtree(work, ignore_errors=True)
    metrics = run.data.metrics
    recipe = {
        "command": f"OMP_NUM_THREADS={params['torch_threads']} maskdm pretrain",
        "params": {k: params[k] for k in DEMO_PRETRAIN},
        "torch_threads": int(params["torch_threads"]),
        "code_commit": args.code_commit,
        "code_version": run.data.tags.get(CODE_VERSION_TAG, ""),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "python_version": platform.python_version(),
        "machine": platform.machine(),
        "metrics": {k: metrics[k] for k in ("loss", "eval_loss", "train_steps_per_s") if k in metrics},
        "rerun_check": check,
        "files_digest": demo_model_digest(),
    }
    DEMO_RECIPE_FILE.write_text(json.dumps(recipe, indent=2) + "\n")
    print(json.dumps(recipe, indent=2))


if __name__ == "__main__":
    main()
