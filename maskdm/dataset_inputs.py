"""The data a stage run read, logged as MLflow dataset inputs (``mlflow.log_input``).

Part of the tracking layer (it imports mlflow; the library modules do not): entry points call it.
Each input is an :class:`mlflow.data.meta_dataset.MetaDataset` with a name (``shapes:train``,
``cifar10:eval``, ``imagefolder:<folder name>:train``, ``shapes:train[replay]``, ...), a source
(where the data is) and a digest of the *contents* used, so the MLflow UI's Dataset column and run
page show them, and the same data gets the same digest in every run:

- ``shapes``: sha256 of the rendered uint8 pixels (shape and bytes); a 20,000-image split at 32 px
  hashes in about 0.1 s.
- ``cifar10``: sha256 of the MD5s of the split's batch files, which torchvision checks against
  the files every time it opens the dataset; the 50,000 images are not hashed again.
- ``imagefolder:<path>``: sha256 of every image file's relative path and bytes, computed once per
  listing (:func:`maskdm.ddpm.data.dataset_identity`: paths, sizes, modification times) and cached in
  ``<MASKDM_DATA_DIR>/digests``; a copy of the same files elsewhere gets the same digest, one
  changed image a new one.
- replayed batches (baseline_loss, train_masks, prune's taylor): the dataset's digest with the
  batches' fingerprint (:meth:`maskdm.method.replay.ReplayBatches.fingerprint`: subset order, batching,
  first batch's pixels).
- a latent model's latents: the ``latent_cache`` run's key (the images' identity and the
  autoencoder's weights digest).
- a file (a sample run's ``samples.npz``, a reference .npz): sha256 of its bytes.

The context says what the stage did with it: :data:`CONTEXTS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import mlflow
import numpy as np
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset

from maskdm.ddpm.data import ArrayImageDataset, dataset_identity, default_cache_dir, image_paths, load_dataset

log = logging.getLogger(__name__)

TRAINING = "training"
EVALUATION = "evaluation"
CALIBRATION = "calibration"
HELDOUT = "heldout"
FID_REFERENCE = "fid_reference"
SAMPLES = "samples"
#: What a stage did with a dataset: trained on it, measured eval_loss on it, scored pruning
#: importance on it (taylor), scored masks on it (held-out), took FID reference statistics of it,
#: or scored generated samples.
CONTEXTS = (TRAINING, EVALUATION, CALIBRATION, HELDOUT, FID_REFERENCE, SAMPLES)
#: Hex digits kept of a sha256 (MLflow stores digests of at most 36 characters).
DIGEST_LENGTH = 16
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

_CHUNK = 1 << 20


def _short(sha) -> str:
    return sha.hexdigest()[:DIGEST_LENGTH]


def array_digest(images: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    sha = hashlib.sha256(f"{images.dtype.str}{images.shape}".encode())
    sha.update(np.ascontiguousarray(images).data)
    return _short(sha)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            sha.update(block)
    return _short(sha)


def folder_digest(root: str | os.PathLike) -> str:
    """sha256 of every image under ``root`` (relative path and bytes), cached per listing."""
    root = Path(os.path.expanduser(str(root))).resolve()

    def contents() -> str:
        sha = hashlib.sha256()
        for path in image_paths(root):
            sha.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(_CHUNK), b""):
                    sha.update(block)
        return _short(sha)

    return _cached(dataset_identity(f"imagefolder:{root}"), contents)


def _cached(key: str, compute) -> str:
    """``compute()``, kept on disk under ``key`` in ``<MASKDM_DATA_DIR>/digests``."""
    cache = default_cache_dir() / "digests" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    try:
        found = json.loads(cache.read_text())
        if found.get("key") == key:
            return found["digest"]
    except (OSError, ValueError, KeyError):
        pass
    digest = compute()
    try:  # a cache that cannot be written only costs computing it again next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"key": key, "digest": digest}))
        os.replace(partial, cache)
    except OSError as exc:
        log.warning("cannot cache a dataset digest in %s: %s", cache.parent, exc)
    return digest


def dataset_digest(name: str, split: str, resolution: int, dataset=None) -> str:
    """The digest of the images of ``name``'s ``split`` at ``resolution`` (see the module docstring).

    ``dataset``: the loaded split, if at hand (the shapes pixels are then not rendered again).
    """
    if name == "shapes":
        if isinstance(dataset, ArrayImageDataset):
            return array_digest(dataset.images)
        # Rendering a split again takes seconds: its digest is kept per split, resolution and renderer code.
        from maskdm.tracking import source_digest

        key = f"shapes;split={split};resolution={resolution};code={source_digest('maskdm.ddpm.data')}"
        return _cached(key, lambda: array_digest(load_dataset(name, resolution, split=split, augment=False).images))
    if name == "cifar10":
        from torchvision.datasets import CIFAR10

        files = CIFAR10.train_list if split == "train" else CIFAR10.test_list
        return _short(hashlib.sha256(";".join(f"{f}={md5}" for f, md5 in files).encode()))
    if name.startswith("imagefolder:"):
        return folder_digest(name.split(":", 1)[1])
    return _short(hashlib.sha256(name.encode()))


def dataset_label(name: str) -> str:
    """A short name for the UI: an image folder by its folder name (the source holds the path)."""
    if name.startswith("imagefolder:"):
        return f"imagefolder:{Path(os.path.expanduser(name.split(':', 1)[1])).resolve().name}"
    return name


def dataset_source(name: str, resolution: int):
    """Where the images come from: the folder, CIFAR-10's download address, or the shapes renderer."""
    if name.startswith("imagefolder:"):
        return _local_source(Path(os.path.expanduser(name.split(":", 1)[1])).resolve())
    if name == "cifar10":
        return HTTPDatasetSource(CIFAR10_URL)
    return CodeDatasetSource({"generator": "maskdm.ddpm.data.render_shapes", "dataset": name, "resolution": str(resolution)})


def _local_source(path: Path):
    """MLflow's source for a local path (a LocalArtifactDatasetSource)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():
        # MLflow 3.17 registers its local source twice and warns that the path is ambiguous between them.
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(str(path))


#: Tries of :func:`log_input` when another run logged the same dataset at the same moment.
LOG_INPUT_TRIES = 3


def log_input(name: str, digest: str, source, context: str, tags: Mapping[str, object] | None = None) -> None:
    """Log one dataset input on the active run.

    MLflow's SQL store looks for the dataset's row (experiment, name, digest) and inserts it when
    it is missing; two runs logging the same dataset at once (two drivers on one store, a
    ``--parallel`` sweep) can both miss it, and the second insert fails on the table's unique key.
    The row exists by then, so logging again links the run to it: tried up to
    :data:`LOG_INPUT_TRIES` times. Seen with four drivers against a tracking server (2026-12-05).
    """
    from mlflow.exceptions import MlflowException

    if context not in CONTEXTS:
        raise ValueError(f"unknown dataset context {context!r}")
    dataset = MetaDataset(source, name=name, digest=digest)
    for attempt in range(1, LOG_INPUT_TRIES + 1):
        try:
            mlflow.log_input(dataset, context=context, tags={k: str(v) for k, v in (tags or {}).items()} or None)
            return
        except MlflowException as exc:
            message = str(exc).lower()
            if attempt == LOG_INPUT_TRIES or "unique" not in message or "dataset" not in message:
                raise
            log.info("dataset %s was being logged by another run at the same moment; logging it again", name)
            time.sleep(0.2 * attempt)


def log_dataset(name: str, split: str, context: str, resolution: int, dataset=None) -> str:
    """Log ``name``'s ``split`` (images at ``resolution``) as an input; returns its digest."""
    digest = dataset_digest(name, split, resolution, dataset)
    log_input(f"{dataset_label(name)}:{split}", digest, dataset_source(name, resolution), context,
              {"dataset": name, "split": split, "resolution": resolution})
    return digest


def log_replay(name: str, resolution: int, batches, context: str, dataset_digest_: str | None = None) -> str:
    """Log replayed batches (:class:`maskdm.method.replay.ReplayBatches`) of ``name``'s training split."""
    base = dataset_digest_ or dataset_digest(name, "train", resolution, batches.dataset)
    digest = _short(hashlib.sha256(f"{base}|{batches.fingerprint()}".encode()))
    kind = "heldout" if context == HELDOUT else "replay"
    log_input(
        f"{dataset_label(name)}:train[{kind}]", digest, dataset_source(name, resolution), context,
        {"dataset": name, "split": "train", "resolution": resolution, "images": len(batches) * batches.spec.batch_size,
         "batch_size": batches.spec.batch_size, "seed": batches.spec.seed, "dataset_digest": base},
    )
    return digest


def latents_digest(key: str) -> str:
    """The digest of cached latents: of their cache key (the images' identity, the autoencoder's weights)."""
    return _short(hashlib.sha256(key.encode()))


def log_latents(name: str, split: str, cache_run_id: str, key: str, context: str) -> str:
    """Log a latent model's latents of ``name``'s ``split``, read from the ``latent_cache`` run ``cache_run_id``."""
    digest = latents_digest(key)
    source = CodeDatasetSource({"latent_cache_run": cache_run_id, "uri": f"runs:/{cache_run_id}/latents", "dataset": name})
    log_input(f"{dataset_label(name)}:{split}[latents]", digest, source, context,
              {"dataset": name, "split": split, "latent_cache_run": cache_run_id})
    return digest


def log_run_file(run_id: str, artifact: str, local: str | os.PathLike, name: str, context: str,
                 tags: Mapping[str, object] | None = None) -> str:
    """Log an artifact of another run (a sample run's samples.npz, a cached reference) by its bytes."""
    digest = file_digest(local)
    source = CodeDatasetSource({"run_id": run_id, "uri": f"runs:/{run_id}/{artifact}"})
    log_input(name, digest, source, context, {"run_id": run_id, "artifact": artifact, **(tags or {})})
    return digest


def log_file(path: str | os.PathLike, name: str, context: str) -> str:
    """Log a local file (a reference .npz of statistics) by its bytes."""
    path = Path(path).expanduser().resolve()
    digest = file_digest(path)
    log_input(name, digest, _local_source(path), context, {"path": str(path)})
    return digest
