"""main: the pruning-ratio sweep, every stage a cached child MLflow Project run (see maskdm/driver/)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import click
import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from entrypoints.common import configure_logging, fail, stage
from maskdm import driver
from maskdm.errors import MaskDMError
from maskdm.tracking import runs_view_url


@click.command("main", help="Sweep pruning ratios: prune -> masks -> finetune, sample and score each model; print the table.")
@click.option("--preset", default="demo", show_default=True, help="demo (embedded model, minutes on a CPU), paper (google/ddpm-cifar10-32, the original recipe) or ldm-celebahq (CompVis/ldm-celebahq-256; needs --dataset imagefolder:<folder>).")
@click.option("--model", default=None, help="Dense model (pixel or latent pipeline): hub id, local folder, run ID, runs:/<id>/model or demo [default: the preset's].")
@click.option("--dataset", default=None, help="shapes, cifar10 or imagefolder:<path> [default: the preset's].")
@click.option("--ratios", default=None, help="Comma-separated pruning ratios in (0, 1) [default: the preset's, 0.3,0.5,0.7].")
@click.option("--pruner", default=None, help="magnitude, random or taylor [default: the preset's].")
@click.option("--pattern", default=None, help="unstructured or N:M [default: the preset's]; N:M fixes the ratio to 1-N/M.")
@click.option("--scope", default=None, help="layer or global [default: the preset's].")
@click.option("--mask_training", default="both", show_default=True,
              help="true: finetune from the learned masks; false: from the pruning masks (the plain baseline); both.")
@click.option("--seeds", default="0", show_default=True,
              help="Replicates, e.g. 0,1,2: every stochastic stage of every arm (mask sampling, finetune, sampling) once per "
                   "replicate, its seed offset by the replicate's number; the report gives mean, SE and paired verdicts. 0 = one draw.")
@click.option("--set", "sets", multiple=True,
              help="Any stage parameter: stage.key=value[,stage.key=value...], repeatable; wins over the preset.")
@click.option("--experiment", default=None, help="MLflow experiment name (created if missing) [default: MLflow's active one].")
@click.option("--dry_run", type=click.BOOL, default=False, show_default=True, help="true: print the plan (every stage with its parameters) and stop.")
@click.option("--parallel", default="auto", show_default=True,
              help="How many independent stages run at once: an integer >= 1, or auto (one per GPU of --gpus; 1 without GPUs).")
@click.option("--gpus", default="auto", show_default=True,
              help="GPUs for the stages, one per running stage: auto (the visible ones), a list (0,1,3) or none (CPU).")
@click.option("--threads", default="auto", show_default=True,
              help="CPU threads per stage process: an integer, or auto (cores // parallel when parallel > 1, else torch's choice).")
@click.option("--backend", default="local", show_default=True,
              help="MLflow Projects backend the stages run on: local, kubernetes, databricks or a plugin's.")
@click.option("--backend_config", default="", help="The backend's configuration: a JSON file or inline JSON (e.g. kubernetes: kube-job-template-path, repository-uri).")
def command(preset, model, dataset, ratios, pruner, pattern, scope, mask_training, seeds, sets, experiment, dry_run,
            parallel, gpus, threads, backend, backend_config) -> None:
    configure_logging()
    try:
        config = driver.resolve_config(
            preset, model=model, dataset=dataset, ratios=ratios, pruner=pruner, pattern=pattern,
            scope=scope, mask_training=mask_training, sets=sets, seeds=seeds,
        )
        launch = driver.resolve_launch(parallel, gpus, threads, backend, backend_config)
    except MaskDMError as exc:
        fail(str(exc))
    plan = driver.build_plan(config)
    try:
        # Before any run: a plan that cannot finish fails now, not after hours of stages.
        driver.check_plan_inputs(config, plan)
    except MaskDMError as exc:
        fail(str(exc))
    if dry_run:
        click.echo(describe_plan(plan))
        return

    # SIGTERM (a scheduler's stop, `kill`) ends like Ctrl-C: the running stage is cancelled and the
    # driver run is marked KILLED instead of being left RUNNING.
    signal.signal(signal.SIGTERM, _interrupt)
    tracking_uri = driver.pin_tracking_uri()
    if experiment:
        mlflow.set_experiment(experiment)
    main_params = {
        "preset": config.preset, "model": config.model, "dataset": config.dataset,
        "ratios": ",".join(driver.format_ratio(r) for r in config.ratios), "pruner": config.pruner,
        "pattern": config.pattern, "scope": config.scope, "mask_training": config.mask_training,
        "seeds": ",".join(map(str, config.seeds)),
    }
    if sets:
        main_params["set"] = ";".join(sets)
    with stage("main", main_params) as run:
        run.set_tags({MLFLOW_RUN_NAME: run_name(config)})
        experiment_id = run.run.info.experiment_id
        # A predecessor of this sweep killed outright (SIGKILL, a lost machine) left its run RUNNING.
        key = driver.driver_key(main_params, experiment_id)
        run.set_tags({driver.DRIVER_KEY_TAG: key})
        driver.end_dead_driver_runs(experiment_id, key, run.run_id)
        # How the stages were placed is not part of any cache key; it is logged for the record.
        run.set_tags({"maskdm.launch": launch.describe()})
        outcomes = driver.run_plan(plan, experiment_id=experiment_id, parent_run_id=run.run_id, launch=launch)
        (run.out / "stage_runs.json").write_text(json.dumps(
            [{"step": o.step, "stage": o.stage, "run_id": o.run_id, "reused": o.reused, "resumed_from": o.resumed_from,
              "wall_s": round(o.wall_s, 2), "cpu_s": round(o.cpu_s, 2)} for o in outcomes.values()], indent=1) + "\n")
        results = driver.write_results(
            driver.used_run_ids(outcomes), run.out, title=f"MaskDM results: driver run {run.run_id} ({config.preset} preset)"
        )
        run.log_metrics({
            "stages_run": sum(not o.reused for o in outcomes.values()),
            "stages_reused": sum(o.reused for o in outcomes.values()),
            "result_rows": results.rows,
        })
        # The per-ratio summary: the FID curves of fid_vs_sparsity.png as MLflow line charts.
        for key, points in results.series.items():
            for step, value in points.items():
                run.log_metrics({key: value}, step=step)
        experiment_name = mlflow.get_experiment(experiment_id).name
    click.echo("")
    click.echo(results.markdown)
    click.echo(driver.ui_hint(tracking_uri, experiment_id, experiment_name, run.run_id))
    click.echo(f"  its runs in the UI:    {runs_view_url(tracking_uri, experiment_id)}")


def run_name(config: driver.SweepConfig) -> str:
    """The driver run's name: what it swept, e.g. ``main demo magnitude unstructured 0.3,0.5,0.7``.

    Model (a local folder by its name), pruner, pattern and ratios; scope and mask_training only
    where they are not the defaults (``layer``, ``both``).
    """
    model = Path(config.model).name if os.path.isabs(config.model) else config.model
    parts = ["main", model, config.pruner, config.pattern]
    if config.scope != "layer":
        parts.append(f"scope={config.scope}")
    parts.append(",".join(driver.format_ratio(r) for r in config.ratios))
    if config.mask_training != "both":
        parts.append(f"mask_training={config.mask_training}")
    if config.seeds != (0,):
        parts.append("seeds=" + ",".join(map(str, config.seeds)))
    return " ".join(parts)


def describe_plan(plan: list[driver.Step]) -> str:
    lines = []
    for index, step in enumerate(plan, 1):
        upstream = [f"{k}=<{v}>" for k, v in step.needs.items()]
        params = [f"{k}={v}" for k, v in sorted(driver.full_params(step.stage, step.params).items()) if k not in step.needs]
        lines.append(f"{index:3d}. {step.name:<36} {step.stage:<14} " + " ".join(upstream + params))
    return "\n".join(lines)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
