"""results.md: the table as markdown sections, each measure as ``mean ± SE (n=...)``, and the
paired verdicts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from maskdm import speed_report
from maskdm.evaluation.fid_protocol import FID_METRIC, UNRECORDED, FidProtocol
from maskdm.report.runs import BOOTSTRAP_SE_SUFFIX, KEY_COLUMNS, MODEL_STAGE_NAMES, PIPELINE_STAGES, _present
from maskdm.report.scores import split_fid_column
from maskdm.report.table import HELDOUT_COLUMN, table_fid_names
from maskdm.evaluation.verdicts import format_estimate

# --------------------------------------------------------------------------------------------
# Markdown


def _format(value: object, column: str) -> str:
    if not _present(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if column.endswith("_bytes"):
        return f"{float(value) / 2**20:.2f}"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _protocol_note(table: pd.DataFrame, name: str) -> str:
    values = [v for v in table.get(f"protocol_{name}", pd.Series(dtype=object)) if _present(v)]
    metric, protocol_id = split_fid_column(name)
    if protocol_id == UNRECORDED:
        note = "Protocol: not recorded (fid runs made before protocols were recorded; they compare with nothing)."
    elif values:
        protocol = FidProtocol.parse(str(values[0]))
        note = f"Protocol `{protocol.id if protocol else values[0]}`: `{values[0]}`."
    else:
        note = ""
    others = [n for n in table_fid_names(table) if n != name and split_fid_column(n)[0] == metric]
    if protocol_id is None and others:
        note += " Scores of the same metric under other protocols are in their own tables: " + ", ".join(f"`{n}`" for n in others) + "."
    return note.strip()


def _sections(fid_names: Sequence[str]) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(title, [(header, column)]) of each table in results.md."""
    yield "Size", [
        ("sparsity", "sparsity"),
        ("nonzero params", "params_nonzero"),
        ("total params", "params_total"),
        ("compression", "compression_ratio"),
        ("compact ckpt (MiB)", "compact_checkpoint_bytes"),
        ("dense ckpt (MiB)", "dense_checkpoint_bytes"),
        *speed_report.SIZE_COLUMNS,
    ]
    for name in fid_names:
        title = "FID (Inception pool3, `fid`)" if name == FID_METRIC else f"FID (`{name}`)"
        yield title, [(ms, f"{ms}_{name}") for ms in MODEL_STAGE_NAMES]
    yield "eval_loss", [(ms, f"{ms}_eval_loss") for ms in MODEL_STAGE_NAMES]
    yield "Held-out loss (train_masks' final mask)", [("masked", HELDOUT_COLUMN)]
    yield VERDICTS_SECTION, []
    # Not the sample runs' own images_per_s (each run's wall clock, whenever it ran): a side-by-side measurement.
    yield speed_report.speed_section()
    yield "Wall time (s)", [(stage, f"{stage}_wall_s") for stage in PIPELINE_STAGES] + [
        (f"{ms} {what}", f"{ms}_{what}_wall_s") for ms in MODEL_STAGE_NAMES for what in ("sample", "fid")
    ]
    yield "Run IDs: stages", [("dense", "dense_run_id")] + [(stage, f"{stage}_run_id") for stage in PIPELINE_STAGES]
    yield "Run IDs: sample / fid", [
        (f"{ms} {what}", f"{ms}_{what}_run_id") for ms in MODEL_STAGE_NAMES for what in ("sample", "fid")
    ]


VERDICTS_SECTION = "Paired differences (replicate by replicate)"
VERDICTS_NOTE = (
    "Difference = first arm - second arm, pairs matched by replicate (same seeds); lower FID and loss are "
    "better, so a negative difference favours the first arm. Verdict `better` / `worse` when |mean| > 2 SE "
    "of the paired differences, else `no difference at 2 SE`; `one replicate` when n = 1 "
    "(no spread to judge by: run `main --seeds 0,1,2`)."
)


def _cell(row: pd.Series, column: str) -> str:
    """A measure as ``mean ± SE (n=...)`` where the table has its ``_se`` and ``_n``; else the value."""
    if f"{column}_se" in row.index and f"{column}_n" in row.index:
        return format_estimate(row[column], row[f"{column}_se"], row[f"{column}_n"], row.get(column + BOOTSTRAP_SE_SUFFIX))
    return _format(row[column], column)


def _markdown_table(table: pd.DataFrame, columns: Sequence[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(row, column) for _, column in columns) + " |")
    return "\n".join(lines)


def verdicts_markdown(verdicts: pd.DataFrame) -> list[str]:
    """The paired-differences section's lines (none without a comparison to make)."""
    if verdicts is None or verdicts.empty:
        return []
    varying = [c for c in ("model", "dataset", "pruner", "pattern", "scope") if verdicts[c].nunique(dropna=False) > 1]
    columns = [("comparison", "comparison"), ("pruning_ratio", "pruning_ratio"), *[(c, c) for c in varying],
               ("arm", "arm"), ("metric", "metric")]
    lines = [f"## {VERDICTS_SECTION}", "", VERDICTS_NOTE, ""]
    lines += ["| " + " | ".join([h for h, _ in columns] + ["mean difference", "SE", "n", "verdict"]) + " |",
              "|" + "---|" * (len(columns) + 4)]
    for _, row in verdicts.iterrows():
        se = _format(row["se"], "se") if _present(row["se"]) else ""
        cells = [_format(row[c], c) for _, c in columns] + [_format(row["mean_difference"], "mean"), se, str(int(row["n"])), row["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def to_markdown(table: pd.DataFrame, title: str = "MaskDM results", verdicts: pd.DataFrame | None = None) -> str:
    """results.md: one small table per quantity, each keyed by ratio/pruner/pattern/scope/mask_training;
    FIDs and losses as mean ± SE over the replicates (n); then the paired differences (``verdicts``,
    :func:`maskdm.evaluation.verdicts.paired_differences`).

    Columns that are empty in every row are left out (results.csv keeps them all); model and
    dataset become a line under the title when they are the same in every row.
    """
    lines = [f"# {title}", ""]
    if table.empty:
        return "\n".join(lines + ["No FINISHED MaskDM stage runs found.", ""])
    constant = [c for c in ("model", "dataset") if table[c].nunique(dropna=False) == 1]
    if constant:
        lines += [", ".join(f"{c}: `{_format(table[c].iloc[0], c) or '-'}`" for c in constant), ""]
    lines += ["FIDs and losses: mean ± standard error over the replicates (n = replicates measured; "
              "SE = sample standard deviation / sqrt(n)). `(n=1, bootstrap SE)`: one fid run's own standard "
              "error over its samples, not the spread between seeds that replicates measure.", ""]
    keys = [(c, c) for c in KEY_COLUMNS if c not in constant]
    fid_titles = {f"{ms}_{name}": name for name in table_fid_names(table) for ms in MODEL_STAGE_NAMES}
    for title_, columns in _sections(table_fid_names(table)):
        if title_ == VERDICTS_SECTION:
            lines += verdicts_markdown(verdicts)
            continue
        filled = [(h, c) for h, c in columns if c in table.columns and table[c].map(_present).any()]
        if filled:
            lines += [f"## {title_}", ""]
            if filled[0][1] in fid_titles and (note := _protocol_note(table, fid_titles[filled[0][1]])):
                lines += [note, ""]
            lines += [_markdown_table(table, keys + filled), ""]
    return "\n".join(lines)
