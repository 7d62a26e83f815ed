"""Datasets: the embedded ``shapes`` set, CIFAR-10 (torchvision), and image folders.

Every dataset yields ``(image, label)`` with ``image`` a float CHW tensor in [-1, 1]. The
``train`` split applies a random horizontal flip; the ``eval`` split is deterministic, so losses
measured on it are reproducible.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from maskdm.errors import MaskDMError

DATASET_NAMES = ("shapes", "cifar10", "imagefolder:<path>")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def default_cache_dir() -> Path:
    return Path(os.environ.get("MASKDM_DATA_DIR", Path.home() / ".cache" / "maskdm" / "data"))


# --- the embedded shapes dataset ------------------------------------------------------------------

SHAPE_CLASSES = ("circle", "square", "triangle", "diamond", "ring", "cross")

#: Sizes of the embedded splits. Generating them is cheap (thousands of images per second).
SHAPES_TRAIN_SIZE = 20000
SHAPES_EVAL_SIZE = 2000
_SHAPES_SPLIT_SEED = {"train": 0, "eval": 1}


#: Shape radius range, as a fraction of the image side: shapes span half to four fifths of the
#: image, so at the demo's 16x16 a triangle, a ring and a cross still differ by several pixels (at
#: 0.15-0.3 they were 2-3 pixel blobs; docs/details/pretrain.md).
SHAPES_RADIUS = (0.25, 0.4)


def render_shapes(
    n: int, seed: int, resolution: int = 32, radius: tuple[float, float] = SHAPES_RADIUS
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8 NHWC) and labels, generated deterministically from ``seed``.

    Each image is one shape of a random class, colour, size and position on a two-colour vertical
    gradient background. Vectorised over the batch with numpy, so no per-image Python loop.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPE_CLASSES), n)
    # Background: a gradient between two muted colours; foreground: a saturated colour far from both.
    bg_top = rng.uniform(0.0, 0.6, (n, 1, 1, 3))
    bg_bottom = rng.uniform(0.0, 0.6, (n, 1, 1, 3))
    fg = rng.uniform(0.0, 1.0, (n, 3))
    fg[np.arange(n), rng.integers(0, 3, n)] = 1.0  # at least one full channel: stands out
    centre = rng.uniform(0.3, 0.7, (n, 2))
    radii = rng.uniform(*radius, n)

    # Every random number is drawn above, for the whole batch; the pixels are then made a chunk
    # at a time, so the float64 intermediates stay in the CPU's caches (all 20,000 training images
    # at once made arrays of 160 MB each at 32x32, and took 13 times as long as at 16x16).
    coords = (np.arange(resolution) + 0.5) / resolution
    t = np.linspace(0.0, 1.0, resolution)[None, :, None, None]
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    chunk = max(1, _RENDER_CHUNK_PIXELS // (resolution * resolution))
    for start in range(0, n, chunk):
        part = slice(start, min(n, start + chunk))
        images[part] = _draw(labels[part], bg_top[part], bg_bottom[part], fg[part], centre[part], radii[part], coords, t)
    return images, labels.astype(np.int64)


#: Pixels per chunk of :func:`render_shapes`: 128 images of 32x32.
_RENDER_CHUNK_PIXELS = 128 * 32 * 32


def _draw(labels, bg_top, bg_bottom, fg, centre, radii, coords, t) -> np.ndarray:
    """The uint8 pixels of :func:`render_shapes`'s images from their drawn labels, colours and geometry."""
    n, resolution = len(labels), len(coords)
    y = coords[None, :, None]
    x = coords[None, None, :]
    dy = y - centre[:, 0, None, None]
    dx = x - centre[:, 1, None, None]
    r = radii[:, None, None]
    regions = {
        "circle": lambda: dx**2 + dy**2 <= r**2,
        "square": lambda: (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r),
        "triangle": lambda: (dy <= 0.8 * r) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6),
        "diamond": lambda: np.abs(dx) + np.abs(dy) <= r,
        "ring": lambda: (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (0.55 * r) ** 2),
        "cross": lambda: ((np.abs(dx) <= 0.3 * r) & (np.abs(dy) <= r)) | ((np.abs(dy) <= 0.3 * r) & (np.abs(dx) <= r)),
    }
    inside = np.zeros((n, resolution, resolution), dtype=bool)
    for k, name in enumerate(SHAPE_CLASSES):
        pick = labels == k
        if pick.any():
            inside[pick] = regions[name]()[pick]

    background = bg_top * (1 - t) + bg_bottom * t  # (n, H, 1, 3)
    images = np.broadcast_to(background, (n, resolution, resolution, 3)).copy()
    images[inside] = np.repeat(fg, inside.reshape(n, -1).sum(1), axis=0)
    return (images * 255).round().astype(np.uint8)


class ArrayImageDataset(Dataset):
    """uint8 NHWC images in memory, with labels, served as [-1, 1] CHW tensors."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool, classes=()):
        self.images = images
        self.labels = labels
        self.train = train
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div(127.5).sub(1.0)
        if self.train and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, int(self.labels[i])


def shapes_dataset(split: str, resolution: int = 32, size: int | None = None, augment: bool | None = None) -> ArrayImageDataset:
    size = size or (SHAPES_TRAIN_SIZE if split == "train" else SHAPES_EVAL_SIZE)
    images, labels = render_shapes(size, _SHAPES_SPLIT_SEED[split], resolution)
    augment = split == "train" if augment is None else augment
    return ArrayImageDataset(images, labels, train=augment, classes=SHAPE_CLASSES)


# --- torchvision / folder datasets ----------------------------------------------------------------


def _transform(resolution: int, train: bool):
    from torchvision import transforms

    steps = [transforms.Resize(resolution), transforms.CenterCrop(resolution)]
    if train:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
    return transforms.Compose(steps)


def reference_transform(resolution: int):
    """The transform a file dataset's images go through for FID reference statistics (no flip)."""
    return _transform(resolution, train=False)


def cifar10_dataset(split: str, resolution: int, cache_dir: Path, augment: bool) -> Dataset:
    from torchvision.datasets import CIFAR10

    root = cache_dir / "cifar10"
    try:
        return CIFAR10(root, train=split == "train", transform=_transform(resolution, augment), download=True)
    except Exception as exc:
        raise MaskDMError(
            f"cannot download CIFAR-10 into {root} ({type(exc).__name__}); offline, put the extracted "
            f"cifar-10-batches-py folder there, or pass dataset=shapes or dataset=imagefolder:<path>"
        ) from None


#: PIL modes of single-channel images; every other mode is read as colour.
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")


def check_one_colour_mode(root: Path, paths: list[Path]) -> None:
    """Refuse a folder that mixes grayscale and colour images.

    Every image is converted to RGB, so a mixed folder would train on grey copies beside colour
    ones without a word: most likely two datasets in one folder. Only headers are read (PIL opens
    lazily), so this costs a file open per image, not a decode.
    """
    from PIL import Image, UnidentifiedImageError

    example: dict[bool, tuple[Path, str]] = {}
    for path in paths:
        try:
            with Image.open(path) as img:
                mode = img.mode
        except (OSError, UnidentifiedImageError):
            raise MaskDMError(f"image folder '{root}': {path} is not a readable image") from None
        example.setdefault(mode in GRAYSCALE_MODES, (path, mode))
        if len(example) == 2:
            (grey, grey_mode), (colour, colour_mode) = example[True], example[False]
            raise MaskDMError(
                f"image folder '{root}' mixes grayscale and colour images (e.g. {grey.relative_to(root)}: {grey_mode}, "
                f"{colour.relative_to(root)}: {colour_mode}); convert them to one mode or split the folder"
            )


def image_paths(root: Path) -> list[Path]:
    """Every png/jpg/jpeg/webp under ``root`` (recursively), sorted by path; one line if there is none."""
    if not root.is_dir():
        raise MaskDMError(f"image folder '{root}' does not exist")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise MaskDMError(f"image folder '{root}' holds no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images")
    return paths


def dataset_identity(name: str, contents: bool = False) -> str:
    """What a cache made from a dataset's images must match: its name, and for an image folder its
    absolute path and a digest of its listing (every image's path, size and modification time), so
    that images added, removed or replaced make a new cache. Reads no pixels.

    ``contents``: an image folder by what it holds instead, wherever it is: a digest of every
    image's path inside the folder and the SHA-256 of its bytes (:func:`folder_contents_digest`).
    A file rewritten with the same size and time (``cp -p``, ``rsync -t`` of another image, a
    restore) changes it; the listing digest would not see that. It reads every byte once.
    """
    if not name.startswith("imagefolder:"):
        return name
    root = Path(os.path.expanduser(name.split(":", 1)[1])).resolve()
    if contents:
        return f"imagefolder:sha256={folder_contents_digest(root)}"
    sha = hashlib.sha256()
    for path in image_paths(root):
        stat = path.stat()
        sha.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"imagefolder:{root};listing={sha.hexdigest()[:16]}"


def folder_contents_digest(root: Path, length: int = 16) -> str:
    """SHA-256 over each image's path relative to ``root`` (which names its class) and its bytes'
    SHA-256, in path order. Measured on 50,000 CIFAR-size PNGs: docs/details/fid.md."""
    sha = hashlib.sha256()
    for path in image_paths(root):
        with open(path, "rb") as f:
            sha.update(f"{path.relative_to(root).as_posix()}\0{hashlib.file_digest(f, 'sha256').hexdigest()}\n".encode())
    return sha.hexdigest()[:length]


class ImageFolderDataset(Dataset):
    """Every png/jpg/jpeg/webp under a folder (recursively), sorted by path; label = parent folder index."""

    def __init__(self, root: Path, resolution: int, train: bool):
        self.paths = image_paths(root)
        check_one_colour_mode(root, self.paths)
        self.classes = sorted({p.parent.name for p in self.paths})
        self._class_index = {c: i for i, c in enumerate(self.classes)}
        self.transform = _transform(resolution, train)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            image = self.transform(img.convert("RGB"))
        return image, self._class_index[self.paths[i].parent.name]


def unflipped_split(name: str, split: str) -> str:
    """The split whose images ``split`` holds once flips are off: an image folder's eval split is
    its training images, so both are ``train``; other datasets' splits differ."""
    return "train" if name.startswith("imagefolder:") else split


def load_dataset(
    name: str,
    resolution: int = 32,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    augment: bool | None = None,
) -> Dataset:
    """A dataset by name: ``shapes``, ``cifar10`` or ``imagefolder:<path>``; split ``train`` or ``eval``.

    ``augment`` (random horizontal flip) defaults to on for ``train`` and off for ``eval``; FID
    reference statistics take the training images without it.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    augment = split == "train" if augment is None else augment
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if name == "shapes":
        return shapes_dataset(split, resolution, augment=augment)
    if name == "cifar10":
        return cifar10_dataset(split, resolution, cache, augment)
    if name.startswith("imagefolder:"):
        # An image folder has no held-out split of its own: eval is the same images, unflipped.
        return ImageFolderDataset(Path(os.path.expanduser(name.split(":", 1)[1])), resolution, augment)
    raise MaskDMError(f"unknown dataset '{name}': use one of {', '.join(DATASET_NAMES)}")
