"""The shipped shapes classifier (the features of ``fid_shapes``): made by the fid stage's recipe
under the current code, so every store scores with these weights instead of training its own."""

from __future__ import annotations

import json

from entrypoints.fid import CLASSIFIER_TRAINING, SHIPPED_CLASSIFIER_FILE, SHIPPED_CLASSIFIER_RECIPE, shapes_classifier_key
from maskdm.ddpm.data import load_dataset
from maskdm.evaluation.fid import weights_digest
from maskdm.evaluation.shapes_features import FEATURE_DIM, classifier_accuracy, load_shapes_classifier


def test_the_shipped_classifier_was_made_by_the_stages_recipe_under_the_current_code():
    recipe = json.loads(SHIPPED_CLASSIFIER_RECIPE.read_text())
    # A change to the training settings, the classifier's code or the shapes renderer changes the
    # key: the stage would then train a classifier in every store again.
    assert recipe["key"] == shapes_classifier_key(), (
        "the shipped shapes classifier is stale: run `python scripts/make_shapes_classifier.py` and commit maskdm/assets/")
    assert recipe["training"] == CLASSIFIER_TRAINING
    assert recipe["weights_digest"] == weights_digest(SHIPPED_CLASSIFIER_FILE)
    assert recipe["rerun_check"]["bit_identical"] and recipe["torch_threads"] >= 1
    model = load_shapes_classifier(SHIPPED_CLASSIFIER_FILE)
    classes = len(load_dataset("shapes", split="eval").classes)
    assert model.config == {"num_classes": classes + 1, "width": 16, "feature_dim": FEATURE_DIM}  # + "not a clean shape"
    # Trained: it tells the shapes apart (a fresh initialisation guesses: about 1 in 6).
    accuracy = classifier_accuracy(model, load_dataset("shapes", split="eval"), limit=1000)
    assert accuracy > 0.95 and abs(accuracy - recipe["metrics"]["eval_accuracy"]) < 0.02

