"""Which model a run is (:func:`model_stage_of`), the FIDs of each model run per metric,
protocol and replicate (:func:`collect_scores`), and the FID columns they make (:func:`fid_columns`)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from maskdm.evaluation.fid_protocol import FID_METRIC, SE_SUFFIX, UNRECORDED, FidProtocol, is_fid_metric
from maskdm.report.runs import BOOTSTRAP_SE_SUFFIX, RunRecord, newest_first, parse_ratio
from maskdm.tracking import REPLICATE_TAG, lineage_stages, masks_source_of, parse_run_ref

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
