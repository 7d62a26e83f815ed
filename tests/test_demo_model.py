"""The shipped demo model: made by pretrain's defaults, the same weights in every store; pretrain is
reproducible bit for bit given its seed and thread count."""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import tracking_store
from entrypoints import pretrain
from entrypoints.cli import cli
from maskdm.ddpm.demo_model import DEMO_MODEL_DIR, demo_model_digest, demo_recipe
from maskdm.ddpm.models import build_unet, default_scheduler, load_ddpm
from maskdm.tracking import DEMO_DIGEST_TAG, STAGE_TAG
from maskdm.ddpm.training import DEMO_PRETRAIN

REPO = Path(__file__).resolve().parents[1]
#: A pretrain short enough for a loaded 2-core CPU, long enough that the weights move.
SHORT = ["--num_iters", "3", "--train_batch_size", "4", "--save_model_steps", "3", "--lr_warmup_steps", "0"]


def _same(recorded: str, default) -> bool:
    """A recorded param string against a default (click's typed value or MLproject's string)."""
    try:
        return float(recorded) == float(default)
    except (TypeError, ValueError):
        return str(recorded) == str(default)


def test_the_shipped_demo_model_is_the_tiny_arch_made_by_pretrains_defaults():
    ddpm = load_ddpm(str(DEMO_MODEL_DIR))
    recipe = demo_recipe()
    # pretrain's defaults, as click has them and as MLproject declares them.
    click_defaults = {("compile" if p.name == "compile_" else p.name): p.default for p in pretrain.command.params}
    mlproject = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["pretrain"]["parameters"]
    # checkpoints_total_limit came after the recipe was recorded; it decides which checkpoints the
    # store keeps, never the weights trained, so a recipe without it still names these weights.
    storage_only = {"checkpoints_total_limit"}
    assert set(recipe["params"]) | storage_only == set(click_defaults) == set(mlproject) == set(DEMO_PRETRAIN)
    for key, value in recipe["params"].items():
        assert _same(value, click_defaults[key]) and _same(value, mlproject[key]["default"]), key
    assert isinstance(recipe["torch_threads"], int) and recipe["torch_threads"] >= 1
    assert recipe["torch_version"] and recipe["code_commit"] and recipe["code_version"]

    # The architecture of those defaults: the same parameters, shapes and config as a fresh build.
    fresh = build_unet(DEMO_PRETRAIN["arch"], DEMO_PRETRAIN["resolution"])
    shipped = dict(ddpm.unet.named_parameters())
    assert {n: p.shape for n, p in fresh.named_parameters()} == {n: p.shape for n, p in shipped.items()}
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "sample_size"):
        # JSON has no tuples: a config loaded from a file holds lists where a fresh one has tuples.
        norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        assert norm(ddpm.unet.config[key]) == norm(fresh.config[key]), key
    assert ddpm.scheduler.config.beta_schedule == default_scheduler(beta_schedule=DEMO_PRETRAIN["beta_schedule"]).config.beta_schedule
    # Trained, not a fresh initialisation: every weight is finite and they moved from the seed's start.
    start = build_unet(DEMO_PRETRAIN["arch"], DEMO_PRETRAIN["resolution"], seed=DEMO_PRETRAIN["seed"])
    assert all(torch.isfinite(p).all() for p in shipped.values())
    assert any(not torch.equal(p, shipped[n]) for n, p in start.named_parameters())


def test_build_unet_with_a_seed_is_the_same_weights_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_unet("tiny", 16, seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream is untouched
    b, c = build_unet("tiny", 16, seed=0), build_unet("tiny", 16, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def _pretrain_weights(*extra: str) -> tuple[dict, dict]:
    done = CliRunner().invoke(cli, ["pretrain", *SHORT, *extra])
    assert done.exit_code == 0, done.output
    run = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], f"tags.`{STAGE_TAG}` = 'pretrain'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )[0]
    folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model")
    return load_file(str(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors")), run.data.params


def test_a_short_pretrain_is_bit_identical_for_one_seed_and_thread_count(tracking):
    # conftest runs every test at one thread; the run records it.
    first, params = _pretrain_weights()
    second, _ = _pretrain_weights()
    assert params["torch_threads"] == str(torch.get_num_threads()) == "1"
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # Where something would change: another seed gives other weights.
    other, _ = _pretrain_weights("--seed", "1")
    assert any(not torch.equal(first[k], other[k]) for k in first)


def _prune_demo_in_store(root: Path) -> tuple[str, dict, dict]:
    """Prune model=demo in a fresh store: (the pretrain run it descends from, its model/ weights, the pruned weights)."""
    root.mkdir()
    with tracking_store(root) as _:
        done = CliRunner().invoke(cli, ["prune", "--model", "demo", "--pruning_ratio", "0.3"])
        assert done.exit_code == 0, done.output
        client = MlflowClient()
        runs = client.search_runs(["0"], f"tags.`{STAGE_TAG}` = 'prune'")
        assert len(runs) == 1
        demo_run_id = runs[0].data.tags["maskdm.upstream.pretrain"]
        demo_run = client.get_run(demo_run_id)
        assert demo_run.data.tags[DEMO_DIGEST_TAG] == demo_model_digest()
        assert runs[0].data.params["model"] == "demo"

        def weights(run_id: str) -> dict:
            folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model")
            return load_file(str(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"))

        dense, pruned = weights(demo_run_id), weights(runs[0].info.run_id)
        # A second prune in the same store reuses the registered run: one demo run per store.
        done = CliRunner().invoke(cli, ["prune", "--model", "demo", "--pruning_ratio", "0.5"])
        assert done.exit_code == 0, done.output
        assert len(client.search_runs(["0"], f"tags.`{STAGE_TAG}` = 'pretrain'")) == 1
        return demo_run_id, dense, pruned


def test_model_demo_prunes_the_same_weights_in_two_stores(tmp_path):
    shipped = load_file(str(DEMO_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors"))
    run_a, dense_a, pruned_a = _prune_demo_in_store(tmp_path / "a")
    run_b, dense_b, pruned_b = _prune_demo_in_store(tmp_path / "b")
    assert run_a != run_b  # two stores, two registrations ...
    for dense in (dense_a, dense_b):  # ... of the shipped weights, bit for bit
        assert dense.keys() == shipped.keys() and all(torch.equal(dense[k], shipped[k]) for k in shipped)
    assert pruned_a.keys() == pruned_b.keys() and all(torch.equal(pruned_a[k], pruned_b[k]) for k in pruned_a)
    assert any(not torch.equal(pruned_a[k], shipped[k]) for k in shipped)  # pruning changed something
