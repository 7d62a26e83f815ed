"""Running one step: the stage cache (a FINISHED run with the step's cache key is reused), dead runs
ended, and the stage started as an MLflow Project run, here (one at a time or from worker threads)
or on another MLflow Projects backend (:class:`Launch`: backend, GPUs, threads)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from maskdm.driver.plan import CACHE_KEY_TAG, PARENT_RUN_TAG, REPO_DIR, STEP_TAG, USED_BY_TAG_PREFIX, cache_key, full_params
from maskdm.errors import MaskDMError, positive_or_auto

if TYPE_CHECKING:
    from maskdm.warm_start.handle import WarmServer

#: One logger for the whole driver, as before it was a package (its lines read "maskdm.driver: ...").
log = logging.getLogger("maskdm.driver")


# --- running stages --------------------------------------------------------------------------------


@dataclass
class StageOutcome:
    step: str
    stage: str
    run_id: str
    reused: bool
    resumed_from: str | None = None
    #: Wall and CPU seconds of the stage's processes (CPU summed over all of them; 0 when reused).
    wall_s: float = 0.0
    cpu_s: float = 0.0


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def find_cached_run(experiment_id: str, key: str) -> str | None:
    """The newest FINISHED run of the experiment with cache key ``key``."""
    runs = _client().search_runs(
        [experiment_id], f"tags.`{CACHE_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0].info.run_id if runs else None


def find_resumable_run(experiment_id: str, key: str) -> str | None:
    """The newest unfinished (killed, failed or still running) run with ``key`` that logged checkpoints.

    A run still running elsewhere is as good a start as a killed one: resuming only reads its
    checkpoints, and the new run writes its own.
    """
    from maskdm.tracking import has_artifact

    runs = _client().search_runs(
        [experiment_id], f"tags.`{CACHE_KEY_TAG}` = '{key}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=20,
    )
    for run in runs:
        if has_artifact(run.info.run_id, "checkpoints"):
            return run.info.run_id
    return None


def end_dead_runs_of_step(experiment_id: str, key: str, parent_run_id: str) -> list[str]:
    """Mark KILLED every RUNNING run with cache key ``key`` whose process is dead; their IDs.

    Only what this host can prove (:func:`maskdm.liveness.judge` without ``stale_after``): a run
    recorded by a process on another host is left alone, and the stage is run again beside it, as
    with two drivers at once. ``maskdm reap --stale_after`` ends those.
    """
    from maskdm.tracking import end_dead_runs, running_runs

    running = running_runs([experiment_id], f"tags.`{CACHE_KEY_TAG}` = '{key}'")
    checks = end_dead_runs(running, ended_by=f"maskdm main (driver run {parent_run_id})") if running else []
    return [c.run.info.run_id for c in checks if c.ended]


#: On a driver (``main``) run: a digest of what it sweeps (its parameters and experiment). A rerun
#: of the same sweep ends the runs of its predecessors with the same key whose process is dead.
DRIVER_KEY_TAG = "maskdm.driver_key"


def driver_key(params: Mapping[str, object], experiment_id: str) -> str:
    payload = json.dumps([experiment_id, sorted((str(k), str(v)) for k, v in params.items())])
    return hashlib.sha256(payload.encode()).hexdigest()


def end_dead_driver_runs(experiment_id: str, key: str, driver_run_id: str) -> list[str]:
    """Mark KILLED the RUNNING driver runs of this sweep (``key``) whose process is dead; their IDs.

    A driver killed by SIGKILL cannot end its own run; the stage runs it left are ended step by
    step (:func:`end_dead_runs_of_step`), and its own run here, by the driver that reruns the sweep.
    The same rules as there: only what this machine can prove.
    """
    from maskdm.tracking import STAGE_TAG, end_dead_runs, running_runs

    running = [r for r in running_runs([experiment_id], f"tags.`{DRIVER_KEY_TAG}` = '{key}' and tags.`{STAGE_TAG}` = 'main'")
               if r.info.run_id != driver_run_id]
    checks = end_dead_runs(running, ended_by=f"maskdm main (driver run {driver_run_id})") if running else []
    return [c.run.info.run_id for c in checks if c.ended]


def run_stage(
    stage: str,
    params: Mapping[str, str],
    *,
    experiment_id: str,
    parent_run_id: str,
    step: str | None = None,
    tags: Mapping[str, str] | None = None,
    project_dir: Path = REPO_DIR,
    code_version: str | None = None,
    launch: Launch | None = None,
    env: Mapping[str, str] | None = None,
    concurrent: bool = False,
    warm: WarmServer | None = None,
) -> StageOutcome:
    """Reuse the FINISHED run with this stage's cache key, or run the stage as a child MLflow Project run.

    ``env`` (a GPU, a thread count) is added to the stage process's environment only. By default
    the stage runs as ``mlflow.projects.run(synchronous=True)`` in this thread; ``concurrent``
    (other stages start from other threads meanwhile) submits it instead (:func:`_submit_and_wait`).
    ``launch.backend`` other than ``local`` hands it to that MLflow Projects backend. With
    ``warm`` (:func:`start_warm_server`), the stage's process is forked from that server instead of
    starting a fresh Python; everything else (the run, its parameters and tags) is the same.
    """
    import mlflow
    from mlflow.entities import Param
    from mlflow.exceptions import ExecutionException
    from mlflow.utils.mlflow_tags import (
        MLFLOW_PROJECT_ENTRY_POINT,
        MLFLOW_RUN_NAME,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
    )

    from maskdm.liveness import process_tags
    from maskdm.tracking import STAGE_TAG
    from maskdm.tracking import code_version as current_code_version

    step = step or stage
    full = full_params(stage, params, project_dir)
    key = cache_key(stage, full, code_version or current_code_version())
    cached = find_cached_run(experiment_id, key)
    if cached:
        log.info("%s: reusing FINISHED run %s", step, cached)
        # Lets `maskdm report --run_id <driver>` find runs this driver reused but did not make.
        _client().set_tag(cached, f"{USED_BY_TAG_PREFIX}{parent_run_id}", "true")
        return StageOutcome(step, stage, cached, reused=True)

    end_dead_runs_of_step(experiment_id, key, parent_run_id)
    passed = dict(full)
    resumed_from = find_resumable_run(experiment_id, key) if stage == "finetune" else None
    if resumed_from:
        log.info("%s: continuing from the checkpoints of unfinished run %s", step, resumed_from)
        passed["resume_run_id"] = resumed_from

    tags = {
        PARENT_RUN_TAG: parent_run_id,
        CACHE_KEY_TAG: key,
        STAGE_TAG: stage,
        STEP_TAG: step,
        MLFLOW_RUN_NAME: step,
        # This (driver) process until the stage's own process records itself: a run whose
        # driver is killed before the stage starts is still judged dead (maskdm.liveness).
        **process_tags(),
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    if launch is not None and launch.backend != "local":
        return _run_on_backend(stage, step, passed, tags, experiment_id, project_dir, launch, resumed_from)

    client = _client()
    # The run is made here, not by mlflow.projects.run, so that the cache key and the parent are on
    # it from its first moment: a run killed at any point is still found by find_resumable_run.
    # Given run_id, mlflow.projects.run neither creates a run nor logs parameters, so they are
    # logged here as `mlflow run` would; it still marks the run FAILED if the command fails.
    run = client.create_run(
        experiment_id,
        tags={
            **tags,
            MLFLOW_SOURCE_TYPE: "PROJECT",
            MLFLOW_SOURCE_NAME: str(project_dir),
            MLFLOW_PROJECT_ENTRY_POINT: stage,
        },
    )
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in passed.items()])
    log.info("%s: running as run %s%s", step, run_id, f" ({describe_env(env)})" if env else "")
    env = {**(env or {}), **(warm.environ(f"entrypoints.{stage}") if warm else {})}
    if concurrent:
        wall_s, cpu_s = _submit_and_wait(stage, step, passed, run_id, experiment_id, project_dir, env)
    else:
        wall_start, cpu_start = time.perf_counter(), _children_cpu_s()
        try:
            # One stage at a time: nothing else spawns while os.environ carries this stage's env.
            with _environ(env):
                mlflow.projects.run(
                    uri=str(project_dir), entry_point=stage, parameters=passed, experiment_id=experiment_id,
                    env_manager="local", synchronous=True, run_id=run_id,
                )
        except ExecutionException:
            raise MaskDMError(f"stage {stage} failed in run {run_id} ({step}); its error is printed above") from None
        wall_s, cpu_s = time.perf_counter() - wall_start, _children_cpu_s() - cpu_start
    # A warm stage's process is the server's child, not this process's: the server reports its CPU.
    cpu_s += warm.cpu_s(run_id) if warm else 0.0
    return StageOutcome(step, stage, run_id, reused=False, resumed_from=resumed_from, wall_s=wall_s, cpu_s=cpu_s)


#: What a warm server imports before it serves: what every stage imports on its way to its own
#: work (the CLI, MLflow's SQL stores, which a process loads with its first client), besides the
#: first stage's own module.
WARM_PRELOAD_FIRST = (
    "entrypoints.cli", "entrypoints.common",
    "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.store.artifact.local_artifact_repo", "mlflow.store.db.utils", "alembic.command", "alembic.config",
    "sqlalchemy.dialects.sqlite",
)
#: What it imports after that, between requests, with the other stages' modules: what stages import
#: lazily on their way (the git lookup of a run's source, diffusers' lazily loaded models and
#: pipelines, the plotting of train_masks' curves, ...), found by listing the modules each demo stage
#: imported after its own module. A stage forked before one of them is imported imports it itself;
#: a sweep killed early never pays for the rest. One not installed is skipped.
WARM_PRELOAD_LATER = (
    "git", "IPython",
    "diffusers.models.unets", "diffusers.models.autoencoders", "diffusers.pipelines.ddpm", "diffusers.pipelines.ddim",
    "diffusers.quantizers", "accelerate", "huggingface_hub", "safetensors.torch", "torchvision", "torch._dynamo", "sympy",
    "PIL.Image", "matplotlib.pyplot", "pandas", "scipy.linalg", "scipy.stats", "scipy.optimize", "scipy.sparse.linalg",
    "scipy.integrate", "scipy.spatial", "filelock",
)


def start_warm_server(stages: Iterable[str], project_dir: Path = REPO_DIR, per_stage_env: Iterable[str] = ()) -> WarmServer | None:
    """A warm server (:mod:`maskdm.warm_start`) for these stages' commands, started by the first
    stage that runs and importing in the background; None where warm starts are off (``MASKDM_WARM_START=0``) or impossible, and for a
    project other than this package's own (its commands are not ``maskdm <stage>``)."""
    from maskdm.warm_start.handle import WarmServer

    if Path(project_dir).resolve() != REPO_DIR.resolve():
        return None

    first, *rest = [f"entrypoints.{stage}" for stage in dict.fromkeys(stages)] or ["entrypoints.cli"]
    # Started by the first stage that runs (a sweep of cached stages starts none), ready once that
    # stage can start; the rest is imported while the stages run.
    modules = [*WARM_PRELOAD_FIRST, first, *rest, *WARM_PRELOAD_LATER]
    return WarmServer.launch(modules, "entrypoints.cli:cli", per_stage_env, ready_after=len(WARM_PRELOAD_FIRST) + 1,
                             when_needed=True)


# --- where and how many stages run at once -------------------------------------------------------

#: Backends mlflow.projects.run knows without plugins (plugins add ``mlflow.project_backend`` entry points).
BUILTIN_BACKENDS = ("local", "kubernetes", "databricks")
#: What mlflow's kubernetes backend reads from backend_config (``kube-context`` is optional).
KUBERNETES_KEYS = ("kube-job-template-path", "repository-uri")
#: The variables that size a stage process's CPU thread pools (torch reads OMP_NUM_THREADS at start).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Launch:
    """How the plan's stages are started: how many at once, on which GPUs, with how many threads.

    ``gpus`` None leaves CUDA_VISIBLE_DEVICES as the driver has it; ``()`` hides every GPU; a
    tuple of IDs makes one slot per GPU, and each running stage holds one slot, so no two running
    stages share a GPU. ``threads`` None leaves the thread variables alone.
    """

    parallel: int = 1
    gpus: tuple[str, ...] | None = None
    threads: int | None = None
    backend: str = "local"
    backend_config: dict = field(default_factory=dict)

    def slot_envs(self) -> list[dict[str, str]]:
        """The environment each of the ``parallel`` slots adds to the stage processes it runs."""
        envs = []
        for slot in range(self.parallel):
            env = {}
            if self.gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot] if self.gpus else ""
            if self.threads is not None:
                env.update({name: str(self.threads) for name in THREAD_VARS})
            envs.append(env)
        return envs

    def describe(self) -> str:
        if self.backend != "local":
            return f"up to {self.parallel} stage(s) at once on the MLflow Projects backend '{self.backend}'"
        parts = [f"up to {self.parallel} stage(s) at once"]
        if self.gpus == ():
            parts.append("on the CPU (GPUs hidden)")
        elif self.gpus:
            parts.append(f"on GPU(s) {','.join(self.gpus[: self.parallel])}, one each")
        if self.threads:
            parts.append(f"{self.threads} CPU thread(s) per stage")
        return ", ".join(parts)


def visible_gpus() -> tuple[str, ...]:
    """The GPUs this process may use, as IDs for CUDA_VISIBLE_DEVICES: the driver's own mask if it
    has one (so ``CUDA_VISIBLE_DEVICES=2,3 maskdm main`` uses GPUs 2 and 3), else 0..n-1."""
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is not None:
        ids = []
        for item in mask.split(","):
            item = item.strip()
            if not item or item.startswith("-"):
                break  # CUDA ignores the rest of the list from an invalid entry on
            ids.append(item)
        return tuple(ids)
    if not gpu_devices_present():
        return ()  # without importing torch (seconds of CPU the driver never otherwise needs)
    import torch

    return tuple(str(i) for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else ()


#: Device files of which a Linux machine with a GPU that torch can use has at least one: NVIDIA's
#: driver, ROCm's (torch.cuda on AMD) and WSL2's GPU bridge.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")


def gpu_devices_present() -> bool:
    """False only where torch cannot find a GPU: Linux without any of :data:`GPU_DEVICE_FILES`.
    Elsewhere (a GPU's files present, another OS) torch is asked."""
    return not sys.platform.startswith("linux") or any(os.path.exists(path) for path in GPU_DEVICE_FILES)


def known_backends() -> list[str]:
    from mlflow.utils.plugins import get_entry_points

    plugins = [e.name for e in get_entry_points("mlflow.project_backend")]
    return [*BUILTIN_BACKENDS, *(p for p in plugins if p not in BUILTIN_BACKENDS)]


def load_backend_config(value: str | Mapping | None) -> dict:
    """``backend_config``: a path to a JSON file or inline JSON, an object either way ("" = none)."""
    if value is None or isinstance(value, Mapping):
        return dict(value or {})
    text = str(value).strip()
    if not text:
        return {}
    if text.startswith(("{", "[")):
        source, what = text, "inline JSON"
    else:
        path = Path(os.path.expanduser(text))
        if not path.is_file():
            raise MaskDMError(f"backend_config: '{text}' is neither a JSON file that exists nor inline JSON ({{...}})")
        source, what = path.read_text(), str(path)
    try:
        config = json.loads(source)
    except ValueError as exc:
        raise MaskDMError(f"backend_config: {what} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise MaskDMError(f"backend_config: {what} must be a JSON object, e.g. {{\"repository-uri\": \"...\"}}")
    return config


def parse_gpus(value: object) -> tuple[str, ...] | None:
    """``auto`` -> None (decided later), ``none`` -> (), ``0,1,3`` (indices or GPU-/MIG- UUIDs) -> a tuple."""
    text = str(value).strip() if value is not None else "auto"
    if text.lower() in ("", "auto"):
        return None
    if text.lower() in ("none", "cpu"):
        return ()
    ids = tuple(item.strip() for item in text.split(","))
    for item in ids:
        if not (item.isdigit() or re.fullmatch(r"(GPU|MIG)-[0-9A-Za-z/-]+", item)):
            raise MaskDMError(f"gpus: '{item}' is not a GPU index or UUID; pass e.g. --gpus 0,1 (or auto, none)")
    if len(set(ids)) != len(ids):
        raise MaskDMError(f"gpus: {text} names a GPU twice; each running stage gets a GPU of its own")
    return ids


def resolve_launch(
    parallel: object = "auto",
    gpus: object = "auto",
    threads: object = "auto",
    backend: str | None = "local",
    backend_config: str | Mapping | None = None,
    *,
    cores: int | None = None,
    detect_gpus: Callable[[], tuple[str, ...]] = visible_gpus,
) -> Launch:
    """Check the options and decide the slots.

    - ``parallel`` auto: one stage per GPU slot (1 with none: the sequential driver as it was).
    - ``gpus`` auto: the visible GPUs when ``parallel`` > 1 (one each); with ``parallel`` 1 the
      environment is left as it is. A list pins every stage to one of its GPUs; ``none`` hides them.
    - ``threads`` auto: with ``parallel`` > 1, cores // parallel CPU threads per stage (two stages
      on two cores would otherwise each start two threads); with 1, torch's own choice.
    - ``backend``: ``local`` or an MLflow Projects backend (``kubernetes``, ``databricks``, a
      plugin) with its ``backend_config``; that backend places the stages, so gpus and threads stay auto.
    """
    backend = str(backend or "local").strip()
    if backend not in known_backends():
        raise MaskDMError(f"backend '{backend}' is not one of {', '.join(known_backends())} (mlflow.projects backends)")
    config = load_backend_config(backend_config)
    count = positive_or_auto("parallel", parallel, "it is how many stages run at once")
    pinned_threads = positive_or_auto("threads", threads, "it is the CPU threads of each stage process")
    listed = parse_gpus(gpus)
    if backend != "local":
        if listed is not None or pinned_threads is not None:
            raise MaskDMError(f"gpus and threads apply to the local backend; the '{backend}' backend places stages itself (set resources in its backend_config)")
        if backend == "kubernetes":
            missing = [key for key in KUBERNETES_KEYS if key not in config]
            if missing:
                raise MaskDMError(f"backend_config for kubernetes needs {', '.join(missing)} (see docs/details/main.md#a-cluster)")
            template = Path(os.path.expanduser(str(config["kube-job-template-path"])))
            if not template.is_file():
                raise MaskDMError(f"backend_config: kube-job-template-path {template} is not a file")
        return Launch(parallel=count or 1, backend=backend, backend_config=config)
    if config:
        raise MaskDMError("backend_config is for a cluster backend (e.g. --backend kubernetes); the local backend takes none")

    # No GPU found: None, not (): the stages' environment keeps whatever CUDA_VISIBLE_DEVICES it has.
    slots = listed if listed is not None else ((detect_gpus() or None) if count != 1 else None)
    parallel_n = count or (len(slots) if slots else 1)
    if slots and parallel_n > len(slots):
        raise MaskDMError(
            f"parallel {parallel_n} needs {parallel_n} GPUs, one per running stage, but gpus gives {len(slots)} "
            f"({','.join(slots)}); lower parallel or pass --gpus none to run on the CPU"
        )
    if listed is None and parallel_n == 1:
        slots = None  # one stage at a time, in the environment the driver was given: as before
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    thread_count = pinned_threads or (max(1, cores // parallel_n) if parallel_n > 1 else None)
    return Launch(parallel=parallel_n, gpus=slots, threads=thread_count)


def describe_env(env: Mapping[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items() if k != "MKL_NUM_THREADS")


@contextlib.contextmanager
def _environ(env: Mapping[str, str]):
    """``env`` set in os.environ for the block (which copies it into a child process), then undone."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _Submitted:
    """The stage processes running now (run ID -> mlflow SubmittedRun), to cancel them on an interrupt."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: dict[str, object] = {}
        self.cancelled = False

    def add(self, run_id: str, submitted) -> None:
        with self.lock:
            self.runs[run_id] = submitted
            cancelled = self.cancelled
        if cancelled:  # started while the driver was being interrupted
            _cancel(run_id, submitted)

    def remove(self, run_id: str) -> None:
        with self.lock:
            self.runs.pop(run_id, None)

    def cancel_all(self) -> None:
        with self.lock:
            self.cancelled = True
            runs = list(self.runs.items())
        for run_id, submitted in runs:
            _cancel(run_id, submitted)


_SUBMITTED = _Submitted()
#: mlflow's local backend copies os.environ when it starts a stage's process; holding this while
#: os.environ carries one stage's GPU and threads keeps every other stage's process from seeing them.
_SPAWN_LOCK = threading.Lock()


def _cancel(run_id: str, submitted) -> None:
    """Stop a started stage (MLflow's SubmittedRun.cancel: SIGTERM to its process, or to its process
    group where it leads one, then wait) and mark its run FAILED unless the stage ended it, as
    mlflow does on Ctrl-C."""
    log.error("cancelling run %s", run_id)
    try:
        submitted.cancel()
    finally:
        _mark_ended(run_id, "FAILED")


def _mark_ended(run_id: str, status: str) -> None:
    """Set the run's end status unless the stage (or the `mlflow run` around it) already did."""
    from mlflow.entities import RunStatus

    client = _client()
    if not RunStatus.is_terminated(client.get_run(run_id).info.status):
        client.set_terminated(run_id, status)


def _wait(submitted) -> tuple[bool, float]:
    """Wait for a submitted stage: (succeeded, CPU seconds of its process tree).

    The process's own rusage (os.wait4), not RUSAGE_CHILDREN's difference, which would also count
    the stages that ended meanwhile in other threads.
    """
    proc = getattr(submitted, "command_proc", None)
    if isinstance(proc, subprocess.Popen) and hasattr(os, "wait4"):
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except ChildProcessError:  # reaped already (cancelled)
            return submitted.wait(), 0.0
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode == 0, usage.ru_utime + usage.ru_stime
    return bool(submitted.wait()), 0.0


def _submit_and_wait(stage, step, passed, run_id, experiment_id, project_dir, env) -> tuple[float, float]:
    """Run a stage from a worker thread: its entry point's command started with ``env`` in its
    environment, then waited for. Returns (wall seconds, CPU seconds)."""
    import mlflow
    from mlflow.projects.backend import loader
    from mlflow.projects.utils import (
        MLFLOW_LOCAL_BACKEND_RUN_ID_CONFIG, PROJECT_BUILD_IMAGE, PROJECT_DOCKER_ARGS, PROJECT_DOCKER_AUTH,
        PROJECT_ENV_MANAGER, PROJECT_STORAGE_DIR, PROJECT_SYNCHRONOUS,
    )
    from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_BACKEND

    # What mlflow.projects.run(synchronous=True) does, less its wait, which must not hold the lock:
    # MLflow's local backend (its project backend plugin interface) checks the parameters against
    # the MLproject, builds the entry point's command and starts it with a copy of os.environ, then
    # returns its SubmittedRun. mlflow.projects.run(synchronous=False) would instead start an
    # `mlflow run --run-id` process per stage that imports MLflow's CLI to do the same (about 3 s
    # of CPU each: benchmarks/bench_parallel_launch.py).
    backend_config = {
        MLFLOW_LOCAL_BACKEND_RUN_ID_CONFIG: run_id, PROJECT_ENV_MANAGER: "local", PROJECT_SYNCHRONOUS: True,
        PROJECT_DOCKER_ARGS: None, PROJECT_STORAGE_DIR: None, PROJECT_BUILD_IMAGE: False, PROJECT_DOCKER_AUTH: None,
    }
    wall_start = time.perf_counter()
    with _SPAWN_LOCK, _environ(env):
        submitted = loader.load_backend("local").run(
            str(project_dir), stage, passed, None, backend_config, mlflow.get_tracking_uri(), experiment_id,
        )
    _client().set_tag(run_id, MLFLOW_PROJECT_BACKEND, "local")
    _SUBMITTED.add(run_id, submitted)
    try:
        ok, cpu_s = _wait(submitted)
    finally:
        _SUBMITTED.remove(run_id)
    _mark_ended(run_id, "FINISHED" if ok else "FAILED")
    if not ok:
        raise MaskDMError(f"stage {stage} failed in run {run_id} ({step}); its error is printed above")
    return time.perf_counter() - wall_start, cpu_s


#: On a stage run a cluster backend made: the backend, and the job it runs as (kubernetes:
#: ``<namespace>/<job name>``; databricks: its run ID), for people and for a rerun of the driver.
LAUNCHED_ON_TAG = "maskdm.launched_on"
BACKEND_JOB_TAG = "maskdm.backend_job"
#: Seconds between looks at the store while a rerun waits for a run a cluster still holds.
REMOTE_POLL_S = 30.0


def _backend_job(submitted) -> str:
    """What the cluster calls the submitted stage (MLflow's SubmittedRun attributes; empty if unknown)."""
    if getattr(submitted, "_job_name", None):
        return f"{getattr(submitted, '_job_namespace', '')}/{submitted._job_name}"
    return str(getattr(submitted, "_databricks_run_id", "") or "")


def _wait_for_remote_run(step, experiment_id, key, backend) -> str | None:
    """A RUNNING run of this step that a cluster backend holds (launched by an earlier driver, its
    pod perhaps still pending): wait until it ends; its ID if it ended FINISHED, else None.

    Such a run records no process here (the driver records what it launched, not itself), so no
    driver can prove it dead: starting the step again would run it twice. ``maskdm reap --run_id
    <id> --stale_after <s>`` ends one whose job is gone for good.
    """
    from mlflow.entities import RunStatus

    from maskdm.tracking import running_runs

    held = running_runs([experiment_id], f"tags.`{CACHE_KEY_TAG}` = '{key}' and tags.`{LAUNCHED_ON_TAG}` = '{backend}'")
    if not held:
        return None
    run_id = held[0].info.run_id
    log.info("%s: run %s is still held by backend %s (job %s); waiting for it instead of starting the step again",
             step, run_id, backend, held[0].data.tags.get(BACKEND_JOB_TAG) or "unknown")
    while not RunStatus.is_terminated(RunStatus.from_string(status := _client().get_run(run_id).info.status)):
        time.sleep(REMOTE_POLL_S)
    return run_id if status == "FINISHED" else None


def _run_on_backend(stage, step, passed, tags, experiment_id, project_dir, launch: Launch, resumed_from) -> StageOutcome:
    """Run a stage on a cluster backend. Such a backend makes the run itself (mlflow passes a given
    run ID to the local backend only), so the driver's tags go on it as soon as it exists.

    The run records what was launched (backend and job), never the driver's process: the stage's
    process is elsewhere (or not started: a pending pod), so the driver's death says nothing about
    it, and a rerun waits for such a run instead of ending it and running the step twice.
    """
    import mlflow

    from maskdm.liveness import PROCESS_TAGS

    wall_start = time.perf_counter()
    held = _wait_for_remote_run(step, experiment_id, tags[CACHE_KEY_TAG], launch.backend)
    if held:
        _client().set_tag(held, f"{USED_BY_TAG_PREFIX}{tags[PARENT_RUN_TAG]}", "true")
        return StageOutcome(step, stage, held, reused=True)
    try:
        submitted = mlflow.projects.run(
            uri=str(project_dir), entry_point=stage, parameters=passed, experiment_id=experiment_id,
            backend=launch.backend, backend_config=dict(launch.backend_config), synchronous=False,
        )
    except Exception as exc:  # noqa: BLE001 - mlflow raises several kinds; one line for the user
        raise MaskDMError(f"backend {launch.backend} could not start stage {stage} ({step}): {' '.join(str(exc).split())}") from None
    run_id = submitted.run_id
    client = _client()
    launched = {k: v for k, v in tags.items() if k not in PROCESS_TAGS}
    launched.update({LAUNCHED_ON_TAG: launch.backend, BACKEND_JOB_TAG: _backend_job(submitted)})
    for key, value in launched.items():
        client.set_tag(run_id, key, value)
    log.info("%s: running as run %s on backend %s", step, run_id, launch.backend)
    _SUBMITTED.add(run_id, submitted)
    try:
        ok = bool(submitted.wait())
    finally:
        _SUBMITTED.remove(run_id)
    _mark_ended(run_id, "FINISHED" if ok else "FAILED")
    if not ok:
        raise MaskDMError(f"stage {stage} failed in run {run_id} ({step}) on backend {launch.backend}; see its logs there")
    return StageOutcome(step, stage, run_id, reused=False, resumed_from=resumed_from, wall_s=time.perf_counter() - wall_start)


def _children_cpu_s() -> float:
    """User + system CPU of every finished child process (a stage's own children are counted in it)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
