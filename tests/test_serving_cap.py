"""Bounded work per served request: the pyfunc model's max_image_steps, and its optional columns."""

from __future__ import annotations

from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import tracking_store

from maskdm import registry
from maskdm.errors import MaskDMError
from maskdm.ddpm.models import load_ddpm
from maskdm.ddpm.sampling import sample_images


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same tiny pipeline logged twice as a pyfunc model: with the default cap and with a cap of 6."""
    from conftest import tiny_unet

    from maskdm.ddpm.models import DDPM, default_scheduler, save_ddpm

    folder = tmp_path_factory.mktemp("serving-store")
    with tracking_store(folder) as uri:
        model_dir = save_ddpm(DDPM(tiny_unet(), default_scheduler()), folder / "tiny_model")
        with mlflow.start_run():
            default = registry.log_pyfunc_model(model_dir, name="default_cap")
            capped = registry.log_pyfunc_model(model_dir, name="capped", max_image_steps=6)
        yield SimpleNamespace(uri=uri, model_dir=model_dir, default=default.model_uri, capped=capped.model_uri)


def test_optional_columns_take_the_sample_stage_defaults(models):
    model = mlflow.pyfunc.load_model(models.default)
    inputs = model.metadata.signature.inputs
    assert inputs.input_names() == list(registry.INPUT_COLUMNS)
    assert {c.name: c.required for c in inputs.inputs} == {"num_images": True, "ddim_steps": False, "seed": False}
    assert model.metadata.flavors["python_function"]["config"]["max_image_steps"] == registry.DEFAULT_MAX_IMAGE_STEPS

    images = model.predict(pd.DataFrame({"num_images": [2]}))
    ddpm = load_ddpm(str(models.model_dir))
    expected = sample_images(ddpm.unet, ddpm.scheduler.config, range(2), steps=100, seed=42, batch_size=2, clip_sample=False)
    np.testing.assert_array_equal(images, expected)  # ddim_steps 100 and seed 42, as `maskdm sample` by default
    # One optional column given, the other left out.
    np.testing.assert_array_equal(model.predict(pd.DataFrame({"num_images": [2], "seed": [42]})), expected)
    with pytest.raises(Exception, match="num_images"):
        model.predict(pd.DataFrame({"ddim_steps": [2], "seed": [0]}))


def test_parse_requests_defaults_and_required_column():
    assert registry.parse_requests(pd.DataFrame({"num_images": [3]})) == [registry.GenerationRequest(3, 100, 42)]
    # An empty value in an optional column takes its default; the others keep theirs.
    frame = pd.DataFrame({"num_images": [1, 2], "ddim_steps": [5, None], "seed": [None, 7]})
    assert registry.parse_requests(frame) == [registry.GenerationRequest(1, 5, 42), registry.GenerationRequest(2, 100, 7)]
    with pytest.raises(MaskDMError, match=r"needs the column num_images \(optional: ddim_steps \(default 100\), seed \(default 42\)\)"):
        registry.parse_requests(pd.DataFrame({"ddim_steps": [1], "seed": [0]}))
    with pytest.raises(MaskDMError, match="row 0: num_images must be an integer"):
        registry.parse_requests(pd.DataFrame({"num_images": [None]}))


def test_requests_beyond_the_cap_are_refused_before_any_work(models):
    model = mlflow.pyfunc.load_model(models.capped)
    assert model.metadata.flavors["python_function"]["config"]["max_image_steps"] == 6
    # Exactly at the cap, summed over rows: served.
    images = model.predict(pd.DataFrame({"num_images": [2, 1], "ddim_steps": [2, 2], "seed": [0, 1]}))
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    for frame, total in [
        ({"num_images": [7], "ddim_steps": [1], "seed": [0]}, 7),
        ({"num_images": [2, 2], "ddim_steps": [2, 2], "seed": [0, 0]}, 8),  # each row fits, together they do not
        ({"num_images": [1]}, 100),  # the default 100 steps count
        ({"num_images": [10**12], "ddim_steps": [2], "seed": [0]}, 2 * 10**12),
    ]:
        with pytest.raises(MaskDMError) as refused:
            model.predict(pd.DataFrame(frame))
        message = str(refused.value)
        assert f"asks for {total} image-steps" in message and "at most max_image_steps=6 per request" in message
        # An MlflowException with a 400 code: `mlflow models serve` answers 400 with this message.
        assert isinstance(refused.value, registry.BadRequest) and refused.value.get_http_status_code() == 400

    # More steps than the model has timesteps: refused as a 400 before any row runs.
    with pytest.raises(registry.BadRequest, match="row 1: ddim_steps must be between 1 and the model's 1000") as refused:
        model.predict(pd.DataFrame({"num_images": [1, 1], "ddim_steps": [1, 10**6], "seed": [0, 0]}))
    assert refused.value.get_http_status_code() == 400

    # The cap is the model's config: a caller loading the model itself may set another.
    raised = mlflow.pyfunc.load_model(models.capped, model_config={"max_image_steps": 8})
    assert raised.predict(pd.DataFrame({"num_images": [2, 2], "ddim_steps": [2, 2], "seed": [0, 0]})).shape[0] == 4
    with pytest.raises(MaskDMError, match="max_image_steps must be an integer >= 1, got 0"):
        mlflow.pyfunc.load_model(models.capped, model_config={"max_image_steps": 0})


def test_the_cap_counts_the_steps_the_sampler_runs():
    # 501 uniform DDIM steps over 1,000 timesteps take every 1000 // 501 = 1st timestep: 1,000 UNet calls.
    assert registry.steps_run(501, 1000) == 1000 and registry.steps_run(500, 1000) == 500
    requests = [registry.GenerationRequest(2, 501, 0)]
    assert registry.check_budget(requests, 2000, num_train_timesteps=1000) == 2000
    with pytest.raises(MaskDMError, match="asks for 2000 image-steps"):
        registry.check_budget(requests, 1999, num_train_timesteps=1000)
    with pytest.raises(MaskDMError, match="row 0: ddim_steps must be between 1 and the model's 1000"):
        registry.check_budget([registry.GenerationRequest(1, 1001, 0)], 10**9, num_train_timesteps=1000)


def test_check_budget_and_cap_values():
    requests = [registry.GenerationRequest(4, 10, 0), registry.GenerationRequest(1, 5, 0)]
    assert registry.check_budget(requests, 45) == 45
    with pytest.raises(MaskDMError, match="asks for 45 image-steps"):
        registry.check_budget(requests, 44)
    assert registry.check_max_image_steps("12") == 12
    for bad in (0, -1, 1.5, "x", float("inf")):
        with pytest.raises(MaskDMError, match="max_image_steps must be an integer >= 1"):
            registry.check_max_image_steps(bad)


def test_an_existing_version_keeps_its_cap():
    version = SimpleNamespace(version="3", tags={registry.FINETUNE_RUN_TAG: "f" * 32, registry.MAX_IMAGE_STEPS_TAG: "6400"})
    registry._check_same_cap("gen", version, None)  # not given: the version's cap stands
    registry._check_same_cap("gen", version, 6400)
    with pytest.raises(MaskDMError, match="gen version 3 already holds finetune run f+ with max_image_steps 6400; .*fixed"):
        registry._check_same_cap("gen", version, 100)
    older = SimpleNamespace(version="1", tags={registry.FINETUNE_RUN_TAG: "f" * 32})
    with pytest.raises(MaskDMError, match="unset \\(registered before the cap existed: no cap\\)"):
        registry._check_same_cap("gen", older, 6400)


def test_promote_rejects_a_bad_cap_in_one_line(tracking):
    from entrypoints.cli import cli

    result = CliRunner().invoke(cli, ["promote", "--finetune_run_id", "best", "--max_image_steps", "0"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ["maskdm: error: max_image_steps must be an integer >= 1, got 0"]
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"
