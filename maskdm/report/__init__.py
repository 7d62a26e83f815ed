"""The results table of an experiment or a driver run, built from the tracking store alone.

Every number comes from ``mlflow.search_runs`` (one pandas frame of runs, :func:`runs_frame`);
nothing is read from files on disk. Runs are joined through their lineage tags
``maskdm.upstream.<stage>``:

* A row is one (model, dataset, pruning_ratio, pruner, pattern, scope, mask_training) combination
  and replicate (``maskdm.replicate``: :func:`build_replicate_table`); :func:`build_table`
  summarises a combination's replicates into one row, each FID and loss as mean, ``_se`` and
  ``_n`` (:mod:`maskdm.evaluation.verdicts`, which also pairs arms replicate by replicate). A row is
  anchored on the newest FINISHED ``finetune`` run of that combination; where there is none, on the
  newest ``train_masks`` run (mask_training true), else on the newest ``prune`` run (mask_training
  empty: no mask stage has run on it yet). The anchor's lineage names the row's other stage runs.
* A row has four model stages: ``dense`` (the newest ``prune`` run with pruning_ratio 0 of the same
  model, preferring the same dataset), ``pruned`` (the prune run), ``masked`` (the train_masks run)
  and ``finetuned`` (the finetune run).
* A model run's FID is the metric of the newest FINISHED ``fid`` run of any ``sample`` run of it,
  per FID metric (``fid`` for Inception pool3, ``fid_inception_<dims>``, ``fid_<name>`` for other
  feature extractors) and per FID protocol (:class:`FidProtocol`: features, samples, reference,
  weights and the sampling settings, recorded by the fid stage in the tag ``maskdm.fid_protocol``).
  Each FID column holds one protocol: a metric's main protocol (the one that scores the most model
  runs) gets the column named by the metric, every other protocol its own ``<metric>@<protocol id>``
  column, and ``protocol_<column>`` names it. The sampling speed is the ``images_per_s`` of the
  sample run behind the first FID column with a value (else of the newest sample run).

:func:`model_stage_of` names the model stage of any run from its tags, for the ``fid`` stage to tag
its runs with (:data:`MODEL_STAGE_TAG`), so that FID can be charted against ``pruning_ratio`` per
model stage (the two finetune arms apart) in the MLflow UI without joins.

The package, one job per module, each importing only those before it: :mod:`~maskdm.report.runs`
(runs as records, read from the store), :mod:`~maskdm.report.scores` (model stages, FIDs per
protocol and replicate, FID columns), :mod:`~maskdm.report.table` (the replicate table and its
summary), :mod:`~maskdm.report.markdown` (results.md), :mod:`~maskdm.report.curves` (the plot
and the UI series) and :mod:`~maskdm.report.files` (the files a report writes). Every public name
is importable from ``maskdm.report``.
"""

from maskdm.evaluation.fid_protocol import (  # noqa: F401 (re-exported: callers import them from here too)
    FID_DIMS, FID_FEATURES, FID_METRIC, FID_PROTOCOL_ID_TAG, FID_PROTOCOL_PART_PREFIX, FID_PROTOCOL_TAG,
    PROTOCOL_PARTS, SE_SUFFIX, UNKNOWN, UNRECORDED, FidProtocol, describe_protocol, fid_metric_name, is_fid_metric,
)
from maskdm.report.runs import (  # noqa: F401 (the report's public names)
    BOOTSTRAP_SE_SUFFIX, INTEGER_COLUMNS, KEY_COLUMNS, MODEL_STAGE_NAMES, MODEL_STAGE_TAG, MODEL_STAGE_VALUES,
    PARENT_TAG, PIPELINE_STAGES, REPORT_FILES, SIZE_COLUMNS, USED_BY_TAG_PREFIX, RunRecord, concat_frames,
    get_run_or_fail, newest_first, parse_ratio, resolve_experiment, run_records, runs_by_id, runs_frame,
    with_ancestors,
)
from maskdm.report.scores import (  # noqa: F401 (the report's public names)
    FidColumn, FidScore, ModelScores, collect_scores, fid_columns, is_fid_column, model_run_of_sample,
    model_stage_of, replicate_of_run, replicate_zero_protocol, split_fid_column,
)
from maskdm.report.table import (  # noqa: F401 (the report's public names)
    HELDOUT_COLUMN, MODEL_RUN_ID_COLUMNS, build_replicate_table, build_table, measure_columns,
    replicate_table_columns, summarize_table, table_columns, table_fid_names,
)
from maskdm.report.markdown import (  # noqa: F401 (the report's public names)
    VERDICTS_NOTE, VERDICTS_SECTION, to_markdown, verdicts_markdown,
)
from maskdm.report.curves import (  # noqa: F401 (the report's public names)
    CurvePoint, chart_metric, fid_curves, plot_fid_vs_sparsity, ui_series,
)
from maskdm.report.files import (  # noqa: F401 (the report's public names)
    ReportFiles, verdicts_of, write_report, write_table_report,
)
from maskdm.report.runs import _present  # noqa: F401 (tests read it)
