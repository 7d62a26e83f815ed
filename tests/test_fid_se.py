"""The fid stage's bootstrap standard error (``se_resamples``, ``se_seed``; metric ``<fid metric>_se``).

Library tests run on small synthetic features; the stage tests reuse test_fid_stage.py's store
and sample runs, with the fast ``shapes`` protocol.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from inception_fixture import _planted_torch_home  # noqa: F401
from test_fid_stage import assert_failed_with_one_line, fid_runs_of, invoke, make_sample_run, random_images, stats_of, store  # noqa: F401

from maskdm.evaluation import fid
from maskdm.errors import MaskDMError
from maskdm.evaluation.fid_protocol import is_fid_metric


def gaussian_features(n: int, seed: int, dims: int = 8) -> np.ndarray:
    """Features of one fixed distribution (correlated, uneven variances), ``n`` draws of it."""
    mixing = np.random.default_rng(1234).standard_normal((dims, dims)) / np.sqrt(dims)
    draws = np.random.default_rng(seed).standard_normal((n, dims)) * np.linspace(0.5, 2.0, dims)
    return (draws @ mixing + 0.3).astype(np.float32)


@pytest.fixture(scope="module")
def reference() -> tuple[np.ndarray, np.ndarray]:
    """Fixed reference statistics of a distribution a little off the samples'."""
    return fid.statistics(gaussian_features(4000, seed=99) * 1.2 + 0.1)


def test_each_replicate_is_the_fid_of_a_resample(reference):
    features = gaussian_features(300, seed=0)
    replicates = fid.bootstrap_fids(features, reference, resamples=6, seed=5)
    # The same draws, made the plain way: rows taken with replacement, statistics, distance.
    rng = np.random.default_rng(5)
    for value in replicates:
        rows = rng.integers(0, len(features), len(features))
        plain = fid.fid_from_stats(*fid.statistics(features[rows]), *reference, method="pytorch-fid")
        assert value == pytest.approx(plain, rel=1e-6)
    assert len(set(replicates.tolist())) == 6  # six different resamples


def test_deterministic_given_its_seed(reference):
    features = gaussian_features(300, seed=0)
    first = fid.bootstrap_fids(features, reference, resamples=20, seed=3)
    again = fid.bootstrap_fids(features, reference, resamples=20, seed=3)
    other = fid.bootstrap_fids(features, reference, resamples=20, seed=4)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert fid.bootstrap_se(first) == fid.bootstrap_se(again) > 0


def test_more_samples_of_the_same_distribution_give_a_smaller_se(reference):
    small = fid.bootstrap_se(fid.bootstrap_fids(gaussian_features(400, seed=1), reference, resamples=60, seed=0))
    large = fid.bootstrap_se(fid.bootstrap_fids(gaussian_features(6400, seed=2), reference, resamples=60, seed=0))
    # An SE shrinks as 1/sqrt(n): 16x the samples, about a quarter of the SE; half is a wide margin
    # for the SE's own noise (about 9 % at 60 resamples).
    assert large < small / 2


def test_leaves_the_features_and_the_fid_alone_unless_told(reference):
    features = gaussian_features(300, seed=0)
    copy = features.copy()
    value = fid.fid_of_features(features, reference)
    replicates = fid.bootstrap_fids(features, reference, resamples=30, seed=0)
    assert np.array_equal(features, copy)
    assert fid.fid_of_features(features, reference) == value
    # The bootstrap's replicates are not the FID (fewer distinct rows bias them): a stage that
    # logged their mean, or one of them, as the FID would be caught by an equality test.
    assert abs(replicates.mean() - value) > 1e-3 * value
    fid.bootstrap_fids(features, reference, resamples=2, seed=0, overwrite=True)
    assert not np.array_equal(features, copy)  # overwrite=True reuses the array, as the stage does


@pytest.mark.parametrize("resamples", [1, -1])
def test_bad_resample_counts(reference, resamples):
    with pytest.raises(MaskDMError, match="se_resamples must be 0 .* or at least 2"):
        fid.bootstrap_fids(gaussian_features(10, seed=0), reference, resamples=resamples)


def test_zero_resamples_is_off(reference):
    assert fid.bootstrap_fids(gaussian_features(10, seed=0), reference, resamples=0).size == 0


def test_se_metrics_are_not_fids():
    assert not any(is_fid_metric(name) for name in ("fid_se", "fid_shapes_se", "fid_inception_64_se"))
    assert all(is_fid_metric(name) for name in ("fid", "fid_shapes", "fid_inception_64"))


# --- the stage ------------------------------------------------------------------------------------


def test_stage_logs_the_se_and_the_same_fid_without_it(store, monkeypatch):
    import maskdm.ddpm.data
    from maskdm.ddpm.data import render_shapes

    monkeypatch.setattr(maskdm.ddpm.data, "SHAPES_TRAIN_SIZE", 400)
    sample_run = make_sample_run(render_shapes(120, seed=7)[0], dataset="shapes")
    for options in ({"se_resamples": 0}, {}, {"se_resamples": 30, "se_seed": 1}, {"se_resamples": 30, "se_seed": 1}):
        result = invoke(sample_run_id=sample_run, features="shapes", **options)
        assert result.exit_code == 0, result.output
    repeated, seeded, default, off = fid_runs_of(sample_run)

    assert "fid_shapes_se" not in off.data.metrics and off.data.params["se_resamples"] == "0"
    assert (default.data.params["se_resamples"], default.data.params["se_seed"]) == (str(fid.DEFAULT_SE_RESAMPLES), "0")
    assert (seeded.data.params["se_resamples"], seeded.data.params["se_seed"]) == ("30", "1")
    for run in (default, seeded):
        assert run.data.metrics["fid_shapes_se"] > 0 and "fid_se" not in run.data.metrics
    assert repeated.data.metrics["fid_shapes_se"] == seeded.data.metrics["fid_shapes_se"]  # same seed, same SE
    assert default.data.metrics["fid_shapes_se"] != seeded.data.metrics["fid_shapes_se"]
    # The SE overwrites the kept features in place once the statistics are taken: had it run
    # before them, the FID and the statistics would move.
    for run in (default, seeded, repeated):
        assert run.data.metrics["fid_shapes"] == off.data.metrics["fid_shapes"]
        assert all(np.array_equal(a, b) for a, b in zip(stats_of(run.info.run_id), stats_of(off.info.run_id)))

    # pytorch-fid's own calculate_frechet_distance gives the reported FID from the logged statistics.
    reference_path = mlflow.artifacts.download_artifacts(run_id=default.data.tags["maskdm.fid_reference_run"], artifact_path="reference_stats.npz")
    reference = fid.load_reference_stats(reference_path, 64)
    by_pytorch_fid = fid.fid_from_stats(*stats_of(default.info.run_id), *reference, method="pytorch-fid")
    assert default.data.metrics["fid_shapes"] == pytest.approx(by_pytorch_fid, rel=1e-6)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"se_resamples": 1}, "se_resamples must be 0 (no standard error) or at least 2"),
        ({"se_resamples": -3}, "se_resamples must be an integer >= 0, not '-3'"),
        ({"se_resamples": "many"}, "se_resamples must be an integer >= 0, not 'many'"),
        ({"se_seed": "x"}, "se_seed must be an integer >= 0, not 'x'"),
    ],
)
def test_bad_se_options_fail_the_run_with_one_line(store, options, message):
    result = invoke(sample_run_id=make_sample_run(random_images(3, seed=0)), dims=64, **options)
    assert_failed_with_one_line(result, message)
