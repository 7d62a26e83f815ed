"""The demo model shipped with the package: where its files are, their digest, its recipe.

Without torch or diffusers: the driver finds the store's run of the demo model by this digest before
any stage runs, and never imports either (seconds of CPU per driver start). Loading it is
:func:`maskdm.ddpm.models.load_ddpm`'s job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from maskdm.errors import MaskDMError

#: The demo model shipped with the package: the diffusers pipeline folder that ``pretrain`` with its
#: defaults saved (its ``model/`` artifact), so ``model=demo`` is the same weights in every tracking
#: store and on every machine. How it was made: docs/details/pretrain.md#the-shipped-demo-model.
DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo_model"  # maskdm/assets (this file: maskdm/ddpm/demo_model.py)
#: What it was made with: the pretrain run's params, thread count, code and library versions.
DEMO_RECIPE_FILE = DEMO_MODEL_DIR.parent / "demo_model_recipe.json"


def demo_model_digest() -> str:
    """A digest of the shipped demo model's files (paths and bytes): which demo model a run is."""
    if not (DEMO_MODEL_DIR / "model_index.json").is_file():
        raise MaskDMError(f"the shipped demo model is missing from {DEMO_MODEL_DIR}; reinstall maskdm")
    digest = hashlib.sha256()
    for path in sorted(p for p in DEMO_MODEL_DIR.rglob("*") if p.is_file()):
        data = path.read_bytes()
        digest.update(f"{path.relative_to(DEMO_MODEL_DIR).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def demo_recipe() -> dict:
    """The recipe the shipped demo model was made with (:data:`DEMO_RECIPE_FILE`)."""
    return json.loads(DEMO_RECIPE_FILE.read_text())
