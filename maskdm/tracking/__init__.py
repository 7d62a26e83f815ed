"""MLflow lineage: the one module that opens stage runs and resolves upstream runs.

A stage run carries the tag ``maskdm.stage``, the tags ``maskdm.upstream.<stage>`` = run ID for
every ancestor, and the lineage params (:data:`LINEAGE_PARAMS`) copied from upstream, so runs of
one stage can be charted against ``pruning_ratio`` in the MLflow UI without joins.

Artifacts a stage produces go to :attr:`StageRun.out` and are logged only when the stage succeeds,
so a failed run holds no half-written outputs. Checkpoints, which must survive a kill, are logged
as they are written (:meth:`StageRun.log_artifact_now`).

No other module talks to the MLflow client for lineage or upstream lookups.

The package, one job per module, each importing only those before it: :mod:`~maskdm.tracking.lineage`
(tags, code version, run references, upstream resolution), :mod:`~maskdm.tracking.dead_runs`,
:mod:`~maskdm.tracking.side_runs` (cached results shared by stage runs),
:mod:`~maskdm.tracking.demo_model` and :mod:`~maskdm.tracking.stage_runs` (opening a stage run).
Every public name is importable from ``maskdm.tracking``.
"""


from maskdm.tracking import lineage  # noqa: F401 (the module, for who patches it)
from maskdm.tracking.lineage import (  # noqa: F401 (the tracking side's public names)
    CODE_VERSION_FILES, CODE_VERSION_TAG, DEMO_DIGEST_TAG, DEMO_TAG, EXPERIMENT_KIND_TAG, LINEAGE_PARAMS,
    MASKS_SOURCES, MASKS_SOURCE_TAG, MODEL_TRAINING_KIND, MODEL_URI_TAG, REPLICATE_SEEDS, REPLICATE_TAG,
    STAGE_TAG, UPSTREAM_TAG_PREFIX, Upstream, client, code_version, find_runs, get_upstream, has_artifact,
    is_run_ref, lineage_stages, masks_source_of, parse_run_ref, replicate_of, replicate_seed,
)
from maskdm.tracking.dead_runs import (  # noqa: F401 (the tracking side's public names)
    RunCheck, end_dead_runs, running_runs,
)
from maskdm.tracking.side_runs import (  # noqa: F401 (the tracking side's public names)
    SideRun, cached_artifact, cached_or_made, log_side_run, source_digest,
)
from maskdm.tracking.demo_model import (  # noqa: F401 (the tracking side's public names)
    demo_model_run_id,
)
from maskdm.tracking.stage_runs import (  # noqa: F401 (the tracking side's public names)
    MODEL_STAGES, SYSTEM_METRICS_ENV, SYSTEM_METRICS_INTERVAL_S, SYSTEM_METRICS_STAGES, StageRun,
    mark_model_training, runs_view_url, stage_run, system_metrics_on,
)
