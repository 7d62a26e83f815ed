"""baseline_loss and train_masks as stage runs: chained by run ID, the exact replay across
processes, artifacts, lineage, and the user-error boundary."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMPipeline
from mlflow.tracking import MlflowClient

from conftest import mlflow_run, tiny_unet
from entrypoints.cli import cli
from maskdm.method.maskpro import load_logits
from maskdm.ddpm.models import DDPM, default_scheduler, save_ddpm
from maskdm.masks import load_masks, maskable_modules
from maskdm.tracking import MODEL_URI_TAG, STAGE_TAG


#: A replay small enough for a tiny UNet on a CPU: 4 batches of 8 images.
SMALL = dict(dataset_size="32", batch_size="8", seed="7")


def runs_of(stage: str) -> list:
    return mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.`{STAGE_TAG}` = '{stage}'",
        order_by=["attributes.start_time DESC"], output_format="list",
    )


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def ok(result) -> None:
    assert result.exit_code == 0, (result.output, result.stderr)


def masks_run(model_dir: Path, pattern: str, ratio: str = "0.5") -> tuple[str, str]:
    """A prune run and the extract_masks run of it (in process: these stages are tested elsewhere)."""
    ok(invoke("prune", "--model", str(model_dir), "--dataset", "shapes", "--pruning_ratio", ratio, "--pattern", pattern))
    prune_id = runs_of("prune")[0].info.run_id
    ok(invoke("extract_masks", "--prune_run_id", prune_id))
    return prune_id, runs_of("extract_masks")[0].info.run_id


def baseline_run(masks_id: str, **overrides) -> str:
    args = {**SMALL, "max_batches": "0", **overrides}
    ok(invoke("baseline_loss", "--masks_run_id", masks_id, *[x for k, v in args.items() for x in (f"--{k}", v)]))
    return runs_of("baseline_loss")[0].info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One tracking store for the module, so the upstream runs are made once (the ``tracking``
    fixture of conftest is per test)."""
    root = tmp_path_factory.mktemp("maskpro_stages")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    patch.chdir(root)
    mlflow.set_tracking_uri(uri)
    model_dir = save_ddpm(DDPM(tiny_unet(), default_scheduler()), root / "tiny_model")
    yield uri, root, model_dir
    mlflow.set_tracking_uri(None)
    patch.undo()


@pytest.fixture(scope="module")
def chain(store):
    """(prune, extract_masks, baseline_loss) run IDs for a 2:4 pruning of the tiny model."""
    _, _, model_dir = store
    prune_id, masks_id = masks_run(model_dir, "2:4")
    return prune_id, masks_id, baseline_run(masks_id)


def metric_history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def test_both_stages_through_mlflow_run_replay_exactly(store, chain):
    tracking, cwd, model_dir = store
    prune_id, masks_id, _ = chain
    done = mlflow_run("baseline_loss", tracking, cwd, masks_run_id=masks_id, **SMALL)
    assert done.returncode == 0, done.stderr[-3000:]
    baseline = runs_of("baseline_loss")[0]
    assert baseline.info.status == "FINISHED"
    bid = baseline.info.run_id
    tags, params = baseline.data.tags, baseline.data.params
    assert tags["maskdm.upstream.extract_masks"] == masks_id and tags["maskdm.upstream.prune"] == prune_id
    assert tags[MODEL_URI_TAG] == str(model_dir) and params["pattern"] == "2:4"
    losses = np.load(mlflow.artifacts.download_artifacts(run_id=bid, artifact_path="baseline_losses.npy"))
    summary = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=bid, artifact_path="baseline_summary.json")).read_text())
    assert losses.shape == (4,) and summary["count"] == 4
    assert summary["params"]["batch_size"] == 8 and summary["params"]["dataset"] == "shapes"
    assert summary["protocol"]["num_batches"] == 4 and len(summary["protocol"]["fingerprint"]) == 64
    assert baseline.data.metrics["baseline_loss_mean"] == pytest.approx(float(losses.mean()))

    # lr=0 with saturated logits: every sampled mask is the initial one, so in another process the
    # training loss must equal the baseline to the last bit on every update.
    done = mlflow_run("train_masks", tracking, cwd, baseline_run_id=bid, lr="0", logits="30", epoch="2",
                      max_step="0", accumulation="2")
    assert done.returncode == 0, done.stderr[-3000:]
    trained = runs_of("train_masks")[0]
    tid = trained.info.run_id
    assert trained.info.status == "FINISHED"
    assert metric_history(tid, "improvement") == [0.0] * 4
    assert metric_history(tid, "mask_flip_rate") == [0.0] * 4
    assert {"loss", "baseline_loss", "delta", "sparsity", "eval_loss"} <= set(trained.data.metrics)
    assert trained.data.tags["maskdm.upstream.baseline_loss"] == bid
    assert trained.data.tags["maskdm.upstream.extract_masks"] == masks_id
    assert trained.data.params["pruning_ratio"] == "0.5" and trained.data.params["dataset"] == "shapes"
    names = {a.path for a in MlflowClient().list_artifacts(tid)}
    assert {"masks.safetensors", "logits.safetensors", "model", "training_curves.png"} <= names


def test_train_masks_writes_n_m_masks_a_sparse_model_and_logits(store, chain):
    _, _, model_dir = store
    _, masks_id, bid = chain
    ok(invoke("train_masks", "--baseline_run_id", bid, "--lr", "500", "--logits", "0.5", "--epoch", "1", "--max_step", "0",
              "--accumulation", "2", "--targets", "down_blocks"))
    run = runs_of("train_masks")[0]
    tid = run.info.run_id
    initial = load_masks(mlflow.artifacts.download_artifacts(run_id=masks_id, artifact_path="masks.safetensors"))
    learned = load_masks(mlflow.artifacts.download_artifacts(run_id=tid, artifact_path="masks.safetensors"))
    assert set(learned) == set(initial)
    changed = [k for k in initial if not torch.equal(learned[k], initial[k])]
    assert changed and all(k.startswith("down_blocks.") for k in changed)
    for name, mask in learned.items():
        if mask[0].numel() % 4 == 0:
            assert (mask.reshape(-1, 4).sum(-1) == 2).all(), name

    unet = DDPMPipeline.from_pretrained(mlflow.artifacts.download_artifacts(run_id=tid, artifact_path="model")).unet
    dense = DDPMPipeline.from_pretrained(model_dir).unet
    modules, originals = maskable_modules(unet), maskable_modules(dense)
    for name, mask in learned.items():
        # The original dense weights where the learned mask keeps, exactly zero elsewhere.
        torch.testing.assert_close(modules[name].weight, originals[name].weight * mask, rtol=0, atol=0)

    logits, state, meta = load_logits(mlflow.artifacts.download_artifacts(run_id=tid, artifact_path="logits.safetensors"))
    assert state.updates == 2 and meta["pattern"] == "2:4" and meta["baseline_run_id"] == bid
    assert set(logits) == {k for k in initial if k.startswith("down_blocks.") and initial[k][0].numel() % 4 == 0}
    assert len(metric_history(tid, "loss")) == 2


def test_mask_seed_changes_the_sampled_masks_not_the_replayed_batches(chain):
    """mask_seed seeds the mask samples only: another seed samples other masks on the same replayed
    batches (same baseline losses), the same seed the same masks; the run is tagged its replicate."""
    from maskdm.tracking import REPLICATE_TAG

    _, _, bid = chain
    runs = {}
    for label, seed in (("a", "0"), ("b", "1"), ("a again", "0")):
        # lr 0 and weak logits: every update samples masks far from the initial one, the same way.
        ok(invoke("train_masks", "--baseline_run_id", bid, "--lr", "0", "--logits", "0.5", "--max_step", "2",
                  "--accumulation", "2", "--heldout_size", "0", "--mask_seed", seed))
        runs[label] = runs_of("train_masks")[0]
    histories = {label: (metric_history(r.info.run_id, "loss"), metric_history(r.info.run_id, "baseline_loss"))
                 for label, r in runs.items()}
    assert histories["a"] == histories["a again"]
    assert histories["a"][1] == histories["b"][1]  # the same replayed batches
    assert histories["a"][0] != histories["b"][0]  # other masks measured on them
    assert runs["b"].data.params["mask_seed"] == "1" and runs["b"].data.tags[REPLICATE_TAG] == "1"
    assert runs["a"].data.tags[REPLICATE_TAG] == "0"


def test_unstructured_masks_keep_the_pruning_sparsity_per_layer(store):
    _, masks_id = masks_run(store[2], "unstructured")
    bid = baseline_run(masks_id, targets="up_blocks")
    ok(invoke("train_masks", "--baseline_run_id", bid, "--lr", "500", "--logits", "0.5", "--max_step", "2", "--accumulation", "2"))
    tid = runs_of("train_masks")[0].info.run_id
    initial = load_masks(mlflow.artifacts.download_artifacts(run_id=masks_id, artifact_path="masks.safetensors"))
    learned = load_masks(mlflow.artifacts.download_artifacts(run_id=tid, artifact_path="masks.safetensors"))
    changed = [k for k in initial if not torch.equal(learned[k], initial[k])]
    assert changed and all(k.startswith("up_blocks.") for k in changed)  # targets came from the baseline run
    for name in initial:
        assert int(learned[name].sum()) == int(initial[name].sum()), name


# --- bad input: one line, non-zero exit, a FAILED run ------------------------------------------------


def assert_one_line_failure(result, stage: str, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskdm: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    run = runs_of(stage)[0]
    assert run.info.status == "FAILED"
    assert MlflowClient().list_artifacts(run.info.run_id) == []


def test_baseline_loss_refuses_a_run_of_the_wrong_stage(chain):
    prune_id, _, _ = chain
    assert_one_line_failure(invoke("baseline_loss", "--masks_run_id", prune_id), "baseline_loss", "'prune' run", "extract_masks")


def test_train_masks_refuses_a_run_of_the_wrong_stage(chain):
    _, masks_id, _ = chain
    result = invoke("train_masks", "--baseline_run_id", masks_id)
    assert_one_line_failure(result, "train_masks", "'extract_masks' run", "baseline_loss")


@pytest.mark.parametrize(
    "option, value, fragment",
    [
        ("--batch_size", "4", "batch_size=4 contradicts the baseline run's batch_size=8"),
        ("--dataset", "cifar10", "dataset=cifar10 contradicts the baseline run's dataset=shapes"),
        ("--seed", "1", "seed=1 contradicts"),
        ("--dataset_size", "64", "dataset_size=64 contradicts"),
    ],
)
def test_train_masks_refuses_values_that_contradict_the_baseline(chain, option, value, fragment):
    _, _, bid = chain
    assert_one_line_failure(invoke("train_masks", "--baseline_run_id", bid, option, value), "train_masks", fragment)


def test_train_masks_accepts_values_equal_to_the_baseline(chain):
    _, _, bid = chain
    ok(invoke("train_masks", "--baseline_run_id", bid, "--batch_size", "8", "--dataset", "shapes", "--max_step", "1",
              "--accumulation", "1"))


def test_targets_that_match_no_layer_list_the_prefixes(chain):
    _, masks_id, bid = chain
    result = invoke("baseline_loss", "--masks_run_id", masks_id, "--targets", "encoder", *sum(([f"--{k}", v] for k, v in SMALL.items()), []))
    assert_one_line_failure(result, "baseline_loss", "targets 'encoder' matches no masked layer", "all, down_blocks, mid_block, up_blocks")
    result = invoke("train_masks", "--baseline_run_id", bid, "--targets", "mid_blocks")
    assert_one_line_failure(result, "train_masks", "'mid_blocks'", "available prefixes")


def test_n_above_four_is_refused_before_any_work(store):
    _, masks_id = masks_run(store[2], "5:8", ratio="0.375")
    result = invoke("baseline_loss", "--masks_run_id", masks_id, *sum(([f"--{k}", v] for k, v in SMALL.items()), []))
    assert_one_line_failure(result, "baseline_loss", "5:8", "N <= 4")


@pytest.mark.parametrize(
    "stage, args, fragment",
    [
        ("baseline_loss", ["--batch_size", "abc"], "batch_size must be an integer"),
        ("baseline_loss", ["--dataset_size", "4", "--batch_size", "8"], "fewer than one batch"),
        ("train_masks", ["--epoch", "0", "--max_step", "0"], "both 0"),
        ("train_masks", ["--lr", "fast"], "lr must be a number"),
        ("train_masks", ["--init", "taylor"], "init must be one of constant, magnitude"),
        ("train_masks", ["--init", "magnitude", "--temperature", "0"], "temperature must be positive"),
        ("train_masks", ["--temperature", "warm"], "temperature must be a number"),
        ("train_masks", ["--samples", "0"], "samples must be an integer >= 1"),
        ("train_masks", ["--reward_baseline", "mean"], "reward_baseline must be one of delta, loo"),
        ("train_masks", ["--reward_baseline", "loo"], "needs samples >= 2"),
        ("train_masks", ["--normalize", "maybe"], "normalize must be true or false"),
        ("train_masks", ["--heldout_size", "-1"], "heldout_size must be an integer >= 0"),
        ("train_masks", ["--heldout_size", "30000"], "heldout_size=30000: only 19968 images"),
        ("train_masks", ["--eval_every", "often"], "eval_every must be an integer >= 0"),
    ],
)
def test_bad_numbers_fail_in_the_run(chain, stage, args, fragment):
    _, masks_id, bid = chain
    first = ["--masks_run_id", masks_id] if stage == "baseline_loss" else ["--baseline_run_id", bid]
    assert_one_line_failure(invoke(stage, *first, *args), stage, fragment)


def test_train_masks_options_and_heldout_metrics(chain):
    _, _, bid = chain
    ok(invoke("train_masks", "--baseline_run_id", bid, "--max_step", "3", "--accumulation", "1", "--init", "magnitude",
              "--temperature", "0.1", "--samples", "2", "--reward_baseline", "loo", "--normalize", "true", "--lr", "0.5",
              "--heldout_size", "24", "--eval_every", "2"))
    run = runs_of("train_masks")[0]
    params, metrics = run.data.params, run.data.metrics
    assert (params["init"], params["samples"], params["reward_baseline"], params["normalize"]) == ("magnitude", "2", "loo", "true")
    assert [m.step for m in sorted(MlflowClient().get_metric_history(run.info.run_id, "heldout_loss"), key=lambda m: m.step)] == [0, 2, 3]
    held = metric_history(run.info.run_id, "heldout_loss")
    assert metrics["heldout_loss_initial"] == held[0] and metrics["heldout_loss_final"] == held[-1]
    assert metrics["heldout_improvement"] == pytest.approx(held[0] - held[-1], abs=1e-12)
    assert metrics["heldout_improvement_se"] >= 0 and len(metric_history(run.info.run_id, "advantage_scale")) == 3
