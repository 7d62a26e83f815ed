"""The results table: one row per combination and replicate (:func:`build_replicate_table`),
summarised over replicates into mean, SE and n (:func:`build_table`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import pandas as pd

from maskdm import speed_report
from maskdm.evaluation.fid_protocol import FID_METRIC
from maskdm.report.runs import (
    _ANCHOR_PRIORITY, BOOTSTRAP_SE_SUFFIX, INTEGER_COLUMNS, KEY_COLUMNS, MODEL_STAGE_NAMES, PIPELINE_STAGES,
    SIZE_COLUMNS, RunRecord, newest_first, run_records,
)
from maskdm.report.scores import FidColumn, ModelScores, collect_scores, fid_columns, is_fid_column, replicate_of_run
from maskdm.evaluation.verdicts import REPLICATE_COLUMN, summarize, summary_columns

#: One logger for the whole report, as before it was a package.
log = logging.getLogger("maskdm.report")


# --------------------------------------------------------------------------------------------
# The table


#: The model run each model stage's values are read from (its eval_loss: one value per run).
MODEL_RUN_ID_COLUMNS = {"dense": "dense_run_id", "pruned": "prune_run_id", "masked": "train_masks_run_id", "finetuned": "finetune_run_id"}
#: The mask-trained model's loss on held-out images (train_masks' ``heldout_loss_final``).
HELDOUT_COLUMN = "masked_heldout_loss"


def replicate_table_columns(fid_names: Sequence[str] = (FID_METRIC,)) -> list[str]:
    """The columns of :func:`build_replicate_table`, in order (FID ones only for the FID column names given)."""
    columns = [*KEY_COLUMNS, REPLICATE_COLUMN, *SIZE_COLUMNS]
    columns += [f"{ms}_{name}" for name in fid_names for ms in MODEL_STAGE_NAMES]
    columns += [f"protocol_{name}" for name in fid_names]
    columns += [f"{ms}_{name}{BOOTSTRAP_SE_SUFFIX}" for name in fid_names for ms in MODEL_STAGE_NAMES]
    columns += [f"{ms}_eval_loss" for ms in MODEL_STAGE_NAMES]
    columns += [HELDOUT_COLUMN]
    columns += [f"{ms}_images_per_s" for ms in MODEL_STAGE_NAMES]
    columns += [f"{stage}_wall_s" for stage in PIPELINE_STAGES]
    columns += [f"{ms}_{what}_wall_s" for ms in MODEL_STAGE_NAMES for what in ("sample", "fid")]
    columns += ["dense_run_id", *(f"{stage}_run_id" for stage in PIPELINE_STAGES)]
    columns += [f"{ms}_{what}_run_id" for ms in MODEL_STAGE_NAMES for what in ("sample", "fid")]
    return columns + speed_report.COLUMNS


def measure_columns(fid_names: Sequence[str] = (FID_METRIC,)) -> dict[str, str | None]:
    """The columns summarised over replicates (mean, ``_se``, ``_n``): every FID, eval_loss and the
    held-out loss; each mapped to the column of the run its value comes from where replicates may
    share that run (:func:`maskdm.evaluation.verdicts.summarize`)."""
    measures: dict[str, str | None] = {f"{ms}_{name}": None for name in fid_names for ms in MODEL_STAGE_NAMES}
    measures.update({f"{ms}_eval_loss": MODEL_RUN_ID_COLUMNS[ms] for ms in MODEL_STAGE_NAMES})
    measures[HELDOUT_COLUMN] = MODEL_RUN_ID_COLUMNS["masked"]
    return measures


def table_columns(fid_names: Sequence[str] = (FID_METRIC,)) -> list[str]:
    """The columns of :func:`build_table`, in order: each measure as mean, ``_se`` and ``_n``."""
    return summary_columns(replicate_table_columns(fid_names), measure_columns(fid_names))


def build_table(runs: pd.DataFrame | None) -> pd.DataFrame:
    """One row per (model, dataset, pruning_ratio, pruner, pattern, scope, mask_training): the
    replicates of :func:`build_replicate_table` summarised (:func:`summarize_table`)."""
    return summarize_table(build_replicate_table(runs))


def summarize_table(replicates: pd.DataFrame) -> pd.DataFrame:
    """Mean, SE and n over the replicates of each row key (:func:`maskdm.evaluation.verdicts.summarize`)."""
    names = table_fid_names(replicates)
    table = summarize(replicates, list(KEY_COLUMNS), measure_columns(names)).reindex(columns=table_columns(names))
    for measure in (f"{ms}_{name}" for name in names for ms in MODEL_STAGE_NAMES):
        # Replicate 0's bootstrap SE would pass for the spread of a mean over several: only n = 1 keeps it.
        table[measure + BOOTSTRAP_SE_SUFFIX] = table[measure + BOOTSTRAP_SE_SUFFIX].where(table[measure + "_n"] == 1)
    return _typed(table)


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    table["mask_training"] = table["mask_training"].astype("boolean")
    table["pruning_ratio"] = table["pruning_ratio"].astype("float64")
    for column in INTEGER_COLUMNS:
        table[column] = pd.to_numeric(table[column]).round().astype("Int64")
    return table


def build_replicate_table(runs: pd.DataFrame | None) -> pd.DataFrame:
    """One row per (model, dataset, pruning_ratio, pruner, pattern, scope, mask_training, replicate); see the module doc.

    A row's replicate is its anchor's ``maskdm.replicate`` tag; its FIDs are those of the fid runs
    of the same replicate (of the dense and pruned models too, which replicates share but score
    each with its own sampling seed).
    """
    records = run_records(runs)
    scores = collect_scores(records)
    dense_runs = newest_first(r for r in records.values() if r.stage == "prune" and r.pruning_ratio == 0)

    # Which rows (and so which model runs) there are comes first: the FID columns are chosen from
    # the scores of those model runs only.
    planned = []
    used_dense = set()
    for key, anchor in _row_anchors(records, scores):
        dense = _dense_for(key, dense_runs)
        used_dense.add(dense.run_id if dense else None)
        planned.append((key, anchor.lineage, dense))
    # A dense reference that no pruned row points at still gets a row, so a dense-only store reports.
    for dense in dense_runs:
        key = _key(dense, None, records)
        if dense.run_id not in used_dense and not any(_same_model(k, key) for k, _, _ in planned):
            planned += [({**key, REPLICATE_COLUMN: r}, {}, dense) for r in _scored_replicates(dense, scores)]
            used_dense.add(dense.run_id)

    model_runs = {run_id for _, lineage, dense in planned for run_id in _model_runs(lineage, dense).values() if run_id}
    columns = fid_columns(scores, model_runs)
    rows = [_row(key, lineage, dense, records, scores, columns) for key, lineage, dense in planned]
    rows.sort(key=_sort_key)
    table = pd.DataFrame(rows, columns=replicate_table_columns([c.name for c in columns]))
    table[REPLICATE_COLUMN] = table[REPLICATE_COLUMN].astype("int64")
    return speed_report.add_columns(_typed(table), records)


def _key(anchor: RunRecord, mask_training: bool | None, records: Mapping[str, RunRecord] | None = None) -> dict:
    params = anchor.params
    # Scope is a prune parameter the later stages do not copy: read it from the prune run.
    prune = (records or {}).get(anchor.lineage.get("prune", "")) or anchor
    return {
        "model": params.get("model"),
        "dataset": params.get("dataset"),
        "pruning_ratio": anchor.pruning_ratio,
        "pruner": params.get("pruner"),
        "pattern": params.get("pattern"),
        "scope": prune.params.get("scope"),
        "mask_training": mask_training,
    }


def _scored_replicates(model: RunRecord, scores: Mapping[str, ModelScores]) -> list[int]:
    """The replicates a model run that replicates share (prune) was scored in; [0] if none."""
    score = scores.get(model.run_id)
    found = sorted({r for _, _, r in score.by_replicate}) if score else []
    return found or [0]


def _row_anchors(records: Mapping[str, RunRecord], scores: Mapping[str, ModelScores]) -> list[tuple[dict, RunRecord]]:
    """The run each row is built from, one per key: see the module doc for the choice."""
    finetunes = [r for r in records.values() if r.stage == "finetune"]
    trained_masks = {f.upstream.get("train_masks") for f in finetunes}
    used_prunes = {r.upstream.get("prune") for r in records.values() if r.stage in ("finetune", "train_masks")}

    def keyed(anchor: RunRecord, mask_training: bool | None, replicate: int) -> tuple[dict, RunRecord]:
        return {**_key(anchor, mask_training, records), REPLICATE_COLUMN: replicate}, anchor

    candidates = [keyed(f, "train_masks" in f.upstream, replicate_of_run(f)) for f in finetunes]
    candidates += [
        keyed(r, True, replicate_of_run(r)) for r in records.values() if r.stage == "train_masks" and r.run_id not in trained_masks
    ]
    candidates += [
        keyed(r, None, replicate)
        for r in records.values()
        if r.stage == "prune" and r.pruning_ratio != 0 and r.run_id not in used_prunes
        for replicate in _scored_replicates(r, scores)
    ]
    candidates.sort(key=lambda c: (_ANCHOR_PRIORITY[c[1].stage], c[1].start_time), reverse=True)
    chosen: dict[tuple, tuple[dict, RunRecord]] = {}
    for key, anchor in candidates:
        hashable = tuple(key.values())
        if hashable in chosen:
            log.info("report: %s run %s has the same row key as %s run %s; keeping the newer/later-stage one",
                     anchor.stage, anchor.run_id, chosen[hashable][1].stage, chosen[hashable][1].run_id)
            continue
        chosen[hashable] = (key, anchor)
    return list(chosen.values())


def _dense_for(key: Mapping, dense_runs: Sequence[RunRecord]) -> RunRecord | None:
    same_model = [d for d in dense_runs if d.params.get("model") == key["model"]]
    same_dataset = [d for d in same_model if d.params.get("dataset") == key["dataset"]]
    return (same_dataset or same_model or [None])[0]


def _same_model(row: Mapping, key: Mapping) -> bool:
    return row["model"] == key["model"] and row["dataset"] == key["dataset"]


def _model_runs(lineage: Mapping[str, str], dense: RunRecord | None) -> dict[str, str | None]:
    return {
        "dense": dense.run_id if dense else None,
        "pruned": lineage.get("prune"),
        "masked": lineage.get("train_masks"),
        "finetuned": lineage.get("finetune"),
    }


def _row(
    key: Mapping,
    lineage: Mapping[str, str],
    dense: RunRecord | None,
    records: Mapping[str, RunRecord],
    scores: Mapping[str, ModelScores],
    fid_columns_: Sequence[FidColumn],
) -> dict:
    row: dict = dict(key)
    # A dense-only row (no lineage) describes the dense run itself.
    size_source = records.get(lineage["prune"]) if "prune" in lineage else (None if lineage else dense)
    for column in SIZE_COLUMNS:
        row[column] = size_source.metrics.get(column) if size_source else None
    if row["sparsity"] is None:
        # Without the prune run in the frame, the later stages' own sparsity is the next best.
        later = [records.get(lineage.get(s, "")) for s in ("finetune", "train_masks")]
        row["sparsity"] = next((r.metrics["sparsity"] for r in later if r and "sparsity" in r.metrics), None)

    model_runs = _model_runs(lineage, dense)
    replicate = key[REPLICATE_COLUMN]
    for column in fid_columns_:
        row[f"protocol_{column.name}"] = column.protocol.key if column.protocol else column.protocol_id or None
    for ms, run_id in model_runs.items():
        record = records.get(run_id or "")
        score = scores.get(run_id or "")
        fids = score.by_replicate if score else {}
        behind = None  # the first FID column's score: its sample and fid runs are the row's
        for column in fid_columns_:
            found = fids.get((column.metric, column.protocol_id, replicate))
            row[f"{ms}_{column.name}"] = found.value if found else None
            row[f"{ms}_{column.name}{BOOTSTRAP_SE_SUFFIX}"] = found.se if found else None
            behind = behind or found
        row[f"{ms}_eval_loss"] = record.metrics.get("eval_loss") if record else None
        if ms == "masked":
            row[HELDOUT_COLUMN] = record.metrics.get("heldout_loss_final") if record else None
        sample = records.get(behind.sample_run_id or "") if behind else None
        sample = sample or (score.newest_sample if score else None)
        fid_run = records.get(behind.fid_run_id) if behind else None
        row[f"{ms}_images_per_s"] = sample.metrics.get("images_per_s") if sample else None
        row[f"{ms}_sample_wall_s"] = sample.wall_s if sample else None
        row[f"{ms}_fid_wall_s"] = fid_run.wall_s if fid_run else None
        row[f"{ms}_sample_run_id"] = sample.run_id if sample else None
        row[f"{ms}_fid_run_id"] = fid_run.run_id if fid_run else None

    for stage in PIPELINE_STAGES:
        record = records.get(lineage.get(stage, ""))
        row[f"{stage}_wall_s"] = record.wall_s if record else None
        row[f"{stage}_run_id"] = lineage.get(stage)
    row["dense_run_id"] = model_runs["dense"]
    return row


def _sort_key(row: Mapping) -> tuple:
    mask_order = {None: 0, False: 1, True: 2}[row["mask_training"]]
    ratio = row["pruning_ratio"] if row["pruning_ratio"] is not None else -1.0
    return (str(row["model"]), str(row["dataset"]), str(row["pruner"]), str(row["pattern"]), str(row["scope"]), ratio,
            mask_order, row[REPLICATE_COLUMN])


def table_fid_names(table: pd.DataFrame) -> list[str]:
    """The FID column names a :func:`build_table` table has (``fid``, ``fid_shapes``, ``fid@<id>``), ``fid`` first."""
    prefix = "finetuned_"
    names = [c[len(prefix):] for c in table.columns if c.startswith(prefix) and is_fid_column(c[len(prefix):])]
    # A summary's fid_se / fid_n are the replicates' standard error and count of `fid`, not FIDs of their own.
    return [n for n in names if not any(n == f"{base}{suffix}" for base in names for suffix in ("_se", "_n"))]
