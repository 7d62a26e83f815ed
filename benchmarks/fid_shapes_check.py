"""Does ``fid_shapes`` rank image sets the way their pictures do? Score sets with one or more classifiers.

Each set is scored against the shapes training split (20,000 images at ``--resolution``), with
every classifier given, side by side: a sample run's ``samples.npz`` (``--samples name=path``) and
fixed controls (eval-split shapes, the same with Gaussian pixel noise, flat grey, uniform noise).

    python benchmarks/fid_shapes_check.py --classifier old.safetensors --classifier new.safetensors \\
        --samples dense=<store>/<dense sample run>/artifacts/samples.npz --samples pruned0.7=...

Without ``--classifier`` it trains one with the ``fid`` stage's settings (about 20 s on a CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskdm.evaluation import fid  # noqa: E402
from maskdm.ddpm.data import render_shapes  # noqa: E402
from maskdm.evaluation.shapes_features import load_shapes_classifier, shapes_features  # noqa: E402


def controls(resolution: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = render_shapes(512, seed=1, resolution=resolution)[0]
    return {
        "512 eval-split shapes": shapes,
        "the same + pixel noise (sigma 40)": np.clip(shapes + rng.normal(0, 40, shapes.shape), 0, 255).astype(np.uint8),
        "flat grey": np.full_like(shapes, 128),
        "uniform noise": rng.integers(0, 256, shapes.shape, dtype=np.uint8),
    }


def stage_classifier():
    from entrypoints.fid import CLASSIFIER_TRAINING
    from maskdm.ddpm.data import load_dataset
    from maskdm.evaluation.shapes_features import train_shapes_classifier

    return train_shapes_classifier(load_dataset("shapes", split="train"), **CLASSIFIER_TRAINING)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", action="append", default=[], help="a shapes_classifier.safetensors (repeatable)")
    p.add_argument("--samples", action="append", default=[], help="name=path/to/samples.npz (repeatable)")
    p.add_argument("--resolution", type=int, default=16, help="of the samples and the reference images")
    args = p.parse_args()

    classifiers = {Path(c).name if len(args.classifier) == 1 else c: load_shapes_classifier(c) for c in args.classifier}
    if not classifiers:
        classifiers = {"the fid stage's settings": stage_classifier()}
    sets = controls(args.resolution)
    for item in args.samples:
        name, _, path = item.partition("=")
        sets[name] = np.load(path)["images"]
    reference_images = render_shapes(20000, seed=0, resolution=args.resolution)[0]
    references = {name: fid.statistics(shapes_features(reference_images, model)) for name, model in classifiers.items()}

    print("| images | " + " | ".join(classifiers) + " |")
    print("|---|" + "---|" * len(classifiers))
    for set_name, images in sets.items():
        scores = [fid.fid_of_features(shapes_features(images, model), references[name]) for name, model in classifiers.items()]
        print(f"| {set_name} | " + " | ".join(f"{s:.2f}" for s in scores) + " |")


if __name__ == "__main__":
    main()
