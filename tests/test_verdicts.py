"""The statistics of replicates (maskdm.evaluation.verdicts): mean, SE and n per arm, paired differences, verdicts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from maskdm.evaluation import verdicts
from maskdm.evaluation.verdicts import BETTER, NO_DIFFERENCE, ONE_REPLICATE, WORSE


def test_mean_se_n_is_the_standard_error_of_the_mean():
    values = [3.0, 4.5, 2.0, None, float("nan")]
    mean, se, n = verdicts.mean_se_n(values)
    numbers = np.array([3.0, 4.5, 2.0])
    assert n == 3 and mean == pytest.approx(numbers.mean())
    assert se == pytest.approx(numbers.std(ddof=1) / math.sqrt(3))
    one = verdicts.mean_se_n([7.0])
    assert one[0] == 7.0 and math.isnan(one[1]) and one[2] == 1
    assert verdicts.mean_se_n([])[2] == 0


@pytest.mark.parametrize("mean, se, n, expected", [
    (-1.0, 0.4, 3, BETTER),           # 1.0 > 2 x 0.4
    (1.0, 0.4, 3, WORSE),
    (-1.0, 0.6, 3, NO_DIFFERENCE),    # 1.0 < 2 x 0.6
    (0.0, 0.0, 4, NO_DIFFERENCE),
    (-5.0, float("nan"), 1, ONE_REPLICATE),
])
def test_verdict_at_two_standard_errors(mean, se, n, expected):
    assert verdicts.verdict(mean, se, n) == expected


def replicate_frame(learned: list[float], plain: list[float], pruner: str = "magnitude") -> pd.DataFrame:
    """A replicate table of one ratio: a mask-trained and a plain row per replicate, with the
    pruned model's eval_loss read from one shared prune run."""
    rows = []
    for mask_training, values in ((True, learned), (False, plain)):
        for k, value in enumerate(values):
            rows.append({"model": "m", "dataset": "shapes", "pruning_ratio": 0.5, "pruner": pruner,
                         "pattern": "unstructured", "scope": "layer", "mask_training": mask_training, "replicate": k,
                         "pruned_fid": 30.0 + k, "finetuned_fid": value, "pruned_eval_loss": 0.2,
                         "prune_run_id": f"prune-{pruner}", "finetune_run_id": f"ft-{pruner}-{mask_training}-{k}"})
    return pd.DataFrame(rows)


def test_summarize_gives_mean_se_n_and_counts_a_shared_run_once():
    frame = replicate_frame([5.0, 5.5, 4.8], [7.0, 7.9, 6.5])
    measures = {"pruned_fid": None, "finetuned_fid": None, "pruned_eval_loss": "prune_run_id"}
    table = verdicts.summarize(frame, ["model", "dataset", "pruning_ratio", "pruner", "pattern", "scope", "mask_training"], measures)
    assert len(table) == 2 and list(table["replicates"]) == ["0,1,2", "0,1,2"]
    learned = table[table["mask_training"] == True].iloc[0]  # noqa: E712
    assert learned["finetuned_fid"] == pytest.approx(np.mean([5.0, 5.5, 4.8]))
    assert learned["finetuned_fid_se"] == pytest.approx(np.std([5.0, 5.5, 4.8], ddof=1) / math.sqrt(3))
    assert learned["finetuned_fid_n"] == 3
    # Three replicates read the same prune run's eval_loss: one measurement, no spread.
    assert learned["pruned_eval_loss_n"] == 1 and pd.isna(learned["pruned_eval_loss_se"])
    # Non-measures come from replicate 0.
    assert learned["finetune_run_id"] == "ft-magnitude-True-0"
    assert list(table.columns) == verdicts.summary_columns(list(frame.columns), measures)


def test_learned_against_pruning_masks_flips_when_the_arms_are_swapped():
    frame = replicate_frame([5.0, 5.5, 4.8], [7.0, 7.9, 6.5])
    (row,) = verdicts.paired_differences(frame, ["fid"]).to_dict("records")
    differences = np.array([5.0 - 7.0, 5.5 - 7.9, 4.8 - 6.5])
    assert row["comparison"].startswith("learned masks - pruning masks") and row["arm"] == "finetuned"
    assert row["mean_difference"] == pytest.approx(differences.mean())
    assert row["se"] == pytest.approx(differences.std(ddof=1) / math.sqrt(3)) and row["n"] == 3
    assert row["verdict"] == BETTER
    swapped = frame.assign(mask_training=~frame["mask_training"].astype(bool))
    (flipped,) = verdicts.paired_differences(swapped, ["fid"]).to_dict("records")
    assert flipped["mean_difference"] == pytest.approx(-differences.mean()) and flipped["verdict"] == WORSE
    # Replicates pair by number: with replicate 2 of the plain arm missing, n is 2.
    partial = frame[~((frame["mask_training"] == False) & (frame["replicate"] == 2))]  # noqa: E712
    (two,) = verdicts.paired_differences(partial, ["fid"]).to_dict("records")
    assert two["n"] == 2 and two["mean_difference"] == pytest.approx(differences[:2].mean())
    one = verdicts.paired_differences(frame[frame["replicate"] == 0], ["fid"])
    assert list(one["verdict"]) == [ONE_REPLICATE]


def test_each_pruner_against_magnitude_per_arm():
    magnitude = replicate_frame([5.0, 5.5, 4.8], [7.0, 7.9, 6.5])
    wanda = replicate_frame([6.0, 6.4, 5.9], [7.1, 7.8, 6.6], pruner="wanda")
    wanda["pruned_fid"] = wanda["pruned_fid"] - 3.0  # wanda prunes better: 3 lower on every replicate
    table = verdicts.paired_differences(pd.concat([magnitude, wanda], ignore_index=True), ["fid"])
    against = table[table["comparison"] == "wanda - magnitude"]
    by_arm = {row["arm"]: row for row in against.to_dict("records")}
    assert set(by_arm) == {"pruned", "finetuned", "finetuned_no_mask_training"}  # pruned once, not per mask_training
    assert by_arm["pruned"]["mean_difference"] == pytest.approx(-3.0) and by_arm["pruned"]["verdict"] == BETTER
    assert by_arm["finetuned"]["mean_difference"] == pytest.approx(np.mean([1.0, 0.9, 1.1]))
    assert by_arm["finetuned"]["verdict"] == WORSE
    assert set(against["pruner"]) == {"wanda"} and set(against["scope"]) == {"layer"}
    # The learned-vs-pruning-masks rows are there for each pruner.
    assert set(table[table["comparison"].str.startswith("learned")]["pruner"]) == {"magnitude", "wanda"}


def test_format_estimate():
    assert verdicts.format_estimate(12.345, 0.4567, 3) == "12.35 ± 0.4567 (n=3)"
    assert verdicts.format_estimate(12.345, float("nan"), 1) == "12.35 (n=1)"
    assert verdicts.format_estimate(12.345, float("nan"), 1, 0.25) == "12.35 ± 0.25 (n=1, bootstrap SE)"
    assert verdicts.format_estimate(12.345, 0.4567, 3, 0.25) == "12.35 ± 0.4567 (n=3)"  # replicates' SE wins
    assert verdicts.format_estimate(float("nan"), float("nan"), 0) == ""
