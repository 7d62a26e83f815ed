"""UNet architecture presets of ``pretrain``, and the resolutions a UNet can take.

Without torch or diffusers: the driver checks a sweep's ``pretrain`` step against them before any
stage runs, and never imports either (seconds of CPU per driver start).
"""

from __future__ import annotations

from maskdm.errors import MaskDMError


def downsampling_factor(block_out_channels) -> int:
    """How much a UNet (or an autoencoder's encoder) with these levels shrinks its input: 2 per level after the first."""
    return 2 ** (len(block_out_channels) - 1)


#: What the published 256-pixel DDPMs (and our 64-pixel member of the family) share.
_DDPM_HIGH_RES = dict(
    layers_per_block=2,
    attention_head_dim=None,
    norm_num_groups=32,
    norm_eps=1e-6,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
)

#: UNet architectures for ``pretrain``. ``ddpm-cifar10`` is the configuration of
#: google/ddpm-cifar10-32 (35.7M parameters); ``tiny`` (0.7M) trains on a CPU in minutes.
ARCHS: dict[str, dict] = {
    # Attention only at 8x8, where it is cheap: the 32x32 level dominates the cost on a CPU.
    "tiny": dict(
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=None,
    ),
    "ddpm-cifar10": dict(
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=None,
        norm_num_groups=32,
        dropout=0.1,
        resnet_time_scale_shift="default",
        flip_sin_to_cos=False,
        freq_shift=1,
    ),
    # The 256-pixel DDPMs of Ho et al. (2020) as published on the hub (google/ddpm-celebahq-256,
    # google/ddpm-ema-church-256, ...): channel multipliers (1, 1, 2, 2, 4, 4), attention at 16x16
    # only, 113.7M parameters. Their pretrained weights load with model=<hub id>; this preset trains
    # the same shape from scratch.
    "ddpm-256": dict(
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        **_DDPM_HIGH_RES,
    ),
    # 64 pixels: no google DDPM is published at this size, so this is our own member of the same
    # family: the 256 model's first five levels (multipliers 1, 1, 2, 2, 4), attention at 16x16 as
    # in both published shapes, bottom at 4x4 as the CIFAR-10 model.
    "ddpm-64": dict(
        block_out_channels=(128, 128, 256, 256, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        **_DDPM_HIGH_RES,
    ),
}

#: The resolution each architecture was made for (``pretrain``'s default for it); any other
#: multiple of its downsampling factor works too.
ARCH_RESOLUTIONS = {"tiny": 16, "ddpm-cifar10": 32, "ddpm-64": 64, "ddpm-256": 256}


def check_resolution(resolution: int, block_out_channels, what: str) -> None:
    """A UNet halves its input once per level after the first: the side must divide evenly."""
    factor = downsampling_factor(block_out_channels)
    if resolution < factor or resolution % factor:
        raise MaskDMError(
            f"{what} cannot take {resolution}x{resolution} images: its {len(block_out_channels)} levels need a "
            f"multiple of {factor} (e.g. {max(factor, round(resolution / factor) * factor)})"
        )
