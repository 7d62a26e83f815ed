"""FID statistics streamed chunk by chunk: samples read from samples.npz in pieces, running mean and covariance."""

from __future__ import annotations

import numpy as np
import pytest

from maskdm.evaluation import fid, npz_stream
from maskdm.ddpm.data import shapes_dataset
from maskdm.errors import MaskDMError
from inception_fixture import _planted_torch_home  # noqa: F401 (the store fixture needs it)
from test_fid_stage import expected_fid, invoke, make_sample_run, random_images, runs_of, stats_of, store  # noqa: F401


def test_running_stats_equal_the_all_at_once_statistics_for_uneven_chunks():
    rng = np.random.default_rng(0)
    # An offset far from zero: a naive sum-of-squares covariance would lose digits here.
    features = rng.normal(size=(37, 6)) * rng.uniform(0.1, 3.0, 6) + 1e3
    running = fid.RunningStats()
    for start, stop in [(0, 1), (1, 11), (11, 12), (12, 30), (30, 37)]:
        running.update(features[start:stop])
    mu, sigma = running.result()
    expected_mu, expected_sigma = fid.statistics(features)
    assert running.count == 37
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-13)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-9, atol=1e-12 * np.abs(expected_sigma).max())


def test_running_stats_need_two_images():
    running = fid.RunningStats()
    running.update(np.ones((1, 3)))
    with pytest.raises(MaskDMError, match="at least 2 images"):
        running.result()


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_rows_stream_in_order_from_plain_and_compressed_files(tmp_path, save):
    images = random_images(7, seed=1, size=5)
    path = tmp_path / "samples.npz"
    save(path, images=images, seed=np.array(42))
    assert npz_stream.array_header(path, "images") == (images.shape, np.dtype(np.uint8))
    chunks = list(npz_stream.iter_rows(path, "images", 3))
    assert [len(c) for c in chunks] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), images)


def test_npz_rows_refuse_pickled_objects(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, images=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        list(npz_stream.iter_rows(path, "images", 1))


def test_dataset_chunks_are_the_dataset_in_order():
    dataset = shapes_dataset("eval", 8, size=11, augment=False)
    chunks = list(fid.dataset_uint8_chunks(dataset, batch_size=4))
    assert [len(c) for c in chunks] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(chunks), dataset.images)


def test_the_fid_stage_streams_samples_in_chunks_with_the_same_value(store, tmp_path, monkeypatch):  # noqa: F811
    import entrypoints.fid as stage

    # Chunks of 2 over 5 images: 2, 2, 1 (a last chunk of one image is fine in a stream).
    monkeypatch.setattr(stage, "CHUNK_IMAGES", 2)
    images, reference_images = random_images(5, seed=12), random_images(6, seed=13)
    model = fid.load_inception(dims=64)
    stats_file = fid.save_stats(tmp_path / "reference.npz", *fid.statistics(fid.inception_features(reference_images, model)))
    result = invoke(sample_run_id=make_sample_run(images), reference=stats_file, dims=64)
    assert result.exit_code == 0, result.output
    run = runs_of("fid")[0]
    assert run.data.metrics["fid_inception_64"] == pytest.approx(expected_fid(images, reference_images), rel=1e-6)
    assert run.data.metrics["num_samples"] == 5
    np.testing.assert_allclose(stats_of(run.info.run_id)[0], fid.statistics(fid.inception_features(images, model))[0], rtol=1e-6)


def test_npz_writer_streams_rows_into_a_file_np_load_reads(tmp_path):
    images = random_images(5, seed=3, size=4)
    path = tmp_path / "samples.npz"
    with npz_stream.NpzWriter(path) as writer:
        writer.open_array("images", images.shape, np.uint8)
        writer.write_rows(images[:2])
        writer.write_rows(images[2:])
        writer.add("seed", np.int64(42))
    with np.load(path, allow_pickle=False) as f:
        np.testing.assert_array_equal(f["images"], images)
        assert f["seed"].item() == 42
    assert not (tmp_path / "samples.npz.partial").exists()


def test_npz_writer_leaves_nothing_under_the_real_name_when_it_fails(tmp_path):
    path = tmp_path / "samples.npz"
    with pytest.raises(ValueError, match="do not fit"):
        with npz_stream.NpzWriter(path) as writer:
            writer.open_array("images", (2, 4, 4, 3), np.uint8)
            writer.write_rows(random_images(3, seed=0, size=4))  # one row too many
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="still has 1 rows"):
        writer = npz_stream.NpzWriter(path)
        writer.open_array("images", (2, 4, 4, 3), np.uint8)
        writer.write_rows(random_images(1, seed=0, size=4))
        writer.close()
    writer.abort()
    assert list(tmp_path.iterdir()) == []
