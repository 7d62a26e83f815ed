"""The sweep: :func:`schedule` starts each step once the steps it needs have ended, up to
``parallel`` at once; :func:`run_plan` wires upstream run IDs; the results files and the UI hint."""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from maskdm.driver.launch import _SUBMITTED, Launch, StageOutcome, _client, run_stage, start_warm_server
from maskdm.driver.plan import (
    DEMO_MODEL_STEP, PARENT_RUN_TAG, REPO_DIR, USED_BY_TAG_PREFIX, VARIANT_TAG, Step, check_plan, join_listed,
)
from maskdm.warm_start import SOCKET_ENV

#: One logger for the whole driver, as before it was a package (its lines read "maskdm.driver: ...").
log = logging.getLogger("maskdm.driver")


def schedule(
    plan: list[Step],
    start: Callable[[Step, int, Mapping[str, StageOutcome]], StageOutcome],
    *,
    parallel: int = 1,
    on_outcome: Callable[[StageOutcome], None] | None = None,
) -> dict[str, StageOutcome]:
    """Run ``start(step, slot, outcomes so far)`` for every step once the steps it needs are done,
    at most ``parallel`` at once, each in a slot (0..parallel-1) no other running step holds.

    Ready steps start in plan order, so ``parallel`` 1 runs the plan in order, in this thread.
    ``on_outcome`` is called in this thread as each step ends. A failure starts nothing new, waits
    for the running steps (their outcomes are kept) and raises the first error. An interrupt
    (Ctrl-C, SIGTERM) cancels the running stages. Returns the outcomes in plan order.
    """
    check_plan(plan)
    outcomes: dict[str, StageOutcome] = {}

    def record(outcome: StageOutcome, step: Step) -> None:
        outcomes[step.name] = outcome
        if on_outcome:
            on_outcome(outcome)

    if parallel <= 1:
        for step in plan:
            record(start(step, 0, outcomes), step)
        return outcomes

    pending = list(plan)
    free = list(range(parallel))
    running: dict[concurrent.futures.Future, tuple[Step, int]] = {}
    failure: BaseException | None = None
    _SUBMITTED.cancelled = False
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="maskdm-stage") as pool:
        try:
            while pending or running:
                if failure is None:
                    for step in list(pending):
                        if not free:
                            break
                        if all(needed in outcomes for needed in step.needs.values()):
                            pending.remove(step)
                            slot = free.pop(0)
                            running[pool.submit(start, step, slot, outcomes)] = (step, slot)
                if not running:
                    break  # a failure with nothing left running (check_plan rules out a stuck plan)
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: plan.index(running[f][0])):
                    step, slot = running.pop(future)
                    free.append(slot)
                    free.sort()
                    try:
                        outcome = future.result()
                    except Exception as exc:  # noqa: BLE001 - re-raised once the running steps end
                        log.error("%s failed; starting no further stages, waiting for the %d running", step.name, len(running))
                        failure = failure or exc
                        continue
                    record(outcome, step)
        except BaseException:
            _SUBMITTED.cancel_all()
            raise
    if failure is not None:
        raise failure
    return {step.name: outcomes[step.name] for step in plan}


def find_demo_model(experiment_id: str | None = None) -> str:
    """The run of the shipped demo model in this tracking store, as ``model=demo`` resolves it.

    The package ships the demo model's weights; the first use in a store registers them as a
    ``pretrain`` run (:func:`maskdm.tracking.demo_model_run_id`, in ``experiment_id``), every later
    one reuses that run whatever the code version, so no store trains its own.
    """
    from maskdm.tracking import demo_model_run_id

    return demo_model_run_id(experiment_id)


def run_plan(
    plan: list[Step],
    *,
    experiment_id: str,
    parent_run_id: str,
    project_dir: Path = REPO_DIR,
    on_outcome: Callable[[StageOutcome], None] | None = None,
    launch: Launch | None = None,
) -> dict[str, StageOutcome]:
    """Run (or reuse) every step, filling upstream run IDs from the steps it needs.

    ``launch`` (default: one stage at a time, in plan order, as the driver always ran) says how
    many independent steps run at once, on which GPU and with how many threads (:func:`schedule`).
    """
    from maskdm.tracking import code_version

    launch = launch or Launch()
    version = code_version()
    envs = launch.slot_envs()
    position = {step.name: index for index, step in enumerate(plan, 1)}
    concurrent_stages = launch.parallel > 1
    if launch != Launch():
        log.info("running %s", launch.describe())
    # Stage processes on this machine fork from one process that imported their libraries once.
    warm = start_warm_server([step.stage for step in plan], project_dir) if launch.backend == "local" else None
    # This driver's stages use its own server or none: not one this process's environment names.
    inherited_socket = os.environ.pop(SOCKET_ENV, None)

    def start(step: Step, slot: int, done: Mapping[str, StageOutcome]) -> StageOutcome:
        params = join_listed({**step.params, **{param: done[needed].run_id for param, needed in step.needs.items()}})
        tags = {VARIANT_TAG: step.variant} if step.variant else {}
        log.info("[%d/%d] %s", position[step.name], len(plan), step.name)
        demo = find_demo_model(experiment_id) if step.name == DEMO_MODEL_STEP and not step.params else None
        if demo:
            log.info("%s: the shipped demo model, run %s", step.name, demo)
            _client().set_tag(demo, f"{USED_BY_TAG_PREFIX}{parent_run_id}", "true")
            return StageOutcome(step.name, step.stage, demo, reused=True)
        return run_stage(
            step.stage, params, experiment_id=experiment_id, parent_run_id=parent_run_id, step=step.name,
            tags=tags, project_dir=project_dir, code_version=version,
            launch=launch if launch.backend != "local" else None, env=envs[slot], concurrent=concurrent_stages,
            warm=warm,
        )

    try:
        return schedule(plan, start, parallel=launch.parallel, on_outcome=on_outcome)
    finally:
        if warm is not None:
            warm.close()
        if inherited_socket is not None:
            os.environ[SOCKET_ENV] = inherited_socket


# --- results ---------------------------------------------------------------------------------------


def used_run_ids(outcomes: Mapping[str, StageOutcome]) -> list[str]:
    return list(dict.fromkeys(o.run_id for o in outcomes.values()))


@dataclass
class Results:
    markdown: str
    rows: int
    #: ``{metric key: {step: value}}``: the FID curves (means over replicates, and their standard
    #: errors) as MLflow metrics (step = ratio in percent).
    series: dict[str, dict[int, float]]


def write_results(run_ids: list[str], folder: Path, title: str) -> Results:
    """The report files (results.md / .csv, fid_vs_sparsity.png, replicates.csv, verdicts.csv) of
    exactly these stage runs (and their ancestors)."""
    from maskdm import report

    replicates = report.build_replicate_table(report.runs_frame(run_ids=run_ids))
    table = report.summarize_table(replicates)
    files = report.write_table_report(table, folder, title=title, replicates=replicates)
    return Results(files.markdown.read_text(), len(table), report.ui_series(table))


def pin_tracking_uri() -> str:
    """Make a relative tracking URI absolute and set it: stage processes run in the project directory."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    elif uri.startswith("file:") and not uri.startswith("file:/"):
        uri = Path(uri[len("file:"):]).resolve().as_uri()
    elif "://" not in uri and not uri.startswith("databricks"):
        uri = Path(uri).resolve().as_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def ui_hint(tracking_uri: str, experiment_id: str, experiment_name: str, driver_run_id: str) -> str:
    """Where to look: the command that opens the UI on this store, and the filters that show the sweep."""
    lines = [
        f"MLflow UI:  mlflow ui --backend-store-uri {tracking_uri}"
        if not tracking_uri.startswith(("http://", "https://"))
        else f"MLflow UI:  {tracking_uri}",
        f"  experiment '{experiment_name}' (id {experiment_id}); driver run {driver_run_id}: results.md, results.csv, fid_vs_sparsity.png, stage_runs.json",
        f"  stage runs it made:    tags.`{PARENT_RUN_TAG}` = '{driver_run_id}'",
        f"  stage runs it reused:  tags.`{USED_BY_TAG_PREFIX}{driver_run_id}` = 'true'   (all of them: stage_runs.json)",
        "  scores of every sweep: tags.`maskdm.stage` = 'fid'  (chart fid against params.pruning_ratio, grouped by tags.`maskdm.model_stage`)",
    ]
    return "\n".join(lines)
