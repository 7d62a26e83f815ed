"""Which finetune run a promote judges and by which FID: candidates with their FIDs per metric
and protocol (replicates under replicate 0's), and the one (metric, protocol) pair they are
ranked by (:func:`choose_scoring`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import mlflow
import pandas as pd

from maskdm.errors import MaskDMError
from maskdm.report import (
    UNRECORDED, FidProtocol, FidScore, RunRecord, collect_scores, concat_frames, describe_protocol, is_fid_metric,
    run_records, runs_by_id,
)
from maskdm.tracking import STAGE_TAG, UPSTREAM_TAG_PREFIX, get_upstream


# --------------------------------------------------------------------------------------------
# Candidates: finetune runs and their FIDs


#: ``metric``/``protocol`` value meaning: the one present (an error naming them when there are several).
AUTO = "auto"


@dataclass(frozen=True)
class Scoring:
    """The FID a promote ranks and compares by: one metric under one FID protocol."""

    metric: str
    protocol_id: str
    protocol: FidProtocol | None

    def describe(self) -> str:
        return f"{self.metric} under protocol {describe_protocol(self.protocol)}"


@dataclass(frozen=True)
class Candidate:
    """A FINISHED finetune run with a model/ artifact and its FIDs (per metric and protocol)."""

    run_id: str
    fids: Mapping[tuple[str, str], FidScore]
    sparsity: float | None
    params: Mapping[str, str]
    lineage: Mapping[str, str]
    start_time: float = 0.0

    def score(self, scoring: Scoring) -> FidScore | None:
        return self.fids.get((scoring.metric, scoring.protocol_id))

    def fid(self, scoring: Scoring) -> float | None:
        score = self.score(scoring)
        return score.value if score else None

    def newest_per_metric(self) -> dict[str, FidScore]:
        newest: dict[str, FidScore] = {}
        for score in sorted(self.fids.values(), key=lambda s: s.start_time, reverse=True):
            newest.setdefault(score.metric, score)
        return newest


def check_metric(metric: str) -> str:
    metric = metric.strip()
    if metric.lower() == AUTO:
        return AUTO
    if not is_fid_metric(metric):
        raise MaskDMError(
            f"metric must be auto, 'fid' (Inception pool3) or 'fid_<name>' (e.g. fid_shapes, fid_inception_64), got '{metric}'"
        )
    return metric


def check_protocol(protocol: str) -> str:
    protocol = protocol.strip()
    if not protocol:
        raise MaskDMError("protocol must be auto, a protocol id (tag maskdm.fid_protocol_id of a fid run) or its full key")
    return AUTO if protocol.lower() == AUTO else protocol


def _protocol_matches(protocol_id: str, protocol: FidProtocol | None, wanted: str) -> bool:
    return wanted == AUTO or wanted == protocol_id or (protocol is not None and wanted == protocol.key)


def choose_scoring(candidates: Sequence[Candidate], metric: str, protocol: str, where: str) -> Scoring:
    """The one (metric, protocol) of the candidates' FIDs that ``metric`` and ``protocol`` select.

    ``auto`` selects any (``protocol=auto`` skips FIDs of no recorded protocol when there are
    others); exactly one must remain, else a one-line MaskDMError naming those present.
    """
    present: dict[tuple[str, str], FidProtocol | None] = {}
    for c in candidates:
        for key, score in c.fids.items():
            present.setdefault(key, score.protocol)
    matching = [k for k in present if (metric == AUTO or k[0] == metric) and _protocol_matches(k[1], present[k], protocol)]
    if protocol == AUTO and any(k[1] != UNRECORDED for k in matching):
        # fid runs made before protocols were recorded compare with nothing: auto skips them.
        matching = [k for k in matching if k[1] != UNRECORDED]
    if len(matching) == 1:
        (metric_, protocol_id), = matching
        return Scoring(metric_, protocol_id, present[matching[0]])
    listing = "; ".join(f"{m} under protocol {describe_protocol(present[(m, i)])}" for m, i in sorted(present))
    has = "have" if where.startswith("the ") else "has"
    if not matching:
        wanted = "FID" if metric == AUTO else f"FID '{metric}'"
        if protocol != AUTO:
            wanted += f" under protocol '{protocol}'"
        raise MaskDMError(f"{where} {has} no {wanted}, only {listing}; pass metric=<name> and protocol=<id> of one of them")
    raise MaskDMError(
        f"{where} {has} FIDs of {len(matching)} protocols, which do not compare: "
        + "; ".join(f"{m} under protocol {describe_protocol(present[(m, i)])}" for m, i in sorted(matching))
        + "; pass metric=<name> and protocol=<id> to choose one"
    )


def _scored_runs(fid_filter: str) -> pd.DataFrame:
    """FINISHED fid runs (any experiment) matching ``fid_filter``, with their sample runs."""
    fids = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{STAGE_TAG}` = 'fid' and attributes.status = 'FINISHED' and {fid_filter}",
    )
    column = f"tags.{UPSTREAM_TAG_PREFIX}sample"
    sample_ids = set(fids[column].dropna()) if column in fids.columns else set()
    return concat_frames([fids, runs_by_id(sample_ids) if sample_ids else None])


def fid_scores(finetune_run_id: str | None = None) -> dict:
    """``{model run id: ModelScores}`` from the fid runs of one finetune run (or of every finetune run)."""
    tag = f"tags.`{UPSTREAM_TAG_PREFIX}finetune`"
    fid_filter = f"{tag} = '{finetune_run_id}'" if finetune_run_id else f"{tag} LIKE '%'"
    return collect_scores(run_records(_scored_runs(fid_filter)))


def candidate(run_ref: str, metric: str = AUTO, protocol: str = AUTO) -> tuple[Candidate, Scoring]:
    """The finetune run ``run_ref`` as a candidate, and the FID it is judged by; one-line MaskDMErrors."""
    up = get_upstream(run_ref, ["finetune"], "model", "finetune_run_id")
    scores = fid_scores(up.run_id).get(up.run_id)
    fids = scores.comparable() if scores else {}
    if not fids:
        wanted = "no FID" if metric == AUTO else f"no FID '{metric}'"
        raise MaskDMError(
            f"finetune run {up.run_id} has {wanted}: run `maskdm sample --model_run_id {up.run_id}` "
            f"and `maskdm fid` on that sample run first"
        )
    run = mlflow.MlflowClient().get_run(up.run_id)
    record = RunRecord(up.run_id, up.stage, up.params, dict(run.data.metrics), up.tags, run.info.start_time / 1000, None)
    chosen = _candidate_of(record, fids)
    return chosen, choose_scoring([chosen], metric, protocol, f"finetune run {up.run_id}")


def _candidate_of(record: RunRecord, fids: Mapping[tuple[str, str], FidScore]) -> Candidate:
    return Candidate(
        run_id=record.run_id,
        fids=fids,
        sparsity=record.metrics.get("sparsity"),
        params=dict(record.params),
        lineage=record.lineage,
        start_time=record.start_time,
    )


def best_candidate(
    experiment_ids: Sequence[str], metric: str = AUTO, min_sparsity: float = 0.0, protocol: str = AUTO
) -> tuple[Candidate, Scoring]:
    """The lowest-FID FINISHED finetune run with sparsity >= ``min_sparsity`` in these experiments.

    The FID is one metric under one protocol (:func:`choose_scoring` over the scored runs that
    pass ``min_sparsity``). Ties go to the sparser, then the newer run. A run that logged no
    ``sparsity`` counts only when ``min_sparsity`` is 0.
    """
    finetunes = run_records(mlflow.search_runs(
        list(experiment_ids), filter_string=f"tags.`{STAGE_TAG}` = 'finetune' and attributes.status = 'FINISHED'"
    ))
    scores = fid_scores()
    scored = []
    for record in finetunes.values():
        score = scores.get(record.run_id)
        sparsity = record.metrics.get("sparsity")
        if score and score.fids and (min_sparsity <= 0 or (sparsity is not None and sparsity >= min_sparsity)):
            scored.append(_candidate_of(record, score.comparable()))
    where = f"experiment(s) {', '.join(experiment_ids)}"
    if not scored:
        wanted = "an FID" if metric == AUTO else f"a '{metric}' FID"
        raise MaskDMError(
            f"no FINISHED finetune run with {wanted} and sparsity >= {min_sparsity:g} in {where}: "
            "run sample and fid on a finetune run first, or lower min_sparsity"
        )
    scoring = choose_scoring(scored, metric, protocol, f"the finetune runs with sparsity >= {min_sparsity:g} in {where}")
    pool = [c for c in scored if c.score(scoring)]
    best = min(pool, key=lambda c: (c.fid(scoring), -(c.sparsity or 0.0), -c.start_time))
    get_upstream(best.run_id, ["finetune"], "model", "finetune_run_id")  # it must hold its model
    return best, scoring
