"""benchmarks/project_paper_sweep.py: the counts come from the paper preset and its plan, and the
table's arithmetic is projected = count / rate (speed is not tested: the run is tiny)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("project_paper_sweep", REPO / "benchmarks" / "project_paper_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_sweep_counts_come_from_the_paper_preset():
    sweep = load_script().paper_sweep()
    # 3 ratios, mask_training=both: a baseline and a mask training per ratio, two finetunes per
    # ratio, and 13 scored models (dense + 4 per ratio).
    assert sweep.runs == {"baseline_loss": 3, "train_masks": 3, "finetune": 6, "sample": 13, "fid": 13}
    assert sweep.baseline_batches == 312  # 20,000 // 64 (max_batches 313 is not reached)
    assert sweep.mask_updates == 15000  # max_step before 2,000 epochs of 312 / 16 updates
    assert (sweep.finetune_steps, sweep.sample_images, sweep.ddim_steps) == (100000, 50000, 100)
    assert len(sweep.branches) == 10 and sweep.branches["r=0.5 masked"].count("train_masks") == 1
    # The held-out scores of the final mask stay within 10 % of the forward passes (eval_every=auto).
    assert 0 < sweep.heldout_batches_per_run * 64 <= 0.1 / 0.9 * 15000 * 16 * 64


def test_projected_hours_are_count_over_rate(tmp_path):
    script = load_script()
    out = tmp_path / "projection.json"
    result = script.main([
        "--device", "cpu", "--arch", "tiny", "--resolution", "16", "--steps", "1", "--warmup", "1",
        "--train_batch", "4", "--mask_batch", "2", "--mask_accumulation", "2", "--sample_batch", "2",
        "--sample_steps", "2", "--fid_batch", "2", "--gpus", "2", "--json", str(out),
    ])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {r["stage"]: r for r in result["rows"]}
    assert list(rows) == ["baseline_loss", "train_masks", "finetune", "sample", "fid"]
    for r in rows.values():
        assert r["rate_fast"] > 0 and r["rate_stock"] > 0
        extra_fast = r["runs"] * r["extra_units_per_run"] / r["extra_rate_fast"] if r["extra_units_per_run"] else 0.0
        extra_stock = r["runs"] * r["extra_units_per_run"] / r["extra_rate_stock"] if r["extra_units_per_run"] else 0.0
        assert r["count"] == r["runs"] * r["units_per_run"]
        assert r["hours_fast"] == pytest.approx((r["count"] / r["rate_fast"] + extra_fast) / 3600)
        assert r["hours_stock"] == pytest.approx((r["count"] / r["rate_stock"] + extra_stock) / 3600)
    assert rows["sample"]["count"] == 13 * 50000 * 100
    assert rows["finetune"]["count"] == 6 * 100000
    assert rows["fid"]["count"] == pytest.approx(13 * 50000 + 50000)
    # The held-out scoring is charged at baseline_loss's rate.
    assert rows["train_masks"]["extra_rate_fast"] == rows["baseline_loss"]["rate_fast"]
    # On the CPU "auto" is the stock path: measured once, the same in both columns.
    assert all(r["fast"] in ("fp32", "fp32 (no switch)") and r["rate_fast"] == r["rate_stock"] for r in rows.values())
    total = sum(r["hours_fast"] for r in rows.values())
    assert result["total_hours_fast"] == pytest.approx(total)
    # Two devices: at least half the total and at least the longest branch, at most the total.
    assert total / 2 <= result["makespan_hours_fast"] < total


def load_semistructured():
    spec = importlib.util.spec_from_file_location("bench_semistructured", REPO / "benchmarks" / "bench_semistructured.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_semistructured_swap_keeps_the_function_and_leaves_3x3_convs(capsys):
    """The 2:4 bench's layer swap (Linear and 1x1 conv as matmuls), checked with dense weights on the CPU."""
    bench = load_semistructured()
    assert bench.main(["--arch", "tiny", "--batch", "2", "--check_swap"]) == 0
    out = capsys.readouterr().out
    assert "relative error 0.00e+00" in out and "attention projection (Linear)" in out and "1x1 conv" in out
    assert "| 3x3 conv |" in out and "cannot" in out


def test_semistructured_bench_says_it_needs_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert load_semistructured().main([]) == 0
    assert "need a CUDA GPU of compute capability 8.0 or newer" in capsys.readouterr().out
