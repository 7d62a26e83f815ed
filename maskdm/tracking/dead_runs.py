"""Runs whose process died: the RUNNING runs of a store and ending those whose process is gone
(:mod:`maskdm.liveness` judges)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from mlflow.entities import RunStatus

from maskdm import liveness
from maskdm.tracking.lineage import client

log = logging.getLogger("maskdm.tracking")


# --- runs whose process died ----------------------------------------------------------------------


def _heartbeat(run_id: str) -> liveness.Heartbeat:
    beat_client = client()
    return liveness.Heartbeat(
        lambda: beat_client.set_tag(run_id, liveness.HEARTBEAT_TAG, str(int(time.time()))), liveness.heartbeat_interval()
    )


def running_runs(experiment_ids: Iterable[str] | None = None, filter_string: str = "") -> list:
    """Every RUNNING run of these experiments (default: all) that also matches ``filter_string``."""
    mlflow_client = client()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in mlflow_client.search_experiments()]
    experiment_ids = list(experiment_ids)
    query = " and ".join(["attributes.status = 'RUNNING'", *([filter_string] if filter_string else [])])
    found, token = [], None
    while experiment_ids:
        page = mlflow_client.search_runs(
            experiment_ids, query, order_by=["attributes.start_time ASC"], max_results=1000, page_token=token
        )
        found.extend(page)
        token = page.token
        if not token:
            break
    return found


@dataclass
class RunCheck:
    """A RUNNING run, the verdict on its process, and whether it was marked KILLED for it."""

    run: object
    verdict: liveness.Verdict
    ended: bool = False


def end_dead_runs(
    runs: Iterable, ended_by: str, stale_after: float | None = None, dry_run: bool = False
) -> list[RunCheck]:
    """Judge each RUNNING run (:func:`maskdm.liveness.judge`); mark the dead ones KILLED unless ``dry_run``.

    A run marked KILLED gets the tags ``maskdm.ended_by`` = ``ended_by`` and ``maskdm.killed_reason``,
    and as its end time the moment it was last known alive. Each run is read again just before it
    is marked, and left alone if it has ended or sent a heartbeat meanwhile.
    """
    mlflow_client = client()
    checks = []
    for run in runs:
        check = RunCheck(run, liveness.judge(run.data.tags, run.info.start_time / 1000, stale_after=stale_after))
        checks.append(check)
        if dry_run or not check.verdict.dead:
            continue
        run_id = run.info.run_id
        fresh = mlflow_client.get_run(run_id)
        beat = liveness.HEARTBEAT_TAG
        if fresh.info.status != "RUNNING" or fresh.data.tags.get(beat) != run.data.tags.get(beat):
            check.verdict = liveness.Verdict(False, "it ended or sent a heartbeat while being judged", check.verdict.last_seen)
            continue
        mlflow_client.set_tag(run_id, liveness.ENDED_BY_TAG, ended_by)
        mlflow_client.set_tag(run_id, liveness.KILLED_REASON_TAG, check.verdict.reason)
        end_ms = max(int(check.verdict.last_seen * 1000), run.info.start_time)
        mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED), end_time=end_ms)
        check.ended = True
        log.warning("marked run %s KILLED: %s", run_id, check.verdict.reason)
    return checks
