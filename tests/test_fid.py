"""FID library: equal to pytorch-fid's CLI on the same images, bad inputs, the shapes feature extractor.

Inception runs with planted random weights (see inception_fixture.py), so the numbers here check
agreement with pytorch-fid, not sample quality. Images are few and tiny: Inception still sees
299x299 inputs, about five images a second on one CPU thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from inception_fixture import _planted_torch_home, planted_inception  # noqa: F401
from PIL import Image

from maskdm.evaluation import fid
from maskdm.errors import MaskDMError


@pytest.fixture(scope="module")
def inception(_planted_torch_home):
    """Models by (dims, fuse), loaded once per module from the planted file: loading takes seconds."""
    weights = _planted_torch_home / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    models: dict[tuple[int, bool], torch.nn.Module] = {}

    def get(dims: int, fuse: bool = True) -> torch.nn.Module:
        if (dims, fuse) not in models:
            models[dims, fuse] = fid.load_inception(dims=dims, weights=weights, fuse=fuse)
        return models[dims, fuse]

    return get


def random_images(n: int, seed: int, scale: float = 1.0, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, size, size, 3)) * scale).astype(np.uint8)


def write_pngs(images: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return folder


def pytorch_fid_cli(png_folder: Path, stats: Path, dims: int, torch_home: Path) -> float:
    env = {**os.environ, "TORCH_HOME": str(torch_home), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytorch_fid", str(png_folder), str(stats), "--device", "cpu", "--dims", str(dims)]
    done = subprocess.run(command + ["--num-workers", "0"], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.split("FID:")[-1])


# --- agreement with pytorch-fid -------------------------------------------------------------------


def test_in_memory_fid_equals_pytorch_fid_cli(planted_inception, inception, tmp_path):
    # Checks preprocessing, statistics and distance end to end on the cheap 192-dim block; the deep
    # blocks are checked on pool3 features below, because the CLI's scipy sqrtm alone takes about a
    # minute at 2048 dims on a CPU.
    samples, reference = random_images(10, seed=1), random_images(10, seed=2, scale=0.6)
    model = inception(192)
    reference_stats = fid.statistics(fid.inception_features(reference, model, batch_size=4))
    stats_file = fid.save_stats(tmp_path / "reference.npz", *reference_stats)

    ours = fid.fid_from_stats(*fid.statistics(fid.inception_features(samples, model, batch_size=4)), *reference_stats)
    theirs = pytorch_fid_cli(write_pngs(samples, tmp_path / "png"), stats_file, 192, planted_inception.parents[2])

    assert theirs > 0
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_pool3_features_equal_pytorch_fid_activations(planted_inception, tmp_path):
    from pytorch_fid.fid_score import get_activations
    from pytorch_fid.inception import InceptionV3

    images = random_images(4, seed=3)
    files = sorted(write_pngs(images, tmp_path / "png").glob("*.png"))
    # pytorch-fid's own constructor, fetching from the hub cache exactly as its CLI does.
    theirs = get_activations(files, InceptionV3([3]).eval(), batch_size=4, dims=2048, num_workers=0)
    ours = fid.inception_features(images, fid.load_inception(dims=2048), batch_size=3)

    assert ours.shape == (4, 2048)
    spread = theirs.std(axis=0).mean()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-2 * spread)


@pytest.mark.parametrize("dims", [64, 192])
def test_early_inception_blocks_give_their_dims(inception, dims):
    images = random_images(3, seed=4)
    features = fid.inception_features(images, inception(dims), batch_size=2)
    unfused = fid.inception_features(images, inception(dims, fuse=False), batch_size=3)
    assert features.shape == (3, dims)
    np.testing.assert_allclose(features, unfused, rtol=1e-4, atol=1e-5)


def test_grey_and_rgba_images_score_as_their_rgb(inception):
    model = inception(64)
    grey = random_images(2, seed=5)[..., :1]
    rgba = np.concatenate([random_images(2, seed=6), np.full((2, 32, 32, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(
        fid.inception_features(grey, model), fid.inception_features(np.repeat(grey, 3, axis=-1), model)
    )
    np.testing.assert_array_equal(fid.inception_features(rgba, model), fid.inception_features(rgba[..., :3], model))


# --- the Fréchet distance -------------------------------------------------------------------------


@pytest.mark.parametrize("dims,count", [(16, 5), (16, 400), (96, 40), (96, 2000)])
def test_eigh_frechet_distance_equals_pytorch_fid(dims, count):
    rng = np.random.default_rng(dims + count)
    a = rng.standard_normal((count, dims)) @ rng.standard_normal((dims, dims))
    b = 1.3 * rng.standard_normal((count, dims)) + 0.2
    stats_a, stats_b = fid.statistics(a), fid.statistics(b)
    eigh = fid.fid_from_stats(*stats_a, *stats_b)
    assert eigh == pytest.approx(fid.fid_from_stats(*stats_a, *stats_b, method="pytorch-fid"), rel=1e-6)
    assert abs(fid.fid_from_stats(*stats_a, *stats_a)) < 1e-6 * eigh


def test_fid_of_mismatched_dims_is_an_error():
    with pytest.raises(MaskDMError, match="dimensions"):
        fid.fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(MaskDMError, match="method"):
        fid.fid_from_stats(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="sqrt")


# --- reference statistics -------------------------------------------------------------------------


def test_reference_stats_round_trip_in_pytorch_fid_format(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(8), np.cov(rng.standard_normal((20, 8)), rowvar=False)
    path = fid.save_stats(tmp_path / "stats.npz", mu, sigma)
    with np.load(path) as f:  # what pytorch-fid's compute_statistics_of_path reads
        assert set(f.files) == {"mu", "sigma"}
    loaded_mu, loaded_sigma = fid.load_reference_stats(path, dims=8)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)


def test_reference_without_mu_is_an_error(tmp_path):
    np.savez(tmp_path / "bad.npz", mean=np.zeros(8), sigma=np.eye(8))
    with pytest.raises(MaskDMError, match="lack mu") as error:
        fid.load_reference_stats(tmp_path / "bad.npz", dims=8)
    assert "\n" not in str(error.value)


def test_reference_of_wrong_dims_is_an_error(tmp_path):
    fid.save_stats(tmp_path / "small.npz", np.zeros(64), np.eye(64))
    with pytest.raises(MaskDMError, match="dims=2048") as error:
        fid.load_reference_stats(tmp_path / "small.npz", dims=2048)
    assert "\n" not in str(error.value)


def test_reference_that_is_not_npz_is_an_error(tmp_path):
    (tmp_path / "stats.npz").write_text("not an archive")
    with pytest.raises(MaskDMError, match="cannot read"):
        fid.load_reference_stats(tmp_path / "stats.npz", dims=8)
    with pytest.raises(MaskDMError, match="does not exist"):
        fid.load_reference_stats(tmp_path / "missing.npz", dims=8)


def test_reference_key_names_every_input():
    base = dict(dataset="cifar10", resolution=32, dims=2048, weights_digest="abc")
    keys = {
        fid.reference_key(**base),
        fid.reference_key(**{**base, "dataset": "shapes"}),
        fid.reference_key(**{**base, "resolution": 64}),
        fid.reference_key(**{**base, "dims": 768}),
        fid.reference_key(**{**base, "weights_digest": "abd"}),
        fid.reference_key(**base, features="shapes"),
    }
    assert len(keys) == 6
    assert fid.reference_key(**base) == fid.reference_key(**base)


def test_dataset_images_come_back_as_their_original_pixels():
    from maskdm.ddpm.data import render_shapes, shapes_dataset

    dataset = shapes_dataset("train", resolution=16, size=12)
    expected = render_shapes(12, seed=0, resolution=16)[0][:10]
    # Through the dataset's [-1, 1] tensors (a Subset hides the stored pixels), and the stored pixels.
    through_tensors = fid.dataset_images_uint8(torch.utils.data.Subset(shapes_dataset("eval", 16, 12), range(12)), limit=10, batch_size=4)
    np.testing.assert_array_equal(through_tensors, render_shapes(12, seed=1, resolution=16)[0][:10])
    np.testing.assert_array_equal(fid.dataset_images_uint8(dataset, limit=10), expected)  # unflipped


# --- bad samples ----------------------------------------------------------------------------------


def test_fewer_than_two_images_is_an_error():
    with pytest.raises(MaskDMError, match="at least 2"):
        fid.check_samples(random_images(1, seed=0))
    with pytest.raises(MaskDMError, match="at least 2"):
        fid.statistics(np.zeros((1, 8)))


def test_samples_of_wrong_shape_or_type_are_an_error():
    with pytest.raises(MaskDMError, match="shaped"):
        fid.check_samples(np.zeros((4, 3, 32, 32), np.uint8))
    with pytest.raises(MaskDMError, match="uint8"):
        fid.check_samples(np.zeros((4, 32, 32, 3), np.float32))


def test_unknown_dims_is_an_error():
    with pytest.raises(MaskDMError, match="64, 192, 768, 2048"):
        fid.load_inception(dims=1000)


# --- weights --------------------------------------------------------------------------------------


def test_offline_without_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    # A closed local port refuses at once, so this fails fast with or without a network.
    monkeypatch.setattr(fid, "FID_WEIGHTS_URL", "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth")
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(MaskDMError) as error:
        fid.load_inception(dims=64)
    message = str(error.value)
    assert "\n" not in message
    assert str(expected) in message and fid.FID_WEIGHTS_URL in message and "weights=" in message
    assert error.value.__suppress_context__
    assert not expected.exists()


def test_explicit_weights_file_needs_no_cache(tmp_path, monkeypatch, _planted_torch_home):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    planted = _planted_torch_home / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    model = fid.load_inception(dims=64, weights=str(planted))
    assert fid.inception_features(random_images(2, seed=0), model).shape == (2, 64)
    assert not (tmp_path / "empty_torch_home" / "hub" / "checkpoints").exists()


def test_weights_that_are_not_inception_are_an_error(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(MaskDMError, match="cannot read"):
        fid.load_inception(dims=64, weights=tmp_path / "junk.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(MaskDMError, match="do not fit"):
        fid.load_inception(dims=64, weights=tmp_path / "other.pth")
    with pytest.raises(MaskDMError, match="does not exist"):
        fid.load_inception(dims=64, weights=tmp_path / "missing.pth")


def test_weights_digest_follows_content(tmp_path):
    for name, content in (("a", b"one"), ("b", b"one"), ("c", b"two")):
        (tmp_path / name).write_bytes(content)
    assert fid.weights_digest(tmp_path / "a") == fid.weights_digest(tmp_path / "b")
    assert fid.weights_digest(tmp_path / "a") != fid.weights_digest(tmp_path / "c")
    assert len(fid.weights_digest(tmp_path / "a")) == 16


# --- shapes features ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_classifier():
    from maskdm.ddpm.data import load_dataset
    from maskdm.evaluation.shapes_features import train_shapes_classifier

    # Less than the stage's default training, enough for the easy classes (0.995 measured).
    return train_shapes_classifier(load_dataset("shapes", split="train"), epochs=4, batch_size=32, max_images=2500)


def test_shapes_classifier_learns_the_labels(shapes_classifier):
    from maskdm.ddpm.data import load_dataset
    from maskdm.evaluation.shapes_features import classifier_accuracy

    assert classifier_accuracy(shapes_classifier, load_dataset("shapes", split="eval"), limit=1000) > 0.9


def test_fid_shapes_separates_distributions(shapes_classifier):
    from maskdm.ddpm.data import render_shapes
    from maskdm.evaluation.shapes_features import shapes_features

    def stats(images):
        return fid.statistics(shapes_features(images, shapes_classifier))

    real_a, real_b = render_shapes(400, seed=10)[0], render_shapes(400, seed=11)[0]
    noisy = np.clip(real_b + np.random.default_rng(0).normal(0, 40, real_b.shape), 0, 255).astype(np.uint8)
    same_set = fid.fid_from_stats(*stats(real_a), *stats(real_a))
    same_distribution = fid.fid_from_stats(*stats(real_a), *stats(real_b))
    other_distribution = fid.fid_from_stats(*stats(real_a), *stats(noisy))

    assert abs(same_set) < 1e-6 * other_distribution
    assert other_distribution > 5 * same_distribution > 0


def test_fid_shapes_scores_coloured_noise_worse_than_shapes(shapes_classifier):
    """The failure that made the classifier learn a "not a clean shape" class: 16x16 samples of a
    heavily pruned demo model are coloured noise, and must not score like shapes."""
    from maskdm.ddpm.data import render_shapes
    from maskdm.evaluation.shapes_features import shapes_features

    def stats(images):
        return fid.statistics(shapes_features(images, shapes_classifier))

    real_a, real_b = render_shapes(400, seed=10, resolution=16)[0], render_shapes(400, seed=11, resolution=16)[0]
    rng = np.random.default_rng(0)
    # Every image's own pixels in a random order: its colours, no shape.
    shuffled = np.stack([image.reshape(-1, 3)[rng.permutation(16 * 16)].reshape(16, 16, 3) for image in real_b])
    reference = stats(real_a)
    assert fid.fid_from_stats(*reference, *stats(shuffled)) > 5 * fid.fid_from_stats(*reference, *stats(real_b))


def test_shapes_classifier_round_trips_through_safetensors(shapes_classifier, tmp_path):
    from maskdm.ddpm.data import render_shapes
    from maskdm.evaluation.shapes_features import load_shapes_classifier, save_shapes_classifier, shapes_features

    loaded = load_shapes_classifier(save_shapes_classifier(shapes_classifier, tmp_path / "classifier.safetensors"))
    images = render_shapes(8, seed=3)[0]
    np.testing.assert_array_equal(shapes_features(images, loaded), shapes_features(images, shapes_classifier))


def test_a_safetensors_file_that_is_no_classifier_is_an_error(tmp_path):
    from safetensors.torch import save_file

    from maskdm.evaluation.shapes_features import load_shapes_classifier

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(MaskDMError, match="not a shapes classifier"):
        load_shapes_classifier(tmp_path / "other.safetensors")


def test_the_shapes_classifier_is_the_same_whatever_the_global_random_state():
    # The training split flips images with the global generator: a classifier that depended on its
    # state differed between processes, so two stores scored the same model differently.
    from maskdm.ddpm.data import load_dataset
    from maskdm.evaluation.shapes_features import train_shapes_classifier

    def trained_after(global_seed: int):
        torch.manual_seed(global_seed)
        model = train_shapes_classifier(load_dataset("shapes", 16, split="train"), epochs=1, batch_size=32, max_images=128)
        return model.state_dict()

    first, second = trained_after(1), trained_after(2)
    assert all(torch.equal(first[k], second[k]) for k in first)
