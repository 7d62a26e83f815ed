"""Runs as records (:class:`RunRecord`: stage, params, metrics, tags, lineage, times) and reading
them from the tracking store (:func:`runs_frame`, the driver's runs and their ancestors), with
the tag and column names the report shares."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from maskdm.errors import MaskDMError
from maskdm.tracking import STAGE_TAG, UPSTREAM_TAG_PREFIX

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
#: ``<model stage>_<FID column>`` + this: that FID's own bootstrap SE over its samples (the fid
#: run's ``<metric>_se``), kept in the summary only where n = 1, where it is the only spread there is.
BOOTSTRAP_SE_SUFFIX = "_bootstrap_se"
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
