"""The data a stage trains or measures a model on: images, or a latent model's cached latents.

A pixel model gets the dataset itself (:func:`maskdm.ddpm.data.load_dataset`). A latent model (a
pipeline with a frozen autoencoder, :mod:`maskdm.ddpm.latent`) gets the latents of its images: each
dataset, split, resolution and autoencoder is encoded once and cached as a ``latent_cache`` run
beside the stage run (as the FID reference statistics are), which every later stage finds again
by its key. The stage run records the one it used in the tag ``maskdm.latent_cache.<split>``.

Every dataset a stage run reads is logged on it as an MLflow dataset input with a digest of its
contents (:mod:`maskdm.dataset_inputs`): :func:`stage_dataset` logs the split it returns, and
:func:`log_replay_batches` the replayed batches a stage takes of one.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from maskdm import dataset_inputs
from maskdm.ddpm.data import dataset_identity, default_cache_dir, load_dataset, unflipped_split
from maskdm.ddpm.latent import LatentCodec, LatentDataset, encode_dataset
from maskdm.tracking import SideRun, StageRun, cached_or_made, client, source_digest

log = logging.getLogger(__name__)

LATENT_CACHE_STAGE = "latent_cache"
LATENT_KEY_TAG = "maskdm.latent_key"
#: ``maskdm.latent_cache.train`` / ``.eval`` on a stage run: the latent_cache run it read.
LATENT_CACHE_TAG = "maskdm.latent_cache"
LATENTS_ARTIFACT = "latents"
#: Images encoded at a time (memory holds one batch of images and latents).
ENCODE_BATCH = 64
#: Loader processes reading the images while a GPU encodes (on the CPU the encoder needs the cores).
ENCODE_WORKERS_ON_GPU = 4


def stage_dataset(
    ddpm, name: str, split: str, augment: bool | None = None, run: StageRun | None = None, context: str | None = "auto"
):
    """``name``'s ``split`` as ``ddpm`` is trained on: images at its resolution, or its latents.

    ``augment`` (the training split's random flip) applies to images only: a flipped latent is
    not the latent of the flipped image, so latents are never flipped. ``run``: the stage run to
    tag with the latent cache it read and to log the dataset input on (none on the non-main
    processes of a multi-process stage). ``context``: the input's context
    (:data:`maskdm.dataset_inputs.CONTEXTS`); ``auto``: ``training`` for the train split,
    ``evaluation`` for eval; None: not logged (the caller logs the part it reads,
    :func:`log_replay_batches`).
    """
    if context == "auto":
        context = dataset_inputs.TRAINING if split == "train" else dataset_inputs.EVALUATION
    if not ddpm.is_latent:
        dataset = load_dataset(name, ddpm.resolution, split=split, augment=augment)
        if run is not None and context:
            dataset_inputs.log_dataset(name, split, context, ddpm.resolution, dataset)
        return dataset
    dataset, cache_run = latent_dataset(ddpm.codec, name, split, ddpm.resolution)
    if run is not None:
        run.set_tags({f"{LATENT_CACHE_TAG}.{split}": cache_run})
        if context:
            dataset_inputs.log_latents(name, split, cache_run, latent_cache_key(cache_run), context)
    return dataset


def latent_cache_key(cache_run: str) -> str:
    """The key a ``latent_cache`` run was made for (the images' identity and the autoencoder's digest)."""
    return client().get_run(cache_run).data.tags[LATENT_KEY_TAG]


def log_replay_batches(ddpm, name: str, batches, context: str, run: StageRun | None) -> None:
    """Log the replayed batches (:class:`maskdm.method.replay.ReplayBatches`) a stage read of ``name``'s
    training split (from :func:`stage_dataset` with ``context=None``) as a dataset input."""
    if run is None:
        return
    if ddpm.is_latent:
        cache_run = client().get_run(run.run_id).data.tags[f"{LATENT_CACHE_TAG}.train"]
        base = dataset_inputs.latents_digest(latent_cache_key(cache_run))
    else:
        base = dataset_inputs.dataset_digest(name, "train", ddpm.resolution, batches.dataset)
    dataset_inputs.log_replay(name, ddpm.resolution, batches, context, base)


def latent_key(autoencoder_digest: str, name: str, split: str, resolution: int) -> str:
    """What identifies a latent cache: reuse it only when all of this matches (an image folder by
    its absolute path and listing, :func:`maskdm.ddpm.data.dataset_identity`)."""
    return (
        f"dataset={dataset_identity(name)};split={split};resolution={resolution};autoencoder={autoencoder_digest};"
        f"code={source_digest('maskdm.ddpm.latent', 'maskdm.ddpm.data')}"
    )


def latent_dataset(codec: LatentCodec, name: str, split: str, resolution: int) -> tuple[LatentDataset, str]:
    """(the latents of ``name``'s ``split`` under ``codec``, the ``latent_cache`` run holding them)."""
    # Latents are never flipped, so an image folder's two splits are one set of latents.
    split = unflipped_split(name, split)
    # Hashing every weight of a large autoencoder takes a while: once per lookup.
    autoencoder_digest = codec.digest()
    key = latent_key(autoencoder_digest, name, split, resolution)
    # Hashed: a dataset path may hold characters a tag search cannot quote; the params keep it readable.
    hashed = hashlib.sha256(key.encode()).hexdigest()[:32]
    # One local copy per cache run, shared by every later stage on this machine: a CelebA-HQ split
    # is 1.5 GB, too much to download again for each stage.
    keep_in = default_cache_dir() / "latents"

    def encode(work: Path) -> SideRun:
        images = load_dataset(name, resolution, split=split, augment=False)
        log.info("encoding the %d images of %s (%s) once; later stages reuse the latents", len(images), name, split)
        previous = codec.device
        on_gpu = torch.cuda.is_available()
        codec.to("cuda" if on_gpu else "cpu")
        try:
            folder = encode_dataset(images, codec, work / LATENTS_ARTIFACT, ENCODE_BATCH, workers=ENCODE_WORKERS_ON_GPU if on_gpu else 0)
        finally:
            codec.to(previous)
        cached = LatentDataset(folder)
        params = {"dataset": name, "split": split, "resolution": resolution, "autoencoder_digest": autoencoder_digest,
                  "latent_shape": "x".join(map(str, cached.latent_shape)), "scaling_factor": codec.scaling_factor}
        return SideRun(params, {"num_images": len(cached)}, [folder])

    run_id, folder = cached_or_made(LATENT_CACHE_STAGE, LATENT_KEY_TAG, hashed, LATENTS_ARTIFACT, encode, keep_in)
    return LatentDataset(folder), run_id


__all__ = ["stage_dataset", "latent_dataset", "log_replay_batches", "LATENT_CACHE_STAGE"]
