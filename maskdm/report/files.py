"""The report's files: results.md, results.csv, fid_vs_sparsity.png, replicates.csv and
verdicts.csv from a runs frame."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from maskdm.report.curves import plot_fid_vs_sparsity
from maskdm.report.markdown import to_markdown
from maskdm.report.runs import REPORT_FILES
from maskdm.report.table import (
    HELDOUT_COLUMN, build_replicate_table, replicate_table_columns, summarize_table, table_fid_names,
)
from maskdm.evaluation.verdicts import paired_differences

# --------------------------------------------------------------------------------------------
# Files


class ReportFiles(NamedTuple):
    markdown: Path
    csv: Path
    plot: Path
    replicates: Path
    verdicts: Path


def verdicts_of(replicates: pd.DataFrame) -> pd.DataFrame:
    """The paired differences of a :func:`build_replicate_table` table: every FID, eval_loss and held-out loss."""
    metrics = [*table_fid_names(replicates), "eval_loss", HELDOUT_COLUMN[len("masked_"):]]
    return paired_differences(replicates, metrics)


def write_table_report(
    table: pd.DataFrame, folder: str | os.PathLike, title: str = "MaskDM results", replicates: pd.DataFrame | None = None,
) -> ReportFiles:
    """The :data:`REPORT_FILES` of ``table`` (:func:`build_table`) and, when given, of the replicate
    table it summarises (replicates.csv, and the paired differences: verdicts.csv and their section)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    markdown, csv, plot, replicates_csv, verdicts_csv = (folder / name for name in REPORT_FILES)
    if replicates is None:
        replicates = pd.DataFrame(columns=replicate_table_columns(table_fid_names(table)))
    verdicts = verdicts_of(replicates)
    markdown.write_text(to_markdown(table, title, verdicts))
    table.to_csv(csv, index=False)
    replicates.to_csv(replicates_csv, index=False)
    verdicts.to_csv(verdicts_csv, index=False)
    plot_fid_vs_sparsity(table, plot)
    return ReportFiles(markdown, csv, plot, replicates_csv, verdicts_csv)


def write_report(runs: pd.DataFrame | None, folder: str | os.PathLike, title: str = "MaskDM results") -> ReportFiles:
    """The :data:`REPORT_FILES` of the runs in ``runs`` (a search_runs frame)."""
    replicates = build_replicate_table(runs)
    return write_table_report(summarize_table(replicates), folder, title, replicates)
