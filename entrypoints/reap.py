"""reap: mark KILLED the RUNNING runs whose process is dead (see maskdm/liveness.py for the rules).

A run of a process killed by SIGKILL (or of a machine that went down) stays RUNNING in the store:
nothing is left to end it. This command judges the RUNNING runs MaskDM made (those with a
``maskdm.*`` tag; ``--all_runs true`` for every run) of the store, of one experiment, or one run,
by the process each recorded, prints one line per run, and marks the dead ones KILLED with the
tags ``maskdm.ended_by`` and ``maskdm.killed_reason``. A run recorded on another machine or in
another PID namespace, or by an older MaskDM, is only ended with an explicit ``--stale_after``;
a run whose process exists but cannot be looked at is never ended. ``--dry_run true`` prints what
would be ended and changes nothing.
"""

from __future__ import annotations

import json
import math

import click

from entrypoints.common import optional, stage
from maskdm import tracking
from maskdm.errors import MaskDMError
from maskdm.report import get_run_or_fail, resolve_experiment


@click.command("reap", help="Mark KILLED the RUNNING runs whose process is dead (killed, or its host rebooted).")
@click.option("--experiment", default=None, help="Experiment name or ID [default: every experiment of the store].")
@click.option("--run_id", default=None, help="Judge only this run.")
@click.option("--stale_after", type=float, default=0.0, show_default=True,
              help="Seconds: also end runs of other machines or PID namespaces (or without a recorded process) not "
                   "seen alive for this long. 0: never; only runs whose process this machine can see is gone are ended.")
@click.option("--dry_run", type=click.BOOL, default=False, show_default=True, help="true: print the verdicts, change nothing.")
@click.option("--all_runs", type=click.BOOL, default=False, show_default=True,
              help="true: judge every RUNNING run, not only MaskDM's (those with a maskdm.* tag).")
def command(experiment: str | None, run_id: str | None, stale_after: float, dry_run: bool, all_runs: bool) -> None:
    params = {"experiment": experiment, "run_id": run_id, "stale_after": stale_after, "dry_run": dry_run, "all_runs": all_runs}
    with stage("reap", params) as run:
        experiment, run_id = optional(experiment), optional(run_id)
        if experiment and run_id:
            raise MaskDMError("pass experiment or run_id, not both")
        if not math.isfinite(stale_after) or stale_after < 0:
            raise MaskDMError(f"stale_after must be a number of seconds >= 0 (0: never), got {stale_after:g}")
        if run_id:
            target = get_run_or_fail(run_id)
            running = [target] if target.info.status == "RUNNING" else []
            if not running:
                click.echo(f"run {run_id} is {target.info.status}, not RUNNING: nothing to do")
        else:
            experiment_ids = [resolve_experiment(experiment)] if experiment else None
            # Every run MaskDM opens (stage, driver, side run) has maskdm.stage: the store is asked
            # for those alone, not for every RUNNING run of every tool.
            only_ours = "" if all_runs else f"tags.`{tracking.STAGE_TAG}` LIKE '%'"
            running = [r for r in tracking.running_runs(experiment_ids, only_ours) if r.info.run_id != run.run_id]
        if not all_runs:
            # Runs MaskDM did not make keep their own rules (another tool may still be writing them).
            others = [r for r in running if not is_maskdm_run(r.data.tags)]
            running = [r for r in running if is_maskdm_run(r.data.tags)]
            if others:
                click.echo(f"run {others[0].info.run_id} has no MaskDM tags: left alone (--all_runs true judges it too)")

        checks = tracking.end_dead_runs(
            running, ended_by=f"maskdm reap (run {run.run_id})", stale_after=stale_after or None, dry_run=dry_run
        )
        for check in checks:
            info, tags = check.run.info, check.run.data.tags
            if check.ended:
                what = "KILLED"
            elif check.verdict.dead:
                what = "would be KILLED"
            elif check.verdict.unknown:
                what = "left RUNNING (unknown)"
            else:
                what = "left RUNNING"
            name = tags.get(tracking.STAGE_TAG) or "non-MaskDM"
            click.echo(f"{info.run_id} ({name} '{info.run_name}', experiment {info.experiment_id}): {what}: {check.verdict.reason}")
        ended = sum(c.ended for c in checks)
        dead = sum(c.verdict.dead for c in checks)
        summary = f"{len(checks)} RUNNING run(s) judged, {dead} dead"
        summary += ": dry run, nothing changed" if dry_run else f", {ended} marked KILLED"
        click.echo(summary)

        (run.out / "reaped.json").write_text(json.dumps([
            {"run_id": c.run.info.run_id, "experiment_id": c.run.info.experiment_id,
             "stage": c.run.data.tags.get(tracking.STAGE_TAG), "dead": c.verdict.dead, "ended": c.ended,
             "reason": c.verdict.reason} for c in checks
        ], indent=1) + "\n")
        run.log_metrics({"runs_running": len(checks), "runs_dead": dead, "runs_ended": ended})


def is_maskdm_run(tags) -> bool:
    """Made by MaskDM: a stage, driver or side run (each has a ``maskdm.*`` tag)."""
    return any(key.startswith("maskdm.") for key in tags)
