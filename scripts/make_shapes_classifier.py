"""Train the shapes classifier behind ``fid_shapes`` with the fid stage's recipe and ship it (maskdm/assets/).

The fid stage registers the shipped file in a store instead of training one there, as long as the
recipe's cache key is the current one (the training settings and the sources of the classifier
and the shapes renderer); a change to those makes the stage train its own again, and
tests/test_shapes_classifier.py fails until this script is run. Usage (about a minute on a CPU)::

    python scripts/make_shapes_classifier.py

It trains twice, each time in a fresh process at one CPU thread, and ships the first only if the
second is the same bit for bit.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

THREADS = 1


def train_once(path: Path) -> None:
    """In this (fresh) process: the recipe's training, saved to ``path``, its eval accuracy printed."""
    import torch

    from entrypoints.fid import CLASSIFIER_TRAINING
    from maskdm.ddpm.data import load_dataset
    from maskdm.evaluation.shapes_features import classifier_accuracy, save_shapes_classifier, train_shapes_classifier

    torch.set_num_threads(THREADS)
    model = train_shapes_classifier(load_dataset("shapes", split="train"), progress=True, **CLASSIFIER_TRAINING)
    save_shapes_classifier(model, path)
    print(json.dumps({"eval_accuracy": classifier_accuracy(model, load_dataset("shapes", split="eval"))}))


def main() -> None:
    import torch
    from safetensors.torch import load_file

    from entrypoints.fid import CLASSIFIER_TRAINING, SHIPPED_CLASSIFIER_FILE, SHIPPED_CLASSIFIER_RECIPE, shapes_classifier_key
    from maskdm.evaluation.fid import weights_digest

    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    with tempfile.TemporaryDirectory() as work:
        paths, outputs = [Path(work) / "a.safetensors", Path(work) / "b.safetensors"], []
        for path in paths:
            done = subprocess.run([sys.executable, __file__, "--train_once", str(path)], env=env, check=True,
                                  stdout=subprocess.PIPE, text=True)
            outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        a, b = (load_file(str(p)) for p in paths)
        identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        if not identical:
            sys.exit("make_shapes_classifier: two trainings in two processes differ; nothing shipped")
        SHIPPED_CLASSIFIER_FILE.write_bytes(paths[0].read_bytes())
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE, text=True).stdout.strip()
    recipe = {
        "command": "python scripts/make_shapes_classifier.py",
        "training": CLASSIFIER_TRAINING,
        "key": shapes_classifier_key(),
        "torch_threads": THREADS,
        "code_commit": commit,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "machine": platform.machine(),
        "metrics": outputs[0],
        "rerun_check": {"bit_identical": identical, "processes": len(paths)},
        "weights_digest": weights_digest(SHIPPED_CLASSIFIER_FILE),
    }
    SHIPPED_CLASSIFIER_RECIPE.write_text(json.dumps(recipe, indent=2) + "\n")
    print(json.dumps(recipe, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--train_once":
        train_once(Path(sys.argv[2]))
    else:
        main()
