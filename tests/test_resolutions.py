"""Architecture presets by resolution, resolutions a model cannot take, and image folders of mixed modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from maskdm.ddpm.data import load_dataset
from maskdm.errors import MaskDMError
from maskdm.ddpm.archs import ARCH_RESOLUTIONS, ARCHS, downsampling_factor
from maskdm.ddpm.models import build_unet, count_parameters
from test_foundation_stages import assert_user_error


def test_every_preset_builds_at_its_resolution_and_keeps_the_size():
    # Shape checks only (no forward for the large ones): the down and up paths have one block per
    # level, the bottom is 4x4 for every preset but the tiny demo one.
    for arch, resolution in ARCH_RESOLUTIONS.items():
        config = ARCHS[arch]
        assert len(config["down_block_types"]) == len(config["up_block_types"]) == len(config["block_out_channels"])
        assert resolution % downsampling_factor(config["block_out_channels"]) == 0, arch
    assert {a: ARCH_RESOLUTIONS[a] // downsampling_factor(ARCHS[a]["block_out_channels"]) for a in ("ddpm-cifar10", "ddpm-64", "ddpm-256")} == {
        "ddpm-cifar10": 4, "ddpm-64": 4, "ddpm-256": 8,
    }


def test_the_256_preset_is_the_published_ddpm_256_shape():
    # google/ddpm-celebahq-256 and google/ddpm-ema-church-256 hold 113,673,219 parameters.
    assert count_parameters(build_unet("ddpm-256", 256)) == 113_673_219


def test_the_64_preset_denoises_a_64_pixel_batch():
    unet = build_unet("ddpm-64", 64).eval()
    with torch.no_grad():
        out = unet(torch.randn(1, 3, 64, 64), torch.tensor([10])).sample
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch, resolution, factor", [("tiny", 10, 4), ("ddpm-cifar10", 20, 8), ("ddpm-256", 128 + 16, 32)])
def test_a_resolution_the_levels_cannot_halve_is_one_line(arch, resolution, factor):
    with pytest.raises(MaskDMError, match=rf"cannot take {resolution}x{resolution} images: .* multiple of {factor}") as caught:
        build_unet(arch, resolution)
    assert "\n" not in str(caught.value)


def test_pretrain_at_a_resolution_the_model_cannot_take_fails_its_run(tracking):
    assert_user_error("pretrain", ["--arch", "tiny", "--resolution", "18", "--num_iters", "1"], "cannot take 18x18 images")


def _save(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_an_image_folder_mixing_grey_and_colour_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "mixed"
    _save(folder / "a" / "0.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), "RGB")
    _save(folder / "a" / "1.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), "RGB")
    # Same folder in one mode loads (the check refuses only the mixture).
    assert len(load_dataset(f"imagefolder:{folder}", 8, "eval")) == 2
    _save(folder / "b" / "2.png", rng.integers(0, 255, (8, 8), dtype=np.uint8), "L")
    with pytest.raises(MaskDMError, match=r"mixes grayscale and colour images \(e\.g\. b/2\.png: L, a/0\.png: RGB\)") as caught:
        load_dataset(f"imagefolder:{folder}", 8, "eval")
    assert "\n" not in str(caught.value)


def test_an_unreadable_file_in_an_image_folder_is_named(tmp_path):
    folder = tmp_path / "broken"
    _save(folder / "ok.png", np.zeros((8, 8, 3), dtype=np.uint8), "RGB")
    (folder / "bad.png").write_bytes(b"not a png")
    with pytest.raises(MaskDMError, match=r"bad\.png is not a readable image"):
        load_dataset(f"imagefolder:{folder}", 8, "eval")


def test_pretrain_on_a_mixed_folder_fails_its_run(tracking, tmp_path):
    folder = tmp_path / "mixed"
    _save(folder / "0.png", np.zeros((8, 8, 3), dtype=np.uint8), "RGB")
    _save(folder / "1.png", np.zeros((8, 8), dtype=np.uint8), "L")
    assert_user_error("pretrain", ["--dataset", f"imagefolder:{folder}", "--num_iters", "1"], "mixes grayscale and colour images")
