"""Datasets and model loading/saving."""

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from PIL import Image

from maskdm.ddpm.data import SHAPE_CLASSES, SHAPES_RADIUS, load_dataset, render_shapes
from maskdm.errors import MaskDMError
from maskdm.ddpm.archs import ARCHS
from maskdm.ddpm.models import build_unet, count_parameters, default_scheduler, load_ddpm, save_ddpm


def test_shapes_are_deterministic_labelled_and_varied():
    a, la = render_shapes(200, seed=3)
    b, lb = render_shapes(200, seed=3)
    c, _ = render_shapes(200, seed=4)
    assert a.shape == (200, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert set(la.tolist()) == set(range(len(SHAPE_CLASSES)))
    # Each image holds a shape: the foreground covers a real share of pixels but not all of them.
    centre_vs_corner = np.abs(a[:, 16, 16].astype(int) - a[:, 0, 0].astype(int)).sum(1)
    assert (centre_vs_corner > 30).mean() > 0.8


def test_shapes_drawn_a_chunk_at_a_time_are_the_images_drawn_at_once(monkeypatch):
    import maskdm.ddpm.data as data

    # One chunk for all 300 images, as before chunks; then chunks of 7 images (300 = 42 x 7 + 6),
    # and of one image. Any image drawn with another's geometry or colours would differ.
    monkeypatch.setattr(data, "_RENDER_CHUNK_PIXELS", 10**9)
    whole, labels = render_shapes(300, seed=11, resolution=24)
    for images_per_chunk in (7, 1):
        monkeypatch.setattr(data, "_RENDER_CHUNK_PIXELS", images_per_chunk * 24 * 24)
        chunked, chunked_labels = render_shapes(300, seed=11, resolution=24)
        assert np.array_equal(chunked, whole) and np.array_equal(chunked_labels, labels)
    assert len(np.unique(whole.reshape(300, -1), axis=0)) == 300


def foreground_pixels(images: np.ndarray) -> np.ndarray:
    # A shape's colour has one channel at 255; the gradient backgrounds stay at or below 0.6 * 255.
    return (images.max(axis=-1) == 255).sum(axis=(1, 2))


def test_shapes_are_large_enough_to_recognise_at_16x16():
    images, labels = render_shapes(600, seed=5, resolution=16)
    area = foreground_pixels(images)
    # The smallest shape (a triangle or cross of radius 0.25 = 4 pixels, cut at the border) still
    # covers a dozen pixels; none fills the image.
    assert area.min() >= 12 and area.max() < 16 * 16
    # Rings have a hole: at the same radius they cover less than circles.
    assert np.median(area[labels == SHAPE_CLASSES.index("ring")]) < np.median(area[labels == SHAPE_CLASSES.index("circle")])
    # The radius range is what sets the size: the old, smaller range gives smaller shapes.
    small = foreground_pixels(render_shapes(600, seed=5, resolution=16, radius=(0.15, 0.3))[0])
    assert SHAPES_RADIUS == (0.25, 0.4) and small.mean() < 0.6 * area.mean()


def test_noise_schedules():
    assert default_scheduler().config.beta_schedule == "linear"
    cosine = default_scheduler(beta_schedule="squaredcos_cap_v2")
    # The cosine schedule keeps more signal at mid noise levels than the linear one.
    assert cosine.alphas_cumprod[500] > default_scheduler().alphas_cumprod[500]
    with pytest.raises(MaskDMError, match="unknown beta_schedule 'sigmoid'"):
        default_scheduler(beta_schedule="sigmoid")


def test_shapes_train_flips_eval_does_not():
    train = load_dataset("shapes", 32, "train")
    ev = load_dataset("shapes", 32, "eval")
    x, y = ev[0]
    assert x.shape == (3, 32, 32) and -1.0 <= x.min() and x.max() <= 1.0 and isinstance(y, int)
    original = torch.from_numpy(train.images[7]).permute(2, 0, 1).float().div(127.5).sub(1.0)
    torch.manual_seed(0)
    draws = [train[7][0] for _ in range(30)]
    assert any(torch.equal(d, original) for d in draws)
    assert any(torch.equal(d, original.flip(-1)) for d in draws)
    assert all(torch.equal(ev[7][0], ev[7][0]) for _ in range(5))


def test_imagefolder_recursive_and_errors(tmp_path):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "b").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "imgs" / "a" / "1.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "imgs" / "b" / "2.jpg")
    ds = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", 16, "eval")
    assert len(ds) == 2 and ds[0][0].shape == (3, 16, 16)
    assert ds[0][0][0].mean() > 0.9 and ds[1][0][2].mean() > 0.9  # red, then blue, in path order
    (tmp_path / "empty").mkdir()
    with pytest.raises(MaskDMError, match="holds no"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}", 16)
    with pytest.raises(MaskDMError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_cifar10_offline_is_one_clear_line(tmp_path, monkeypatch):
    # Offline made explicit: the data folder is empty and every connection attempt fails, so this
    # holds the same on a machine that can reach the CIFAR-10 server (and downloads nothing there).
    import socket

    attempts = []

    def unreachable(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    with pytest.raises(MaskDMError) as info:
        load_dataset("cifar10", 32, "eval", cache_dir=tmp_path)
    message = str(info.value)
    assert attempts, "the download was never tried, so this checked nothing about being offline"
    assert "\n" not in message and "dataset=shapes" in message
    assert str(tmp_path / "cifar10") in message and "cifar-10-batches-py" in message
    assert not any(p.is_file() and p.stat().st_size > 0 for p in tmp_path.rglob("*"))


def test_save_load_roundtrip_opens_with_ddpmpipeline(tmp_path, tiny_ddpm):
    folder = save_ddpm(tiny_ddpm, tmp_path / "m")
    pipe = DDPMPipeline.from_pretrained(folder)
    loaded = load_ddpm(str(folder))
    for (n, p), (_, q) in zip(tiny_ddpm.unet.state_dict().items(), pipe.unet.state_dict().items()):
        assert torch.equal(p, q), n
    assert loaded.scheduler.config.num_train_timesteps == tiny_ddpm.scheduler.config.num_train_timesteps
    # A bare UNet folder loads too.
    unet_only = load_ddpm(str(folder / "unet"))
    assert count_parameters(unet_only.unet) == count_parameters(tiny_ddpm.unet)


def test_missing_path_and_unfetchable_hub_id_are_one_line(tmp_path):
    with pytest.raises(MaskDMError, match="does not exist"):
        load_ddpm(str(tmp_path / "nope"))
    with pytest.raises(MaskDMError) as info:
        load_ddpm("google/not-a-real-model-xyz")
    message = str(info.value)
    assert "\n" not in message and "google/not-a-real-model-xyz" in message and "model=demo" in message


def test_arch_presets():
    assert 0.5e6 < count_parameters(build_unet("tiny")) < 1.5e6
    assert abs(count_parameters(build_unet("ddpm-cifar10")) - 35.746307e6) < 1e3
    with pytest.raises(MaskDMError, match="unknown arch"):
        build_unet("huge")
    assert set(ARCHS) == {"tiny", "ddpm-cifar10", "ddpm-64", "ddpm-256"}


def test_dataset_identity_follows_an_image_folders_contents(tmp_path, monkeypatch):
    from PIL import Image

    from maskdm.ddpm.data import dataset_identity

    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
    first = dataset_identity(f"imagefolder:{tmp_path / 'imgs'}")
    monkeypatch.chdir(tmp_path)
    assert dataset_identity("imagefolder:imgs") == first  # relative or absolute: one folder
    assert dataset_identity("shapes") == "shapes"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(folder / "3.png")
    added = dataset_identity("imagefolder:imgs")
    assert added != first
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "3.png")  # replaced: another size
    assert dataset_identity("imagefolder:imgs") not in (first, added)
