"""Every pruner behind one call: a model and a :class:`~maskdm.method.pruning.PruneConfig` in, masks out.

``magnitude`` and ``random`` need nothing else; ``taylor`` (:mod:`maskdm.method.taylor`), ``wanda`` and
``sparsegpt`` (:mod:`maskdm.method.oneshot`) measure on replayed training images, given as
``train_images``. The ``prune`` stage and benchmarks/pruner_study.py both prune through
:func:`run_pruner`, so a study measures exactly what the stage does.

``sparsegpt`` changes the kept weights of ``unet`` in place (its reconstruction); every pruner
leaves the pruned weights as they are, for :func:`~maskdm.method.pruning.apply_pruning` to zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from maskdm.masks import prunable_modules
from maskdm.method.oneshot import ONESHOT_PRUNERS, CalibConfig, calibration_batches, calibration_samples, sparsegpt_prune, wanda_scores
from maskdm.method.pruning import PruneConfig, PruneResult, compute_masks, selection_of
from maskdm.method.replay import ReplayBatches
from maskdm.method.taylor import TaylorConfig, taylor_batches, taylor_scores

#: Pruners that measure on training images.
DATA_PRUNERS = ("taylor", *ONESHOT_PRUNERS)


@dataclass
class PrunerOutcome:
    result: PruneResult
    #: What the pruner ranked by (``|w|`` for magnitude), by layer; None for random.
    scores: dict[str, torch.Tensor] | None
    #: Within what the scores were compared (:func:`maskdm.method.pruning.selection_of`).
    selection: str
    #: Metrics of the measurement (taylor's samples, sparsegpt's passes), for the run.
    metrics: dict[str, float] = field(default_factory=dict)
    #: How wanda/sparsegpt calibrated (pruning_stats.json's ``calibration``); None for the others.
    calibration: dict | None = None
    #: The replayed training images the data-driven pruners measured on (None for the others).
    batches: ReplayBatches | None = None


def run_pruner(
    unet: nn.Module,
    scheduler,
    config: PruneConfig,
    train_images=None,
    taylor: TaylorConfig | None = None,
    calib: CalibConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> PrunerOutcome:
    """Decide ``config``'s masks for ``unet`` (left on the CPU); ``train_images``: the training split
    without augmentation, needed by the data-driven pruners."""
    taylor, calib = taylor or TaylorConfig(seed=config.seed), calib or CalibConfig(seed=config.seed)
    modules = prunable_modules(unet, config.protect)  # none: compute_masks says "nothing to prune"
    scores, metrics, calibration, batches = None, {}, None, None
    if config.pruner in DATA_PRUNERS and modules:
        if train_images is None:
            raise ValueError(f"pruner={config.pruner} needs train_images")  # the stage checks the dataset first
        unet.to(device)
        try:
            if config.pruner == "taylor":
                batches = taylor_batches(train_images, taylor)
                importance = taylor_scores(unet, scheduler, modules, batches, taylor.threshold, device)
                scores, metrics = importance.scores, importance.metrics()
            else:
                batches = calibration_batches(train_images, calib)
                samples = calibration_samples(batches, int(scheduler.config.num_train_timesteps), calib)
                calibration = {**calib.to_dict(), "calib_forward_samples": int(samples.images.shape[0])}
                if config.pruner == "wanda":
                    scores = wanda_scores(unet, scheduler, modules, samples, calib.batch_size, device)
                else:
                    done = sparsegpt_prune(unet, scheduler, modules, samples, config, calib, device, progress=progress)
                    metrics = {"sparsegpt_passes": done.passes, "sparsegpt_dead_inputs": done.dead_inputs}
                    calibration.update(metrics)
                    return PrunerOutcome(done.result, done.scores, selection_of(config, calib.blocksize), metrics, calibration, batches)
        finally:
            unet.to("cpu")
    result = compute_masks(unet, config, scores)
    if config.pruner == "magnitude":
        scores = {n: m.weight.detach().abs() for n, m in modules.items()}
    return PrunerOutcome(result, scores, selection_of(config, calib.blocksize), metrics, calibration, batches)
