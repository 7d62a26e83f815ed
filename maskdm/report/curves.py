"""FID against sparsity: the series of each model stage (:func:`fid_curves`), the plot
(``fid_vs_sparsity.png``) and the MLflow metric series the driver logs (:func:`ui_series`)."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from maskdm.evaluation.fid_protocol import FID_METRIC
from maskdm.report.runs import BOOTSTRAP_SE_SUFFIX, MODEL_STAGE_NAMES, _present
from maskdm.report.scores import split_fid_column
from maskdm.report.table import table_fid_names

# --------------------------------------------------------------------------------------------
# FID curves: the plot and the UI series


@dataclass(frozen=True)
class CurvePoint:
    pruning_ratio: float
    sparsity: float
    fid: float
    run_id: str  # the model run
    se: float | None = None  # standard error over the replicates (None: one replicate)
    n: int = 1
    bootstrap_se: float | None = None  # with one replicate: its fid run's bootstrap SE over the samples


def chart_metric(table: pd.DataFrame) -> str:
    """``fid`` if any model has it, else the first other main-protocol column with values, else ``fid``.

    Only a metric's main-protocol column (named by the metric alone) is charted.
    """
    for name in table_fid_names(table):
        if split_fid_column(name)[1] is None and any(table[f"{ms}_{name}"].map(_present).any() for ms in MODEL_STAGE_NAMES):
            return name
    return FID_METRIC


def fid_curves(table: pd.DataFrame, metric: str = FID_METRIC) -> dict[str, list[CurvePoint]]:
    """``{series label: points sorted by pruning_ratio}`` of FID against pruning for each model stage.

    Series: ``dense`` (at ratio and sparsity 0), ``pruned``, ``masked``, ``finetuned`` (mask-trained)
    and ``finetuned (no mask training)``. When the rows differ in model, dataset, pruner or pattern,
    the labels get the values of those that differ (``finetuned [2:4]``). A model run appears once
    per series.
    """
    if table.empty or f"finetuned_{metric}" not in table.columns:
        return {}
    group_columns = [c for c in ("model", "dataset", "pruner", "pattern", "scope")
                     if c in table.columns and table[c].nunique(dropna=False) > 1]
    curves: dict[str, dict[str, CurvePoint]] = defaultdict(dict)
    order: dict[str, int] = {}
    # The dense model does not depend on pruner or pattern: its series splits by model and dataset only.
    dense_group_columns = [c for c in group_columns if c in ("model", "dataset")]
    for _, row in table.iterrows():
        suffix = _label_suffix(row, group_columns)
        series = {
            "dense": ("dense" + _label_suffix(row, dense_group_columns), "dense_run_id", 0.0, 0.0),
            "pruned": ("pruned" + suffix, "prune_run_id", row["pruning_ratio"], row["sparsity"]),
            "masked": ("masked" + suffix, "train_masks_run_id", row["pruning_ratio"], row["sparsity"]),
            "finetuned": (
                ("finetuned (no mask training)" if _is_false(row["mask_training"]) else "finetuned") + suffix,
                "finetune_run_id",
                row["pruning_ratio"],
                row["sparsity"],
            ),
        }
        for ms, (label, id_column, ratio, sparsity) in series.items():
            value, run_id = row[f"{ms}_{metric}"], row[id_column]
            if _present(value) and _present(run_id) and _present(ratio):
                sparsity = float(sparsity) if _present(sparsity) else float(ratio)
                se = row.get(f"{ms}_{metric}_se")
                n = row.get(f"{ms}_{metric}_n")
                boot = row.get(f"{ms}_{metric}{BOOTSTRAP_SE_SUFFIX}")
                curves[label].setdefault(run_id, CurvePoint(
                    float(ratio), sparsity, float(value), run_id, float(se) if _present(se) else None, int(n) if _present(n) else 1,
                    float(boot) if _present(boot) else None))
                order.setdefault(label, MODEL_STAGE_NAMES.index(ms))
    labels = sorted(curves, key=lambda label: (order[label], label))
    return {label: sorted(curves[label].values(), key=lambda p: p.pruning_ratio) for label in labels}


def _label_suffix(row: pd.Series, columns: Sequence[str]) -> str:
    return " [" + " ".join(str(row[c]) for c in columns) + "]" if columns else ""


def _is_false(value: object) -> bool:
    return _present(value) and not bool(value)


def plot_fid_vs_sparsity(table: pd.DataFrame, path: str | os.PathLike, metric: str | None = None) -> Path:
    """fid_vs_sparsity.png: FID against sparsity, one line per :func:`fid_curves` series."""
    # The Agg canvas directly: no pyplot, so the caller's matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = metric or chart_metric(table)
    figure = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    curves = fid_curves(table, metric)
    for label, points in curves.items():
        # Error bars: +-1 standard error of the mean over the replicates; with one replicate, its
        # fid run's bootstrap SE over the samples (what that run can say of its own noise).
        errors = [p.se if p.se is not None else p.bootstrap_se or 0.0 for p in points]
        line = axes.errorbar([p.sparsity for p in points], [p.fid for p in points], yerr=errors, marker="o", capsize=3,
                             label=label)[0]
        if label.startswith("dense"):
            # The dense model is the reference every pruned model is measured against.
            for point in points:
                axes.axhline(point.fid, color=line.get_color(), linestyle="--", linewidth=0.8)
    if curves:
        axes.legend(fontsize="small")
    else:
        axes.text(0.5, 0.5, f"no '{metric}' logged yet", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("sparsity (share of prunable weights removed)")
    axes.set_ylabel(metric if metric != FID_METRIC else "FID (Inception)")
    replicates = max((p.n for points in curves.values() for p in points), default=1)
    bootstrap = any(p.n == 1 and p.se is None and p.bootstrap_se is not None for points in curves.values() for p in points)
    if replicates > 1:
        title = f"{metric} vs sparsity: mean ± 1 SE over replicates (up to n={replicates})"
        title += "\n(n=1 points: bootstrap SE over the samples)" if bootstrap else ""
    else:
        title = f"{metric} vs sparsity, one replicate: " + ("± 1 bootstrap SE over the samples" if bootstrap else "no error bars")
    axes.set_title(title, fontsize="medium")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path


def ui_series(table: pd.DataFrame, metric: str | None = None) -> dict[str, dict[int, float]]:
    """``{metric key: {step: value}}`` that plots :func:`fid_curves` as MLflow line charts.

    The key is ``<metric>_by_ratio/<series>`` (the mean over replicates) and, where there are two or
    more replicates, ``<metric>_se_by_ratio/<series>`` (its standard error); the step is the pruning
    ratio in percent (rounded), because an MLflow metric's x axis is an integer step.
    """
    metric = metric or chart_metric(table)
    series = {}
    for label, points in fid_curves(table, metric).items():
        slug = re.sub(r"[^\w.\-/]+", "_", label).strip("_")
        name = re.sub(r"[^\w.\-]+", "_", metric)  # an MLflow metric name has no '@'
        series[f"{name}_by_ratio/{slug}"] = {
            int(round(p.pruning_ratio * 100)): p.fid for p in points
        }
        errors = {int(round(p.pruning_ratio * 100)): p.se for p in points if p.se is not None}
        if errors:
            series[f"{name}_se_by_ratio/{slug}"] = errors
    return series
