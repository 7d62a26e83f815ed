"""The ``main`` driver: a pruning-ratio sweep run as MLflow Project child runs, with a stage cache.

For each ratio the driver chains prune -> extract_masks -> baseline_loss -> train_masks ->
finetune, and samples and scores (sample -> fid) the dense model once and, per ratio, the pruned,
mask-trained and finetuned models. ``mask_training`` picks which finetune runs are made: from the
learned masks (``true``), straight from the pruning masks (``false``: the plain pruning +
finetuning baseline) or both, so MaskPro's gain is measured rather than assumed.

Every stage runs through :func:`run_stage`: its cache key is the sha256 of the stage name, its
complete parameters (the MLproject defaults filled in, upstream run IDs included) and
:func:`maskdm.tracking.code_version`. A FINISHED run in the experiment with that key is reused;
otherwise a new run, a child of the driver run, is made with ``mlflow.projects.run``. A finetune
run that was killed after logging checkpoints is continued (``resume_run_id``), not restarted.

The plan is a graph (each step ``needs`` the steps whose run IDs it takes): :func:`schedule`
starts a step once those have ended, up to ``parallel`` at once, each in a slot of its own that
may carry a GPU (CUDA_VISIBLE_DEVICES) and a CPU thread count (:class:`Launch`); ``parallel`` 1
is the plan in order, as it always ran. A ``backend`` other than ``local`` (kubernetes, ...)
runs the stages through that MLflow Projects backend. None of this enters a cache key.

The package, one job per module, each importing only the ones above it in this list:

- :mod:`maskdm.driver.presets`: the ``demo``, ``paper`` and ``ldm-celebahq`` sweeps, stage by stage;
- :mod:`maskdm.driver.plan`: options and presets into a :class:`SweepConfig`, the plan's
  :class:`Step` s, each stage's full MLproject parameters and cache key, the checks made before
  any run;
- :mod:`maskdm.driver.launch`: one step run or reused (the cache search, dead runs ended, the
  MLflow Project run started here or on another backend);
- :mod:`maskdm.driver.sweep`: the scheduler, :func:`run_plan`, the results files.

Its public names are all importable from ``maskdm.driver``. The driver owns the cache search and
therefore talks to MLflow directly (an exception to the library rule, like :mod:`maskdm.tracking`).
"""

from maskdm.driver import launch, plan, presets, sweep  # noqa: F401 (the modules, for who patches them)
from maskdm.driver.presets import (  # noqa: F401 (the driver's public names)
    DEMO, LDM_CELEBAHQ, PAPER, PRESETS,
)
from maskdm.driver.plan import (  # noqa: F401 (the driver's public names)
    CACHE_KEY_TAG, DEMO_MODEL_STEP, DRIVER_OWNED, KNOWN_DATASET_SIZES, MASK_TRAINING_CHOICES, PARAM_RANGES,
    PARENT_RUN_TAG, PATH_PARAMS, REPO_DIR, STAGES, STEP_TAG, USED_BY_TAG_PREFIX, VARIANTS, VARIANT_TAG, Step,
    SweepConfig, build_plan, cache_key, check_plan, check_plan_inputs, check_sets, dataset_images,
    declared_defaults, format_ratio, full_params, join_listed, parse_ratios, parse_seeds, parse_sets,
    resolve_config, speed_step, stage_options,
)
from maskdm.driver.launch import (  # noqa: F401 (the driver's public names)
    BACKEND_JOB_TAG, BUILTIN_BACKENDS, DRIVER_KEY_TAG, KUBERNETES_KEYS, LAUNCHED_ON_TAG, REMOTE_POLL_S,
    THREAD_VARS, Launch, StageOutcome, describe_env, driver_key, end_dead_driver_runs, end_dead_runs_of_step,
    find_cached_run, find_resumable_run, known_backends, load_backend_config, parse_gpus, resolve_launch,
    run_stage, visible_gpus,
)
from maskdm.driver.sweep import (  # noqa: F401 (the driver's public names)
    Results, find_demo_model, pin_tracking_uri, run_plan, schedule, ui_hint, used_run_ids, write_results,
)
from maskdm.driver.plan import _LISTED  # noqa: F401 (tests read it)
from maskdm.driver.sweep import log  # noqa: F401 (the driver's logger, "maskdm.driver")
