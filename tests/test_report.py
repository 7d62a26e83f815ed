"""The report: its table from the tracking store, the files, the UI tag rule and the entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import tracking_store
from maskdm import report
from maskdm.errors import MaskDMError
from maskdm.tracking import STAGE_TAG, UPSTREAM_TAG_PREFIX

REPO = Path(__file__).resolve().parents[1]
RATIOS = (0.3, 0.5)
T0_MS = 1_700_000_000_000


# --------------------------------------------------------------------------------------------
# A fake pipeline in a tracking store: runs shaped like the stages' (tags, lineage, metrics)


@dataclass
class Made:
    run_id: str
    stage: str
    lineage: dict  # {stage: run_id} of this run and its ancestors
    params: dict
    metrics: dict
    wall_s: float


@dataclass
class FakeStore:
    """Creates stage runs with the contract's tags and lineage, at increasing start times."""

    experiment_id: str
    parent_run_id: str | None = None
    clock_ms: int = T0_MS
    runs: list = field(default_factory=list)

    def make(self, stage, up: Made | None = None, params=None, metrics=None, wall_s=10.0, status="FINISHED",
             parent=True, artifacts: dict | None = None, tags: dict | None = None) -> Made:
        client = MlflowClient()
        lineage_params = {k: v for k, v in (up.params if up else {}).items()
                          if k in ("model", "dataset", "pruning_ratio", "pruner", "pattern")}
        params = {**lineage_params, **(params or {})}
        tags = {STAGE_TAG: stage, **(tags or {})}
        tags.update({f"{UPSTREAM_TAG_PREFIX}{s}": rid for s, rid in (up.lineage if up else {}).items()})
        if parent and self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        self.clock_ms += 60_000
        run = client.create_run(self.experiment_id, start_time=self.clock_ms, tags=tags)
        run_id = run.info.run_id
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), self.clock_ms, 0) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)) for k, v in params.items()],
        )
        for artifact_path, local in (artifacts or {}).items():
            client.log_artifacts(run_id, str(local), artifact_path)
        client.set_terminated(run_id, status, end_time=self.clock_ms + int(wall_s * 1000))
        made = Made(run_id, stage, {**(up.lineage if up else {}), stage: run_id}, params, dict(metrics or {}), wall_s)
        self.runs.append(made)
        return made

    def score(self, model: Made, fid: float | None, images_per_s: float, extra: dict | None = None,
              samples: int = 16) -> tuple[Made, Made]:
        """A sample run of ``model`` and fid runs of it, as the fid stage makes them: one FID metric per
        fid run, tagged with its protocol. ``extra`` FIDs (``fid_shapes``) get fid runs of their own,
        made first; other ``extra`` metrics go on the ``fid`` run, which is returned."""
        sample = self.make("sample", model, {"model_run_id": model.run_id, "ddim_steps": "10"},
                           {"images_per_s": images_per_s}, wall_s=3.0)
        extra = dict(extra or {})
        for name in [k for k in extra if report.is_fid_metric(k)]:
            self.fid(sample, name, extra.pop(name), samples=samples)
        metrics = {**({"fid": fid} if fid is not None else {}), **extra}
        fid_run = self.make("fid", sample, {"sample_run_id": sample.run_id}, metrics, wall_s=2.0,
                            tags=fake_protocol("fid", samples=samples).tags())
        return sample, fid_run

    def fid(self, sample: Made, metric: str, value: float, protocol: report.FidProtocol | None | str = "default",
            samples: int = 16, status: str = "FINISHED") -> Made:
        """One fid run of ``sample`` logging ``metric``; ``protocol=None`` makes one that records none."""
        if protocol == "default":
            protocol = fake_protocol(metric, samples=samples)
        return self.make("fid", sample, {"sample_run_id": sample.run_id}, {metric: value}, wall_s=2.0, status=status,
                         tags=protocol.tags() if protocol else None)


def fake_protocol(metric: str = "fid", samples: int = 16, steps: int = 10, seed: int = 42) -> report.FidProtocol:
    """A protocol as the fid stage records it, for a metric: fid (Inception 2048), fid_inception_<dims>, fid_<name>."""
    if metric == "fid" or metric.startswith("fid_inception_"):
        features, dims = "inception", int(metric.rpartition("_")[2]) if metric != "fid" else 2048
    else:
        features, dims = metric[len("fid_"):], 64
    assert report.fid_metric_name(features, dims) == metric
    return report.FidProtocol.of(features=features, dims=dims, samples=samples, reference="shapes:train",
                                 resolution=16, weights="0123456789abcdef", sampler="ddim", steps=steps,
                                 skip="uniform", eta=0, clip="true", seed=seed)


def fid_of(stage: str, ratio: float, mask_training: bool = True) -> float:
    """Distinct, structured FIDs: the pipeline improves on pruning, mask training more so."""
    return {"dense": 10.0, "pruned": 10 + 100 * ratio, "masked": 10 + 50 * ratio,
            "finetuned": 10 + (20 if mask_training else 30) * ratio}[stage]


def build_pipeline(store: FakeStore, model_dir: Path | None = None, ratios=RATIOS, model="tiny-test") -> dict:
    """Dense reference plus, per ratio, prune -> extract -> baseline -> train_masks -> finetune (and a
    finetune straight from the extracted masks), each model stage sampled and scored."""
    artifacts = {"model": model_dir} if model_dir else None
    lineage = {"model": model, "dataset": "shapes", "pruner": "magnitude", "pattern": "unstructured"}
    made = {}
    dense = store.make("prune", None, {**lineage, "pruning_ratio": "0"},
                       {"sparsity": 0.0, "params_total": 1000, "params_nonzero": 1000, "compression_ratio": 1.0,
                        "compact_checkpoint_bytes": 9000, "dense_checkpoint_bytes": 8000, "eval_loss": 0.10})
    made["dense"] = dense
    made["dense_scores"] = store.score(dense, fid_of("dense", 0), 500.0)
    for i, ratio in enumerate(ratios):
        nonzero = int(1000 * (1 - ratio))
        prune = store.make("prune", None, {**lineage, "pruning_ratio": str(ratio)},
                           {"sparsity": ratio, "params_total": 1000, "params_nonzero": nonzero,
                            "compression_ratio": 1000 / nonzero, "compact_checkpoint_bytes": 4000 + i,
                            "dense_checkpoint_bytes": 8000, "eval_loss": 0.2 + ratio}, wall_s=11.0 + i)
        extract = store.make("extract_masks", prune, {"prune_run_id": prune.run_id}, {"mask_sparsity": ratio}, wall_s=1.0)
        baseline = store.make("baseline_loss", extract, {"masks_run_id": extract.run_id}, {}, wall_s=5.0)
        train = store.make("train_masks", baseline, {"baseline_run_id": baseline.run_id},
                           {"sparsity": ratio, "eval_loss": 0.15 + ratio}, wall_s=50.0 + i)
        finetune = store.make("finetune", train, {"masks_run_id": train.run_id},
                              {"sparsity": ratio, "eval_loss": 0.11 + ratio, "loss": 0.1}, wall_s=100.0 + i,
                              artifacts=artifacts)
        finetune_nomt = store.make("finetune", extract, {"masks_run_id": extract.run_id},
                                   {"sparsity": ratio, "eval_loss": 0.12 + ratio, "loss": 0.1}, wall_s=90.0 + i,
                                   artifacts=artifacts)
        made[ratio] = dict(prune=prune, extract=extract, baseline=baseline, train=train, finetune=finetune,
                           finetune_nomt=finetune_nomt)
        made[ratio]["pruned_scores"] = store.score(prune, fid_of("pruned", ratio), 400.0 + i)
        made[ratio]["masked_scores"] = store.score(train, fid_of("masked", ratio), 410.0 + i)
        made[ratio]["finetuned_scores"] = store.score(
            finetune, fid_of("finetuned", ratio), 420.0 + i, {"fid_shapes": 1 + ratio, "fid_wall_s": 7.0}
        )
        made[ratio]["finetuned_nomt_scores"] = store.score(finetune_nomt, fid_of("finetuned", ratio, False), 430.0 + i)
    return made


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    """One SQLite store for the module: creating one costs seconds; each test uses its own experiment."""
    with tracking_store(tmp_path_factory.mktemp("report-store")) as uri:
        yield uri


@pytest.fixture(scope="module")
def pipeline(store_uri):
    experiment_id = mlflow.create_experiment("pipeline")
    store = FakeStore(experiment_id)
    made = build_pipeline(store)
    # Noise the report must ignore: a FAILED fid run with a better FID, and a RUNNING finetune.
    store.fid(made[0.3]["finetuned_scores"][0], "fid", 0.001, status="FAILED")
    store.make("finetune", made[0.5]["train"], {}, {"eval_loss": 0.0}, status="RUNNING")
    return experiment_id, made


def row_of(table: pd.DataFrame, ratio: float, mask_training: bool) -> pd.Series:
    rows = table[(table["pruning_ratio"] == ratio) & (table["mask_training"] == mask_training)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


# --------------------------------------------------------------------------------------------
# The table


def test_table_rows_columns_values_and_run_ids(pipeline):
    experiment_id, made = pipeline
    table = report.build_table(report.runs_frame([experiment_id]))

    assert list(table.columns) == report.table_columns(["fid", "fid_shapes"])
    # Each FID column names its one protocol.
    assert set(table["protocol_fid"]) == {fake_protocol("fid").key}
    assert set(table["protocol_fid_shapes"]) == {fake_protocol("fid_shapes").key}
    assert len(table) == 2 * len(RATIOS)
    assert sorted(zip(table["pruning_ratio"], table["mask_training"])) == sorted(
        (r, mt) for r in RATIOS for mt in (True, False))
    assert set(table["model"]) == {"tiny-test"} and set(table["pruner"]) == {"magnitude"}

    for ratio in RATIOS:
        runs = made[ratio]
        for mask_training in (True, False):
            row = row_of(table, ratio, mask_training)
            finetune = runs["finetune"] if mask_training else runs["finetune_nomt"]
            scores = runs["finetuned_scores"] if mask_training else runs["finetuned_nomt_scores"]
            assert row["sparsity"] == pytest.approx(ratio)
            assert row["params_nonzero"] == runs["prune"].metrics["params_nonzero"]
            assert row["compression_ratio"] == pytest.approx(runs["prune"].metrics["compression_ratio"])
            assert row["compact_checkpoint_bytes"] == runs["prune"].metrics["compact_checkpoint_bytes"]
            assert row["dense_fid"] == pytest.approx(fid_of("dense", 0))
            assert row["pruned_fid"] == pytest.approx(fid_of("pruned", ratio))
            assert row["finetuned_fid"] == pytest.approx(fid_of("finetuned", ratio, mask_training))
            assert row["finetuned_eval_loss"] == pytest.approx(finetune.metrics["eval_loss"])
            assert row["pruned_eval_loss"] == pytest.approx(runs["prune"].metrics["eval_loss"])
            assert row["dense_eval_loss"] == pytest.approx(made["dense"].metrics["eval_loss"])
            assert row["finetuned_images_per_s"] == pytest.approx(scores[0].metrics["images_per_s"])
            assert row["finetune_wall_s"] == pytest.approx(finetune.wall_s)
            assert row["prune_wall_s"] == pytest.approx(runs["prune"].wall_s)
            assert row["finetuned_sample_wall_s"] == pytest.approx(scores[0].wall_s)
            assert row["finetune_run_id"] == finetune.run_id
            assert row["prune_run_id"] == runs["prune"].run_id
            assert row["extract_masks_run_id"] == runs["extract"].run_id
            assert row["dense_run_id"] == made["dense"].run_id
            assert row["finetuned_fid_run_id"] == scores[1].run_id
            assert row["finetuned_sample_run_id"] == scores[0].run_id
            if mask_training:
                assert row["masked_fid"] == pytest.approx(fid_of("masked", ratio))
                assert row["train_masks_run_id"] == runs["train"].run_id
                assert row["baseline_loss_wall_s"] == pytest.approx(runs["baseline"].wall_s)
                assert row["finetuned_fid_shapes"] == pytest.approx(1 + ratio)
            else:
                # Finetuning straight from the extracted masks: there is no mask-trained model.
                assert pd.isna(row["masked_fid"]) and pd.isna(row["train_masks_run_id"])
                assert pd.isna(row["baseline_loss_run_id"])


def test_newest_finished_fid_wins_and_timings_are_not_fids(store_uri):
    store = FakeStore(mlflow.create_experiment("rescored"))
    made = build_pipeline(store, ratios=(0.5,))
    sample = made[0.5]["finetuned_scores"][0]
    newer = store.fid(sample, "fid", 3.25)
    table = report.build_table(report.runs_frame([store.experiment_id]))
    row = row_of(table, 0.5, True)
    assert row["finetuned_fid"] == pytest.approx(3.25)
    assert row["finetuned_fid_run_id"] == newer.run_id
    # fid_shapes lives only on the older run: each FID metric comes from its own newest run.
    assert row["finetuned_fid_shapes"] == pytest.approx(1.5)
    assert "finetuned_fid_wall" not in table.columns and "finetuned_fid_wall_s" in table.columns


def test_fids_of_two_protocols_are_kept_apart(store_uri):
    """A metric scored under two protocols: the main protocol keeps the metric's column, the other
    gets its own, and a fid run that records no protocol is never mixed with either."""
    store = FakeStore(mlflow.create_experiment("two-protocols"))
    made = build_pipeline(store, ratios=(0.3, 0.5))
    # Newer fid runs of other protocols: more samples for two finetuned models, and one with no protocol.
    big = fake_protocol("fid", samples=64)
    rescored = {r: store.fid(made[r]["finetuned_scores"][0], "fid", 1.0 + r, protocol=big) for r in (0.3, 0.5)}
    legacy = store.fid(made[0.5]["pruned_scores"][0], "fid", 0.5, protocol=None)
    table = report.build_table(report.runs_frame([store.experiment_id]))

    main, other = fake_protocol("fid"), big
    # The main protocol scores 10 model runs, the other 2: the main one keeps the name `fid`.
    assert report.table_fid_names(table) == ["fid", f"fid@{other.id}", f"fid@{report.UNRECORDED}", "fid_shapes"]
    assert set(table["protocol_fid"]) == {main.key} and set(table[f"protocol_fid@{other.id}"]) == {other.key}
    for ratio in (0.3, 0.5):
        row = row_of(table, ratio, True)
        # Though newer, the 64-sample FID does not replace the 16-sample one: it has its own column.
        assert row["finetuned_fid"] == pytest.approx(fid_of("finetuned", ratio))
        assert row[f"finetuned_fid@{other.id}"] == pytest.approx(1.0 + ratio)
        assert row["finetuned_fid_run_id"] == made[ratio]["finetuned_scores"][1].run_id != rescored[ratio].run_id
        assert pd.isna(row_of(table, ratio, False)[f"finetuned_fid@{other.id}"])
        assert pd.isna(row[f"dense_fid@{other.id}"])
    assert row_of(table, 0.5, True)["pruned_fid"] == pytest.approx(fid_of("pruned", 0.5))
    assert row_of(table, 0.5, True)[f"pruned_fid@{report.UNRECORDED}"] == pytest.approx(0.5)
    assert legacy.run_id not in set(table["pruned_fid_run_id"])

    markdown = report.to_markdown(table)
    main_section = markdown.split("## FID (Inception pool3, `fid`)")[1].split("\n## ")[0]
    assert main.key in main_section and f"`fid@{other.id}`" in main_section
    other_section = markdown.split(f"## FID (`fid@{other.id}`)")[1].split("\n## ")[0]
    assert other.key in other_section and f"{1.3:.4g}" in other_section
    assert "not recorded" in markdown.split(f"## FID (`fid@{report.UNRECORDED}`)")[1].split("\n## ")[0]
    # The plot and the UI series chart the main protocol only.
    assert report.chart_metric(table) == "fid"
    assert report.ui_series(table)["fid_by_ratio/finetuned"][50] == pytest.approx(fid_of("finetuned", 0.5))


def test_fid_metric_names_and_protocol_round_trip():
    assert report.fid_metric_name("inception", 2048) == "fid"
    assert report.fid_metric_name("inception", "64") == "fid_inception_64"
    assert report.fid_metric_name("shapes", 64) == "fid_shapes"
    assert report.is_fid_metric("fid_inception_64") and report.is_fid_metric("fid_shapes")
    assert not report.is_fid_metric("fid_wall_s") and not report.is_fid_metric("fid.protocol")
    assert not report.is_fid_metric("fid_run_id") and not report.is_fid_metric("fidelity")

    protocol = fake_protocol("fid_inception_64", samples=100)
    assert protocol.metric == "fid_inception_64"
    assert report.FidProtocol.parse(protocol.key) == protocol
    assert report.FidProtocol.from_tags(protocol.tags()) == protocol
    tags = protocol.tags()
    assert tags[report.FID_PROTOCOL_ID_TAG] == protocol.id and len(protocol.id) == 10
    assert {k[len(report.FID_PROTOCOL_PART_PREFIX):] for k in tags if k.startswith(report.FID_PROTOCOL_PART_PREFIX)} == set(
        report.PROTOCOL_PARTS)
    other = fake_protocol("fid_inception_64", samples=200, seed=1)
    assert other.id != protocol.id
    assert protocol.differences(other) == [("samples", "100", "200"), ("seed", "42", "1")]
    assert [d[0] for d in protocol.differences(None)] == list(report.PROTOCOL_PARTS)
    assert report.FidProtocol.parse("features=inception;dims=2048") is None  # parts missing
    with pytest.raises(ValueError):
        report.FidProtocol.of(features="inception")


def test_partial_pipeline_and_dense_only(store_uri):
    store = FakeStore(mlflow.create_experiment("partial"))
    lineage = {"model": "m", "dataset": "shapes", "pruner": "random", "pattern": "2:4"}
    prune = store.make("prune", None, {**lineage, "pruning_ratio": "0.5"}, {"sparsity": 0.5, "eval_loss": 1.0})
    store.score(prune, 42.0, 100.0)
    table = report.build_table(report.runs_frame([store.experiment_id]))
    assert len(table) == 1
    assert table.iloc[0]["pruned_fid"] == pytest.approx(42.0)
    assert pd.isna(table.iloc[0]["mask_training"]) and pd.isna(table.iloc[0]["dense_fid"])

    dense_only = FakeStore(mlflow.create_experiment("dense-only"))
    dense = dense_only.make("prune", None, {**lineage, "pruning_ratio": "0"}, {"sparsity": 0.0, "eval_loss": 0.5})
    dense_only.score(dense, 7.0, 100.0)
    table = report.build_table(report.runs_frame([dense_only.experiment_id]))
    assert len(table) == 1 and table.iloc[0]["dense_fid"] == pytest.approx(7.0)
    assert table.iloc[0]["sparsity"] == 0.0 and table.iloc[0]["dense_run_id"] == dense.run_id

    empty = report.build_table(report.runs_frame([mlflow.create_experiment("empty")]))
    assert empty.empty and list(empty.columns) == report.table_columns()
    assert "No FINISHED" in report.to_markdown(empty)


def test_driver_run_reports_children_reused_runs_and_ancestors(store_uri):
    experiment_id = mlflow.create_experiment("driver")
    client = MlflowClient()
    driver = client.create_run(experiment_id, tags={STAGE_TAG: "main"}).info.run_id
    store = FakeStore(experiment_id, parent_run_id=driver)
    made = build_pipeline(store, ratios=(0.3,))
    # A 0.7 chain made outside the driver: its finetune run is a child, its other stage runs are
    # found through that child's lineage tags, and its sample/fid runs through maskdm.used_by.<driver>.
    old_store = FakeStore(experiment_id)
    old = build_pipeline(old_store, ratios=(0.7,))
    client.set_tag(old[0.7]["finetune"].run_id, "mlflow.parentRunId", driver)
    for reused in old[0.7]["finetuned_scores"]:
        client.set_tag(reused.run_id, f"{report.USED_BY_TAG_PREFIX}{driver}", "true")
    # Runs of the same experiment the driver did not use are not reported.
    FakeStore(experiment_id).make("prune", None, {"model": "tiny-test", "pruning_ratio": "0.9"}, {"sparsity": 0.9})

    table = report.build_table(report.runs_frame(parent_run_id=driver))
    assert sorted(set(table["pruning_ratio"])) == [0.3, 0.7]
    row = row_of(table, 0.7, True)
    assert row["prune_run_id"] == old[0.7]["prune"].run_id
    assert row["sparsity"] == pytest.approx(0.7)  # the ancestor prune run came along
    assert row["finetuned_fid"] == pytest.approx(fid_of("finetuned", 0.7))
    assert row["dense_run_id"] == made["dense"].run_id

    with pytest.raises(MaskDMError, match="does not exist"):
        report.runs_frame(parent_run_id="0" * 32)


def test_model_stage_of():
    up = UPSTREAM_TAG_PREFIX
    sample_of_finetune = {STAGE_TAG: "sample", f"{up}prune": "a", f"{up}train_masks": "b", f"{up}finetune": "c"}
    assert report.model_stage_of(sample_of_finetune, {"pruning_ratio": "0.5"}) == "finetuned"
    assert report.model_stage_of({STAGE_TAG: "fid", f"{up}prune": "a", f"{up}train_masks": "b", f"{up}sample": "s"},
                                 {"pruning_ratio": "0.5"}) == "masked"
    assert report.model_stage_of({STAGE_TAG: "fid", f"{up}prune": "a"}, {"pruning_ratio": "0.50"}) == "pruned"
    assert report.model_stage_of({STAGE_TAG: "fid", f"{up}prune": "a"}, {"pruning_ratio": "0.0"}) == "dense"
    assert report.model_stage_of({STAGE_TAG: "prune"}, {"pruning_ratio": "0"}) == "dense"
    assert report.model_stage_of({STAGE_TAG: "sample", f"{up}pretrain": "p"}, {}) == "dense"
    assert report.model_stage_of({}, {}) is None


# --------------------------------------------------------------------------------------------
# Files and the UI series


def test_write_report_files(pipeline, tmp_path):
    experiment_id, made = pipeline
    runs = report.runs_frame([experiment_id])
    files = report.write_report(runs, tmp_path / "out", title="T")
    assert [p.name for p in files] == list(report.REPORT_FILES)

    csv = pd.read_csv(files.csv)
    table = report.build_table(runs)
    assert list(csv.columns) == list(table.columns) and len(csv) == len(table)
    assert set(csv["finetune_run_id"]) == {made[r][k].run_id for r in RATIOS for k in ("finetune", "finetune_nomt")}

    markdown = files.markdown.read_text()
    assert markdown.startswith("# T")
    assert "## FID (Inception pool3, `fid`)" in markdown and "## FID (`fid_shapes`)" in markdown
    assert made[0.5]["finetune"].run_id in markdown and made["dense"].run_id in markdown
    assert "model: `tiny-test`" in markdown
    fid_table = markdown.split("## FID (Inception pool3, `fid`)")[1].split("##")[0]
    # Each FID table names the protocol of its column.
    assert f"Protocol `{fake_protocol('fid').id}`: `{fake_protocol('fid').key}`" in fid_table
    shapes_table = markdown.split("## FID (`fid_shapes`)")[1].split("##")[0]
    assert fake_protocol("fid_shapes").key in shapes_table and fake_protocol("fid").key not in shapes_table
    assert f"{fid_of('finetuned', 0.5):.4g}" in fid_table and f"{fid_of('masked', 0.3):.4g}" in fid_table

    with Image.open(files.plot) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_fid_curves_and_ui_series(pipeline):
    experiment_id, made = pipeline
    table = report.build_table(report.runs_frame([experiment_id]))
    curves = report.fid_curves(table)
    assert set(curves) == {"dense", "pruned", "masked", "finetuned", "finetuned (no mask training)"}
    assert [p.pruning_ratio for p in curves["finetuned"]] == list(RATIOS)
    assert [p.fid for p in curves["pruned"]] == [pytest.approx(fid_of("pruned", r)) for r in RATIOS]
    assert len(curves["dense"]) == 1 and curves["dense"][0].sparsity == 0.0

    series = report.ui_series(table)
    assert series["fid_by_ratio/finetuned"] == {30: pytest.approx(fid_of("finetuned", 0.3)),
                                                50: pytest.approx(fid_of("finetuned", 0.5))}
    assert "fid_by_ratio/finetuned_no_mask_training" in series


def test_fid_curves_split_by_pruner_and_pattern(pipeline):
    experiment_id, _ = pipeline
    table = report.build_table(report.runs_frame([experiment_id]))
    other = table.copy()
    other["pattern"] = "2:4"
    for column in ("prune_run_id", "train_masks_run_id", "finetune_run_id"):
        other[column] = other[column] + "-2:4"
    other["finetuned_fid"] = other["finetuned_fid"] + 1
    curves = report.fid_curves(pd.concat([table, other], ignore_index=True))
    # Only what differs between the rows (here the pattern) goes into the labels.
    assert {"dense", "finetuned [unstructured]", "finetuned [2:4]", "pruned [2:4]"} <= set(curves)
    assert [p.fid - 1 for p in curves["finetuned [2:4]"]] == [
        pytest.approx(p.fid) for p in curves["finetuned [unstructured]"]]
    assert len(curves["dense"]) == 1  # one dense model, whatever the pattern


# --------------------------------------------------------------------------------------------
# The entry point


def invoke(*args: str):
    from entrypoints.cli import cli

    return CliRunner().invoke(cli, ["report", *args], catch_exceptions=False)


def newest_report_run(experiment_id: str):
    return MlflowClient().search_runs([experiment_id], f"tags.`{STAGE_TAG}` = 'report'",
                                      order_by=["attributes.start_time DESC"])[0]


def test_report_command_logs_files_and_prints_table(pipeline, monkeypatch):
    experiment_id, made = pipeline
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    result = invoke()
    assert result.exit_code == 0, result.output
    assert made[0.3]["finetune"].run_id in result.output and "| pruning_ratio |" in result.output

    run = newest_report_run(experiment_id)
    assert run.info.status == "FINISHED"
    listed = {f.path for f in MlflowClient().list_artifacts(run.info.run_id)}
    assert listed == set(report.REPORT_FILES)
    history = MlflowClient().get_metric_history(run.info.run_id, "fid_by_ratio/finetuned")
    assert {m.step: m.value for m in history} == {30: pytest.approx(fid_of("finetuned", 0.3)),
                                                 50: pytest.approx(fid_of("finetuned", 0.5))}

    # By name from another experiment: the report run lands in its own experiment.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    result = invoke("--experiment", "pipeline")
    assert result.exit_code == 0, result.output
    assert made[0.5]["finetune_nomt"].run_id in result.output


@pytest.mark.parametrize("args, message", [
    (("--experiment", "no-such-experiment"), "experiment 'no-such-experiment' does not exist"),
    (("--run_id", "0" * 32), "does not exist"),
    (("--experiment", "pipeline", "--run_id", "0" * 32), "not both"),
])
def test_report_command_bad_input(pipeline, monkeypatch, capsys, args, message):
    experiment_id, _ = pipeline
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    from entrypoints.cli import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", *args], prog_name="maskdm")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("maskdm: error:") and message in err[0]
    assert newest_report_run(experiment_id).info.status == "FAILED"


def test_report_command_rejects_a_non_driver_run(pipeline, monkeypatch, capsys):
    experiment_id, made = pipeline
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    from entrypoints.cli import cli

    with pytest.raises(SystemExit):
        cli.main(["report", "--run_id", made[0.3]["prune"].run_id], prog_name="maskdm")
    assert "is a 'prune' run; expected a main (driver) run" in capsys.readouterr().err


def test_report_through_mlflow_run(pipeline, store_uri, tmp_path):
    experiment_id, made = pipeline
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri}
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "report", "--env-manager", "local",
         "--experiment-id", experiment_id, "-P", "experiment=pipeline"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert made[0.3]["finetune"].run_id in done.stdout
    run = newest_report_run(experiment_id)
    assert run.info.status == "FINISHED" and run.data.params.get("experiment") == "pipeline"
    assert {f.path for f in MlflowClient().list_artifacts(run.info.run_id)} == set(report.REPORT_FILES)


# --------------------------------------------------------------------------------------------
# Replicates


def test_replicates_give_mean_se_n_and_paired_verdicts(store_uri, tmp_path):
    """Three replicates of one ratio, made as `main --seeds 0,1,2` makes them: sample seeds 42+k (so
    each replicate's fid run records its own protocol), every replicated run tagged with k."""
    from maskdm.tracking import REPLICATE_TAG

    store = FakeStore(mlflow.create_experiment("replicates"))
    lineage = {"model": "tiny-test", "dataset": "shapes", "pruner": "magnitude", "pattern": "unstructured", "scope": "layer"}
    dense = store.make("prune", None, {**lineage, "pruning_ratio": "0"}, {"sparsity": 0.0, "eval_loss": 0.1})
    prune = store.make("prune", None, {**lineage, "pruning_ratio": "0.5"}, {"sparsity": 0.5, "eval_loss": 0.3})
    extract = store.make("extract_masks", prune, {"prune_run_id": prune.run_id})
    baseline = store.make("baseline_loss", extract, {"masks_run_id": extract.run_id})

    def scored(model: Made, value: float, k: int) -> Made:
        tag = {REPLICATE_TAG: str(k)}
        sample = store.make("sample", model, {"model_run_id": model.run_id, "seed": str(42 + k)}, {"images_per_s": 9.0}, tags=tag)
        return store.make("fid", sample, {"sample_run_id": sample.run_id}, {"fid_shapes": value, "fid_shapes_se": 0.25 + k / 100},
                          tags={**fake_protocol("fid_shapes", seed=42 + k).tags(), **tag})

    learned, plain, heldout = [5.0, 5.5, 4.8], [7.0, 7.9, 6.5], [0.30, 0.33, 0.31]
    for k in range(3):
        tag = {REPLICATE_TAG: str(k)}
        scored(dense, 10.0 + k, k)
        scored(prune, 40.0 + k, k)
        train = store.make("train_masks", baseline, {"baseline_run_id": baseline.run_id, "mask_seed": str(k)},
                           {"eval_loss": 0.2, "heldout_loss_final": heldout[k]}, tags=tag)
        scored(train, 20.0 + k, k)
        finetune = store.make("finetune", train, {"masks_run_id": train.run_id, "seed": str(k)}, {"eval_loss": 0.1 + k / 100}, tags=tag)
        scored(finetune, learned[k], k)
        nomt = store.make("finetune", extract, {"masks_run_id": extract.run_id, "seed": str(k)}, {"eval_loss": 0.15}, tags=tag)
        scored(nomt, plain[k], k)

    replicates = report.build_replicate_table(report.runs_frame([store.experiment_id]))
    assert len(replicates) == 6 and sorted(replicates["replicate"]) == [0, 0, 1, 1, 2, 2]
    table = report.summarize_table(replicates)
    # Three seeds, one protocol column: the replicates are compared under replicate 0's protocol.
    assert report.table_fid_names(table) == ["fid", "fid_shapes"]
    assert set(table["protocol_fid_shapes"]) == {fake_protocol("fid_shapes", seed=42).key}
    assert list(table.columns) == report.table_columns(["fid", "fid_shapes"])
    row = row_of(table, 0.5, True)
    for column, values in {"finetuned_fid_shapes": learned, "dense_fid_shapes": [10.0, 11.0, 12.0],
                           "pruned_fid_shapes": [40.0, 41.0, 42.0], "masked_fid_shapes": [20.0, 21.0, 22.0],
                           "finetuned_eval_loss": [0.10, 0.11, 0.12], "masked_heldout_loss": heldout}.items():
        assert row[column] == pytest.approx(sum(values) / 3), column
        assert row[f"{column}_se"] == pytest.approx(pd.Series(values).std(ddof=1) / 3 ** 0.5), column
        assert row[f"{column}_n"] == 3
    assert row["pruned_eval_loss_n"] == 1 and row["scope"] == "layer" and row["replicates"] == "0,1,2"
    assert row_of(table, 0.5, False)["finetuned_fid_shapes"] == pytest.approx(sum(plain) / 3)

    files = report.write_table_report(table, tmp_path, "T", replicates=replicates)
    verdict_rows = pd.read_csv(files.verdicts)
    (paired,) = verdict_rows[verdict_rows["metric"] == "fid_shapes"].to_dict("records")
    differences = pd.Series(learned) - pd.Series(plain)
    assert paired["mean_difference"] == pytest.approx(differences.mean()) and paired["n"] == 3
    assert paired["se"] == pytest.approx(differences.std(ddof=1) / 3 ** 0.5) and paired["verdict"] == "better"
    assert len(pd.read_csv(files.replicates)) == 6
    markdown = files.markdown.read_text()
    assert "## Paired differences" in markdown and "| better |" in markdown
    assert f"{sum(learned) / 3:.4g} ± {pd.Series(learned).std(ddof=1) / 3 ** 0.5:.4g} (n=3)" in markdown
    series = report.ui_series(table)
    assert series["fid_shapes_se_by_ratio/finetuned"][50] == pytest.approx(row["finetuned_fid_shapes_se"])
    assert series["fid_shapes_by_ratio/finetuned"][50] == pytest.approx(row["finetuned_fid_shapes"])

    # Each replicate's fid run's own bootstrap SE is in replicates.csv; a mean over three keeps none
    # (replicate 0's would pass for the spread of the mean), one replicate shows its own.
    assert sorted(replicates["finetuned_fid_shapes_bootstrap_se"]) == pytest.approx([0.25, 0.25, 0.26, 0.26, 0.27, 0.27])
    assert pd.isna(row["finetuned_fid_shapes_bootstrap_se"])
    one = report.summarize_table(replicates[replicates["replicate"] == 0].reset_index(drop=True))
    assert row_of(one, 0.5, True)["finetuned_fid_shapes_bootstrap_se"] == pytest.approx(0.25)
    (tmp_path / "one").mkdir()
    markdown = report.write_table_report(one, tmp_path / "one", "T", replicates=replicates).markdown.read_text()
    assert f"{learned[0]:.4g} ± 0.25 (n=1, bootstrap SE)" in markdown
    assert "0.3 (n=1)" in markdown  # eval_loss has no bootstrap SE: the value alone
