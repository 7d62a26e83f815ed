"""The shipped demo model as a run of the store: registered once, then reused (:func:`demo_model_run_id`)."""

from __future__ import annotations

import logging

import mlflow
from mlflow.entities import Param, RunStatus

from maskdm.tracking.lineage import (
    DEMO_DIGEST_TAG, DEMO_TAG, MODEL_URI_TAG, STAGE_TAG, _experiment_id, client, find_runs,
)
from maskdm.tracking.side_runs import _machine_lock

log = logging.getLogger("maskdm.tracking")


# --- the demo model -------------------------------------------------------------------------------


def demo_model_run_id(experiment_id: str | None = None) -> str:
    """The run of the shipped demo model in this tracking store; registered first if there is none.

    The package ships the demo model (:data:`maskdm.ddpm.demo_model.DEMO_MODEL_DIR`), so every store and
    machine prunes the same weights; it is logged once per store as a FINISHED ``pretrain`` run
    tagged ``maskdm.demo=true`` and ``maskdm.demo_digest=<digest of the files>``, with its recipe
    as params and the weights as its ``model/`` artifact, so lineage runs back to it as to a trained
    one. Demo runs trained by earlier versions (another digest, or none) are not used.
    ``experiment_id``: where to register it (default: the active run's experiment, else ``0``).
    """
    from maskdm.ddpm.demo_model import demo_model_digest

    digest = demo_model_digest()
    tags = {DEMO_TAG: "true", DEMO_DIGEST_TAG: digest}
    runs = find_runs("pretrain", tags)
    if runs:
        return runs[0].info.run_id
    with _machine_lock("pretrain", digest):
        runs = find_runs("pretrain", tags)  # registered by the process we waited for
        if runs:
            return runs[0].info.run_id
        return _register_demo_model(digest, experiment_id or _experiment_id() or "0")


def _register_demo_model(digest: str, experiment_id: str) -> str:
    from maskdm.ddpm.demo_model import DEMO_MODEL_DIR, DEMO_RECIPE_FILE, demo_recipe

    recipe = demo_recipe()
    mlflow_client = client()
    created = mlflow_client.create_run(experiment_id, tags={STAGE_TAG: "pretrain", DEMO_TAG: "true", DEMO_DIGEST_TAG: digest})
    run_id = created.info.run_id
    try:
        params = {**recipe["params"], "torch_threads": recipe["torch_threads"], "model": "demo", "pruning_ratio": 0,
                  "pruner": "none", "pattern": "dense"}
        mlflow_client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        mlflow_client.set_tag(run_id, MODEL_URI_TAG, f"runs:/{run_id}/model")
        for key in ("code_commit", "code_version", "torch_version"):
            mlflow_client.set_tag(run_id, f"maskdm.demo_{key}", str(recipe.get(key, "")))
        for key, value in recipe.get("metrics", {}).items():
            mlflow_client.log_metric(run_id, key, float(value))
        mlflow_client.log_artifacts(run_id, str(DEMO_MODEL_DIR), "model")
        mlflow_client.log_artifact(run_id, str(DEMO_RECIPE_FILE))
    except BaseException:
        mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    log.info("registered the shipped demo model in %s as run %s", mlflow.get_tracking_uri(), run_id)
    return run_id
