"""The two finetune arms told apart by lineage alone, on runs a user makes by hand (no driver).

One tiny chain is made once for the module with the ``maskdm`` CLI, in process: a 16x16 UNet
saved with save_pretrained -> prune 0.5 -> extract_masks -> baseline_loss -> train_masks, then
each arm (finetune from the learned masks of train_masks, finetune straight from extract_masks)
is finetuned for 2 steps, sampled (4 images, 2 DDIM steps) and scored (planted random Inception
weights at 64 dims against a stats file: the values check the wiring, not quality). None of these
runs has the driver's ``maskdm.variant``; what tells the arms apart must come from the lineage.
Also here: the experiment kind that makes MLflow 3's UI open on the runs, and the driver run's name.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from inception_fixture import _planted_torch_home  # noqa: F401
from mlflow.tracking import MlflowClient

from conftest import tiny_unet, tracking_store
from entrypoints.cli import cli
from maskdm import driver, report
from maskdm.evaluation import fid
from maskdm.ddpm.models import DDPM, default_scheduler, save_ddpm
from maskdm.tracking import (
    EXPERIMENT_KIND_TAG,
    MASKS_SOURCE_TAG,
    MODEL_TRAINING_KIND,
    STAGE_TAG,
    mark_model_training,
    masks_source_of,
    runs_view_url,
)

#: 2 optimizer steps of 4 images, one checkpoint, no mixed precision: seconds on a loaded CPU.
FINETUNE = ["--num_iters", "2", "--save_model_steps", "2", "--train_batch_size", "4", "--ema_max_decay", "0.9",
            "--mixed_precision", "no"]
SAMPLE = ["--total_samples", "4", "--batch_size", "4", "--ddim_steps", "2"]


@dataclass
class Arm:
    finetune: str
    sample: str
    fid: str


@dataclass
class Chain:
    experiment_id: str
    prune: str
    extract_masks: str
    baseline_loss: str
    train_masks: str
    learned: Arm  # finetuned from train_masks' learned masks
    unlearned: Arm  # finetuned straight from extract_masks' masks


def newest(stage: str) -> str:
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.`{STAGE_TAG}` = '{stage}'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
    )
    return runs[0].info.run_id


def made_by_cli(stage: str, *args: str) -> str:
    """Run ``maskdm <stage> <args>`` as a user would; the FINISHED run it made."""
    result = CliRunner().invoke(cli, [stage, *args])
    assert result.exit_code == 0, (result.output, result.exception)
    run_id = newest(stage)
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    return run_id


def tags_of(run_id: str) -> dict[str, str]:
    return MlflowClient().get_run(run_id).data.tags


@pytest.fixture(scope="module")
def store(tmp_path_factory, _planted_torch_home):  # noqa: F811
    root = tmp_path_factory.mktemp("lineage_arms")
    with tracking_store(root), pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(_planted_torch_home))
        yield root


@pytest.fixture(scope="module")
def chain(store) -> Chain:
    model_dir = save_ddpm(DDPM(tiny_unet(), default_scheduler()), store / "tiny_model")
    prune = made_by_cli("prune", "--model", str(model_dir), "--dataset", "shapes", "--pruning_ratio", "0.5")
    masks = made_by_cli("extract_masks", "--prune_run_id", prune)
    baseline = made_by_cli("baseline_loss", "--masks_run_id", masks, "--dataset_size", "16", "--batch_size", "8")
    learned_masks = made_by_cli("train_masks", "--baseline_run_id", baseline, "--lr", "500", "--logits", "0.5",
                                "--epoch", "1", "--max_step", "0", "--accumulation", "2")
    reference = fid.save_stats(store / "reference.npz", np.zeros(64), np.eye(64))

    def arm(masks_run_id: str) -> Arm:
        finetune = made_by_cli("finetune", "--masks_run_id", masks_run_id, *FINETUNE)
        sample = made_by_cli("sample", "--model_run_id", finetune, *SAMPLE)
        score = made_by_cli("fid", "--sample_run_id", sample, "--reference", str(reference), "--dims", "64",
                            "--batch_size", "4")
        return Arm(finetune, sample, score)

    experiment_id = MlflowClient().get_run(prune).info.experiment_id
    return Chain(experiment_id, prune, masks, baseline, learned_masks, arm(learned_masks), arm(masks))


def test_each_finetune_records_where_its_masks_came_from(chain):
    assert tags_of(chain.learned.finetune)[MASKS_SOURCE_TAG] == "train_masks"
    assert tags_of(chain.unlearned.finetune)[MASKS_SOURCE_TAG] == "extract_masks"
    # Made by hand: the driver's tag is absent, so the lineage alone told them apart.
    for run_id in (chain.learned.finetune, chain.unlearned.finetune):
        assert driver.VARIANT_TAG not in tags_of(run_id)


@pytest.mark.parametrize("arm, source", [("learned", "train_masks"), ("unlearned", "extract_masks")])
def test_every_run_below_a_finetune_carries_its_arm(chain, arm, source):
    runs = getattr(chain, arm)
    for run_id in (runs.sample, runs.fid):
        tags = tags_of(run_id)
        assert tags[MASKS_SOURCE_TAG] == source
        assert tags["maskdm.upstream.finetune"] == runs.finetune
        assert driver.VARIANT_TAG not in tags


def test_runs_above_a_finetune_carry_no_arm(chain):
    # train_masks' own model is "masked", not a finetune arm: nothing to tell apart there.
    for run_id in (chain.prune, chain.extract_masks, chain.baseline_loss, chain.train_masks):
        assert MASKS_SOURCE_TAG not in tags_of(run_id)


def test_fid_runs_of_the_two_arms_group_apart(chain):
    learned, unlearned = tags_of(chain.learned.fid), tags_of(chain.unlearned.fid)
    assert learned[report.MODEL_STAGE_TAG] == "finetuned"
    assert unlearned[report.MODEL_STAGE_TAG] == "finetuned_no_mask_training"
    # The value the UI recipe groups by is one of the documented ones, the driver's variant names.
    assert set(report.MODEL_STAGE_VALUES) == set(driver.VARIANTS)
    params = MlflowClient().get_run(chain.learned.fid).data.params
    assert params["pruning_ratio"] == "0.5"  # the chart's x axis, on the fid run itself


def test_model_stage_of_reads_the_arm_from_the_lineage():
    up = "maskdm.upstream."
    learned = {STAGE_TAG: "fid", f"{up}extract_masks": "e", f"{up}train_masks": "t", f"{up}finetune": "f"}
    unlearned = {STAGE_TAG: "fid", f"{up}extract_masks": "e", f"{up}finetune": "f"}
    ratio = {"pruning_ratio": "0.5"}
    assert report.model_stage_of(learned, ratio) == "finetuned"
    assert report.model_stage_of(unlearned, ratio) == "finetuned_no_mask_training"
    assert report.model_stage_of({STAGE_TAG: "finetune", f"{up}extract_masks": "e"}, ratio) == "finetuned_no_mask_training"
    assert masks_source_of({"train_masks", "extract_masks"}) is None  # no finetune: no arm
    assert masks_source_of({"finetune", "train_masks", "extract_masks"}) == "train_masks"


def test_report_keeps_each_arm_in_its_row(chain):
    table = report.build_table(report.runs_frame(experiment_ids=[chain.experiment_id]))
    rows = {bool(row["mask_training"]): row for _, row in table[table["pruning_ratio"] == 0.5].iterrows()}
    assert set(rows) == {True, False}
    assert rows[True]["finetune_run_id"] == chain.learned.finetune
    assert rows[False]["finetune_run_id"] == chain.unlearned.finetune
    assert rows[True]["finetuned_fid_run_id"] == chain.learned.fid
    assert rows[False]["finetuned_fid_run_id"] == chain.unlearned.fid


def test_stage_runs_make_their_experiment_open_on_runs(chain):
    experiment = MlflowClient().get_experiment(chain.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND


@pytest.mark.parametrize("before, after", [
    (None, MODEL_TRAINING_KIND),
    ("", MODEL_TRAINING_KIND),
    ("genai_development_inferred", MODEL_TRAINING_KIND),  # the UI's guess, not a choice
    ("no_inferred_type", MODEL_TRAINING_KIND),
    ("genai_development", "genai_development"),  # a user's choice is kept
    ("finetuning", "finetuning"),
])
def test_experiment_kind_is_set_unless_someone_chose_one(store, before, after):
    client = MlflowClient()
    tags = {} if before is None else {EXPERIMENT_KIND_TAG: before}
    experiment_id = client.create_experiment(f"kind-{before}", tags=tags)
    mark_model_training(experiment_id)
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == after


def test_driver_run_name_says_what_it_swept(tmp_path):
    from entrypoints.main import run_name

    assert run_name(driver.resolve_config("demo")) == "main demo magnitude unstructured 0.3,0.5,0.7"
    assert run_name(driver.resolve_config("demo", ratios="0.5", pruner="random", pattern="2:4", scope="global",
                                          mask_training="false")) == (
        "main demo random 2:4 scope=global 0.5 mask_training=false")
    assert run_name(driver.resolve_config("demo", model=str(tmp_path))) == (
        f"main {tmp_path.name} magnitude unstructured 0.3,0.5,0.7")


def test_runs_view_link_opens_model_training_mode():
    local = runs_view_url("sqlite:////tmp/store/mlflow.db", "7")
    assert local == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    served = runs_view_url("http://tracking-host:5000/", "0")
    assert served == "http://tracking-host:5000/#/experiments/0/runs?workflowType=machine_learning"
