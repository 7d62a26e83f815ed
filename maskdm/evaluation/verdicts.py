"""Replicates to numbers a researcher can act on: mean, standard error and n per arm, and paired
differences between arms with a verdict. Pure pandas/numpy; :mod:`maskdm.report` builds the tables
these work on.

* :func:`summarize`: one row per key (ratio, pruner, ..., mask_training) from the rows of its
  replicates. Each measure column ``X`` becomes its mean over the replicates (``X``), the standard
  error of that mean (``X_se`` = sample standard deviation, ddof=1, / sqrt(n); empty for n < 2) and
  ``X_n``, the number of replicates that measured it. A value read from a run that several
  replicates share (the dense and pruned models' ``eval_loss``: one prune run per ratio) counts once.
* :func:`paired_differences`: two arms compared replicate by replicate (pairs matched by replicate
  index, so both arms of a pair share their sampling noise and, for the finetune arms, their
  finetune seed): the mean of the differences, their standard error, n and :func:`verdict`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

#: Lower FID and loss is better: a difference (first arm - second arm) below -2 SE is ``better``.
BETTER, WORSE, NO_DIFFERENCE, ONE_REPLICATE = "better", "worse", "no difference at 2 SE", "one replicate"
#: How many standard errors a mean difference must exceed to decide (about a 95 % two-sided
#: interval for a normal mean; with few replicates the t distribution's tails are wider, so 2 SE
#: decides more often than a t test at 5 % would: read a verdict at n = 2 or 3 as a first look).
SE_FACTOR = 2.0
REPLICATE_COLUMN = "replicate"
#: Columns of :func:`paired_differences`'s frame.
PAIRED_COLUMNS = (
    "comparison", "model", "dataset", "pruning_ratio", "pruner", "pattern", "scope", "arm", "metric",
    "mean_difference", "se", "n", "verdict",
)


def mean_se_n(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, standard error of the mean, n) of the values that are numbers; NaN where undefined
    (no values; the SE of a single one)."""
    numbers = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").dropna().astype(float)
    n = len(numbers)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(numbers.mean())
    se = float(numbers.std(ddof=1) / math.sqrt(n)) if n >= 2 else math.nan
    if n >= 2 and numbers.nunique() == 1:
        se = 0.0  # equal values: exactly no spread (not the 1e-17 that summing floats leaves)
    return mean, se, n


def verdict(mean: float, se: float, n: int) -> str:
    """``better`` / ``worse`` when |mean difference| > 2 SE (lower is better), else ``no difference
    at 2 SE``; ``one replicate`` when n = 1 (no spread to judge against)."""
    if n < 2 or math.isnan(mean):
        return ONE_REPLICATE
    if abs(mean) > SE_FACTOR * (0.0 if math.isnan(se) else se):
        return BETTER if mean < 0 else WORSE
    return NO_DIFFERENCE


def summary_columns(columns: Sequence[str], measures: Iterable[str]) -> list[str]:
    """The columns of :func:`summarize`'s frame: ``replicate`` becomes ``replicates``, each measure
    ``X`` is followed by ``X_se`` and ``X_n``."""
    measures = set(measures)
    out = []
    for column in columns:
        if column == REPLICATE_COLUMN:
            out.append("replicates")
        else:
            out += [column, f"{column}_se", f"{column}_n"] if column in measures else [column]
    return out


def summarize(replicates: pd.DataFrame, keys: Sequence[str], measures: Mapping[str, str | None]) -> pd.DataFrame:
    """One row per ``keys`` value; see the module doc. ``measures``: measure column -> the column
    holding the ID of the run its value was read from (a run shared by replicates counts once), or
    None. Other columns come from the group's lowest replicate; ``replicates`` lists the group's
    replicate numbers (``0,1,2``)."""
    columns = summary_columns(list(replicates.columns), measures)
    if replicates.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    # Groups in the order of their first row (the replicate table's order), each by replicate.
    for _, group in replicates.groupby(list(keys), dropna=False, sort=False):
        group = group.sort_values(REPLICATE_COLUMN, kind="stable")
        row = group.iloc[0].to_dict()
        row["replicates"] = ",".join(str(int(r)) for r in group[REPLICATE_COLUMN])
        for column, source in measures.items():
            values = group
            if source is not None and source in group.columns:
                # One value per run: rows without a run ID (nothing measured) are dropped by mean_se_n anyway.
                values = group[group[source].isna() | ~group[source].duplicated()]
            row[column], row[f"{column}_se"], row[f"{column}_n"] = mean_se_n(values[column])
        row.pop(REPLICATE_COLUMN, None)
        rows.append(row)
    table = pd.DataFrame(rows, columns=columns)
    for column in measures:
        table[f"{column}_n"] = table[f"{column}_n"].astype("int64")
    return table.reset_index(drop=True)


def paired(first: pd.DataFrame, second: pd.DataFrame, column: str) -> tuple[float, float, int]:
    """(mean, SE, n) of ``first[column] - second[column]`` over the replicates both measured,
    matched by replicate number."""
    a = first[[REPLICATE_COLUMN, column]].dropna().drop_duplicates(REPLICATE_COLUMN)
    b = second[[REPLICATE_COLUMN, column]].dropna().drop_duplicates(REPLICATE_COLUMN)
    joined = a.merge(b, on=REPLICATE_COLUMN, suffixes=("_a", "_b"))
    return mean_se_n((joined[f"{column}_a"].astype(float) - joined[f"{column}_b"].astype(float)).tolist())


def paired_differences(
    replicates: pd.DataFrame, metrics: Sequence[str], arms: Sequence[str] = ("pruned", "masked", "finetuned"),
    reference_pruner: str = "magnitude",
) -> pd.DataFrame:
    """Paired differences between arms, one row per (comparison, ratio, ..., arm, metric) measured.

    ``metrics`` are the measure names without the arm (``fid``, ``fid_shapes``, ``eval_loss``); a
    replicate table column is ``<arm>_<metric>``.

    * ``learned masks - pruning masks``: the finetuned model of the mask-trained row against the
      finetuned model of the ``mask_training`` false row (equal finetune), per ratio, pruner,
      pattern and scope.
    * ``<pruner> - magnitude``: every other pruner against ``reference_pruner`` at the same ratio,
      pattern, scope and arm, where the frame holds both.
    """
    rows: list[dict] = []
    if replicates.empty:
        return pd.DataFrame(columns=PAIRED_COLUMNS)
    frame = replicates.copy()
    frame["_mt"] = frame["mask_training"].map(lambda v: None if v is None or pd.isna(v) else bool(v))
    shared = ["model", "dataset", "pruning_ratio", "pruner", "pattern", "scope"]

    def add(comparison: str, key: Mapping, arm: str, metric: str, stats: tuple[float, float, int]) -> None:
        mean, se, n = stats
        if n:
            rows.append({"comparison": comparison, **{k: key[k] for k in shared}, "arm": arm, "metric": metric,
                         "mean_difference": mean, "se": se, "n": n, "verdict": verdict(mean, se, n)})

    for values, group in frame.groupby(shared, dropna=False, sort=False):
        key = dict(zip(shared, values))
        learned, plain = group[group["_mt"] == True], group[group["_mt"] == False]  # noqa: E712 - None is neither
        if learned.empty or plain.empty:
            continue
        for metric in metrics:
            column = f"finetuned_{metric}"
            if column in frame.columns:
                add("learned masks - pruning masks (both finetuned)", key, "finetuned", metric, paired(learned, plain, column))

    pruners = [p for p in frame["pruner"].dropna().unique() if p != reference_pruner]
    if reference_pruner in set(frame["pruner"].dropna()) and pruners:
        against = ["model", "dataset", "pruning_ratio", "pattern", "scope", "_mt"]
        for values, group in frame.groupby(against, dropna=False, sort=False):
            reference = group[group["pruner"] == reference_pruner]
            if reference.empty:
                continue
            for pruner in pruners:
                other = group[group["pruner"] == pruner]
                if other.empty:
                    continue
                key = {**dict(zip(against, values)), "pruner": pruner}
                mask_training = key["_mt"]
                for arm in arms:
                    label = "finetuned_no_mask_training" if arm == "finetuned" and mask_training is False else arm
                    for metric in metrics:
                        column = f"{arm}_{metric}"
                        if column in frame.columns:
                            add(f"{pruner} - {reference_pruner}", key, label, metric, paired(other, reference, column))
    table = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    # The pruned arm is the same runs in a row of each mask_training value: one row is enough.
    table = table.drop_duplicates(ignore_index=True)
    table["n"] = table["n"].astype("int64")
    return table


def format_estimate(mean: float, se: float, n: int, bootstrap_se: float | None = None, digits: str = ".4g") -> str:
    """``12.3 ± 0.45 (n=3)``; ``12.3 (n=1)``, or ``12.3 ± 0.24 (n=1, bootstrap SE)`` with the one
    run's own bootstrap SE; empty when nothing was measured."""
    if not n or mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    text = _number(mean, digits)
    if n >= 2 and se is not None and not np.isnan(se):
        return f"{text} ± {_number(se, digits)} (n={int(n)})"
    if n == 1 and bootstrap_se is not None and not pd.isna(bootstrap_se):
        return f"{text} ± {_number(bootstrap_se, digits)} (n=1, bootstrap SE)"
    return f"{text} (n={int(n)})"


def _number(value: float, digits: str) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:{digits}}"
