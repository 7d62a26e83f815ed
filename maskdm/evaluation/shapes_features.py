"""A feature extractor for the embedded ``shapes`` dataset, so the offline demo gets a quality number.

Inception's weights need a download; the shapes dataset is labelled, so a small CNN trained on its
labels (on a CPU, in well under a minute) gives features that know what a good shape looks like.
The Fréchet distance over its penultimate layer is logged as ``fid_shapes``. It is comparable only
between runs scored with the same classifier (same weights digest), never with Inception's ``fid``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from maskdm.errors import MaskDMError

log = logging.getLogger(__name__)

FEATURE_DIM = 64
#: The classifier is trained on the shapes dataset at its default resolution; images of any other
#: size (the demo model samples 16x16) are resized to it first, references and samples alike.
CLASSIFIER_RESOLUTION = 32


class ShapesClassifier(nn.Module):
    """Three conv blocks, global pooling, a hidden layer (the features) and a linear classifier."""

    def __init__(self, num_classes: int, width: int = 16, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(3, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, feature_dim),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations of images in [-1, 1] NCHW: what ``fid_shapes`` compares."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _tensors(dataset: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    count = len(dataset) if limit is None else min(limit, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(count))
    images, labels = zip(*DataLoader(subset, batch_size=1000, shuffle=False, num_workers=0))
    return torch.cat(images), torch.cat(labels)


def _num_classes(dataset: Dataset, labels: torch.Tensor) -> int:
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes else int(labels.max()) + 1


def corrupted(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Copies of [-1, 1] NCHW images that are no longer clean shapes: the failures of a weak or
    heavily pruned DDPM. Each image gets Gaussian noise of a random strength (0.05 to 1), fine or
    coarse (drawn at half resolution and upsampled, like a 16x16 sample resized for the
    classifier), or has its pixels shuffled (colours kept, shape gone)."""
    n, c, h, w = images.shape
    sigma = 0.05 + 0.95 * torch.rand(n, 1, 1, 1, generator=generator)
    fine = torch.randn(images.shape, generator=generator)
    coarse = F.interpolate(torch.randn((n, c, h // 2, w // 2), generator=generator), size=(h, w), mode="bilinear", align_corners=False)
    kind = torch.randint(0, 3, (n, 1, 1, 1), generator=generator)
    noisy = (images + sigma * torch.where(kind == 0, fine, coarse)).clamp(-1.0, 1.0)
    order = torch.argsort(torch.rand(n, h * w, generator=generator), dim=1)
    shuffled = images.flatten(2).gather(2, order[:, None, :].expand(-1, c, -1)).view_as(images)
    return torch.where(kind == 2, shuffled, noisy)


def train_shapes_classifier(
    dataset: Dataset,
    epochs: int = 3,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    max_images: int | None = 4000,
    seed: int = 0,
    progress: bool = False,
) -> ShapesClassifier:
    """Train a :class:`ShapesClassifier` on a labelled dataset of [-1, 1] images; returns it in eval mode.

    A few thousand of the shapes are enough: the classes are geometric and the task easy, and the
    classifier only has to separate good shapes from bad ones, not win a benchmark. One extra
    class, "not a clean shape", holds a :func:`corrupted` copy of every image: trained on clean
    shapes alone, the features ignored noise, and the samples of a 70 %-pruned demo model (coloured
    noise) scored a lower ``fid_shapes`` than the dense model's shapes.
    """
    generator = torch.Generator().manual_seed(seed)
    # Seeded before the images are read: a training split flips images with the global generator,
    # and unseeded that made every process train a different classifier (and score another fid_shapes).
    torch.manual_seed(seed)
    images, labels = _tensors(dataset, max_images)
    if len(images) < batch_size:
        raise MaskDMError(f"the classifier needs at least {batch_size} labelled images, got {len(images)}")
    num_classes = _num_classes(dataset, labels)
    images = torch.cat([images, corrupted(images, generator)])
    labels = torch.cat([labels, torch.full_like(labels, num_classes)])
    torch.manual_seed(seed)
    model = ShapesClassifier(num_classes + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps_per_epoch = len(images) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=epochs * steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        running = 0.0
        for step in tqdm(range(steps_per_epoch), desc=f"shapes classifier epoch {epoch + 1}", disable=not progress):
            pick = order[step * batch_size : (step + 1) * batch_size]
            loss = nn.functional.cross_entropy(model(images[pick]), labels[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item()
        log.info("shapes classifier epoch %d: loss %.4f", epoch + 1, running / steps_per_epoch)
    return model.eval()


def classifier_accuracy(model: ShapesClassifier, dataset: Dataset, limit: int | None = None) -> float:
    """Share of correctly classified images of a labelled dataset."""
    images, labels = _tensors(dataset, limit)
    with torch.inference_mode():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(500)])
    return float((predictions == labels).float().mean())


def shapes_features(images: np.ndarray, model: ShapesClassifier, batch_size: int = 500) -> np.ndarray:
    """Features (N, feature_dim) float32 of uint8 NHWC RGB images, scaled to [-1, 1] as the dataset is."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise MaskDMError(f"the shapes classifier scores uint8 RGB images shaped (N, H, W, 3), not {images.dtype} {images.shape}")
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            batch = batch.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            if batch.shape[-1] != CLASSIFIER_RESOLUTION:
                batch = F.interpolate(batch, size=CLASSIFIER_RESOLUTION, mode="bilinear", align_corners=False)
            chunks.append(model.eval().features(batch).numpy())
    return np.concatenate(chunks) if chunks else np.empty((0, model.config["feature_dim"]), np.float32)


def save_shapes_classifier(model: ShapesClassifier, path: str | os.PathLike) -> Path:
    """Weights as safetensors, with the architecture in the file's metadata."""
    path = Path(path)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(path), metadata={"maskdm.shapes_classifier": json.dumps(model.config)})
    return path


def load_shapes_classifier(path: str | os.PathLike) -> ShapesClassifier:
    path = Path(path)
    if not path.is_file():
        raise MaskDMError(f"shapes classifier file '{path}' does not exist")
    with safe_open(str(path), framework="pt") as f:
        config = json.loads((f.metadata() or {}).get("maskdm.shapes_classifier", "null") or "null")
        if not config:
            raise MaskDMError(f"'{path}' is not a shapes classifier saved by maskdm (no architecture in its metadata)")
        state = {name: f.get_tensor(name) for name in f.keys()}
    model = ShapesClassifier(**config)
    model.load_state_dict(state)
    return model.eval()
