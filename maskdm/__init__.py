"""MaskDM: prune a pretrained DDPM, learn its masks (MaskPro), finetune, sample and score it.

The library (this package) takes tensors, modules and small config objects and returns results;
it never calls MLflow except in :mod:`maskdm.tracking`, :mod:`maskdm.report`,
:mod:`maskdm.registry` and :mod:`maskdm.driver`.
"""

__version__ = "0.1.0"
