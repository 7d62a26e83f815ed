"""pretrain, prune and extract_masks as stage runs: lineage, artifacts, and the user-error boundary."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMPipeline
from mlflow.tracking import MlflowClient

from conftest import mlflow_run
from entrypoints.cli import cli
from entrypoints.extract_masks import SOURCE_TAG
from maskdm.masks import DEFAULT_PROTECT, MASKS_FILE, load_masks, maskable_modules, masks_from_weights, save_masks
from maskdm.ddpm.models import save_ddpm
from maskdm.method.pruning import PruneConfig, prune, pruning_stats, write_stats
from maskdm.tracking import DEMO_TAG, MODEL_URI_TAG, STAGE_TAG, stage_run


def only_run(stage: str):
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{STAGE_TAG}` = '{stage}'", output_format="list")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def assert_user_error(stage: str, args: list[str], message: str) -> None:
    """The stage fails with one ``maskdm: error:`` line, exit 1, a FAILED run and no artifacts."""
    result = CliRunner().invoke(cli, [stage, *args])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskdm: error: ") and message in lines[0], result.stderr
    run = only_run(stage)
    assert run.info.status == "FAILED"
    assert MlflowClient().list_artifacts(run.info.run_id) == []


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def download(run, path: str) -> str:
    return mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path)


@pytest.fixture
def pruned(tracking, tiny_model_dir, tmp_path):
    """A prune run (ratio 0.5) and an extract_masks run, both through ``mlflow run``."""
    done = mlflow_run("prune", tracking, tmp_path, model=tiny_model_dir, dataset="shapes", pruning_ratio="0.5", preview_images="6")
    assert done.returncode == 0, done.stderr[-3000:]
    prune_run = only_run("prune")
    done = mlflow_run("extract_masks", tracking, tmp_path, prune_run_id=prune_run.info.run_id)
    assert done.returncode == 0, done.stderr[-3000:]
    return prune_run, only_run("extract_masks")


def test_prune_and_extract_masks_through_mlflow_run(pruned, tiny_model_dir, tiny_ddpm):
    prune_run, masks_run = pruned
    assert prune_run.info.status == "FINISHED" and masks_run.info.status == "FINISHED"
    params = prune_run.data.params
    assert params["pruning_ratio"] == "0.5" and params["dataset"] == "shapes" and params["pruner"] == "magnitude"
    assert prune_run.data.tags[MODEL_URI_TAG] == str(tiny_model_dir)
    assert abs(prune_run.data.metrics["sparsity"] - 0.5) < 0.01 and "eval_loss" in prune_run.data.metrics

    folder = mlflow.artifacts.download_artifacts(run_id=prune_run.info.run_id, artifact_path="model")
    pruned_unet = DDPMPipeline.from_pretrained(folder).unet
    stats = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=prune_run.info.run_id, artifact_path="pruning_stats.json")).read_text())
    original = maskable_modules(tiny_ddpm.unet)
    for name, module in maskable_modules(pruned_unet).items():
        if any(p in name for p in DEFAULT_PROTECT):
            assert torch.equal(module.weight, original[name].weight), name  # protected: bit-identical
            assert name not in stats["layers"]
    names = [a.path for a in MlflowClient().list_artifacts(prune_run.info.run_id)]
    assert {"model", "pruning_stats.json", "preview.png", "masks.safetensors"} <= set(names)
    # preview_images 6: the grid of six images (the default's 64 make another size).
    import numpy as np
    from PIL import Image

    from maskdm.ddpm.sampling import save_grid

    preview = Image.open(download(prune_run, "preview.png"))
    six, sixty_four = (Image.open(save_grid(np.zeros((n, 16, 16, 3), np.uint8), Path(folder).parent / f"grid{n}.png")) for n in (6, 64))
    assert preview.size == six.size != sixty_four.size

    # extract_masks: the masks prune recorded; on this model (no weight was zero before pruning)
    # they are exactly the pruned model's nonzero pattern. With lineage.
    recorded = load_masks(download(prune_run, "masks.safetensors"))
    masks = load_masks(mlflow.artifacts.download_artifacts(run_id=masks_run.info.run_id, artifact_path="masks.safetensors"))
    assert set(masks) == set(stats["layers"]) == set(recorded)
    assert masks_run.data.tags[SOURCE_TAG] == "recorded_mask"
    modules = maskable_modules(pruned_unet)
    for name, mask in masks.items():
        assert torch.equal(mask, recorded[name]), name
        assert torch.equal(mask, modules[name].weight != 0), name
    tags, mparams = masks_run.data.tags, masks_run.data.params
    assert tags["maskdm.upstream.prune"] == prune_run.info.run_id and tags[STAGE_TAG] == "extract_masks"
    assert tags[MODEL_URI_TAG] == str(tiny_model_dir)
    for key in ("model", "dataset", "pruning_ratio", "pruner", "pattern"):
        assert mparams[key] == params[key], key
    assert masks_run.data.metrics["mask_layers"] == len(masks)
    summary = mlflow.artifacts.download_artifacts(run_id=masks_run.info.run_id, artifact_path="extraction_summary.txt")
    assert prune_run.info.run_id in Path(summary).read_text()


def test_pretrain_through_mlflow_run_and_demo_resolution(tracking, tmp_path):
    done = mlflow_run(
        "pretrain", tracking, tmp_path, resolution="16", num_iters="4", train_batch_size="4",
        save_model_steps="2", lr_warmup_steps="0",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = only_run("pretrain")
    assert run.data.tags[DEMO_TAG] == "false"  # not the demo configuration
    assert {"loss", "eval_loss"} <= set(run.data.metrics)
    assert run.data.params["pruning_ratio"] == "0"
    client = MlflowClient()
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/checkpoint-2", "checkpoints/checkpoint-4"]
    pipeline = DDPMPipeline.from_pretrained(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model"))
    # The noise schedule is saved with the model, so every later stage trains and samples with it.
    assert run.data.params["beta_schedule"] == pipeline.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert run.data.params["lr_scheduler"] == "cosine"

    # model=demo resolves to the shipped demo model, not to a pretrain run of the store, even one
    # marked as made with the demo configuration.
    client.set_tag(run.info.run_id, DEMO_TAG, "true")
    result = invoke("prune", "--model", "demo", "--pruning_ratio", "0.3")
    assert result.exit_code == 0, result.output
    prune_run = only_run("prune")
    demo_run = client.get_run(prune_run.data.tags["maskdm.upstream.pretrain"])
    assert demo_run.info.run_id != run.info.run_id and demo_run.data.tags[DEMO_TAG] == "true"
    assert prune_run.data.tags["maskdm.model_uri"] == f"runs:/{demo_run.info.run_id}/model"
    assert prune_run.data.params["model"] == "demo" and prune_run.data.params["dataset"] == "shapes"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pruning_ratio", "-0.1"], "out of range"),
        (["--pruning_ratio", "1.0"], "out of range"),
        (["--pattern", "4:2"], "4:2"),
        (["--pattern", "2:0"], "2:0"),
        (["--pattern", "a:b"], "a:b"),
        (["--model", "/does/not/exist"], "does not exist"),
        (["--model", "google/not-a-real-model-xyz"], "cannot fetch model"),
        (["--dataset", "mnist"], "unknown dataset"),
        (["--dataset", "imagefolder:EMPTY"], "holds no"),
        (["--preview_images", "0"], "preview_images must be an integer >= 1"),
    ],
)
def test_prune_bad_input_is_one_line_and_a_failed_run(tracking, tiny_model_dir, tmp_path, args, message, capfd):
    (tmp_path / "empty").mkdir()
    args = [a.replace("EMPTY", str(tmp_path / "empty")) for a in args]
    if "--model" not in args:
        args = ["--model", str(tiny_model_dir), *args]
    if "--dataset" not in args:
        args += ["--dataset", "shapes"]
    assert_user_error("prune", args, message)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--beta_schedule", "sigmoid"], "unknown beta_schedule 'sigmoid'"),
        (["--lr_scheduler", "exponential"], "lr_scheduler must be one of"),
        (["--arch", "huge"], "unknown arch 'huge'"),
    ],
)
def test_pretrain_bad_input_is_one_line_and_a_failed_run(tracking, args, message):
    assert_user_error("pretrain", ["--num_iters", "2", *args], message)


def _fake_run(stage: str, status: str = "FINISHED") -> str:
    client = MlflowClient()
    run = client.create_run("0", tags={STAGE_TAG: stage})  # MLflow's Default experiment
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.mark.parametrize(
    "upstream, message",
    [
        (lambda: "0" * 32, "does not exist"),
        (lambda: _fake_run("prune", "RUNNING"), "is RUNNING, not FINISHED"),
        (lambda: _fake_run("prune", "FAILED"), "is FAILED, not FINISHED"),
        (lambda: _fake_run("sample"), "expected a prune run"),
        (lambda: _fake_run("prune"), "has no 'model' artifact"),
    ],
)
def test_extract_masks_upstream_checks(tracking, upstream, message):
    run_id = upstream()
    result = CliRunner().invoke(cli, ["extract_masks", "--prune_run_id", run_id])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskdm: error: ") and message in lines[0], result.stderr
    run = only_run("extract_masks")
    assert run.info.status == "FAILED" and MlflowClient().list_artifacts(run.info.run_id) == []


def test_bad_option_value_is_one_line(tracking):
    result = CliRunner().invoke(cli, ["prune", "--no_such_option", "1"])
    assert result.exit_code == 2 and result.stderr.startswith("maskdm: error: ")


# --------------------------------------------------------------------------------------------
# extract_masks uses the masks prune recorded, checked against the weights


def plant_zero_group(unet) -> str:
    """Make the first 2:4 group of the first prunable layer [0, 0, 0, 1]: magnitude 2:4 prunes the first
    two zeros (earlier first on ties) and keeps the third, a kept weight that is exactly zero."""
    name, module = next((n, m) for n, m in maskable_modules(unet).items() if not any(p in n for p in DEFAULT_PROTECT))
    with torch.no_grad():
        module.weight.view(module.weight.shape[0], -1)[0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    return name


def first_group(tensor: torch.Tensor) -> list:
    return tensor.reshape(tensor.shape[0], -1)[0, :4].tolist()


def test_a_kept_weight_that_is_exactly_zero_stays_kept(tracking, tiny_ddpm, tmp_path):
    name = plant_zero_group(tiny_ddpm.unet)
    folder = save_ddpm(tiny_ddpm, tmp_path / "planted")
    result = invoke("prune", "--model", str(folder), "--dataset", "shapes", "--pattern", "2:4", "--pruning_ratio", "0.5")
    assert result.exit_code == 0, result.output
    prune_run = only_run("prune")
    result = invoke("extract_masks", "--prune_run_id", prune_run.info.run_id)
    assert result.exit_code == 0, result.output
    masks_run = only_run("extract_masks")
    assert masks_run.info.status == "FINISHED" and masks_run.data.tags[SOURCE_TAG] == "recorded_mask"

    unet = DDPMPipeline.from_pretrained(download(prune_run, "model")).unet
    assert first_group(unet.get_submodule(name).weight.detach()) == [0.0, 0.0, 0.0, 1.0]
    masks = load_masks(download(masks_run, "masks.safetensors"))
    assert first_group(masks[name]) == [False, False, True, True]  # the zero at index 2 stays kept
    # Every group keeps exactly 2 of 4, the planted one included (the zeros would give it 1).
    stats = json.loads(Path(download(prune_run, "pruning_stats.json")).read_text())
    assert set(masks) == set(stats["layers"]) and not stats["dense_layers"]
    for layer, mask in masks.items():
        assert bool((mask.reshape(-1, 4).sum(-1) == 2).all()), layer
    assert int(masks_from_weights(unet, [name])[name].reshape(-1, 4).sum(-1).min()) == 1
    assert masks_run.data.metrics["mask_sparsity"] == 0.5
    summary = Path(download(masks_run, "extraction_summary.txt")).read_text()
    assert "source: recorded_mask" in summary
    kept_zeros = int(summary.split("kept weights that are exactly zero: ")[1].split()[0])
    assert kept_zeros >= 1


def fake_prune_run(ddpm, record=None) -> str:
    """A FINISHED prune run holding ``ddpm`` (already pruned), its stats and, when given, ``record``
    as its masks.safetensors (none: a prune run made before prune recorded its masks)."""
    result = prune(ddpm.unet, PruneConfig(ratio=0.5, pattern="2:4"))
    with stage_run("prune", {"model": "tiny-test", "dataset": "shapes", "pruning_ratio": 0.5}) as run:
        save_ddpm(ddpm, run.out / "model")
        write_stats(pruning_stats(ddpm.unet, result), run.out / "pruning_stats.json")
        if record is not None:
            save_masks(record(result.masks), run.out / MASKS_FILE)
    return run.run_id


def test_a_prune_run_without_recorded_masks_falls_back_to_the_zeros_with_a_warning(tracking, tiny_ddpm, caplog):
    name = plant_zero_group(tiny_ddpm.unet)
    run_id = fake_prune_run(tiny_ddpm)
    with caplog.at_level("WARNING", logger="entrypoints.extract_masks"):
        result = invoke("extract_masks", "--prune_run_id", run_id)
    assert result.exit_code == 0, result.output
    assert any("recorded no masks.safetensors" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    masks_run = only_run("extract_masks")
    assert masks_run.info.status == "FINISHED" and masks_run.data.tags[SOURCE_TAG] == "weight_zeros"
    masks = load_masks(download(masks_run, "masks.safetensors"))
    for layer, module in maskable_modules(tiny_ddpm.unet).items():
        if layer in masks:
            assert torch.equal(masks[layer], module.weight != 0), layer
    assert first_group(masks[name]) == [False, False, False, True]  # what the fallback cannot know


def _flip_one_kept(masks):
    """Mark one kept, nonzero weight pruned: a recorded mask the weights contradict."""
    masks = {k: v.clone() for k, v in masks.items()}
    first = next(iter(masks))
    masks[first].view(-1)[torch.nonzero(masks[first].view(-1))[-1]] = False
    return masks


@pytest.mark.parametrize(
    "record, message",
    [
        (_flip_one_kept, "contradict the model's weights: layer"),
        (lambda masks: dict(list(masks.items())[1:]), "has no mask"),
    ],
)
def test_recorded_masks_that_contradict_the_prune_run_fail_in_one_line(tracking, tiny_ddpm, record, message):
    run_id = fake_prune_run(tiny_ddpm, record)
    assert_user_error("extract_masks", ["--prune_run_id", run_id], message)
