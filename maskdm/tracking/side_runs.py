"""Cached side runs: results shared by many stage runs (FID reference statistics, classifiers,
latent caches), made once per machine and key, and found by their digests."""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import RunStatus

from maskdm import liveness
from maskdm.tracking.dead_runs import _heartbeat
from maskdm.tracking.lineage import STAGE_TAG, client, find_runs, has_artifact

log = logging.getLogger("maskdm.tracking")


# --- cached side runs: results shared by many stage runs (FID reference statistics, classifiers) ---


def source_digest(*modules: str) -> str:
    """A digest of these modules' source: a cached side run is remade when the code that made it changes."""
    sha = hashlib.sha256()
    for module in modules:
        sha.update(Path(__import__(module, fromlist=["_"]).__file__).read_bytes())
    return sha.hexdigest()[:16]


def cached_artifact(
    stage_name: str, key_tag: str, key: str, artifact: str, keep_in: str | os.PathLike | None = None
) -> tuple[str, Path] | None:
    """(run ID, downloaded artifact) of the FIRST FINISHED ``stage_name`` run tagged ``key_tag=key``, if any.

    The first to finish, not the newest: two processes that find no cache and both make one (two
    drivers at once) must end up using the same one. Each looks again after logging its own, and
    the run that finished first is the same for both, whatever the order they started in.

    ``keep_in``: download into ``keep_in/<run ID>/`` once and reuse that copy (a run's artifacts
    never change), for artifacts too large to copy again for every stage; else a temporary folder.
    """
    for cached in find_runs(stage_name, {key_tag: key}, order_by="attributes.end_time ASC"):
        run_id = cached.info.run_id
        if has_artifact(run_id, artifact):
            log.info("reusing %s run %s (%s)", stage_name, run_id, key)
            if keep_in is not None:
                return run_id, _kept_copy(run_id, artifact, Path(keep_in))
            dst = tempfile.mkdtemp(prefix=f"maskdm-{stage_name}-")
            return run_id, Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=dst))
    return None


def _kept_copy(run_id: str, artifact: str, keep_in: Path) -> Path:
    folder = keep_in / run_id
    if not folder.is_dir():
        keep_in.mkdir(parents=True, exist_ok=True)
        # Downloaded beside it and renamed when complete: a copy cut off halfway is never taken.
        partial = Path(tempfile.mkdtemp(prefix=f".{run_id}-", dir=keep_in))
        try:
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(partial))
            os.rename(partial, folder)
        except OSError:
            if not folder.is_dir():  # else another process finished the same copy first
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return folder / artifact


@dataclass
class SideRun:
    """What a cache's maker hands :func:`cached_or_made` to log: the side run's params, metrics and files."""

    params: Mapping[str, object]
    metrics: Mapping[str, float]
    files: list[Path]


def cached_or_made(
    stage_name: str, key_tag: str, key: str, artifact: str, make: Callable[[Path], SideRun],
    keep_in: str | os.PathLike | None = None,
) -> tuple[str, Path]:
    """(run ID, local ``artifact``) of the ``stage_name`` cache run for ``key``; ``make(folder)``
    makes it (its files under ``folder``) when there is none, and it is logged as a side run.

    One process per machine and store makes it: the others wait on a lock file, then find it. So a
    ``--parallel`` sweep encodes a dataset or scores a reference once, not once per process.
    Processes on different machines sharing a store may each make one; :func:`cached_artifact`
    keeps them all on the first. A process killed while making it releases the lock (an flock).
    """
    found = cached_artifact(stage_name, key_tag, key, artifact, keep_in)
    if found is not None:
        return found
    with _machine_lock(stage_name, key):
        found = cached_artifact(stage_name, key_tag, key, artifact, keep_in)
        if found is not None:  # made by the process we waited for
            return found
        work = Path(tempfile.mkdtemp(prefix=f"maskdm-{stage_name}-"))
        try:
            made = make(work)
            run_id = log_side_run(stage_name, {key_tag: key}, made.params, made.metrics, made.files)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # the logged copy is the cache
        log.info("cached as %s run %s", stage_name, run_id)
    return cached_artifact(stage_name, key_tag, key, artifact, keep_in)


@contextmanager
def _machine_lock(stage_name: str, key: str):
    from filelock import FileLock, Timeout

    name = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{stage_name}|{key}".encode()).hexdigest()[:32]
    # Per user: a folder another user made first would refuse this one's lock files.
    user = os.getuid() if hasattr(os, "getuid") else getpass.getuser()  # a uid needs no passwd entry
    folder = Path(tempfile.gettempdir()) / f"maskdm-locks-{user}"
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / f"{name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is making this %s; waiting for it", stage_name)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def log_side_run(stage_name: str, tags: Mapping[str, str], params: Mapping[str, object], metrics: Mapping[str, float], files: list[Path]) -> str:
    """A FINISHED run of ``stage_name`` beside the active run (same experiment, not its child).

    Cache runs are shared by every later fid run, so they must not live and die with this one.
    """
    active = mlflow.active_run()
    experiment_id = active.info.experiment_id if active else None
    mlflow_client = client()
    # The process, as on a stage run: a side run whose process dies while logging it is ended by
    # `maskdm reap` (maskdm.liveness) instead of staying RUNNING.
    created = mlflow_client.create_run(experiment_id or "0", tags={STAGE_TAG: stage_name, **liveness.process_tags(), **tags})
    run_id = created.info.run_id
    heartbeat = _heartbeat(run_id).start()
    try:
        for key, value in params.items():
            mlflow_client.log_param(run_id, key, str(value))
        for key, value in metrics.items():
            mlflow_client.log_metric(run_id, key, float(value))
        for path in files:
            mlflow_client.log_artifact(run_id, str(path))
    except KeyboardInterrupt:
        heartbeat.stop()
        mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        heartbeat.stop()
        mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    heartbeat.stop()
    mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run_id
