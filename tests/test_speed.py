"""speed: the side-by-side measurement's arithmetic and order, the stage's params/metrics, the
report's speed and size tables, the semi-structured layer swap, and bad input."""

from __future__ import annotations

import json
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from torch import nn

from conftest import tiny_unet, tracking_store
from tests.test_report import FakeStore, build_pipeline

from maskdm import report, speed_report
from maskdm.evaluation import speed
from maskdm.errors import MaskDMError
from maskdm.ddpm.models import DDPM, default_scheduler, save_ddpm
from maskdm.method.pruning import PruneConfig, prune
from maskdm.ddpm.sparse_storage import folder_bytes

CUDA_SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


# --------------------------------------------------------------------------------------------
# The measurement


def test_interleaved_order_is_a_b_b_a():
    order = speed.interleaved_order(["a", "b", "c"], 4)
    assert order == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"], ["c", "b", "a"]]
    with pytest.raises(MaskDMError, match="repeats"):
        speed.interleaved_order(["a"], 0)


def test_measure_calls_in_order_and_excludes_warmup():
    calls: list[str] = []
    costs = {"dense": 2.0, "half": 1.0}
    fns = {label: (lambda label=label: calls.append(label) or costs[label]) for label in costs}
    # A timer that returns each call's known cost: the arithmetic, without a clock.
    times = speed.measure(fns, repeats=3, warmup=2, timer=lambda fn: fn())
    assert calls[:4] == ["dense", "half", "dense", "half"]  # warm-up: untimed
    assert calls[4:] == ["dense", "half", "half", "dense", "dense", "half"]
    assert times == {"dense": [2.0] * 3, "half": [1.0] * 3}
    timed = speed.summarize(times, "dense")
    assert timed["half"].ratio.value == pytest.approx(2.0)
    assert (timed["half"].ratio.low, timed["half"].ratio.high) == pytest.approx((2.0, 2.0))
    assert timed["dense"].ratio.value == pytest.approx(1.0)


def test_spread_and_ratio_interval():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    spread = speed.Spread.of(values)
    assert (spread.median, spread.q1, spread.q3, spread.min, spread.max, spread.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    rng = np.random.default_rng(1)
    reference = 2.0 + rng.normal(0, 0.05, 40)
    model = 1.0 + rng.normal(0, 0.05, 40)
    ratio = speed.ratio_interval(reference, model)
    assert ratio.value == pytest.approx(np.median(reference / model))
    assert ratio.low < ratio.value < ratio.high
    assert 1.8 < ratio.low and ratio.high < 2.2
    with pytest.raises(ValueError):
        speed.ratio_interval([1.0, 2.0], [1.0])


def test_sleeping_models_ratio_is_the_sleep_ratio():
    """Two stand-in models of known cost, timed by the real clock: loose, it is arithmetic, not a speed target."""
    fns = {"slow": lambda: time.sleep(0.02), "fast": lambda: time.sleep(0.01)}
    timed = speed.summarize(speed.measure(fns, repeats=5, warmup=1), "slow")
    assert 0.015 < timed["slow"].spread.median < 0.05
    assert 1.3 < timed["fast"].ratio.value < 2.7
    assert timed["fast"].ratio.low <= timed["fast"].ratio.value <= timed["fast"].ratio.high


# --------------------------------------------------------------------------------------------
# Semi-structured layers


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with the two smallest of every four consecutive input weights zeroed."""
    rows = weight.detach().reshape(weight.shape[0], -1, 4).clone()
    smallest = rows.abs().argsort(-1)[..., :2]
    rows.scatter_(-1, smallest, 0.0)
    return rows.reshape(weight.shape)


class Layers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(64, 32)        # 2:4, 32x64: qualifies
        self.dense_proj = nn.Linear(64, 32)  # not 2:4
        self.small = nn.Linear(16, 8)        # 2:4 but below the kernels' 32x64
        self.shortcut = nn.Conv2d(64, 32, 1)  # 1x1, 2:4: qualifies (as a matmul)
        self.conv = nn.Conv2d(64, 32, 3, padding=1)  # 3x3, 2:4: never (not one matmul)
        with torch.no_grad():
            for layer in (self.proj, self.small, self.shortcut, self.conv):
                layer.weight.copy_(two_four(layer.weight))

    def forward(self, x):
        y = self.shortcut(x) + self.conv(x)
        z = x.mean((2, 3))
        return y.mean((2, 3)) + self.proj(z) + self.dense_proj(z)


def test_which_layers_qualify():
    model = Layers()
    assert speed.qualifying_layers(model) == {"proj": "linear", "shortcut": "1x1 conv"}
    assert "multiples of 32x64" in speed.why_not(model.small)
    assert "not 2:4" in speed.why_not(model.dense_proj)
    assert "not one 2-D matmul" in speed.why_not(model.conv)


def test_swapped_wrappers_compute_the_dense_layers_anywhere():
    """With a dense copy standing in for the compressed weight: the reshapes (NHWC pixels x weight) are right."""
    model = Layers().eval()
    x = torch.randn(2, 64, 5, 5)
    with torch.no_grad():
        ref = model(x)
        swapped = speed.to_semi_structured(model, to_sparse=lambda w: w.clone())
        out = model(x)
    assert set(swapped) == {"proj", "shortcut"}
    assert isinstance(model.proj, speed.SemiStructuredLinear) and isinstance(model.shortcut, speed.SemiStructuredConv1x1)
    assert isinstance(model.conv, nn.Conv2d)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert speed.check_close(out, ref) < 1e-5
    with pytest.raises(MaskDMError, match="differs from dense"):
        speed.check_close(out + 1.0, ref)


def test_no_qualifying_layer_is_an_error():
    with pytest.raises(MaskDMError, match="pattern=2:4"):
        speed.to_semi_structured(nn.Sequential(nn.Linear(64, 32)), to_sparse=lambda w: w)


def test_unknown_kernel_and_dtype():
    with pytest.raises(MaskDMError, match="unknown kernel 'sparse'"):
        speed.check_kernel("sparse")
    with pytest.raises(MaskDMError, match="no float32"):
        speed.resolve_dtype("float32", "cpu", "semi_structured")
    assert speed.resolve_dtype("auto", "cpu") == torch.float32


@pytest.mark.skipif(CUDA_SM80, reason="the CPU's answer")
def test_semi_structured_on_a_cpu_says_it_needs_cuda():
    with pytest.raises(MaskDMError) as caught:
        speed.check_kernel_device("semi_structured", "cpu")
    assert "needs a CUDA GPU" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.skipif(not CUDA_SM80, reason="semi-structured sparse kernels need CUDA sm80+")
def test_semi_structured_unet_matches_dense_on_the_gpu():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, block_out_channels=(64, 128), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, attention_head_dim=None)
    prune(unet, PruneConfig(ratio=0.5, pattern="2:4"))
    dense = UNet2DModel.from_config(unet.config)
    dense.load_state_dict(unet.state_dict())
    dense.to("cuda", torch.bfloat16).eval()
    swapped = speed.prepare_kernel(unet, "semi_structured", "cuda")  # checks within the tolerance itself
    kinds = set(swapped.values())
    assert "attention projection" in kinds or "1x1 conv" in kinds
    x = torch.randn(8, 3, 16, 16, device="cuda", dtype=torch.bfloat16)
    t = torch.full((8,), 10, device="cuda")
    with torch.no_grad():
        assert speed.relative_error(unet(x, t).sample, dense(x, t).sample) <= speed.SEMI_STRUCTURED_TOLERANCE


# --------------------------------------------------------------------------------------------
# The stage


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A store with a dense prune run, a pruned one (ratio 0.5) and a finetune of it, each with a model/."""
    folder = tmp_path_factory.mktemp("speed-store")
    with tracking_store(folder) as uri, pytest.MonkeyPatch.context() as patch:
        experiment_id = mlflow.create_experiment("speed")
        patch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
        dense_dir = save_ddpm(DDPM(tiny_unet(), default_scheduler()), folder / "dense")
        unet = tiny_unet()
        prune(unet, PruneConfig(ratio=0.5))
        pruned_dir = save_ddpm(DDPM(unet, default_scheduler()), folder / "pruned")
        store = FakeStore(experiment_id)
        lineage = {"model": "tiny", "dataset": "shapes", "pruner": "magnitude", "pattern": "unstructured"}
        dense = store.make("prune", None, {**lineage, "pruning_ratio": "0"}, artifacts={"model": dense_dir})
        pruned = store.make("prune", None, {**lineage, "pruning_ratio": "0.5"}, artifacts={"model": pruned_dir})
        tuned = store.make("finetune", pruned, {"masks_run_id": "x"}, artifacts={"model": pruned_dir})
        other = store.make("pretrain", None, {}, artifacts={"model": dense_dir})
        yield dict(uri=uri, experiment_id=experiment_id, dense=dense, pruned=pruned, tuned=tuned, other=other,
                   dense_dir=dense_dir, pruned_dir=pruned_dir)


def invoke(*args: str):
    from entrypoints.cli import cli

    result = CliRunner().invoke(cli, ["speed", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def newest_speed_run(experiment_id: str):
    runs = MlflowClient().search_runs([experiment_id], "tags.`maskdm.stage` = 'speed'", order_by=["attributes.start_time DESC"])
    return runs[0]


SMALL = ("--batch_size", "2", "--ddim_steps", "1", "--repeats", "3", "--threads", "1")


def test_stage_logs_ratios_spread_sizes_and_settings(models, tmp_path):
    ids = [models[k].run_id for k in ("pruned", "dense", "tuned")]
    result = invoke("--model_run_ids", ",".join(ids), *SMALL)
    assert result.exit_code == 0, result.stderr
    run = newest_speed_run(models["experiment_id"])
    assert run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert params["dense_run_id"] == models["dense"].run_id  # dense=auto: the ratio-0 prune run
    assert params["device"] == "cpu" and params["threads_used"] == "1" and params["resolved_dtype"] == "float32"
    assert params["kernel"] == "dense" and params["version_torch"] == torch.__version__
    for rid in ids:
        for key in ("sample_s", "sample_s_q1", "sample_s_q3", "sample_s_min", "sample_s_max", "speedup", "speedup_low",
                    "speedup_high", "images_per_s", "registered_bytes", "load_s", "load_speedup", "served_s_per_image",
                    "served_speedup"):
            assert f"{key}/{rid}" in metrics, key
        assert metrics[f"sample_s_min/{rid}"] <= metrics[f"sample_s/{rid}"] <= metrics[f"sample_s_max/{rid}"]
        assert metrics[f"speedup_low/{rid}"] <= metrics[f"speedup/{rid}"] <= metrics[f"speedup_high/{rid}"]
        assert metrics[f"images_per_s/{rid}"] == pytest.approx(2 / metrics[f"sample_s/{rid}"])
    dense = models["dense"].run_id
    assert metrics[f"speedup/{dense}"] == 1.0 and metrics[f"served_speedup/{dense}"] == 1.0
    # The packed registered copy of a half-pruned model is smaller than the dense one's.
    pruned = models["pruned"].run_id
    assert metrics[f"registered_bytes/{pruned}"] < metrics[f"registered_bytes/{dense}"]
    assert metrics[f"dense_bytes/{pruned}"] == pytest.approx(folder_bytes(models["pruned_dir"]))

    saved = json.loads(open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="speed.json",
                                                                 dst_path=str(tmp_path))).read())
    order = [dense, pruned, models["tuned"].run_id]
    assert saved["order"] == [order, order[::-1], order]  # reference first, then A B B A
    assert all(len(v) == 3 for v in saved["sample_times"].values())


@pytest.mark.parametrize("args, message", [
    (("--kernel", "sparse"), "unknown kernel 'sparse'"),
    (("--repeats", "0"), "repeats must be at least 1"),
    (("--threads", "0"), "threads must be an integer >= 1 or auto, not '0'"),
    (("--model_run_ids", ""), "no model runs"),
    (("--dense", "auto", "--model_run_ids", "{pruned}"), "dense=auto: no prune run with pruning_ratio 0"),
    (("--kernel", "semi_structured", "--dense", "{other}", "--model_run_ids", "{dense}"), "has no masks"),
])
def test_bad_input_is_one_line_and_a_failed_run(models, args, message):
    args = [a.format(**{k: getattr(v, "run_id", "") for k, v in models.items()}) for a in args]
    if "--model_run_ids" not in args:
        args += ["--model_run_ids", f"{models['dense'].run_id},{models['pruned'].run_id}"]
    result = invoke(*SMALL, *args)
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("maskdm: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert newest_speed_run(models["experiment_id"]).info.status == "FAILED"


@pytest.mark.skipif(CUDA_SM80, reason="the CPU's answer")
def test_semi_structured_stage_on_a_cpu_fails_saying_it_needs_cuda(models):
    ids = f"{models['dense'].run_id},{models['pruned'].run_id}"
    result = invoke("--kernel", "semi_structured", "--model_run_ids", ids, *SMALL)
    assert result.exit_code == 1 and "needs a CUDA GPU" in result.stderr
    assert newest_speed_run(models["experiment_id"]).info.status == "FAILED"


# --------------------------------------------------------------------------------------------
# The report


def test_report_reads_the_speed_run(tmp_path):
    with tracking_store(tmp_path) as _:
        experiment_id = mlflow.create_experiment("speed-report")
        store = FakeStore(experiment_id)
        made = build_pipeline(store, ratios=(0.5,))
        dense, tuned, pruned = made["dense"].run_id, made[0.5]["finetune"].run_id, made[0.5]["prune"].run_id
        metrics = {f"speedup/{dense}": 1.0, f"speedup_low/{dense}": 1.0, f"speedup_high/{dense}": 1.0,
                   f"speedup/{tuned}": 1.01, f"speedup_low/{tuned}": 0.97, f"speedup_high/{tuned}": 1.04,
                   f"speedup/{pruned}": 0.99, f"speedup_low/{pruned}": 0.95, f"speedup_high/{pruned}": 1.02,
                   f"registered_bytes/{tuned}": 3 * 2**20, f"load_speedup/{tuned}": 0.8,
                   f"load_speedup_low/{tuned}": 0.7, f"load_speedup_high/{tuned}": 0.9}
        older = store.make("speed", None, {"kernel": "dense"}, {f"speedup/{tuned}": 9.0})
        newer = store.make("speed", None, {"kernel": "dense"}, metrics)
        table = report.build_table(report.runs_frame([experiment_id]))
        row = table[(table["pruning_ratio"] == 0.5) & (table["mask_training"] == True)].iloc[0]  # noqa: E712
        assert row["finetuned_speedup"] == pytest.approx(1.01)  # the newest run, not the older 9.0
        assert row["finetuned_speedup_text"] == "1.01 [0.97, 1.04]"
        assert row["pruned_speedup_text"] == "0.99 [0.95, 1.02]" and row["dense_speedup_text"] == "1.00 [1.00, 1.00]"
        assert row["speed_run_id"] == newer.run_id != older.run_id and row["speed_kernel"] == "dense"
        assert row["registered_bytes"] == 3 * 2**20 and row["registered_load_text"] == "0.80 [0.70, 0.90]"
        markdown = report.to_markdown(table)
        speed_table = markdown.split(speed_report.SPEED_TITLE)[1].split("##")[0]
        assert "1.01 [0.97, 1.04]" in speed_table and newer.run_id in speed_table
        assert "Sampling speed (images/s)" not in markdown
        size_table = markdown.split("## Size")[1].split("##")[0]
        assert "registered (MiB)" in size_table and "| 3.00 |" in size_table and "0.80 [0.70, 0.90]" in size_table


def test_driver_plan_ends_with_the_speed_step():
    from maskdm import driver

    plan = driver.build_plan(driver.resolve_config("demo"))
    step = plan[-1]
    models = [s.name for s in plan if s.variant and s.stage in ("prune", "train_masks", "finetune")]
    assert step.stage == "speed" and step.needs["dense"] == "prune dense"
    listed = [step.needs[f"model_run_ids[{i}]"] for i in range(len(models) - 1)]
    assert listed == [m for m in models if m != "prune dense"]
    done = {name: f"id-{name}" for name in step.needs.values()}
    params = driver.join_listed({**step.params, **{p: done[n] for p, n in step.needs.items()}})
    assert params["model_run_ids"] == ",".join(f"id-{m}" for m in listed) and params["dense"] == "id-prune dense"
    assert set(step.params) <= driver.stage_options("speed")


# --------------------------------------------------------------------------------------------
# The served model


def test_served_model_runs_with_the_kernel_it_was_promoted_with(models, tmp_path):
    from types import SimpleNamespace

    from maskdm.registry import DEFAULT_MODEL_CONFIG, DDPMImageGenerator
    from maskdm.ddpm.sparse_storage import pack_pipeline_copy

    assert DEFAULT_MODEL_CONFIG["kernel"] == "dense"  # a version registered before the option loads dense
    pipeline = tmp_path / "pipeline"
    pack_pipeline_copy(models["pruned_dir"], pipeline)
    generator = DDPMImageGenerator()
    generator.load_context(SimpleNamespace(artifacts={"pipeline": str(pipeline)}, model_config={"device": "cpu"}))
    assert generator.kernel == "dense" and generator.mixed_precision == "no"
    images = generator.predict(None, pd.DataFrame({"num_images": [2], "ddim_steps": [1]}))
    assert images.shape == (2, 16, 16, 3)
    if not CUDA_SM80:
        with pytest.raises(MaskDMError, match="needs a CUDA GPU"):
            DDPMImageGenerator().load_context(SimpleNamespace(
                artifacts={"pipeline": str(pipeline)}, model_config={"device": "cpu", "kernel": "semi_structured"}))


def test_promote_rejects_an_unknown_kernel(models):
    from entrypoints.cli import cli

    result = CliRunner().invoke(cli, ["promote", "--finetune_run_id", models["tuned"].run_id, "--kernel", "sparse"])
    assert result.exit_code == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("maskdm: error:")] == [
        "maskdm: error: unknown kernel 'sparse': choose one of dense, semi_structured"]
    runs = MlflowClient().search_runs([models["experiment_id"]], "tags.`maskdm.stage` = 'promote'")
    assert runs[0].info.status == "FAILED"
