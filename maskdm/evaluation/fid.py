"""Fréchet Inception Distance, computed in memory exactly as ``python -m pytorch_fid`` computes it.

pytorch-fid reads PNG files, converts them to RGB, turns them into [0, 1] tensors with
``ToTensor`` and lets its ``InceptionV3`` resize them to 299x299 and scale them to [-1, 1]. A PNG
holds uint8 pixels losslessly, so the same numbers come straight from a uint8 NHWC array: divide
by 255 and hand the tensor to the same network. The network is pytorch-fid's own
``pytorch_fid.inception.InceptionV3``, loaded from the same weights file.

It is faster than pytorch-fid's CLI in three ways, each checked against it: no PNG decoding or
DataLoader workers; batch norms folded into convolutions and channels-last layout (about 1.7x
less CPU time per image; features move by about 1e-6); and the matrix square root in the
Fréchet distance taken through symmetric eigendecompositions (:func:`trace_sqrt_product`)
instead of scipy's general ``sqrtm``, which alone takes about a minute at 2048 dimensions on a
CPU. pytorch-fid's ``calculate_frechet_distance`` stays available as ``method="pytorch-fid"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from scipy import linalg
from pytorch_fid import inception as pf_inception
from pytorch_fid.fid_score import calculate_frechet_distance
from pytorch_fid.inception import InceptionV3
from torch import nn
from torch.nn.functional import adaptive_avg_pool2d
from tqdm.auto import tqdm

from maskdm.errors import MaskDMError

log = logging.getLogger(__name__)

FID_WEIGHTS_URL = pf_inception.FID_WEIGHTS_URL
#: Feature sizes pytorch-fid offers: pool3 (2048, the FID), and three earlier layers.
INCEPTION_DIMS = tuple(sorted(InceptionV3.BLOCK_INDEX_BY_DIM))
DEFAULT_DIMS = 2048
DOWNLOAD_TIMEOUT_S = 30.0


# --- weights ------------------------------------------------------------------------------------


def default_weights_path() -> Path:
    """Where pytorch-fid looks for its weights: ``$TORCH_HOME/hub/checkpoints/<file name of the URL>``."""
    file_name = os.path.basename(urllib.parse.urlparse(FID_WEIGHTS_URL).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def resolve_weights(weights: str | os.PathLike | None = None, timeout_s: float | None = None) -> Path:
    """The weights file to use: ``weights`` if given, else pytorch-fid's cached file, downloaded if missing."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MaskDMError(f"Inception weights file '{path}' does not exist")
        return path
    path = default_weights_path()
    if not path.is_file():
        _download_weights(path, DOWNLOAD_TIMEOUT_S if timeout_s is None else timeout_s)
    return path


def _download_weights(target: Path, timeout_s: float) -> None:
    log.info("downloading pytorch-fid's Inception weights from %s to %s", FID_WEIGHTS_URL, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # torch.hub opens the URL without a timeout; a stalled network would otherwise hang forever.
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(target), progress=False)
    except OSError as exc:  # URLError, timeouts and refused connections are all OSErrors
        reason = getattr(exc, "reason", None) or exc
        raise MaskDMError(
            f"cannot download the Inception weights ({reason}): download {FID_WEIGHTS_URL} "
            f"to {target}, or pass weights=<path to that file>"
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def weights_digest(path: str | os.PathLike, length: int = 16) -> str:
    """A short sha256 of a weights file: names the weights in cache keys without trusting file names."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:length]


def check_dims(dims: int) -> None:
    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        raise MaskDMError(f"dims={dims} is not an Inception feature size: use one of {', '.join(map(str, INCEPTION_DIMS))}")


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MaskDMError(f"cannot read Inception weights '{path}' as a state dict ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise MaskDMError(f"Inception weights '{path}' hold a {type(state).__name__}, not a state dict")
    return state


def load_inception(
    dims: int = DEFAULT_DIMS,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    fuse: bool = True,
) -> nn.Module:
    """pytorch-fid's ``InceptionV3`` returning ``dims`` features, in eval mode on ``device``.

    Weights come from ``weights`` if given, else from where pytorch-fid finds them (torch hub's
    checkpoint cache, downloaded there when missing). They are read with ``weights_only=True`` and
    handed to pytorch-fid's own constructor. ``fuse`` folds batch norms into convolutions and
    switches to channels-last, for speed only (see :func:`fuse_for_inference`).
    """
    check_dims(dims)
    path = resolve_weights(weights)
    state = _load_state_dict(path)
    # InceptionV3 fetches its weights with a module-level loader; swapping that loader for the
    # dict read above is the one way to build pytorch-fid's exact network from a chosen file.
    with mock.patch.object(pf_inception, "load_state_dict_from_url", lambda *args, **kwargs: state):
        try:
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
        except RuntimeError as exc:
            first_line = str(exc).splitlines()[0]
            raise MaskDMError(f"Inception weights '{path}' do not fit pytorch-fid's InceptionV3: {first_line}") from None
    model = model.eval().to(device)
    return fuse_for_inference(model) if fuse else model


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """The same network with batch norms folded into convolutions, in channels-last layout.

    Uses torch.fx's conv/bn fusion; outputs agree with the unfused network to about 1e-6.
    """
    from torch.fx.experimental.optimization import fuse

    return fuse(model.eval()).to(memory_format=torch.channels_last)


# --- features -----------------------------------------------------------------------------------


def check_samples(images: np.ndarray, min_count: int = 2) -> None:
    """FID needs images as uint8 NHWC with 1, 3 or 4 channels, and at least two for a covariance.

    ``min_count=1`` checks one chunk of a stream, whose total is checked by the statistics.
    """
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = getattr(images, "shape", None)
        raise MaskDMError(f"samples must be an array of images shaped (N, H, W, 1|3|4), not {shape}")
    if images.dtype != np.uint8:
        raise MaskDMError(f"samples must be uint8 images, not {images.dtype}")
    if len(images) < min_count:
        raise MaskDMError(f"FID needs at least 2 images to estimate a covariance, got {len(images)}")


def _as_rgb_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1], as PIL's ``convert('RGB')`` then ``ToTensor`` give it."""
    batch = torch.from_numpy(np.ascontiguousarray(images))
    if batch.shape[-1] == 1:
        batch = batch.expand(*batch.shape[:-1], 3)  # grey -> RGB repeats the channel
    elif batch.shape[-1] == 4:
        batch = batch[..., :3]  # RGBA -> RGB drops alpha
    return batch.permute(0, 3, 1, 2).float().div(255)


#: ``fid --batch_size auto``. On the CPU memory sets the batch, not throughput: Inception at 299x299
#: holds about 9 MB per image of a batch, and speed barely moves with the batch (docs/benchmarks.md,
#: "fid's batch size on the CPU": pool3 features peak at 1.8 GiB with 50 images a batch against 3.1
#: GiB with 200, and 50 was 9% faster). A GPU wants larger batches.
AUTO_BATCH_SIZE = {"cpu": 50, "cuda": 200}


def auto_batch_size(device: str | torch.device) -> int:
    """Images per Inception forward pass for ``batch_size=auto`` on ``device``."""
    return AUTO_BATCH_SIZE["cuda" if torch.device(device).type == "cuda" else "cpu"]


def inception_features(
    images: np.ndarray,
    model: nn.Module,
    batch_size: int = 200,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Features (N, dims) float32 of uint8 NHWC ``images`` (any N >= 1), equal to pytorch-fid's for their PNGs."""
    check_samples(images, min_count=1)
    if batch_size < 1:
        raise MaskDMError(f"batch_size must be at least 1, not {batch_size}")
    chunks = []
    starts = range(0, len(images), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="inception features", disable=not progress, leave=False):
            batch = _as_rgb_unit(images[start : start + batch_size]).to(device)
            pred = model(batch.contiguous(memory_format=torch.channels_last))[0]
            # As pytorch-fid: blocks before pool3 give maps, averaged to one vector per image.
            if pred.shape[2] != 1 or pred.shape[3] != 1:
                pred = adaptive_avg_pool2d(pred, output_size=(1, 1))
            chunks.append(pred.flatten(1).float().cpu().numpy())
    return np.concatenate(chunks)


# --- statistics and distance --------------------------------------------------------------------


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance in float64, as pytorch-fid computes them (all features at once)."""
    if len(features) < 2:
        raise MaskDMError(f"FID needs at least 2 images to estimate a covariance, got {len(features)}")
    act = np.asarray(features, dtype=np.float64)
    _warn_if_singular(len(act), act.shape[1])
    return np.mean(act, axis=0), np.cov(act, rowvar=False)


def _warn_if_singular(count: int, dims: int) -> None:
    if count < dims:
        log.warning(
            "%d images for %d-dimensional features: the covariance is singular and the FID biased; "
            "FID is meant for thousands of images (50,000 by convention)",
            count,
            dims,
        )


class RunningStats:
    """Mean and covariance accumulated chunk by chunk, so memory is one chunk's features, not all of them.

    Chunks are merged with Chan et al.'s pairwise update (each chunk's own mean and centred
    scatter, then a rank-one correction), in float64: no sum of squares of raw features, whose
    cancellation would cost digits. Agrees with :func:`statistics` on the concatenated features to
    about 1e-12 relative (tested).
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None
        self.scatter: np.ndarray | None = None

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) == 0:
            return
        mean = x.mean(axis=0)
        centred = x - mean
        scatter = centred.T @ centred
        if self.count == 0:
            self.count, self.mean, self.scatter = len(x), mean, scatter
            return
        total = self.count + len(x)
        delta = mean - self.mean
        self.scatter += scatter + np.outer(delta, delta) * (self.count * len(x) / total)
        self.mean += delta * (len(x) / total)
        self.count = total

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) with the unbiased covariance, as ``np.cov``."""
        if self.count < 2:
            raise MaskDMError(f"FID needs at least 2 images to estimate a covariance, got {self.count}")
        _warn_if_singular(self.count, len(self.mean))
        return self.mean.copy(), self.scatter / (self.count - 1)


def streamed_statistics(chunks: Iterable[np.ndarray], features: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, number of images) of uint8 image chunks under ``features``, one chunk in memory at a time."""
    running = RunningStats()
    for chunk in chunks:
        running.update(features(chunk))
    mu, sigma = running.result()
    return mu, sigma, running.count


FRECHET_METHODS = ("eigh", "pytorch-fid")


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``Tr sqrtm(sigma1 @ sigma2)`` from two symmetric eigendecompositions.

    ``sigma1 @ sigma2`` has the eigenvalues of the symmetric ``R sigma2 R`` with ``R = sqrtm(sigma1)``,
    so the trace is the sum of their square roots. Symmetric solvers take seconds at 2048 dimensions
    where scipy's general ``sqrtm`` takes minutes on a CPU, and they stay real when the covariances
    are singular (fewer images than dimensions), where ``sqrtm`` can return complex noise.
    """
    eigenvalues, eigenvectors = linalg.eigh(sigma1)
    root1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    product = root1 @ sigma2 @ root1
    product_eigenvalues = linalg.eigvalsh((product + product.T) / 2)
    return float(np.sqrt(np.clip(product_eigenvalues, 0.0, None)).sum())


def fid_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, method: str = "eigh"
) -> float:
    """The Fréchet distance between two Gaussians, ``|mu1 - mu2|^2 + Tr(s1 + s2 - 2 sqrtm(s1 s2))``.

    ``method="pytorch-fid"`` calls pytorch-fid's ``calculate_frechet_distance`` (scipy ``sqrtm``);
    ``"eigh"`` (default) computes the same formula with :func:`trace_sqrt_product`, which agrees
    with it to about 1e-9 relative (tested) and is faster at 2048 dimensions (one loaded CPU core:
    6 to 13 s against 54 s for ``sqrtm``).
    """
    if method not in FRECHET_METHODS:
        raise MaskDMError(f"unknown Fréchet distance method '{method}': use one of {', '.join(FRECHET_METHODS)}")
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MaskDMError(f"statistics of {mu1.shape[0]} and {mu2.shape[0]} dimensions cannot be compared")
    if method == "eigh":
        diff = mu1 - mu2
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # pytorch-fid prints its singularity notice
            value = calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
    except ValueError as exc:
        raise MaskDMError(f"the Fréchet distance is not real ({exc}): use more images than feature dimensions") from None
    except TypeError as exc:
        # pytorch-fid 0.3.0 passes sqrtm(disp=False), which scipy 1.18 removed.
        import scipy

        raise MaskDMError(f"pytorch-fid's Fréchet distance fails with scipy {scipy.__version__} ({exc}): use method='eigh' or scipy<1.18") from None
    if printed.getvalue().strip():
        log.warning("pytorch-fid: %s", printed.getvalue().strip())
    return float(value)


def fid_of_features(features: np.ndarray, reference: tuple[np.ndarray, np.ndarray], method: str = "eigh") -> float:
    return fid_from_stats(*statistics(features), *reference, method=method)


# --- standard error: a bootstrap over the samples ------------------------------------------------

#: ``fid --se_resamples``: bootstrap replicates of the FID. 100 gives the SE to about 7 % (its own
#: relative spread is 1/sqrt(2 x 99)) and cost 4 to 10 % of the CPU stage's Inception pass at
#: 50,000 x 2048 in three measurements (docs/benchmarks.md, "The FID's standard error").
DEFAULT_SE_RESAMPLES = 100
#: Rows of the features gathered and converted to float64 at a time in a replicate.
SE_CHUNK_ROWS = 4096


def check_se_resamples(resamples: int) -> None:
    if resamples == 1 or resamples < 0:
        raise MaskDMError(f"se_resamples must be 0 (no standard error) or at least 2 (a standard deviation), not {resamples}")


def bootstrap_fids(
    features: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray],
    resamples: int = DEFAULT_SE_RESAMPLES,
    seed: int = 0,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """FIDs of ``resamples`` bootstrap resamples of the sample ``features`` (n rows drawn with
    replacement) against the fixed ``reference`` statistics; deterministic given ``seed``.

    Each replicate is exactly ``fid_from_stats(*statistics(features[drawn]), *reference)`` (tested),
    computed without copying rows: with multinomial counts ``w`` (drawn by numpy's PCG64 from
    ``seed``), the resample's mean is ``X^T w / n`` and its ``np.cov`` is
    ``(sum_i w_i x_i x_i^T - n m m^T) / (n - 1)``. Three things make it cheap:

    * the features are centred and rotated once into the eigenbasis ``V`` of the reference
      covariance (``Z = (X - mu) V``, kept as float32 in place of ``X`` when ``overwrite``), so
      ``Tr sqrtm(sigma_ref sigma_b)`` is the sum of square roots of the eigenvalues of
      ``diag(s) cov_b(Z) diag(s)`` with ``s`` the square roots of the reference eigenvalues: one
      symmetric ``eigvalsh`` per replicate and no d x d x d products;
    * ``Z^T diag(w) Z = Z^T Z + Z^T diag(w - 1) Z`` and ``w - 1`` is zero for the ~37 % of rows
      drawn exactly once, so a replicate multiplies only the other ~63 %, in float32 products of
      :data:`SE_CHUNK_ROWS` rows summed in float64;
    * it runs in torch on ``device`` (the stage's: a GPU when there is one).

    Cost per replicate: ``0.63 n d^2`` float32 multiply-adds and one d x d ``eigvalsh``; memory:
    the features once as float32 (none more with ``overwrite``) and a few d x d float64.
    """
    check_se_resamples(resamples)
    if resamples == 0:
        return np.empty(0)
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2:
        raise MaskDMError(f"the bootstrap needs features shaped (n >= 2, dims), not {features.shape}")
    count, dims = features.shape
    mu_ref, sigma_ref = (np.asarray(a, dtype=np.float64) for a in reference)
    ref_values, ref_vectors = linalg.eigh(sigma_ref)
    scale = np.sqrt(np.clip(ref_values, 0.0, None))
    mu = features.mean(axis=0, dtype=np.float64)

    z = features if overwrite and features.dtype == np.float32 and features.flags.writeable else np.empty((count, dims), np.float32)
    for start in range(0, count, SE_CHUNK_ROWS):  # rotate chunk by chunk: no float64 copy of all rows
        rows = slice(start, start + SE_CHUNK_ROWS)
        z[rows] = (features[rows].astype(np.float64) - mu) @ ref_vectors

    dev = torch.device(device)
    f64 = torch.float64
    zt = torch.from_numpy(z).to(dev)
    scale_t = torch.from_numpy(scale).to(dev)
    offset = torch.from_numpy(ref_vectors.T @ (mu - mu_ref)).to(dev)  # V^T (mu - mu_ref): the mean term in Z's basis
    # Everything of all n rows, once: their sum (zero up to rounding) and second moment.
    total = torch.zeros(dims, dtype=f64, device=dev)
    second = torch.zeros(dims, dims, dtype=f64, device=dev)
    for start in range(0, count, SE_CHUNK_ROWS):
        chunk = zt[start : start + SE_CHUNK_ROWS].to(f64)
        total += chunk.sum(0)
        second += chunk.T @ chunk
    trace_ref = float(np.trace(sigma_ref))

    rng = np.random.default_rng(seed)
    fids = np.empty(resamples)
    for b in tqdm(range(resamples), desc="fid standard error (bootstrap)", disable=not progress, leave=False):
        weights = np.bincount(rng.integers(0, count, count), minlength=count)
        changed = np.flatnonzero(weights != 1)
        extra = torch.from_numpy((weights[changed] - 1).astype(np.float32)).to(dev)
        changed_t = torch.from_numpy(changed).to(dev)
        sum_b, second_b = total.clone(), second.clone()
        for start in range(0, len(changed), SE_CHUNK_ROWS):
            chunk = zt[changed_t[start : start + SE_CHUNK_ROWS]]
            coef = extra[start : start + SE_CHUNK_ROWS]
            # float32 within a chunk (half dgemm's time), float64 across chunks: replicates agree
            # with float64 resampling to about 1e-6 relative (tested), far inside the SE.
            weighted = chunk * coef[:, None]
            sum_b += weighted.sum(0).to(f64)
            second_b += (chunk.T @ weighted).to(f64)
        mean_b = sum_b / count
        cov_b = (second_b - count * torch.outer(mean_b, mean_b)) / (count - 1)
        product = scale_t[:, None] * cov_b * scale_t[None, :]
        eigenvalues = torch.linalg.eigvalsh((product + product.T) / 2)
        trace_sqrt = eigenvalues.clamp(min=0).sqrt().sum()
        diff = offset + mean_b
        fids[b] = float(diff @ diff + torch.trace(cov_b) - 2 * trace_sqrt) + trace_ref
    return fids


def bootstrap_se(fids: np.ndarray) -> float:
    """The bootstrap standard error: the standard deviation (ddof=1) of the replicate FIDs."""
    return float(np.std(fids, ddof=1))


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Statistics in pytorch-fid's ``--save-stats`` format: a compressed .npz with ``mu`` and ``sigma``."""
    path = Path(path)
    np.savez_compressed(path, mu=mu, sigma=sigma)
    return path


def load_reference_stats(path: str | os.PathLike, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` (dims,) and ``sigma`` (dims, dims) from a pytorch-fid style .npz."""
    path = Path(path)
    if not path.is_file():
        raise MaskDMError(f"reference statistics file '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [key for key in ("mu", "sigma") if key not in f.files]
            if missing:
                raise MaskDMError(
                    f"reference statistics '{path}' lack {' and '.join(missing)}: expected a pytorch-fid "
                    f"--save-stats .npz with arrays mu and sigma (it holds {', '.join(f.files) or 'nothing'})"
                )
            mu, sigma = f["mu"], f["sigma"]
    except MaskDMError:
        raise
    except Exception as exc:
        raise MaskDMError(f"cannot read reference statistics '{path}' as .npz ({type(exc).__name__})") from None
    if mu.shape != (dims,) or sigma.shape != (dims, dims):
        raise MaskDMError(
            f"reference statistics '{path}' are {mu.shape[0] if mu.ndim == 1 else mu.shape}-dimensional "
            f"(mu {mu.shape}, sigma {sigma.shape}); dims={dims} needs mu ({dims},) and sigma ({dims}, {dims})"
        )
    return mu.astype(np.float64), sigma.astype(np.float64)


# --- reference statistics of a dataset ----------------------------------------------------------


def reference_key(
    dataset: str, resolution: int, dims: int, weights_digest: str, features: str = "inception",
    preprocessing: str = "", code: str = "",
) -> str:
    """What identifies a dataset's reference statistics: reuse them only when all of this matches.

    ``dataset``: its identity (an image folder by its contents, :func:`maskdm.ddpm.data.dataset_identity`);
    ``preprocessing``: :func:`preprocessing_identity`; ``code``: a digest of the code that made them.
    """
    return (f"dataset={dataset};resolution={resolution};features={features};dims={dims};weights={weights_digest};"
            f"preprocessing={preprocessing};code={code}")


#: The libraries between an image file and its features: decoding (Pillow), resizing and cropping
#: (torchvision), the feature network (pytorch-fid's InceptionV3, run by torch).
PREPROCESSING_PACKAGES = ("pytorch-fid", "torchvision", "Pillow", "torch", "numpy")


def preprocessing_identity(resolution: int) -> str:
    """A digest of how a dataset's images become the network's input: the reference transform
    (resize, crop, no flip; its settings as torchvision prints them) and the versions of
    :data:`PREPROCESSING_PACKAGES`. Statistics made under another of either are made again."""
    from importlib import metadata

    from maskdm.ddpm.data import reference_transform

    versions = []
    for name in PREPROCESSING_PACKAGES:
        try:
            versions.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name}==none")
    text = f"{reference_transform(resolution)!r};{';'.join(versions)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: Images decoded to float at a time by :func:`dataset_uint8_chunks` (each rounded to uint8 at once).
DECODE_IMAGES = 32


def dataset_uint8_chunks(
    dataset: torch.utils.data.Dataset, limit: int | None = None, batch_size: int = 500
) -> Iterator[np.ndarray]:
    """The images of a maskdm dataset ((image in [-1, 1] CHW, label) items) as uint8 NHWC chunks, in order.

    Rounded as samples are (:func:`maskdm.ddpm.sampling.to_uint8`), which gives back a dataset's
    original uint8 pixels exactly. One chunk of ``batch_size`` images is held at a time, as uint8:
    the float images are decoded and rounded :data:`DECODE_IMAGES` at a time into it. (Decoding a
    whole chunk as one float batch cost about 3.4 GB over the chunk for 1,000 images at 256x256:
    the items, their stacked copy and ``to_uint8``'s temporaries, 786 MB each; docs/benchmarks.md.)
    """
    from maskdm.ddpm.sampling import to_uint8

    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise MaskDMError("the reference dataset holds no images")
    stored = getattr(dataset, "images", None)
    if isinstance(stored, np.ndarray) and stored.dtype == np.uint8 and stored.ndim == 4:
        # In-memory datasets (the embedded shapes) hold the uint8 pixels already: no round trip.
        for start in range(0, count, batch_size):
            yield stored[start : min(start + batch_size, count)]
        return
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        part = torch.utils.data.Subset(dataset, range(start, stop))
        chunk = None  # allocated once the first images give the shape; a new array per chunk (a consumer may keep it)
        for images, _ in torch.utils.data.DataLoader(part, batch_size=DECODE_IMAGES, shuffle=False, num_workers=0):
            pixels = to_uint8(images)
            if chunk is None:
                chunk, filled = np.empty((stop - start, *pixels.shape[1:]), dtype=np.uint8), 0
            chunk[filled : filled + len(pixels)] = pixels
            filled += len(pixels)
        yield chunk


def dataset_images_uint8(dataset: torch.utils.data.Dataset, limit: int | None = None, batch_size: int = 500) -> np.ndarray:
    """All of :func:`dataset_uint8_chunks` in one array (for small datasets and tests)."""
    return np.concatenate(list(dataset_uint8_chunks(dataset, limit, batch_size)))


def inception_stats_of(images: np.ndarray, model: nn.Module, batch_size: int = 200, device: str = "cpu", progress: bool = False):
    """(mu, sigma) of ``images`` under ``model``: what the fid stage stores as sample or reference stats."""
    return statistics(inception_features(images, model, batch_size, device, progress))

