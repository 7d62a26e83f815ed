"""promote: register a finetune run as a pyfunc image generator and move an alias to it if it earns it.

Exit status 0 when the model is registered, whether or not the alias moved (the last line says
which and why); 1 with one ``maskdm: error:`` line for bad input, including FIDs of several
protocols where ``metric``/``protocol`` are ``auto``, and a champion whose FID was measured under
another protocol than the candidate's (unless ``force``). See :mod:`maskdm.registry`.
"""

from __future__ import annotations

import click

from entrypoints.common import optional, stage
from maskdm import registry
from maskdm.errors import MaskDMError
from maskdm.report import resolve_experiment


@click.command("promote", help="Register a finetuned model (pyfunc image generator) and move an alias to it.")
@click.option("--finetune_run_id", default="best", show_default=True,
              help="A finetune run ID, or best: the lowest-FID finetune run at or above min_sparsity.")
@click.option("--registered_model", default="maskdm-ddpm", show_default=True, help="Registered model name.")
@click.option("--alias", default="champion", show_default=True, help="The alias to move.")
@click.option("--min_sparsity", type=float, default=0.0, show_default=True, help="For best: the least sparsity accepted.")
@click.option("--force", type=click.BOOL, default=False, show_default=True,
              help="Move the alias even if the model is worse than the current holder.")
@click.option("--max_fid", type=float, default=None, help="Move the alias only if the FID is at most this.")
@click.option("--metric", default="auto", show_default=True,
              help="The FID to rank and compare by: fid (Inception pool3), fid_<name>, or auto: the one FID of the runs.")
@click.option("--protocol", default="auto", show_default=True,
              help="The FID protocol (its id, tag maskdm.fid_protocol_id of a fid run), or auto: the one the runs have.")
@click.option("--experiment", default=None, help="For best: experiment name or ID [default: this run's experiment].")
@click.option("--max_image_steps", type=int, default=None,
              help="Serving cap: the most num_images x ddim_steps (summed over rows) one predict call may ask for "
                   f"[default: {registry.DEFAULT_MAX_IMAGE_STEPS} for a new version; fixed once registered].")
@click.option("--kernel", default="dense", show_default=True,
              help="What the served model runs with: dense, or semi_structured (2:4 layers on PyTorch's sparse kernels; "
                   "serving needs a CUDA GPU, sm80+). Recorded with the version (tag kernel, model_config); fixed once registered.")
def command(**params) -> None:
    with stage("promote", params) as run:
        from maskdm.evaluation.speed import check_kernel

        check_kernel(params["kernel"])
        metric = registry.check_metric(params["metric"])
        protocol = registry.check_protocol(params["protocol"])
        name, alias = params["registered_model"].strip(), params["alias"].strip()
        registry.check_names(name, alias)
        if params["max_image_steps"] is not None:
            registry.check_max_image_steps(params["max_image_steps"])
        min_sparsity = params["min_sparsity"]
        if not 0.0 <= min_sparsity <= 1.0:
            raise MaskDMError(f"min_sparsity must be between 0 and 1, got {min_sparsity:g}")
        ref = optional(params["finetune_run_id"])
        if ref is None:
            raise MaskDMError("finetune_run_id is required: a finetune run ID, or best")

        if ref.lower() == "best":
            experiment = optional(params["experiment"])
            experiment_id = resolve_experiment(experiment) if experiment else run.run.info.experiment_id
            chosen, scoring = registry.best_candidate([experiment_id], metric, min_sparsity, protocol)
        else:
            chosen, scoring = registry.candidate(ref, metric, protocol)
        run.upstream(chosen.run_id, ["finetune"], "model", "finetune_run_id")  # the promote run's lineage
        metric = scoring.metric
        run.set_tags({
            "maskdm.fid_metric": metric,
            "maskdm.fid_protocol": scoring.protocol.key if scoring.protocol else registry.UNRECORDED,
            "maskdm.fid_protocol_id": scoring.protocol_id,
        })

        # The gate compares FIDs of one protocol only: a holder scored otherwise is refused before
        # anything is registered (force skips the comparison, and so this check).
        holder = registry.alias_holder(name, alias, metric)
        existing = registry.find_version(name, chosen.run_id)
        if holder and not params["force"] and (existing is None or str(existing.version) != holder.version):
            conflict = registry.protocol_conflict(scoring, holder)
            if conflict:
                raise MaskDMError(f"{name}@{alias} not moved: {conflict}")

        version, created = registry.register(
            chosen, name, scoring, promote_run_id=run.run_id, max_image_steps=params["max_image_steps"],
            kernel=params["kernel"]
        )
        fid = chosen.fid(scoring)
        decision = registry.decide(fid, metric, str(version.version), holder, params["max_fid"], params["force"])
        if decision.promote:
            registry.set_alias(name, alias, str(version.version))
        run.set_tags({
            "maskdm.registered_model": name,
            "maskdm.model_version": version.version,
            "maskdm.alias": alias,
            "maskdm.promoted": str(decision.promote).lower(),
            "maskdm.promote_reason": decision.reason,
        })
        what = "registered" if created else "already registered"
        click.echo(
            f"{name} version {version.version}: {what} finetune run {chosen.run_id} "
            f"({metric} {fid:.4g} under FID protocol {scoring.protocol_id}, "
            f"sparsity {chosen.sparsity if chosen.sparsity is not None else 'unknown'})"
        )
        if decision.promote:
            click.echo(f"{name}@{alias} -> version {version.version}: {decision.reason}")
        else:
            kept = f"stays on version {holder.version}" if holder else "not set"
            click.echo(f"{name}@{alias} not moved ({kept}): {decision.reason}")
