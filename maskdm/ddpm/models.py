"""DDPM models: building one of the architecture presets (:mod:`maskdm.ddpm.archs`), loading from a
hub id or local folder, saving as a pipeline.

Models move between stages only as diffusers pipeline folders (``model_index.json``, ``unet/``,
``scheduler/``) that ``DDPMPipeline.from_pretrained`` opens, or for a latent diffusion model
``LDMPipeline.from_pretrained`` (``vqvae/`` besides: the frozen autoencoder whose latents the UNet
works on, :mod:`maskdm.ddpm.latent`). Run IDs and ``demo`` are resolved to such folders by
:mod:`maskdm.tracking`; this module only sees paths and hub ids.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel, VQModel

from maskdm.errors import MaskDMError
from maskdm.ddpm.archs import ARCHS, check_resolution, downsampling_factor
from maskdm.ddpm.latent import LatentCodec

log = logging.getLogger(__name__)

DEFAULT_HUB_MODEL = "google/ddpm-cifar10-32"

def build_unet(arch: str, resolution: int = 32, in_channels: int = 3, seed: int | None = None) -> UNet2DModel:
    """A freshly initialised UNet of preset ``arch``.

    ``seed``: the initial weights are drawn with torch's RNG seeded with it (and the caller's RNG
    state is restored after), so ``pretrain`` with one seed starts from the same weights every time;
    unseeded, two demo pretrains on one machine differed by up to 0.5 after 30 steps
    (docs/details/pretrain.md#determinism). None: drawn from the global RNG as it stands.
    """
    if arch not in ARCHS:
        raise MaskDMError(f"unknown arch '{arch}': choose one of {', '.join(ARCHS)}")
    check_resolution(resolution, ARCHS[arch]["block_out_channels"], f"arch '{arch}'")
    if seed is None:
        return UNet2DModel(sample_size=resolution, in_channels=in_channels, out_channels=in_channels, **ARCHS[arch])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(sample_size=resolution, in_channels=in_channels, out_channels=in_channels, **ARCHS[arch])


#: Noise (beta) schedules a model can be trained with: ``linear`` is Ho et al. (2020), which
#: google/ddpm-cifar10-32 uses; ``squaredcos_cap_v2`` is the cosine schedule of Nichol & Dhariwal
#: (2021), which destroys a small image's content more gradually and trains the demo model faster.
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")


def default_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear") -> DDPMScheduler:
    """The DDPM noise scheduler a model is trained with (saved with it; every later stage reads it)."""
    if beta_schedule not in BETA_SCHEDULES:
        raise MaskDMError(f"unknown beta_schedule '{beta_schedule}': choose one of {', '.join(BETA_SCHEDULES)}")
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)


@dataclass
class DDPM:
    """A UNet and the noise scheduler it was trained with; for latent diffusion, the frozen autoencoder too.

    Every stage prunes, masks and trains ``unet`` only; ``vqvae`` is carried along unchanged.
    """

    unet: UNet2DModel
    scheduler: DDPMScheduler
    vqvae: VQModel | None = None

    @property
    def is_latent(self) -> bool:
        return self.vqvae is not None

    @property
    def codec(self):
        """The :class:`maskdm.ddpm.latent.LatentCodec` of a latent model, else ``None`` (the UNet works on pixels)."""
        if self.vqvae is None:
            return None
        return LatentCodec(self.vqvae)

    @property
    def resolution(self) -> int:
        """The side of the images the model makes (for a latent model, the decoded images)."""
        size = int(self.unet.config.sample_size)
        return size * self.codec.factor if self.is_latent else size

    @property
    def channels(self) -> int:
        """Channels of the images the model makes."""
        return int(self.vqvae.config.in_channels if self.is_latent else self.unet.config.in_channels)


def is_local_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or os.path.exists(ref)


def load_ddpm(ref: str, cache_dir: str | None = None) -> DDPM:
    """Load a DDPM from a local pipeline folder, a local UNet folder, or a diffusers hub id."""
    path = Path(os.path.expanduser(ref))
    if is_local_path(ref):
        if not path.exists():
            raise MaskDMError(f"model path '{ref}' does not exist")
        return _load_local(path)
    return _load_hub(ref, cache_dir)


def _load_local(path: Path) -> DDPM:
    if (path / "model_index.json").exists():
        unet = UNet2DModel.from_pretrained(path, subfolder="unet")
        scheduler = _load_scheduler(path / "scheduler")
        if AUTOENCODER in _pipeline_components(path / "model_index.json"):
            if not (path / AUTOENCODER / "config.json").exists():
                raise MaskDMError(
                    f"latent pipeline '{path}' names an autoencoder ({AUTOENCODER}) in model_index.json but has no "
                    f"{AUTOENCODER}/ folder; copy the autoencoder the UNet was trained with into it"
                )
            try:
                vqvae = VQModel.from_pretrained(path, subfolder=AUTOENCODER)
            except (OSError, ValueError) as exc:
                raise MaskDMError(f"latent pipeline '{path}': its autoencoder ({AUTOENCODER}/) cannot be loaded ({type(exc).__name__})") from None
            return _latent_ddpm(vqvae, unet, scheduler, str(path))
    elif (path / "config.json").exists() and _is_unet_config(path / "config.json"):
        # A bare UNet folder: pair it with the scheduler folder beside it, else the DDPM default.
        unet = UNet2DModel.from_pretrained(path)
        scheduler = _load_scheduler(path.parent / "scheduler")
    elif (path / "unet" / "config.json").exists():
        unet = UNet2DModel.from_pretrained(path, subfolder="unet")
        scheduler = _load_scheduler(path / "scheduler")
    else:
        raise MaskDMError(
            f"model path '{path}' is neither a diffusers pipeline folder (model_index.json) nor a UNet folder (config.json)"
        )
    return DDPM(unet, scheduler)


#: The component of a latent pipeline (diffusers ``LDMPipeline``) holding its frozen autoencoder.
AUTOENCODER = "vqvae"


def _pipeline_components(model_index: Path) -> set[str]:
    try:
        index = json.loads(model_index.read_text())
    except (OSError, ValueError):
        raise MaskDMError(f"cannot read {model_index}: not a JSON pipeline index") from None
    # diffusers writes an absent optional component as [null, null].
    return {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None}


#: The latent scale of an autoencoder whose config does not name one. diffusers then fills in
#: 0.18215 (Stable Diffusion's KL autoencoder), but the VQ autoencoders of the LDM paper were trained
#: on unscaled latents (their variance is about 1): CompVis/ldm-celebahq-256's config names no
#: scaling_factor, and diffusers' own LDMPipeline makes noise with it for that reason
#: (huggingface/diffusers#6725).
UNNAMED_LATENT_SCALE = 1.0


def _latent_ddpm(vqvae: VQModel, unet: UNet2DModel, scheduler: DDPMScheduler, where: str) -> DDPM:
    """A latent DDPM, once the UNet is checked to work on this autoencoder's latents."""
    latent_channels = int(vqvae.config.latent_channels)
    if int(unet.config.in_channels) != latent_channels or int(unet.config.out_channels) != latent_channels:
        raise MaskDMError(
            f"latent pipeline '{where}': the UNet takes {unet.config.in_channels} channels but the autoencoder's "
            f"latents have {latent_channels}; the two do not belong together"
        )
    if "scaling_factor" in vqvae.config.get("_use_default_values", []):
        log.warning("%s: the autoencoder's config names no scaling_factor; latents are unscaled (%g), as the LDM paper trained them",
                    where, UNNAMED_LATENT_SCALE)
        # Written into the config, so every model/ this pipeline becomes names it from now on.
        vqvae.register_to_config(scaling_factor=UNNAMED_LATENT_SCALE)
    return DDPM(unet, scheduler, vqvae.eval().requires_grad_(False))


def _is_unet_config(config: Path) -> bool:
    try:
        return json.loads(config.read_text()).get("_class_name") == "UNet2DModel"
    except (OSError, ValueError):
        return False


def _load_scheduler(folder: Path) -> DDPMScheduler:
    if (folder / "scheduler_config.json").exists():
        return DDPMScheduler.from_pretrained(folder)
    return default_scheduler()


def _load_hub(hub_id: str, cache_dir: str | None) -> DDPM:
    # Without a network, huggingface_hub retries for about a minute before failing; a quick DNS
    # probe lets us go straight to the local cache (a model downloaded earlier still loads).
    kwargs = dict(cache_dir=cache_dir, local_files_only=not _hub_reachable())
    unet = None
    for subfolder in ("unet", None):  # a pipeline repo, else a repo holding a bare UNet
        try:
            unet = UNet2DModel.from_pretrained(hub_id, subfolder=subfolder, **kwargs)
            pipeline_repo = subfolder is not None
            break
        except Exception as exc:  # diffusers raises OSError/ValueError/HTTP errors alike
            failure = exc
    if unet is None:
        where = "the local Hugging Face cache (the hub is unreachable)" if kwargs["local_files_only"] else "the Hugging Face hub"
        raise MaskDMError(
            f"cannot fetch model '{hub_id}' from {where} ({type(failure).__name__}); "
            "pass model=demo, a local pipeline or UNet folder, or an MLflow run ID / runs:/<id>/model"
        )
    try:
        scheduler = DDPMScheduler.from_pretrained(hub_id, subfolder="scheduler", **kwargs)
    except Exception:
        log.warning("no scheduler found for %s; using the linear DDPM schedule", hub_id)
        scheduler = default_scheduler()
    components: set[str] = set()
    if pipeline_repo:
        # A repo with unet/ is a pipeline and has a model_index.json: without it a latent pipeline
        # would load as a pixel model, its UNet trained on images.
        try:
            components = set(DiffusionPipeline.load_config(hub_id, **kwargs))
        except Exception as exc:
            raise MaskDMError(f"cannot read the pipeline index (model_index.json) of '{hub_id}' ({type(exc).__name__})") from None
    if AUTOENCODER not in components:
        return DDPM(unet, scheduler)
    try:
        vqvae = VQModel.from_pretrained(hub_id, subfolder=AUTOENCODER, **kwargs)
    except Exception as exc:
        raise MaskDMError(
            f"latent pipeline '{hub_id}' names an autoencoder ({AUTOENCODER}) that cannot be fetched ({type(exc).__name__}); "
            "without it the UNet's latents cannot be made or decoded"
        ) from None
    return _latent_ddpm(vqvae, unet, scheduler, hub_id)


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def save_ddpm(ddpm: DDPM, folder: str | os.PathLike) -> Path:
    """Save as a pipeline folder that ``DDPMPipeline.from_pretrained`` (a latent model:
    ``LDMPipeline.from_pretrained``) opens, safetensors weights."""
    folder = Path(folder)
    if ddpm.is_latent:
        # Imported here: diffusers keeps LDMPipeline among its deprecated pipelines, and pixel models
        # must not depend on it.
        from diffusers import LDMPipeline

        pipeline = LDMPipeline(vqvae=ddpm.vqvae, unet=ddpm.unet, scheduler=ddpm.scheduler)
    else:
        pipeline = DDPMPipeline(unet=ddpm.unet, scheduler=ddpm.scheduler)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def pipeline_image_shape(folder: str | os.PathLike) -> tuple[int, int, int]:
    """(C, H, W) of the images a saved pipeline makes, from its configs alone (no weights read)."""
    folder = Path(folder)
    unet = UNet2DModel.load_config(str(folder), subfolder="unet")
    size = unet["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    if AUTOENCODER not in _pipeline_components(folder / "model_index.json"):
        return int(unet["in_channels"]), int(height), int(width)
    vqvae = VQModel.load_config(str(folder), subfolder=AUTOENCODER)
    factor = downsampling_factor(vqvae["block_out_channels"])
    return int(vqvae["in_channels"]), int(height) * factor, int(width) * factor


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
