"""report and promote on the outputs of REAL stage runs, not hand-made ones.

One small chain of the real stages, in-process, on a tiny 16x16 model: a dense reference (prune at
ratio 0), prune 0.5 -> extract_masks -> baseline_loss -> train_masks -> finetune, and a finetune
straight from the extracted masks; every model sampled (16 images, 3 DDIM steps) and scored with
the shapes features (classifier training scaled down as in test_fid_stage.py). Then:

* promote with its defaults (metric and protocol ``auto``) on that store, which holds one FID
  protocol, as the README's promote command after the Quickstart;
* a second protocol (a 4-step sample of one model) and an Inception FID at 64 dims (planted
  weights) are added; the report's columns are checked one by one against the metrics, params and
  tags those runs logged, and promote must now choose explicitly and refuses to compare across
  protocols.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from inception_fixture import _planted_torch_home  # noqa: F401
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import tiny_unet, tracking_store
from maskdm import report, speed_report
from maskdm.ddpm.models import DDPM, default_scheduler, save_ddpm
from maskdm.tracking import STAGE_TAG, UPSTREAM_TAG_PREFIX

EXPERIMENT = "real-chain"
SAMPLE = ["--total_samples", "16", "--batch_size", "16", "--mixed_precision", "no"]


def invoke(*args: str) -> str:
    """Run a maskdm command in-process; the run ID it made (the newest run of that stage)."""
    from entrypoints.cli import cli

    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, (args, result.output)
    return newest(args[0]).info.run_id


def newest(stage: str):
    experiment = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    return MlflowClient().search_runs([experiment], f"tags.`{STAGE_TAG}` = '{stage}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)[0]


def run_of(run_id: str):
    return MlflowClient().get_run(run_id)


def sample_and_score(model_run: str, *extra: str, steps: str = "3") -> tuple[str, str]:
    sample = invoke("sample", "--model_run_id", model_run, "--ddim_steps", steps, *SAMPLE)
    return sample, invoke("fid", "--sample_run_id", sample, "--features", "shapes", "--batch_size", "16", *extra)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, _planted_torch_home):
    import maskdm.ddpm.data

    folder = tmp_path_factory.mktemp("real-chain")
    with tracking_store(folder) as uri, pytest.MonkeyPatch.context() as patch:
        experiment_id = mlflow.create_experiment(EXPERIMENT)
        patch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
        patch.setenv("TORCH_HOME", str(_planted_torch_home))
        # The shapes reference statistics scaled down (test_fid_stage.py); the classifier is the shipped one.
        patch.setattr(maskdm.ddpm.data, "SHAPES_TRAIN_SIZE", 400)
        model_dir = save_ddpm(DDPM(tiny_unet(), default_scheduler()), folder / "tiny_model")

        runs = {"dense": invoke("prune", "--model", str(model_dir), "--dataset", "shapes", "--pruning_ratio", "0")}
        runs["prune"] = invoke("prune", "--model", str(model_dir), "--dataset", "shapes", "--pruning_ratio", "0.5")
        runs["extract_masks"] = invoke("extract_masks", "--prune_run_id", runs["prune"])
        runs["baseline_loss"] = invoke("baseline_loss", "--masks_run_id", runs["extract_masks"], "--dataset_size", "32",
                                       "--batch_size", "16", "--max_batches", "2")
        runs["train_masks"] = invoke("train_masks", "--baseline_run_id", runs["baseline_loss"], "--epoch", "1",
                                     "--max_step", "2", "--accumulation", "1")
        finetune = ["--num_iters", "4", "--train_batch_size", "8", "--save_model_steps", "2", "--mixed_precision", "no"]
        runs["finetune"] = invoke("finetune", "--masks_run_id", runs["train_masks"], *finetune)
        runs["finetune_nomt"] = invoke("finetune", "--masks_run_id", runs["extract_masks"], *finetune)
        scores = {name: sample_and_score(runs[name])
                  for name in ("dense", "prune", "train_masks", "finetune", "finetune_nomt")}
        yield dict(uri=uri, folder=folder, experiment_id=experiment_id, runs=runs, scores=scores)


def promote(*args: str):
    from entrypoints.cli import cli

    return CliRunner().invoke(cli, ["promote", *args])


def test_promote_with_its_defaults_on_a_store_of_one_protocol(chain):
    """The README's `promote -P finetune_run_id=best` on a store scored as the Quickstart scores it."""
    result = promote("--registered_model", "real")
    assert result.exit_code == 0, result.output
    fids = {name: run_of(chain["scores"][name][1]).data.metrics["fid_shapes"] for name in ("finetune", "finetune_nomt")}
    # The lowest FID; ties (2 train_masks steps may leave the masks as extracted) go to the sparser, then the newer.
    runs = {name: run_of(chain["runs"][name]) for name in fids}
    best = min(fids, key=lambda n: (fids[n], -runs[n].data.metrics["sparsity"], -runs[n].info.start_time))
    version = MlflowClient().get_model_version_by_alias("real", "champion")
    assert version.tags["finetune_run_id"] == chain["runs"][best]
    assert float(version.tags["fid_shapes"]) == pytest.approx(fids[best])
    fid_run = run_of(chain["scores"][best][1])
    assert version.tags["fid_shapes.protocol"] == fid_run.data.tags[report.FID_PROTOCOL_TAG]
    assert version.tags["fid_run_id"] == fid_run.info.run_id
    promote_run = newest("promote")
    assert promote_run.data.tags["maskdm.fid_metric"] == "fid_shapes"
    assert promote_run.data.tags["maskdm.fid_protocol_id"] == fid_run.data.tags[report.FID_PROTOCOL_ID_TAG]


@pytest.fixture(scope="module")
def two_protocols(chain):
    """The same store plus a 4-step sample of the mask-trained finetune (another protocol) and an
    Inception FID at 64 dims of its 3-step sample (metric fid_inception_64), against 6 PNGs."""
    reference = chain["folder"] / "reference" / "all"
    reference.mkdir(parents=True)
    for i, image in enumerate(np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)):
        Image.fromarray(image).save(reference / f"{i}.png")
    chain["steps4"] = sample_and_score(chain["runs"]["finetune"], steps="4")
    sample = chain["scores"]["finetune"][0]
    chain["inception"] = invoke("fid", "--sample_run_id", sample, "--features", "inception", "--dims", "64",
                                "--batch_size", "16", "--reference", f"imagefolder:{reference.parent}")
    return chain


def stage_metrics(stage: str, experiment_id: str) -> set[str]:
    """Every metric name the FINISHED runs of a stage logged in the experiment."""
    runs = MlflowClient().search_runs([experiment_id], f"tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'FINISHED'")
    return {name for run in runs for name in run.data.metrics}


def test_report_columns_are_the_metrics_the_stages_log(two_protocols):
    chain = two_protocols
    runs, scores = chain["runs"], chain["scores"]
    invoke("report", "--experiment", EXPERIMENT)
    report_run = newest("report")
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=report_run.info.run_id, artifact_path="results.csv"))
    assert list(table.columns) == list(report.build_table(report.runs_frame([chain["experiment_id"]])).columns)

    # The FID columns: exactly the FID metrics the fid runs logged, one protocol each.
    steps3 = run_of(scores["finetune"][1]).data.tags
    steps4 = run_of(chain["steps4"][1]).data.tags
    inception = run_of(chain["inception"])
    # 64 dims never log `fid`; the run's own bootstrap SE is not an FID (no column of its own).
    assert set(inception.data.metrics) == {"fid_inception_64", "fid_inception_64_se", "num_samples"}
    logged = {m for m in stage_metrics("fid", chain["experiment_id"]) if report.is_fid_metric(m)}
    assert logged == {"fid_shapes", "fid_inception_64"}
    names = report.table_fid_names(table)
    assert names == ["fid", "fid_inception_64", "fid_shapes", f"fid_shapes@{steps4[report.FID_PROTOCOL_ID_TAG]}"]
    assert table[[f"{ms}_fid" for ms in report.MODEL_STAGE_NAMES]].isna().all().all()  # nothing logged `fid`
    assert {report.split_fid_column(n)[0] for n in names if table[f"finetuned_{n}"].notna().any()} == logged
    assert set(table["protocol_fid_shapes"]) == {steps3[report.FID_PROTOCOL_TAG]}
    assert set(table[f"protocol_fid_shapes@{steps4[report.FID_PROTOCOL_ID_TAG]}"]) == {steps4[report.FID_PROTOCOL_TAG]}
    assert set(table["protocol_fid_inception_64"]) == {inception.data.tags[report.FID_PROTOCOL_TAG]}
    markdown = mlflow.artifacts.load_text(f"runs:/{report_run.info.run_id}/results.md")
    assert steps3[report.FID_PROTOCOL_TAG] in markdown and steps4[report.FID_PROTOCOL_TAG] in markdown

    # Every column of every row, against the run it names.
    assert sorted(table["mask_training"]) == [False, True] and set(table["pruning_ratio"]) == {0.5}
    size_metrics = stage_metrics("prune", chain["experiment_id"])
    assert set(report.SIZE_COLUMNS) <= size_metrics
    model_runs = {"dense": "dense_run_id", "pruned": "prune_run_id", "masked": "train_masks_run_id",
                  "finetuned": "finetune_run_id"}
    checked = set()
    for _, row in table.iterrows():
        mask_training = bool(row["mask_training"])
        finetune = run_of(row["finetune_run_id"])
        assert row["finetune_run_id"] == runs["finetune" if mask_training else "finetune_nomt"]

        def check(column, expected):
            checked.add(column)
            if expected is None:
                assert pd.isna(row[column]), column
            elif isinstance(expected, float):
                assert row[column] == pytest.approx(expected, rel=1e-6), column
            else:
                assert str(row[column]) == str(expected), column

        prune = run_of(runs["prune"])
        for column in report.KEY_COLUMNS:
            check(column, mask_training if column == "mask_training" else
                  float(finetune.data.params[column]) if column == "pruning_ratio" else
                  prune.data.params[column] if column == "scope" else finetune.data.params[column])
        check("replicates", "0")  # one replicate: every measure's SE is empty and its n is 1 (0 where unmeasured)
        for measure in report.measure_columns(names):
            check(f"{measure}_se", None)
            check(f"{measure}_n", 1 if pd.notna(row[measure]) else 0)
        for column in report.SIZE_COLUMNS:
            check(column, float(prune.data.metrics[column]))
        for stage in report.PIPELINE_STAGES:
            if stage in ("baseline_loss", "train_masks") and not mask_training:
                expected = None  # the finetune straight from the extracted masks has neither
            else:
                expected = runs["finetune_nomt" if stage == "finetune" and not mask_training else stage]
            check(f"{stage}_run_id", expected)
            if expected:
                info = run_of(expected).info
                assert run_of(expected).data.tags[STAGE_TAG] == stage
                check(f"{stage}_wall_s", (info.end_time - info.start_time) / 1000)
            else:
                check(f"{stage}_wall_s", None)
        check("dense_run_id", runs["dense"])
        for ms, id_column in model_runs.items():
            model_run = row[id_column]
            if pd.isna(model_run):
                for column in [c for c in table.columns if c.startswith(f"{ms}_") and not c.endswith(("_se", "_n"))]:
                    check(column, None)
                continue
            check(f"{ms}_eval_loss", float(run_of(model_run).data.metrics["eval_loss"]))
            if ms == "masked":
                check(report.HELDOUT_COLUMN, run_of(model_run).data.metrics.get("heldout_loss_final"))
            # The sample and fid runs behind the row: those of the first FID column with a value, so
            # fid_inception_64's for the mask-trained finetune, else the 3-step fid_shapes ones.
            key = {"dense": "dense", "pruned": "prune", "masked": "train_masks",
                   "finetuned": "finetune" if mask_training else "finetune_nomt"}[ms]
            sample_id, fid_id = scores[key]
            if (ms, mask_training) == ("finetuned", True):
                fid_id = chain["inception"]
            fid_run, sample = run_of(fid_id), run_of(sample_id)
            assert fid_run.data.tags[f"{UPSTREAM_TAG_PREFIX}sample"] == sample_id
            assert sample.data.params["model_run_id"] == model_run
            check(f"{ms}_fid_run_id", fid_id)
            check(f"{ms}_sample_run_id", sample_id)
            check(f"{ms}_images_per_s", float(sample.data.metrics["images_per_s"]))
            check(f"{ms}_sample_wall_s", (sample.info.end_time - sample.info.start_time) / 1000)
            check(f"{ms}_fid_wall_s", (fid_run.info.end_time - fid_run.info.start_time) / 1000)
            for name in names:
                metric, protocol_id = report.split_fid_column(name)
                column = f"{ms}_{name}"
                if pd.isna(row[column]):
                    # Empty only where no fid run of this model logged this metric under this protocol.
                    found = [f for f in fid_runs_of_model(model_run) if metric in f.data.metrics
                             and f.data.tags[report.FID_PROTOCOL_ID_TAG] == (protocol_id or table_protocol_id(table, name))]
                    assert not found, column
                    check(column + report.BOOTSTRAP_SE_SUFFIX, None)
                    checked.add(column)
                    continue
                (source,) = [f for f in fid_runs_of_model(model_run) if metric in f.data.metrics
                             and f.data.tags[report.FID_PROTOCOL_ID_TAG] == (protocol_id or table_protocol_id(table, name))]
                check(column, float(source.data.metrics[metric]))
                # One replicate: the fid run's own bootstrap SE stands beside its FID.
                check(column + report.BOOTSTRAP_SE_SUFFIX, source.data.metrics.get(metric + "_se"))
        for name in names:
            checked.add(f"protocol_{name}")
        # No speed run in this store: the side-by-side speed and registered-size columns are empty
        # (they are checked against speed runs in tests/test_speed.py).
        for column in speed_report.COLUMNS:
            check(column, None)
    # Every column was checked against the runs: a column added to the table must be checked here too.
    assert checked == set(table.columns), set(table.columns) - checked
    assert table[[c for c in table.columns if c.endswith(report.BOOTSTRAP_SE_SUFFIX)]].notna().any().any()
    assert row_value(table, True, "finetuned_fid_shapes") == pytest.approx(
        run_of(scores["finetune"][1]).data.metrics["fid_shapes"])
    assert row_value(table, True, f"finetuned_fid_shapes@{steps4[report.FID_PROTOCOL_ID_TAG]}") == pytest.approx(
        run_of(chain["steps4"][1]).data.metrics["fid_shapes"])


def table_protocol_id(table: pd.DataFrame, name: str) -> str | None:
    keys = {k for k in table[f"protocol_{name}"] if isinstance(k, str)}
    if not keys:
        return None
    (key,) = keys
    return report.FidProtocol.parse(key).id


def row_value(table: pd.DataFrame, mask_training: bool, column: str):
    (value,) = table.loc[table["mask_training"] == mask_training, column]
    return value


def fid_runs_of_model(model_run: str) -> list:
    experiment = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    samples = MlflowClient().search_runs([experiment], f"tags.`{STAGE_TAG}` = 'sample' and params.model_run_id = '{model_run}'")
    found = []
    for sample in samples:
        found += MlflowClient().search_runs(
            [experiment], f"tags.`{STAGE_TAG}` = 'fid' and tags.`{UPSTREAM_TAG_PREFIX}sample` = '{sample.info.run_id}'")
    return found


def test_promote_on_two_protocols_chooses_explicitly_and_gates_by_protocol(two_protocols):
    chain = two_protocols
    steps3 = run_of(chain["scores"]["finetune"][1]).data.tags
    steps4 = run_of(chain["steps4"][1]).data.tags

    # Three FIDs of the finetune runs now (fid_shapes under two protocols, fid_inception_64): auto names them.
    result = promote("--registered_model", "real2")
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("maskdm: error:") and "FIDs of 3 protocols" in line
    for tags in (steps3, steps4, run_of(chain["inception"]).data.tags):
        assert tags[report.FID_PROTOCOL_ID_TAG] in line
    # metric alone still leaves two protocols of fid_shapes.
    result = promote("--registered_model", "real2", "--metric", "fid_shapes")
    assert result.exit_code == 1 and "FIDs of 2 protocols" in result.stderr

    # The 3-step protocol: both finetune runs were scored under it.
    result = promote("--registered_model", "real2", "--protocol", steps3[report.FID_PROTOCOL_ID_TAG])
    assert result.exit_code == 0, result.output
    holder = MlflowClient().get_model_version_by_alias("real2", "champion")
    assert holder.tags["fid_shapes.protocol_id"] == steps3[report.FID_PROTOCOL_ID_TAG]

    # The 4-step FID of the mask-trained finetune does not compare with the holder's 3-step one.
    result = promote("--registered_model", "real2", "--finetune_run_id", chain["runs"]["finetune"],
                     "--protocol", steps4[report.FID_PROTOCOL_ID_TAG])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("maskdm: error: real2@champion not moved") and "steps 4 vs 3" in line
    assert "samples" not in line and "force=true" in line
    assert len(MlflowClient().search_model_versions("name = 'real2'")) == 1
    assert newest("promote").info.status == "FAILED"
