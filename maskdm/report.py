"""The results table of an experiment or a driver run, built from the tracking store alone.

Every number comes from ``mlflow.search_runs`` (one pandas frame of runs, :func:`runs_frame`);
nothing is read from files on disk. Runs are joined through their lineage tags
``maskdm.upstream.<stage>``:

* A row is one (model, dataset, pruning_ratio, pruner, pattern, scope, mask_training) combination
  and replicate (``maskdm.replicate``: :func:`build_replicate_table`); :func:`build_table`
  summarises a combination's replicates into one row, each FID and loss as mean, ``_se`` and
  ``_n`` (:mod:`maskdm.verdicts`, which also pairs arms replicate by replicate). A row is
  anchored on the newest FINISHED ``finetune`` run of that combination; where there is none, on the
  newest ``train_masks`` run (mask_training true), else on the newest ``prune`` run (mask_training
  empty: no mask stage has run on it yet). The anchor's lineage names the row's other stage runs.
* A row has four model stages: ``dense`` (the newest ``prune`` run with pruning_ratio 0 of the same
  model, preferring the same dataset), ``pruned`` (the prune run), ``masked`` (the train_masks run)
  and ``finetuned`` (the finetune run).
* A model run's FID is the metric of the newest FINISHED ``fid`` run of any ``sample`` run of it,
  per FID metric (``fid`` for Inception pool3, ``fid_inception_<dims>``, ``fid_<name>`` for other
  feature extractors) and per FID protocol (:class:`FidProtocol`: features, samples, reference,
  weights and the sampling settings, recorded by the fid stage in the tag ``maskdm.fid_protocol``).
  Each FID column holds one protocol: a metric's main protocol (the one that scores the most model
  runs) gets the column named by the metric, every other protocol its own ``<metric>@<protocol id>``
  column, and ``protocol_<column>`` names it. The sampling speed is the ``images_per_s`` of the
  sample run behind the first FID column with a value (else of the newest sample run).

:func:`model_stage_of` names the model stage of any run from its tags, for the ``fid`` stage to tag
its runs with (:data:`MODEL_STAGE_TAG`), so that FID can be charted against ``pruning_ratio`` per
model stage (the two finetune arms apart) in the MLflow UI without joins.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from maskdm import speed_report
from maskdm.errors import MaskDMError
from maskdm.fid_protocol import (  # noqa: F401 (re-exported: callers import them from here too)
    FID_DIMS, FID_FEATURES, FID_METRIC, FID_PROTOCOL_ID_TAG, FID_PROTOCOL_PART_PREFIX, FID_PROTOCOL_TAG,
    PROTOCOL_PARTS, SE_SUFFIX, UNKNOWN, UNRECORDED, FidProtocol, describe_protocol, fid_metric_name, is_fid_metric,
)
from maskdm.tracking import REPLICATE_TAG, STAGE_TAG, UPSTREAM_TAG_PREFIX, lineage_stages, masks_source_of, parse_run_ref
from maskdm.verdicts import REPLICATE_COLUMN, format_estimate, paired_differences, summarize, summary_columns

log = logging.getLogger(__name__)

#: The tag the ``fid`` (and ``sample``) stage should set to :func:`model_stage_of` of its run.
MODEL_STAGE_TAG = "maskdm.model_stage"
#: The values of :data:`MODEL_STAGE_TAG`: one per model of a row, the two finetune arms apart
#: (``finetuned``: from the masks train_masks learned; ``finetuned_no_mask_training``: straight
#: from extract_masks), named as the driver's ``maskdm.variant`` and the ``fid_by_ratio/*`` series.
MODEL_STAGE_VALUES = ("dense", "pruned", "masked", "finetuned", "finetuned_no_mask_training")
#: The model stages of a row, in pipeline order.
MODEL_STAGE_NAMES = ("dense", "pruned", "masked", "finetuned")
#: The stages of one ratio's chain, whose run IDs and wall times a row carries.
PIPELINE_STAGES = ("prune", "extract_masks", "baseline_loss", "train_masks", "finetune")
KEY_COLUMNS = ("model", "dataset", "pruning_ratio", "pruner", "pattern", "scope", "mask_training")
SIZE_COLUMNS = (
    "sparsity",
    "params_total",
    "params_nonzero",
    "compression_ratio",
    "compact_checkpoint_bytes",
    "dense_checkpoint_bytes",
)
INTEGER_COLUMNS = ("params_total", "params_nonzero", "compact_checkpoint_bytes", "dense_checkpoint_bytes")
#: A driver that reuses a run made outside it tags that run ``maskdm.used_by.<driver run id> = true``,
#: so that ``report --run_id <driver>`` finds it although it is not the driver's child.
USED_BY_TAG_PREFIX = "maskdm.used_by."
PARENT_TAG = "mlflow.parentRunId"
#: results.csv: one row per key, each measure as mean, ``_se`` and ``_n`` over the replicates;
#: replicates.csv: one row per key and replicate (one draw each); verdicts.csv: the paired differences.
REPORT_FILES = ("results.md", "results.csv", "fid_vs_sparsity.png", "replicates.csv", "verdicts.csv")

_ANCHOR_PRIORITY = {"finetune": 2, "train_masks": 1, "prune": 0}
_IN_CHUNK = 100


# --------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class RunRecord:
    """One FINISHED MaskDM stage run, as far as the report needs it."""

    run_id: str
    stage: str
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    tags: Mapping[str, str]
    start_time: float  # seconds since the epoch; orders runs "newest first"
    wall_s: float | None

    @property
    def upstream(self) -> dict[str, str]:
        """``{stage: run_id}`` of every ancestor."""
        return {k[len(UPSTREAM_TAG_PREFIX):]: v for k, v in self.tags.items() if k.startswith(UPSTREAM_TAG_PREFIX)}

    @property
    def lineage(self) -> dict[str, str]:
        """:attr:`upstream` plus this run itself."""
        return {**self.upstream, self.stage: self.run_id}

    @property
    def pruning_ratio(self) -> float | None:
        return parse_ratio(self.params.get("pruning_ratio"))


def parse_ratio(value: object) -> float | None:
    try:
        ratio = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(ratio) else ratio


def _present(value: object) -> bool:
    if value is None or (isinstance(value, str) and not value.strip()):
        return False
    try:
        return not bool(pd.isna(value))
    except (TypeError, ValueError):
        return True


def _seconds(value: object) -> float | None:
    if not _present(value):
        return None
    return pd.Timestamp(value).timestamp()


def run_records(runs: pd.DataFrame | None) -> dict[str, RunRecord]:
    """The FINISHED runs of a ``mlflow.search_runs`` frame that carry a ``maskdm.stage`` tag."""
    if runs is None or runs.empty:
        return {}
    records: dict[str, RunRecord] = {}
    for row in runs.to_dict("records"):
        stage = row.get(f"tags.{STAGE_TAG}")
        if row.get("status") != "FINISHED" or not _present(stage):
            continue
        fields = {kind: {} for kind in ("params", "metrics", "tags")}
        for column, value in row.items():
            kind, dot, key = column.partition(".")
            if dot and kind in fields and _present(value):
                fields[kind][key] = float(value) if kind == "metrics" else str(value)
        start, wall = _seconds(row.get("start_time")), None
        if start is not None and _present(row.get("end_time")):
            # The timestamps' difference, not two epoch floats' (those lose about 1e-7 s at 1.7e9 s).
            wall = (pd.Timestamp(row["end_time"]) - pd.Timestamp(row["start_time"])).total_seconds()
        records[row["run_id"]] = RunRecord(
            run_id=row["run_id"],
            stage=str(stage),
            params=fields["params"],
            metrics=fields["metrics"],
            tags=fields["tags"],
            start_time=start if start is not None else -math.inf,
            wall_s=wall,
        )
    return records


def newest_first(records: Iterable[RunRecord]) -> list[RunRecord]:
    return sorted(records, key=lambda r: r.start_time, reverse=True)


# --------------------------------------------------------------------------------------------
# Model stages and scores


def model_stage_of(tags: Mapping[str, str], params: Mapping[str, str]) -> str | None:
    """One of :data:`MODEL_STAGE_VALUES` for a model run or any run descending from one.

    The newest stage of the run's lineage among finetune > train_masks > prune decides; a prune
    run with pruning_ratio 0 (and a bare pretrain run) is the dense reference. A finetune is
    ``finetuned`` when its lineage holds train_masks and ``finetuned_no_mask_training`` when it
    holds only extract_masks (:func:`maskdm.tracking.masks_source_of`), whoever made it. For a
    sample or fid run pass its own tags and params (the lineage params include pruning_ratio).
    """
    stages = lineage_stages(tags)
    if "finetune" in stages:
        return "finetuned_no_mask_training" if masks_source_of(stages) == "extract_masks" else "finetuned"
    if "train_masks" in stages:
        return "masked"
    if "prune" in stages:
        return "dense" if parse_ratio(params.get("pruning_ratio")) == 0 else "pruned"
    if "pretrain" in stages:
        return "dense"
    return None


def model_run_of_sample(sample: RunRecord) -> str | None:
    """The run whose model a sample run sampled: its ``model_run_id`` param, else the lineage rule."""
    ref = sample.params.get("model_run_id")
    if ref:
        return parse_run_ref(ref)[0]
    upstream = sample.upstream
    return next((upstream[s] for s in ("finetune", "train_masks", "prune", "pretrain") if s in upstream), None)


@dataclass(frozen=True)
class FidScore:
    value: float
    fid_run_id: str
    sample_run_id: str | None
    metric: str = FID_METRIC
    protocol: FidProtocol | None = None
    start_time: float = 0.0
    replicate: int = 0
    se: float | None = None  # the fid run's own bootstrap standard error over its samples (``<metric>_se``)

    @property
    def protocol_id(self) -> str:
        return self.protocol.id if self.protocol else UNRECORDED


@dataclass(frozen=True)
class ModelScores:
    """What the sample and fid runs of one model run measured."""

    fids: Mapping[tuple[str, str], FidScore]  # newest value per (FID metric, protocol id)
    newest_sample: RunRecord | None  # the newest sample run of the model
    #: Newest value per (FID metric, replicate 0's protocol id, replicate): a replicate's sample
    #: seed is offset by its number, so its protocol is named by the seed replicate 0 had
    #: (:func:`replicate_zero_protocol`) and all replicates of one protocol share a column.
    by_replicate: Mapping[tuple[str, str, int], FidScore] = None  # type: ignore[assignment]

    def comparable(self) -> dict[tuple[str, str], FidScore]:
        """Newest value per (FID metric, replicate 0's protocol id): the model's FIDs as replicates
        compare (a replicate-k run sampled with seed + k counts under replicate 0's protocol)."""
        newest: dict[tuple[str, str], FidScore] = {}
        for (metric, protocol_id, _), score in self.by_replicate.items():
            kept = newest.setdefault((metric, protocol_id), score)
            if score.start_time > kept.start_time:
                newest[(metric, protocol_id)] = score
        return newest

    def of_metric(self, metric: str) -> list[FidScore]:
        """The model's scores under ``metric``, one per protocol, newest first."""
        return sorted((s for (m, _), s in self.fids.items() if m == metric), key=lambda s: s.start_time, reverse=True)


def collect_scores(records: Mapping[str, RunRecord]) -> dict[str, ModelScores]:
    """``{model run id: ModelScores}`` for every model run that has a FINISHED sample run."""
    samples_by_model: dict[str, list[RunRecord]] = defaultdict(list)
    for record in records.values():
        if record.stage == "sample" and (model_run := model_run_of_sample(record)):
            samples_by_model[model_run].append(record)
    fids_by_sample: dict[str, list[RunRecord]] = defaultdict(list)
    for record in records.values():
        if record.stage == "fid":
            sample_ref = record.upstream.get("sample") or record.params.get("sample_run_id")
            if sample_ref:
                fids_by_sample[parse_run_ref(sample_ref)[0]].append(record)

    scores = {}
    for model_run, samples in samples_by_model.items():
        fid_runs = newest_first(f for s in samples for f in fids_by_sample.get(s.run_id, ()))
        fids: dict[tuple[str, str], FidScore] = {}
        by_replicate: dict[tuple[str, str, int], FidScore] = {}
        for fid_run in fid_runs:
            protocol = FidProtocol.from_tags(fid_run.tags)
            replicate = replicate_of_run(fid_run)
            base = replicate_zero_protocol(protocol, replicate)
            for name, value in fid_run.metrics.items():
                if is_fid_metric(name):
                    se = fid_run.metrics.get(name + SE_SUFFIX)
                    score = FidScore(value, fid_run.run_id, fid_run.upstream.get("sample"), name, protocol, fid_run.start_time, se=se)
                    fids.setdefault((name, score.protocol_id), score)
                    score = FidScore(value, fid_run.run_id, fid_run.upstream.get("sample"), name, base, fid_run.start_time, replicate, se)
                    by_replicate.setdefault((name, score.protocol_id, replicate), score)
        scores[model_run] = ModelScores(fids, newest_first(samples)[0], by_replicate)
    return scores


def replicate_of_run(record: RunRecord) -> int:
    """The run's ``maskdm.replicate`` tag; 0 for a run without one (made before replicates, or of a
    stage all replicates share)."""
    try:
        return int(record.tags.get(REPLICATE_TAG, 0))
    except (TypeError, ValueError):
        return 0


def replicate_zero_protocol(protocol: FidProtocol | None, replicate: int) -> FidProtocol | None:
    """The protocol with the sampling seed replicate 0 used (seed - replicate): what a replicate's
    FID is compared under."""
    if protocol is None or not replicate:
        return protocol
    try:
        seed = int(protocol.get("seed"))
    except ValueError:
        return protocol
    return FidProtocol(tuple((p, str(seed - replicate) if p == "seed" else v) for p, v in protocol.parts))


@dataclass(frozen=True)
class FidColumn:
    """One FID column group of the table: one metric under one protocol."""

    name: str  # the metric for its main protocol, else "<metric>@<protocol id>"
    metric: str
    protocol_id: str
    protocol: FidProtocol | None


def fid_columns(scores: Mapping[str, ModelScores], model_runs: Iterable[str] | None = None) -> list[FidColumn]:
    """The FID column groups of the model runs' scores: ``fid`` first, then the other metrics by name.

    Per metric, the main protocol (the column named by the metric) is the recorded protocol that
    scores the most model runs (ties: the newest fid run); the others follow, the same way ordered,
    each as ``<metric>@<protocol id>``. Runs with no recorded protocol never take the metric's name.
    """
    wanted = set(scores) if model_runs is None else set(model_runs) & set(scores)
    coverage: dict[tuple[str, str], list] = {}
    for model_run in wanted:
        # Under replicate 0's protocol (by_replicate), so a model's replicates count once.
        for key, score in scores[model_run].comparable().items():
            entry = coverage.setdefault(key, [0, -math.inf, score.protocol])
            entry[0] += 1
            entry[1] = max(entry[1], score.start_time)
    metrics = sorted({m for m, _ in coverage}, key=lambda m: (m != FID_METRIC, m))
    columns = []
    for metric in metrics:
        ranked = sorted(
            (k for k in coverage if k[0] == metric),
            key=lambda k: (k[1] != UNRECORDED, coverage[k][0], coverage[k][1], k[1]),
            reverse=True,
        )
        for i, (_, protocol_id) in enumerate(ranked):
            main = i == 0 and protocol_id != UNRECORDED
            name = metric if main else f"{metric}@{protocol_id}"
            columns.append(FidColumn(name, metric, protocol_id, coverage[(metric, protocol_id)][2]))
    if not any(c.metric == FID_METRIC for c in columns):
        # The Inception column is always there (empty when nothing was scored with it).
        columns.insert(0, FidColumn(FID_METRIC, FID_METRIC, "", None))
    return columns


def split_fid_column(name: str) -> tuple[str, str | None]:
    """``fid_shapes@1a2b3c4d5e`` -> (``fid_shapes``, ``1a2b3c4d5e``); ``fid`` -> (``fid``, None)."""
    metric, at, protocol_id = name.partition("@")
    return metric, (protocol_id if at else None)


def is_fid_column(name: str) -> bool:
    """``fid``, ``fid_shapes``, ``fid@<id>``; not ``fid@<id>_bootstrap_se`` (that FID's bootstrap SE)."""
    return is_fid_metric(split_fid_column(name)[0]) and not name.endswith(BOOTSTRAP_SE_SUFFIX)


# --------------------------------------------------------------------------------------------
# The table


#: The model run each model stage's values are read from (its eval_loss: one value per run).
MODEL_RUN_ID_COLUMNS = {"dense": "dense_run_id", "pruned": "prune_run_id", "masked": "train_masks_run_id", "finetuned": "finetune_run_id"}
#: The mask-trained model's loss on held-out images (train_masks' ``heldout_loss_final``).
HELDOUT_COLUMN = "masked_heldout_loss"
#: ``<model stage>_<FID column>`` + this: that FID's own bootstrap SE over its samples (the fid
#: run's ``<metric>_se``), kept in the summary only where n = 1, where it is the only spread there is.
BOOTSTRAP_SE_SUFFIX = "_bootstrap_se"


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
    share that run (:func:`maskdm.verdicts.summarize`)."""
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
    """Mean, SE and n over the replicates of each row key (:func:`maskdm.verdicts.summarize`)."""
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
    :func:`maskdm.verdicts.paired_differences`).

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


def table_fid_names(table: pd.DataFrame) -> list[str]:
    """The FID column names a :func:`build_table` table has (``fid``, ``fid_shapes``, ``fid@<id>``), ``fid`` first."""
    prefix = "finetuned_"
    names = [c[len(prefix):] for c in table.columns if c.startswith(prefix) and is_fid_column(c[len(prefix):])]
    # A summary's fid_se / fid_n are the replicates' standard error and count of `fid`, not FIDs of their own.
    return [n for n in names if not any(n == f"{base}{suffix}" for base in names for suffix in ("_se", "_n"))]


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


# --------------------------------------------------------------------------------------------
# Querying the tracking store


def resolve_experiment(ref: str) -> str:
    """The ID of the experiment named ``ref``, or ``ref`` itself if it is an experiment ID."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(ref)
    if experiment is None and ref.isdigit():
        try:
            experiment = client.get_experiment(ref)
        except MlflowException:
            experiment = None
    if experiment is None:
        raise MaskDMError(f"experiment '{ref}' does not exist in the tracking store {mlflow.get_tracking_uri()}")
    return experiment.experiment_id


def get_run_or_fail(run_id: str, what: str = "run_id"):
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise MaskDMError(f"{what}: run '{run_id}' does not exist in the tracking store {mlflow.get_tracking_uri()}") from None


def concat_frames(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if f is not None and not f.empty]
    if not frames:
        return pd.DataFrame(columns=["run_id", "status", "start_time", "end_time"])
    return pd.concat(frames, ignore_index=True).drop_duplicates("run_id", ignore_index=True)


def runs_by_id(run_ids: Iterable[str]) -> pd.DataFrame:
    """The runs with these IDs, from any experiment."""
    import mlflow

    ids = sorted(set(run_ids))
    frames = []
    for start in range(0, len(ids), _IN_CHUNK):
        quoted = ", ".join(f"'{i}'" for i in ids[start:start + _IN_CHUNK])
        frames.append(mlflow.search_runs(search_all_experiments=True, filter_string=f"attributes.run_id IN ({quoted})"))
    return concat_frames(frames)


def with_ancestors(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` plus every run their ``maskdm.upstream.*`` tags name that it lacks (from any experiment)."""
    upstream_columns = [c for c in runs.columns if c.startswith(f"tags.{UPSTREAM_TAG_PREFIX}")]
    named = {v for c in upstream_columns for v in runs[c] if _present(v)}
    missing = named - set(runs["run_id"])
    # Lineage tags hold every ancestor, so one round finds them all.
    return concat_frames([runs, runs_by_id(missing)]) if missing else runs


def runs_frame(
    experiment_ids: Sequence[str] | None = None,
    parent_run_id: str | None = None,
    run_ids: Iterable[str] | None = None,
) -> pd.DataFrame:
    """The ``mlflow.search_runs`` frame a report is built from, plus the ancestors of its runs.

    ``parent_run_id`` (a driver run): its children, and the runs tagged ``maskdm.used_by.<id>``.
    ``run_ids``: exactly these runs. ``experiment_ids``: every run of these experiments. With none
    of the three: every run of the active experiment (``MLFLOW_EXPERIMENT_NAME``/``_ID``, the
    active run's, else Default).
    """
    import mlflow

    frames = []
    if parent_run_id:
        parent = get_run_or_fail(parent_run_id)
        frames.append(mlflow.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
        ))
        frames.append(mlflow.search_runs(
            search_all_experiments=True, filter_string=f"tags.`{USED_BY_TAG_PREFIX}{parent_run_id}` = 'true'"
        ))
    if run_ids is not None:
        frames.append(runs_by_id(run_ids))
    if experiment_ids is not None or (not parent_run_id and run_ids is None):
        frames.append(mlflow.search_runs(list(experiment_ids) if experiment_ids is not None else None))
    return with_ancestors(concat_frames(frames))
