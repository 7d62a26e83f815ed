"""Latent diffusion: the frozen autoencoder a latent pipeline's UNet works under.

A latent pipeline (diffusers' ``LDMPipeline``: ``vqvae`` + ``unet`` + ``scheduler``, as
``CompVis/ldm-celebahq-256``) denoises the latents of a frozen VQ autoencoder. Pruning, masks,
baseline loss, mask training and finetuning see only the UNet and the tensors it is trained on, so
they work unchanged once their dataset is a dataset of latents (:class:`LatentDataset`), and the
sampler decodes what it makes (:meth:`LatentCodec.decode`).

Latents follow diffusers' convention (``LDMPipeline``): ``z = encode(x).latents * scaling_factor``
and ``x = decode(z / scaling_factor)``; ``decode`` quantizes, as the pipeline's does.

A dataset is encoded once per dataset, split, resolution and autoencoder (:func:`encode_dataset`)
into a ``.npy`` file that later reads take one latent at a time with ordinary reads
(:class:`LatentDataset`): memory is bounded by the batch, not by the dataset. Caching that file
as an MLflow run is the stages' business (``entrypoints/datasets.py``), not this module's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from maskdm.ddpm.archs import downsampling_factor
from maskdm.errors import MaskDMError

LATENTS_FILE = "latents.npy"
LABELS_FILE = "labels.npy"
#: Latents decoded at a time. The quantizer compares every latent pixel with every codebook entry
#: (torch.cdist): 256 latents of 64x64 against CelebA-HQ's 8,192 entries would be 34 GB at once.
DECODE_BATCH = 16


class LatentCodec:
    """Images in [-1, 1] <-> scaled latents, through a frozen diffusers ``VQModel``."""

    def __init__(self, vqvae):
        self.vqvae = vqvae.eval().requires_grad_(False)

    @property
    def scaling_factor(self) -> float:
        return float(self.vqvae.config.scaling_factor)

    @property
    def factor(self) -> int:
        """How much smaller a latent is than its image: 2 per encoder level after the first."""
        return downsampling_factor(self.vqvae.config.block_out_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.vqvae.config.latent_channels)

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) of the images decoded from latents of (C, h, w)."""
        _, height, width = latent_shape
        return int(self.vqvae.config.in_channels), height * self.factor, width * self.factor

    def to(self, device) -> "LatentCodec":
        self.vqvae.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vqvae.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents (float32, on the codec's device) of images NCHW in [-1, 1]."""
        latents = self.vqvae.encode(images.to(self.device, torch.float32)).latents
        return latents * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images NCHW in about [-1, 1] (float32, not clamped) of scaled latents, :data:`DECODE_BATCH` at a time."""
        latents = latents.to(self.device, torch.float32) / self.scaling_factor
        return torch.cat([self.vqvae.decode(chunk).sample for chunk in latents.split(DECODE_BATCH)])

    def digest(self) -> str:
        """sha256 of the autoencoder's config and weights: which autoencoder a latent cache was made by."""
        # Not the bookkeeping keys (``_name_or_path`` is where it was loaded from).
        config = {k: v for k, v in self.vqvae.config.items() if not k.startswith("_")}
        sha = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.vqvae.state_dict().items()):
            sha.update(name.encode())
            sha.update(tensor.detach().to("cpu", copy=True).contiguous().view(torch.uint8).numpy().tobytes())
        return sha.hexdigest()[:32]


def encode_dataset(
    dataset: Dataset, codec: LatentCodec, folder: str | os.PathLike, batch_size: int = 64, progress: bool = True,
    workers: int = 0,
) -> Path:
    """Encode every image of ``dataset`` (``(image, label)`` items, in order) into ``folder``.

    ``latents.npy`` (float32, N x C x h x w) is written batch by batch, so memory holds one batch
    (and the ``workers`` loader processes' prefetched ones); ``labels.npy`` (int64) beside it. Both
    are written under temporary names and renamed when complete, so a folder never holds a partial
    file under the real name. ``workers``: processes that read and resize the images while the
    autoencoder encodes (on a GPU the reading is what takes the time).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count = len(dataset)
    if count == 0:
        raise MaskDMError("the dataset to encode is empty")
    first = _image(dataset[0])
    latent_shape = tuple(codec.encode(first[None]).shape[1:])
    labels = np.empty(count, dtype=np.int64)
    partial = folder / (LATENTS_FILE + ".partial")
    with partial.open("wb") as out, tqdm(total=count, desc="encoding latents", unit="img", disable=not progress) as bar:
        np.lib.format.write_array_header_2_0(
            out, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": (count, *latent_shape)}
        )
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_images_and_labels)
        start = 0
        for images, batch_labels in loader:
            labels[start : start + len(batch_labels)] = batch_labels
            out.write(codec.encode(images).to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes())
            start += len(batch_labels)
            bar.update(len(batch_labels))
    np.save(folder / (LABELS_FILE + ".partial.npy"), labels)
    os.replace(folder / (LABELS_FILE + ".partial.npy"), folder / LABELS_FILE)
    os.replace(partial, folder / LATENTS_FILE)
    return folder


class LatentDataset(Dataset):
    """The latents of :func:`encode_dataset` as ``(latent, label)`` items, read one at a time from disk.

    Ordinary positional reads (``os.pread``) rather than a memory map: file pages in the OS cache
    do not count against the process's resident memory, mapped pages would. No flip augmentation:
    a flipped latent is not the latent of the flipped image.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / LATENTS_FILE
        if not path.is_file() or not (self.folder / LABELS_FILE).is_file():
            raise MaskDMError(f"latent cache '{self.folder}' holds no {LATENTS_FILE} and {LABELS_FILE}")
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self._offset = f.tell()
        if fortran or dtype != np.dtype("<f4") or len(shape) != 4:
            raise MaskDMError(f"latent cache '{path}' is not a float32 N x C x h x w array")
        self.shape = tuple(int(s) for s in shape)
        self.labels = np.load(self.folder / LABELS_FILE, allow_pickle=False)
        if len(self.labels) != self.shape[0]:
            raise MaskDMError(f"latent cache '{self.folder}': {self.shape[0]} latents but {len(self.labels)} labels")
        self._row_bytes = int(np.prod(self.shape[1:])) * 4
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.shape[1:]

    def _file(self) -> int:
        # One descriptor per process: DataLoader workers fork with this object.
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.folder / LATENTS_FILE, os.O_RDONLY), os.getpid()
        return self._fd

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"latent {i} out of range 0..{len(self) - 1}")
        data = os.pread(self._file(), self._row_bytes, self._offset + i * self._row_bytes)
        if len(data) != self._row_bytes:
            raise MaskDMError(f"latent cache '{self.folder}' is truncated at latent {i}")
        latent = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(self.shape[1:])
        return latent, int(self.labels[i])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None
        return state

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


def _image(item) -> torch.Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


def _label(item) -> int:
    return int(item[1]) if isinstance(item, (tuple, list)) and len(item) > 1 else 0


def _images_and_labels(items: list) -> tuple[torch.Tensor, list[int]]:
    return torch.stack([_image(item) for item in items]), [_label(item) for item in items]
