"""fid: score a sample run's samples.npz against reference statistics (``fid``, or ``fid_shapes``).

The reference is a pytorch-fid style .npz of ``mu`` and ``sigma``, or a dataset name (default: the
lineage's ``dataset``) whose training images are scored once and cached as a ``fid_reference``
run, found again by :func:`maskdm.evaluation.fid.reference_key` (dataset, resolution, features, dims,
weights digest). ``features=shapes`` scores with a small classifier of the embedded shapes
dataset, the package's shipped one (or one trained where its code changed), cached as a
``shapes_classifier`` run; it logs ``fid_shapes``, never
``fid``. ``fid`` is Inception pool3 (2048 dims) only; other Inception sizes log ``fid_inception_<dims>``.
Beside the FID, ``<that metric>_se``: its bootstrap standard error over the samples against the
fixed reference (``se_resamples``, ``se_seed``; :func:`maskdm.evaluation.fid.bootstrap_fids`).

Every fid run records its FID protocol (:class:`maskdm.fid_protocol.FidProtocol`: features and dims,
number of samples, reference, weights digest, and the sample run's sampler, steps, skip type, eta,
x0 clipping and seed) in the tags ``maskdm.fid_protocol`` (``part=value;...``),
``maskdm.fid_protocol_id`` (its digest) and ``maskdm.fid_protocol.<part>``; report and promote
compare FIDs only under one protocol.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
from tqdm.auto import tqdm

from entrypoints.common import integer, optional, stage, truth
import maskdm
from maskdm import dataset_inputs
from maskdm.evaluation import fid, npz_stream
from maskdm.errors import MaskDMError
from maskdm.evaluation.fid_protocol import SE_SUFFIX, UNKNOWN, FidProtocol
from maskdm.report import MODEL_STAGE_TAG, model_stage_of
from maskdm.tracking import SideRun, Upstream, cached_or_made, parse_run_ref, source_digest

log = logging.getLogger(__name__)

FEATURES = ("inception", "shapes")
SAMPLES = "samples.npz"
REFERENCE_STATS = "reference_stats.npz"
CLASSIFIER_FILE = "shapes_classifier.safetensors"
REFERENCE_KEY_TAG = "maskdm.fid_reference_key"
CLASSIFIER_KEY_TAG = "maskdm.shapes_classifier_key"
#: The images per forward pass this run used (its batch_size param may say auto).
BATCH_SIZE_TAG = "maskdm.fid_batch_size"
#: Training of the shapes classifier (maskdm.evaluation.shapes_features): 99.65% eval accuracy measured, 20 s
#: on an idle 2-core CPU (docs/details/fid.md).
CLASSIFIER_TRAINING = {"epochs": 3, "batch_size": 32, "max_images": 4000, "seed": 0}
#: The classifier shipped with the package, trained by scripts/make_shapes_classifier.py with that
#: recipe at one CPU thread (two trainings in two processes bit-identical), and its recipe: a store
#: without a classifier registers this file instead of training one, while the recipe's cache key
#: is the current one. So every store scores ``fid_shapes`` with the same weights, and none waits
#: for a training (trained per store they are the same only where the float arithmetic agrees).
SHIPPED_CLASSIFIER_FILE = Path(maskdm.__file__).resolve().parent / "assets" / "shapes_classifier.safetensors"
SHIPPED_CLASSIFIER_RECIPE = SHIPPED_CLASSIFIER_FILE.with_name("shapes_classifier_recipe.json")


@click.command("fid", help="FID of a sample run's samples.npz against a dataset or a .npz of statistics.")
@click.option("--sample_run_id", required=True, help="MLflow run ID of a sample run.")
@click.option(
    "--reference", default="", show_default=False,
    help="A .npz of mu and sigma (pytorch-fid --save-stats, or published CIFAR-10 statistics) or a dataset "
    "name (cifar10, shapes, imagefolder:<path>) whose training images are scored once and cached. "
    "Default: the lineage's dataset.",
)
@click.option(
    "--dims", type=int, default=2048, show_default=True,
    help="Inception features: 2048 (pool3: logs fid), 768, 192 or 64 (log fid_inception_<dims>).",
)
@click.option(
    "--batch_size", default="auto", show_default=True,
    help="Images per forward pass: an integer, or auto (200 on a GPU, 50 on the CPU, where it bounds memory).",
)
@click.option(
    "--features", default="inception", show_default=True,
    help="inception (logs fid) or shapes (the embedded dataset's classifier; logs fid_shapes, ignores dims).",
)
@click.option("--weights", default="", help="Inception weights file. Default: pytorch-fid's (torch hub cache, else download).")
@click.option(
    "--se_resamples", default=str(fid.DEFAULT_SE_RESAMPLES), show_default=True,
    help="Bootstrap resamples of the samples for the FID's standard error (metric <fid metric>_se); 0: none.",
)
@click.option("--se_seed", default="0", show_default=True, help="Seed of the bootstrap's draws.")
def command(
    sample_run_id: str, reference: str, dims: int, batch_size: str, features: str, weights: str,
    se_resamples: str, se_seed: str,
) -> None:
    params = {
        "sample_run_id": sample_run_id, "reference": optional(reference), "dims": dims,
        "batch_size": batch_size, "features": features, "weights": optional(weights),
        "se_resamples": se_resamples, "se_seed": se_seed,
    }
    with stage("fid", params) as run:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        batch_size = resolve_batch_size(batch_size, device)
        check_params(features, dims)
        se_resamples, se_seed = integer("se_resamples", se_resamples, minimum=0), integer("se_seed", se_seed, minimum=0)
        fid.check_se_resamples(se_resamples)
        up = run.upstream(sample_run_id, ["sample"], SAMPLES, "sample_run_id")
        # dense / pruned / masked / finetuned / finetuned_no_mask_training (the arm, from the lineage):
        # what the MLflow UI groups FID-vs-ratio charts by.
        run.set_tags({MODEL_STAGE_TAG: model_stage_of(up.tags, up.params) or "unknown"})
        reference = optional(reference) or up.params.get("dataset")
        if not reference:
            raise MaskDMError("the sample run's lineage names no dataset: pass reference=<dataset name or .npz of mu and sigma>")
        # Everything a user can get wrong is checked before the (long) feature extraction starts.
        given_stats = check_reference(reference, features, dims)
        samples_path = up.download(SAMPLES)
        shape, saved = read_samples_header(samples_path)
        # The samples and the reference, as the run's dataset inputs (the UI's Dataset column).
        dataset_inputs.log_run_file(up.run_id, SAMPLES, samples_path, f"samples:{up.run_id[:8]}", dataset_inputs.SAMPLES,
                                    {"images": shape[0], "resolution": shape[1]})
        if given_stats is not None:
            dataset_inputs.log_file(reference, Path(reference).name, dataset_inputs.FID_REFERENCE)
        else:
            dataset_inputs.log_dataset(reference, "train", dataset_inputs.FID_REFERENCE, shape[1])
        extractor = load_extractor(features, dims, optional(weights), batch_size, device)

        # Chunk by chunk: memory holds one chunk of images and its features, whatever the count (and,
        # for the standard error, every image's features: n x dims float32, 0.4 GB at 50,000 x 2048).
        chunks = progress(npz_stream.iter_rows(samples_path, "images", CHUNK_IMAGES), shape[0], "sample features")
        kept = FeatureKeeper(extractor.features, shape[0], extractor.dims) if se_resamples else None
        *sample_stats, _ = fid.streamed_statistics(chunks, kept or extractor.features)
        fid.save_stats(run.out / "sample_stats.npz", *sample_stats)
        tags = {}
        if given_stats is not None:
            reference_stats = given_stats
            stats_path = Path(reference).expanduser().resolve()
            tags["maskdm.fid_reference"] = str(stats_path)
            # A file is named by its content: the same statistics under another path compare.
            reference_part = f"sha256:{fid.weights_digest(stats_path)}"
        else:
            from maskdm.ddpm.data import dataset_identity

            # An image folder by its contents (read once here), not its path: the same images
            # elsewhere compare, and images changed in place make new statistics and a new protocol.
            identity = dataset_identity(reference, contents=True)
            reference_stats, tags["maskdm.fid_reference_run"] = dataset_statistics(reference, shape[1], extractor, identity)
            tags["maskdm.fid_reference"] = reference
            reference_part = f"{identity}:train"
        value = fid.fid_from_stats(*sample_stats, *reference_stats)
        se = None
        if kept is not None:
            # After the statistics and the FID, from the same features (its own copy, which it
            # overwrites) and the same reference: the FID is the same with and without it (tested).
            replicates = fid.bootstrap_fids(kept.array, reference_stats, se_resamples, se_seed, device, overwrite=True, progress=True)
            se = fid.bootstrap_se(replicates)

        protocol = FidProtocol.of(
            features=extractor.name, dims=extractor.dims, samples=shape[0], reference=reference_part,
            resolution=shape[1], weights=extractor.digest, **sampling_settings(up, saved),
        )
        metric = protocol.metric
        run.set_tags({
            **tags,
            **protocol.tags(),
            "maskdm.fid_features": extractor.name,
            "maskdm.fid_weights_digest": extractor.digest,
            "maskdm.device": device,
            BATCH_SIZE_TAG: str(batch_size),
        })
        run.log_metrics({metric: value, "num_samples": shape[0], **({f"{metric}{SE_SUFFIX}": se} if se is not None else {})})
        se_text = f" +- {se:.4f} (bootstrap SE over the samples, {se_resamples} resamples)" if se is not None else ""
        log.info("%s = %.4f%s (%d samples against %s; protocol %s)", metric, value, se_text, shape[0],
                 tags["maskdm.fid_reference"], protocol.id)


class FeatureKeeper:
    """The extractor's features, also written into one preallocated (n, dims) float32 array (for the SE)."""

    def __init__(self, features: Callable[[np.ndarray], np.ndarray], count: int, dims: int) -> None:
        self._features = features
        self.array = np.empty((count, dims), dtype=np.float32)
        self._filled = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = self._features(images)
        self.array[self._filled : self._filled + len(out)] = out
        self._filled += len(out)
        return out


def check_params(features: str, dims: int) -> None:
    if features not in FEATURES:
        raise MaskDMError(f"unknown features '{features}': use one of {', '.join(FEATURES)}")
    if features == "inception":
        fid.check_dims(dims)


def resolve_batch_size(value: str, device: str) -> int:
    """``auto`` by device (:data:`maskdm.evaluation.fid.AUTO_BATCH_SIZE`), else a positive integer."""
    if str(value).strip().lower() == "auto":
        return fid.auto_batch_size(device)
    return integer("batch_size", value)


def check_reference(reference: str, features: str, dims: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The statistics of a reference .npz (checked against the features' size), None for a dataset name."""
    from maskdm.evaluation.shapes_features import FEATURE_DIM

    if is_stats_file(reference):
        return fid.load_reference_stats(Path(reference).expanduser(), dims if features == "inception" else FEATURE_DIM)
    if features == "shapes" and reference != "shapes":
        raise MaskDMError(f"features=shapes scores the shapes dataset only, not '{reference}': use features=inception")
    return None


#: The sampling settings samples.npz records beside the images (written by the sample stage).
SAVED_SETTINGS = ("seed", "ddim_steps", "skip_type", "eta", "clip_sample")


#: Images read, featurised and merged into the statistics at a time (:func:`npz_stream.iter_rows`).
CHUNK_IMAGES = 1000


def read_samples_header(path: Path) -> tuple[tuple[int, ...], dict[str, str]]:
    """The shape of a samples.npz's images (checked: uint8 NHWC, at least 2) and the sampling settings it records.

    Only the header of the images is read; the images themselves are streamed later.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f.files:
                raise MaskDMError(f"{SAMPLES} of the sample run holds no 'images' array (it has {', '.join(f.files)})")
            saved = {k: str(f[k].item()) for k in SAVED_SETTINGS if k in f.files and f[k].size == 1}
        shape, dtype = npz_stream.array_header(path, "images")
    except MaskDMError:
        raise
    except Exception as exc:
        raise MaskDMError(f"cannot read the sample run's {SAMPLES} ({type(exc).__name__})") from None
    if dtype != np.uint8:
        raise MaskDMError(f"samples must be uint8 images, not {dtype}")
    if len(shape) != 4 or shape[-1] not in (1, 3, 4):
        raise MaskDMError(f"samples must be images of shape (N, H, W, C) with C 1, 3 or 4, not {shape}")
    if shape[0] < 2:
        raise MaskDMError(f"FID needs at least 2 images to estimate a covariance, got {shape[0]}")
    return shape, saved


def progress(chunks, total: int, desc: str):
    """tqdm over images for an iterator of image chunks."""
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for chunk in chunks:
            yield chunk
            bar.update(len(chunk))


# --- the sampling half of the protocol ------------------------------------------------------------


def _number(value: str | None, integer: bool) -> str | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return value
    return str(int(number)) if integer and number == int(number) else format(number, "g")


def sampling_settings(up: Upstream, saved: dict[str, str]) -> dict[str, str]:
    """How the sample run drew its images: its params, else what its samples.npz records, else unknown."""

    def setting(key: str) -> str | None:
        value = up.params.get(key)
        return value if value not in (None, "") else saved.get(key)

    return {
        # The sample stage has one sampler, DDIM over the original code's timestep sequences.
        "sampler": up.params.get("sampler") or "ddim",
        "steps": _number(setting("ddim_steps"), integer=True) or UNKNOWN,
        "skip": setting("skip_type") or UNKNOWN,
        "eta": _number(setting("eta"), integer=False) or UNKNOWN,
        "clip": clip_setting(up, saved),
        "seed": _number(setting("seed"), integer=True) or UNKNOWN,
    }


def clip_setting(up: Upstream, saved: dict[str, str]) -> str:
    """``true``/``false``: whether the sample run clipped DDIM's predicted x0 to [-1, 1].

    The sample run's ``clip_sample`` param, else the ``clip_sample`` its samples.npz records. A
    sample run made before the stage had that option followed the model's scheduler config, as
    DDIMPipeline does: then ``clip_sample`` of the sampled model run's
    ``model/scheduler/scheduler_config.json`` (diffusers' default, true, when the key is absent).
    ``unknown`` when none of these can be read.
    """
    for given in (up.params.get("clip_sample"), saved.get("clip_sample")):
        if truth(given) is not None:
            return str(truth(given)).lower()
    model_ref = up.params.get("model_run_id")
    if model_ref:
        import mlflow

        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=parse_run_ref(model_ref)[0], artifact_path="model/scheduler/scheduler_config.json",
                dst_path=tempfile.mkdtemp(prefix="maskdm-fid-scheduler-"),
            )
            return str(bool(json.loads(Path(path).read_text()).get("clip_sample", True))).lower()
        except Exception as exc:  # the protocol says so; the FID itself does not depend on it
            log.warning("cannot read the sampled model's scheduler config (%s): x0 clipping recorded as unknown", exc)
    return UNKNOWN


# --- feature extractors ---------------------------------------------------------------------------


@dataclass
class Extractor:
    """What turns uint8 NHWC images into feature vectors, and what identifies it in cache keys."""

    name: str  # "inception" or "shapes"
    dims: int
    digest: str  # of the weights file
    features: Callable[[np.ndarray], np.ndarray]


def load_extractor(features: str, dims: int, weights: str | None, batch_size: int, device: str) -> Extractor:
    if features == "inception":
        weights_file = fid.resolve_weights(weights)
        model = fid.load_inception(dims, weights_file, device)
        digest = fid.weights_digest(weights_file)
        return Extractor("inception", dims, digest, lambda images: fid.inception_features(images, model, batch_size, device))
    from maskdm.evaluation.shapes_features import load_shapes_classifier, shapes_features

    classifier_file = shapes_classifier_file()
    classifier = load_shapes_classifier(classifier_file)
    return Extractor(
        "shapes", classifier.config["feature_dim"], fid.weights_digest(classifier_file),
        lambda images: shapes_features(images, classifier, batch_size),
    )


# --- cached side runs (the reference statistics, the shapes classifier) ---------------------------


def shapes_classifier_key(training: Mapping[str, object] | None = None) -> str:
    """Retrain when the training settings (default: :data:`CLASSIFIER_TRAINING`, read when called),
    the classifier's code or the shapes renderer change."""
    training = CLASSIFIER_TRAINING if training is None else training
    settings = ";".join(f"{k}={v}" for k, v in sorted(training.items()))
    return f"{settings};code={source_digest('maskdm.evaluation.shapes_features', 'maskdm.ddpm.data')}"


def shipped_classifier_recipe() -> dict | None:
    """The shipped classifier's recipe if it was trained under the current cache key, else None
    (the training settings or the sources of the classifier or the shapes renderer changed since)."""
    if not (SHIPPED_CLASSIFIER_FILE.is_file() and SHIPPED_CLASSIFIER_RECIPE.is_file()):
        return None
    recipe = json.loads(SHIPPED_CLASSIFIER_RECIPE.read_text())
    return recipe if recipe.get("key") == shapes_classifier_key() else None


def shapes_classifier_file() -> Path:
    """The cached classifier's weights; when the store has none, the shipped classifier is logged as
    its ``shapes_classifier`` run, or, if the code changed since it was made, one is trained."""

    def train(work: Path) -> SideRun:
        from maskdm.ddpm.data import load_dataset
        from maskdm.evaluation.shapes_features import classifier_accuracy, save_shapes_classifier, train_shapes_classifier

        recipe = shipped_classifier_recipe()
        if recipe is not None:
            path = work / CLASSIFIER_FILE
            shutil.copyfile(SHIPPED_CLASSIFIER_FILE, path)
            log.info("registering the shipped shapes classifier (%s) in this store", SHIPPED_CLASSIFIER_FILE.name)
            params = {"dataset": "shapes", **CLASSIFIER_TRAINING, "made_by": recipe["command"],
                      "torch_threads": recipe["torch_threads"], "code_commit": recipe["code_commit"]}
            return SideRun(params, {"eval_accuracy": recipe["metrics"]["eval_accuracy"]}, [path, SHIPPED_CLASSIFIER_RECIPE])
        log.info("training the shapes classifier once (about a minute on a CPU); later fid runs reuse it")
        model = train_shapes_classifier(load_dataset("shapes", split="train"), progress=True, **CLASSIFIER_TRAINING)
        accuracy = classifier_accuracy(model, load_dataset("shapes", split="eval"))
        log.info("shapes classifier: eval accuracy %.4f", accuracy)
        path = save_shapes_classifier(model, work / CLASSIFIER_FILE)
        return SideRun({"dataset": "shapes", **CLASSIFIER_TRAINING}, {"eval_accuracy": accuracy}, [path])

    return cached_or_made("shapes_classifier", CLASSIFIER_KEY_TAG, shapes_classifier_key(), CLASSIFIER_FILE, train)[1]


def is_stats_file(reference: str) -> bool:
    return reference.lower().endswith(".npz") or Path(reference).expanduser().is_file()


def reference_statistics_key(identity: str, resolution: int, extractor: "Extractor") -> str:
    """The ``fid_reference`` cache key: the dataset's identity (an image folder's contents), the
    features, and what turned images into them: the preprocessing (:func:`maskdm.evaluation.fid.preprocessing_identity`)
    and the code that reads, decodes and scores the images (maskdm.evaluation.fid, maskdm.ddpm.data)."""
    return fid.reference_key(
        identity, resolution, extractor.dims, extractor.digest, extractor.name,
        preprocessing=fid.preprocessing_identity(resolution),
        code=source_digest("maskdm.evaluation.fid", "maskdm.ddpm.data"),
    )


def dataset_statistics(
    dataset: str, resolution: int, extractor: Extractor, identity: str | None = None
) -> tuple[tuple[np.ndarray, np.ndarray], str]:
    """(mu, sigma) of a dataset's training images under ``extractor``, and the ``fid_reference`` run caching them.

    ``identity``: :func:`maskdm.ddpm.data.dataset_identity` of ``dataset`` with ``contents=True``, when
    the caller has it already (it reads every image file)."""
    from maskdm.ddpm.data import dataset_identity

    identity = identity or dataset_identity(dataset, contents=True)
    key = reference_statistics_key(identity, resolution, extractor)

    def score(work: Path) -> SideRun:
        from maskdm.ddpm.data import load_dataset

        train = load_dataset(dataset, resolution, split="train", augment=False)
        log.info("computing reference statistics of %d %s images once; later fid runs reuse them", len(train), dataset)
        chunks = progress(fid.dataset_uint8_chunks(train, batch_size=CHUNK_IMAGES), len(train), "reference features")
        *stats, count = fid.streamed_statistics(chunks, extractor.features)
        params = {"dataset": dataset, "resolution": resolution, "features": extractor.name, "dims": extractor.dims,
                  "weights_digest": extractor.digest, "dataset_identity": identity,
                  "preprocessing": fid.preprocessing_identity(resolution)}
        return SideRun(params, {"num_images": count}, [fid.save_stats(work / REFERENCE_STATS, *stats)])

    run_id, path = cached_or_made("fid_reference", REFERENCE_KEY_TAG, key, REFERENCE_STATS, score)
    return fid.load_reference_stats(path, extractor.dims), run_id


__all__ = ["command"]
