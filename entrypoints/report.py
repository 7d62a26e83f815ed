"""report: results.md, results.csv, fid_vs_sparsity.png, replicates.csv and verdicts.csv of an
experiment or a driver run.

Built from the tracking store alone (``mlflow.search_runs``; see :mod:`maskdm.report`). The files
are logged as artifacts of the report run and the markdown is printed to stdout.
"""

from __future__ import annotations

import click

from entrypoints.common import optional, stage
from maskdm.errors import MaskDMError
from maskdm.report import (
    build_replicate_table,
    get_run_or_fail,
    resolve_experiment,
    runs_frame,
    summarize_table,
    ui_series,
    write_table_report,
)
from maskdm.tracking import STAGE_TAG

DRIVER_STAGE = "main"


@click.command("report", help="Results table of an experiment or a driver run, from the tracking store.")
@click.option("--experiment", default=None, help="Experiment name or ID [default: this run's experiment].")
@click.option("--run_id", default=None, help="A driver (main) run: report the stage runs it made or reused.")
def command(experiment: str | None, run_id: str | None) -> None:
    with stage("report", {"experiment": experiment, "run_id": run_id}) as run:
        experiment, run_id = optional(experiment), optional(run_id)
        if experiment and run_id:
            raise MaskDMError("pass experiment or run_id, not both")
        if run_id:
            driver_stage = get_run_or_fail(run_id).data.tags.get(STAGE_TAG, "")
            if driver_stage != DRIVER_STAGE:
                raise MaskDMError(
                    f"run_id: run {run_id} is a '{driver_stage or 'non-MaskDM'}' run; expected a {DRIVER_STAGE} (driver) run"
                )
            runs, source = runs_frame(parent_run_id=run_id), f"driver run {run_id}"
        else:
            experiment_id = resolve_experiment(experiment) if experiment else run.run.info.experiment_id
            runs, source = runs_frame([experiment_id]), f"experiment {experiment_id}"

        replicates = build_replicate_table(runs)
        table = summarize_table(replicates)
        files = write_table_report(table, run.out, title=f"MaskDM results: {source}", replicates=replicates)
        run.set_tags({"maskdm.report.source": source, "maskdm.report.rows": len(table)})
        # The same curves as fid_vs_sparsity.png, as metrics an MLflow line chart can draw.
        for key, points in ui_series(table).items():
            for step, value in points.items():
                run.log_metrics({key: value}, step=step)
        click.echo(files.markdown.read_text())
