"""finetune as a stage run: end to end through ``mlflow run``, a SIGKILLed run resumed, bad input.

One tiny chain (a 16x16 UNet saved with save_pretrained -> prune 0.5 -> extract_masks) is built
in-process once for the module; every finetune is a handful of steps at batch 4.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMPipeline
from mlflow.tracking import MlflowClient

from conftest import tiny_unet, tracking_store
from entrypoints.cli import cli
from maskdm.masks import DEFAULT_PROTECT, load_masks, mask_sparsity, maskable_modules, prunable_modules, save_masks
from maskdm.ddpm.models import DDPM, build_unet, default_scheduler, save_ddpm
from maskdm.tracking import STAGE_TAG
from maskdm.ddpm.sparse_storage import load_tensors
from maskdm.ddpm.training import EMA_WEIGHTS

REPO = Path(__file__).resolve().parents[1]
#: Small enough for a loaded 2-core CPU: 4 optimizer steps of 4 images, a checkpoint every 2.
QUICK = ["--train_batch_size", "4", "--ema_max_decay", "0.9", "--mixed_precision", "no"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tracking store for the module (the chain is built once), used in-process and by child processes."""
    root = tmp_path_factory.mktemp("finetune")
    with tracking_store(root) as uri:
        yield root, uri


def child_env(tracking_uri: str) -> dict:
    # conftest has set OMP_NUM_THREADS=1 in os.environ, which children inherit.
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def newest_run(stage: str):
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.`{STAGE_TAG}` = '{stage}'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
    )
    return runs[0]


@pytest.fixture(scope="module")
def chain(store):
    """(prune run, extract_masks run, masks) for a tiny random model pruned to 0.5."""
    root, _ = store
    model_dir = save_ddpm(DDPM(tiny_unet(), default_scheduler()), root / "tiny_model")
    done = invoke("prune", "--model", str(model_dir), "--dataset", "shapes", "--pruning_ratio", "0.5")
    assert done.exit_code == 0, done.output
    prune_run = newest_run("prune")
    done = invoke("extract_masks", "--prune_run_id", prune_run.info.run_id)
    assert done.exit_code == 0, done.output
    masks_run = newest_run("extract_masks")
    masks = load_masks(mlflow.artifacts.download_artifacts(run_id=masks_run.info.run_id, artifact_path="masks.safetensors"))
    return prune_run, masks_run, masks


def model_of(run_id: str):
    return DDPMPipeline.from_pretrained(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model")).unet


def assert_zero_exactly_where_masked(unet, masks) -> None:
    """The zeros of every masked layer are exactly its mask's False entries: none kept is zero."""
    modules = maskable_modules(unet)
    assert set(masks) <= set(modules)
    for name, mask in masks.items():
        weight = modules[name].weight.detach()
        assert torch.equal(weight == 0, ~mask), (name, int((weight[~mask] != 0).sum()), int((weight[mask] == 0).sum()))


def baked_names(state: dict) -> dict:
    """Checkpoint tensors (keyed as the masked training model names them) keyed as in a saved model."""
    return {k.replace(".parametrizations.weight.original", ".weight"): v for k, v in state.items()}


def checkpoint_tensors(run_id: str, step: int, file: str) -> dict:
    """A checkpoint's tensors by their dense file name (checkpoints store them packed: maskdm.ddpm.sparse_storage)."""
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoints/checkpoint-{step}")
    return baked_names(load_tensors(Path(folder) / file))


def listed(run_id: str, path: str | None = None) -> list[str]:
    return [f.path for f in MlflowClient().list_artifacts(run_id, path)]


def metric_steps(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, key))


def test_finetune_through_mlflow_run(store, chain):
    root, uri = store
    prune_run, masks_run, masks = chain
    cmd = ["mlflow", "run", str(REPO), "-e", "finetune", "--env-manager", "local",
           "-P", f"masks_run_id={masks_run.info.run_id}", "-P", "num_iters=4", "-P", "save_model_steps=2",
           "-P", "train_batch_size=4", "-P", "ema_max_decay=0.9", "-P", "mixed_precision=no", "-P", "dropout=0.1",
           "-P", "preview_images=8"]
    done = subprocess.run(cmd, cwd=root, env=child_env(uri), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = newest_run("finetune")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"

    # model/: a pipeline, zero exactly where the masks are False, trained (kept weights moved), dropout set.
    unet = model_of(run_id)
    assert_zero_exactly_where_masked(unet, masks)
    pruned = maskable_modules(model_of(prune_run.info.run_id))
    assert any(not torch.equal(m.weight, pruned[n].weight) for n, m in maskable_modules(unet).items() if n in masks)
    assert unet.config.dropout == 0.1 and run.data.params["dropout_used"] == "0.1"
    # The logged sparsity is the saved model's share of zeros in the masked layers: the masks' own.
    assert mask_sparsity(masks) > 0.4
    assert run.data.metrics["sparsity"] == mask_sparsity(masks)

    # The saved weights are the EMA's of the last step, bit for bit, not the live model's: the last
    # checkpoint holds both (the EMA as ema.safetensors, the live model in accelerate's state).
    ema = checkpoint_tensors(run_id, 4, EMA_WEIGHTS)
    live = checkpoint_tensors(run_id, 4, "model.safetensors")
    saved = {n: p.detach() for n, p in unet.named_parameters()}
    assert set(ema) == set(saved) <= set(live)
    for name, weight in saved.items():
        assert torch.equal(weight, ema[name]), name
    differing = [n for n in saved if not torch.equal(saved[n], live[n])]
    assert len(differing) > len(saved) / 2, differing
    # ... though the live model is exactly as sparse as the masks too (masked weights never move).
    for name, mask in masks.items():
        assert torch.equal(live[f"{name}.weight"] == 0, ~mask), name

    # Checkpoints and sample grids at steps 2 and 4, each checkpoint complete; metrics as it went.
    assert listed(run_id, "checkpoints") == ["checkpoints/checkpoint-2", "checkpoints/checkpoint-4"]
    for path in listed(run_id, "checkpoints"):
        # Stored packed (kept values + 1-bit mask): maskdm.ddpm.sparse_storage.
        assert {f"{path}/ema.json", f"{path}/ema.sparse.safetensors", f"{path}/model.sparse.safetensors"} <= set(listed(run_id, path))
    assert listed(run_id, "samples") == ["samples/step-2.png", "samples/step-4.png"]
    # Grids of preview_images (8): one row of eight, where the default's 64 make eight rows.
    from PIL import Image

    from maskdm.ddpm.sampling import save_grid

    grid = Image.open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="samples/step-4.png"))
    side = unet.config.sample_size
    expected = {n: Image.open(save_grid(np.zeros((n, side, side, 3), np.uint8), root / f"grid{n}.png")).size for n in (8, 64)}
    assert grid.size == expected[8] != expected[64]
    assert {"model", "checkpoints", "samples"} <= set(listed(run_id))
    assert metric_steps(run_id, "loss") == [4] == metric_steps(run_id, "lr")  # every 10 steps and at the last
    assert "lr" in run.data.metrics and {2, 4} <= set(metric_steps(run_id, "eval_loss"))

    # Lineage: tags for every ancestor, lineage params copied, declared params logged.
    tags, params = run.data.tags, run.data.params
    assert tags[STAGE_TAG] == "finetune"
    assert tags["maskdm.upstream.extract_masks"] == masks_run.info.run_id
    assert tags["maskdm.upstream.prune"] == prune_run.info.run_id
    for key in ("model", "dataset", "pruning_ratio", "pruner", "pattern"):
        assert params[key] == prune_run.data.params[key], key
    assert params["dataset"] == "shapes" and params["pruning_ratio"] == "0.5"
    assert params["masks_run_id"] == masks_run.info.run_id and params["num_iters"] == "4"


@pytest.mark.parametrize("args, expected", [([], 0.0), (["--dropout", "0.3"], 0.3)])
def test_dropout_follows_the_model_unless_a_value_is_asked_for(store, chain, monkeypatch, args, expected):
    """The tiny model is configured without dropout: by default it trains without; 0.3 is applied."""
    from torch import nn

    import entrypoints.finetune as finetune_module

    prune_run, masks_run, _ = chain
    assert model_of(prune_run.info.run_id).config.dropout == 0.0
    seen: list[tuple[float, bool]] = []
    real = finetune_module.train_ddpm

    def recording(ddpm, *a, **kw):
        # The p of every dropout layer as each training forward pass uses it.
        dropouts = [m for m in ddpm.unet.modules() if isinstance(m, nn.Dropout)]
        assert dropouts
        hooks = [m.register_forward_pre_hook(lambda module, _: seen.append((module.p, module.training))) for m in dropouts]
        try:
            return real(ddpm, *a, **kw)
        finally:
            for hook in hooks:
                hook.remove()

    monkeypatch.setattr(finetune_module, "train_ddpm", recording)
    done = invoke("finetune", "--masks_run_id", masks_run.info.run_id, "--num_iters", "2", "--save_model_steps", "2", *QUICK, *args)
    assert done.exit_code == 0, done.output
    assert {p for p, training in seen if training} == {expected}
    run = newest_run("finetune")
    assert run.data.params["dropout"] == ("model" if not args else "0.3")
    assert float(run.data.params["dropout_used"]) == expected


def test_killed_finetune_resumes_from_its_newest_checkpoint(store, chain):
    root, uri = store
    _, masks_run, masks = chain
    masks_run_id = masks_run.info.run_id
    # Runs until killed: checkpoints every 4 steps of a 100000-step run.
    proc = subprocess.Popen(
        ["maskdm", "finetune", "--masks_run_id", masks_run_id, "--num_iters", "100000", "--save_model_steps", "4", *QUICK],
        cwd=root, env=child_env(uri),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        killed_id = wait_for_complete_checkpoint(proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert MlflowClient().get_run(killed_id).info.status == "RUNNING"  # a SIGKILL leaves no trace in the store

    done = invoke("finetune", "--masks_run_id", masks_run_id, "--num_iters", "16", "--save_model_steps", "8",
                  "--resume_run_id", killed_id, *QUICK)
    assert done.exit_code == 0, done.output
    run = newest_run("finetune")
    source, step = run.data.tags["maskdm.resumed_from"].split(":")
    step = int(step)
    assert source == killed_id and step % 4 == 0 and 4 <= step < 16
    loss_steps = metric_steps(run.info.run_id, "loss")
    assert loss_steps[0] > step and loss_steps[-1] == 16
    assert sorted(listed(run.info.run_id, "checkpoints")) == sorted(f"checkpoints/checkpoint-{s}" for s in range(step + 1, 17) if s % 8 == 0 or s == 16)
    assert_zero_exactly_where_masked(model_of(run.info.run_id), masks)


def wait_for_complete_checkpoint(proc: subprocess.Popen, timeout_s: float = 300) -> str:
    """The run ID of the running finetune once its first checkpoint artifact is complete (has ema.json)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the finetune to be killed ended by itself"
        runs = mlflow.search_runs(
            search_all_experiments=True, output_format="list",
            filter_string=f"tags.`{STAGE_TAG}` = 'finetune' and attributes.status = 'RUNNING' and params.num_iters = '100000'",
        )
        for run in runs:
            if "checkpoints/checkpoint-4/ema.json" in listed(run.info.run_id, "checkpoints/checkpoint-4"):
                return run.info.run_id
        time.sleep(0.2)
    raise AssertionError("no complete checkpoint within the timeout")


def fake_run(stage: str, params: dict | None = None, artifact: Path | None = None, tags: dict | None = None) -> str:
    """A FINISHED run of ``stage`` made directly in the store (for inputs a real chain cannot produce)."""
    client = MlflowClient()
    experiment_id = "0"  # MLflow's Default experiment (set_experiment would leak into later tests)
    run = client.create_run(experiment_id, tags={STAGE_TAG: stage, **(tags or {})})
    for key, value in (params or {}).items():
        client.log_param(run.info.run_id, key, value)
    if artifact is not None:
        client.log_artifact(run.info.run_id, str(artifact))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def foreign_masks_run(prune_run_id: str, folder: Path) -> tuple[str, str]:
    """An extract_masks run whose masks come from another architecture than its prune run's model."""
    other = build_unet("tiny", 16)
    masks = {n: torch.ones(m.weight.shape, dtype=torch.bool) for n, m in prunable_modules(other, DEFAULT_PROTECT).items()}
    ours = maskable_modules(tiny_unet())
    # A masks file lists its layers sorted by name; the check reports the first that does not fit.
    first_misfit = next(n for n in sorted(masks) if n not in ours or tuple(ours[n].weight.shape) != tuple(masks[n].shape))
    save_masks(masks, folder / "masks.safetensors")
    run_id = fake_run("extract_masks", artifact=folder / "masks.safetensors", tags={"maskdm.upstream.prune": prune_run_id})
    return run_id, first_misfit


def test_bad_input_is_one_line_and_a_failed_run(store, chain, tmp_path):
    prune_run, masks_run, _ = chain
    prune_id, masks_id = prune_run.info.run_id, masks_run.info.run_id
    misfit_id, misfit_layer = foreign_masks_run(prune_id, tmp_path)
    other_finetune = fake_run("finetune", params={"masks_run_id": "f" * 32})
    cases = [
        (["--masks_run_id", misfit_id], f"mask for layer '{misfit_layer}' does not fit the model"),
        (["--masks_run_id", prune_id], "is a 'prune' run; expected a train_masks or extract_masks run"),
        (["--masks_run_id", masks_id, "--resume_run_id", prune_id], "is a 'prune' run; expected a finetune run"),
        (["--masks_run_id", masks_id, "--resume_run_id", other_finetune], f"finetuned masks run {'f' * 32}, not {masks_id}"),
        (["--masks_run_id", masks_id, "--num_iters", "0"], "num_iters must be at least 1"),
        (["--masks_run_id", masks_id, "--dropout", "1.5"], "dropout must be in [0, 1)"),
        (["--masks_run_id", masks_id, "--dropout", "half"], "dropout must be 'model' or a probability"),
        (["--masks_run_id", masks_id, "--preview_images", "0"], "preview_images must be an integer >= 1"),
    ]
    for args, message in cases:
        result = invoke("finetune", *args, *QUICK)
        assert result.exit_code == 1, (args, result.output)
        # MLflow's download progress bars may come first; the error itself is one line, and the last.
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert len(errors) == 1 and errors[0].startswith("maskdm: error: ") and message in errors[0], (args, result.stderr)
        assert result.stderr.strip().splitlines()[-1] == errors[0]
        run = newest_run("finetune")
        assert run.info.status == "FAILED" and listed(run.info.run_id) == [], args
