"""The registered model: a pyfunc image generator logged from code (:data:`MODEL_CODE`), its
requests, serving cap, kernel and signature, and :func:`log_pyfunc_model`."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from maskdm.errors import MaskDMError


log = logging.getLogger("maskdm.registry")


PIPELINE_ARTIFACT = "pipeline"
INPUT_COLUMNS = ("num_images", "ddim_steps", "seed")
#: The optional input columns and their defaults: the ``sample`` stage's, so that a request for
#: ``num_images`` alone gives the first images ``maskdm sample`` makes of the model by default.
COLUMN_DEFAULTS = {"ddim_steps": 100, "seed": 42}
#: The most image-steps (num_images x ddim_steps, summed over the rows) one predict call may ask
#: for, unless set when registering: one batch of 64 images at the default 100 steps.
DEFAULT_MAX_IMAGE_STEPS = 6400
#: The version tag recording a version's ``max_image_steps``.
MAX_IMAGE_STEPS_TAG = "max_image_steps"
#: ``model_config`` of a registered model; override at load with ``mlflow.pyfunc.load_model(uri, model_config=...)``.
DEFAULT_MODEL_CONFIG = {"batch_size": 64, "device": "auto", "max_image_steps": DEFAULT_MAX_IMAGE_STEPS, "kernel": "dense"}
#: The version tag recording the kernel the served model runs with (``promote --kernel``, :mod:`maskdm.evaluation.speed`).
KERNEL_TAG = "kernel"
#: The version tag that names the finetune run a version holds (the idempotency key).
FINETUNE_RUN_TAG = "finetune_run_id"
RESERVED_ALIASES = ("latest",)
#: The distributions the pyfunc model imports (pinned to the installed versions when logged).
REQUIREMENTS = ("mlflow", "torch", "torchvision", "diffusers", "numpy", "pandas", "pillow", "safetensors", "tqdm")

MODEL_CODE = '''"""MaskDM image generator: the models-from-code entry MLflow executes to load the pyfunc model."""
import mlflow

from maskdm.registry import DDPMImageGenerator

mlflow.models.set_model(DDPMImageGenerator())
'''


# --------------------------------------------------------------------------------------------
# The pyfunc model


@dataclass(frozen=True)
class GenerationRequest:
    num_images: int
    ddim_steps: int
    seed: int


def _as_int(value: object, column: str, row: int) -> int:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        raise MaskDMError(f"row {row}: {column} must be an integer, got {value!r}")
    return int(number)


def parse_requests(model_input: pd.DataFrame | Mapping) -> list[GenerationRequest]:
    """One request per row: integer columns num_images (>= 1) and, optional, ddim_steps (>= 1) and seed (>= 0).

    A missing optional column, or an empty value in one, takes :data:`COLUMN_DEFAULTS`.
    """
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns and c not in COLUMN_DEFAULTS]
    if missing:
        optional = ", ".join(f"{c} (default {v})" for c, v in COLUMN_DEFAULTS.items())
        raise MaskDMError(f"the input needs the column {', '.join(missing)} (optional: {optional})")
    if frame.empty:
        raise MaskDMError("the input has no rows: pass one row per request (num_images, ddim_steps, seed)")
    requests = []
    for row, record in enumerate(frame.to_dict("records")):
        values = [record.get(c) for c in INPUT_COLUMNS]
        values = [COLUMN_DEFAULTS[c] if c in COLUMN_DEFAULTS and _empty(v) else v for v, c in zip(values, INPUT_COLUMNS)]
        request = GenerationRequest(*(_as_int(v, c, row) for v, c in zip(values, INPUT_COLUMNS)))
        if request.num_images < 1:
            raise MaskDMError(f"row {row}: num_images must be at least 1, got {request.num_images}")
        if request.ddim_steps < 1:
            raise MaskDMError(f"row {row}: ddim_steps must be at least 1, got {request.ddim_steps}")
        if request.seed < 0:
            raise MaskDMError(f"row {row}: seed must be at least 0, got {request.seed}")
        requests.append(request)
    return requests


def _empty(value: object) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def check_max_image_steps(value: object) -> int:
    """A cap as given to promote or in a model_config: an integer >= 1."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number) or number < 1:
        raise MaskDMError(f"max_image_steps must be an integer >= 1, got {value!r}")
    return int(number)


def steps_run(ddim_steps: int, num_train_timesteps: int) -> int:
    """The UNet calls ``ddim_steps`` uniform DDIM steps really make: every ``T // S``-th timestep,
    so more than ``S`` when ``S`` does not divide ``T`` (501 of 1,000 run 1,000)."""
    from maskdm.ddpm.sampling import ddim_timesteps

    return len(ddim_timesteps(num_train_timesteps, ddim_steps, "uniform"))


def check_budget(requests: Sequence[GenerationRequest], max_image_steps: int, num_train_timesteps: int | None = None) -> int:
    """The image-steps the requests ask for (num_images x the steps each row runs, summed); an error
    above the cap. With the model's ``num_train_timesteps``, each row's steps are those its sampler
    runs (:func:`steps_run`), and a step count it cannot run is an error, before any row runs."""
    if num_train_timesteps is None:
        total = sum(r.num_images * r.ddim_steps for r in requests)
    else:
        total = 0
        for row, r in enumerate(requests):
            try:
                total += r.num_images * steps_run(r.ddim_steps, num_train_timesteps)
            except MaskDMError as exc:
                raise MaskDMError(f"row {row}: {exc}") from None
    if total > max_image_steps:
        raise MaskDMError(
            f"the request asks for {total} image-steps (num_images x the DDIM steps each row runs, summed over its rows); "
            f"this model serves at most max_image_steps={max_image_steps} per request: ask for fewer images "
            f"or steps, or split the request"
        )
    return total


def generate(
    ddpm, requests: Sequence[GenerationRequest], batch_size: int = 64, device: str = "cpu", mixed_precision: str = "no"
) -> np.ndarray:
    """The images of all requests as one uint8 NHWC array, in request order."""
    from maskdm.ddpm.sampling import sample_images

    images = [
        sample_images(
            ddpm.unet, ddpm.scheduler.config, range(r.num_images),
            steps=r.ddim_steps, seed=r.seed, batch_size=min(batch_size, r.num_images), device=device,
            clip_sample=False,  # as the sample stage's default (the original DDIM code never clips x0)
            codec=ddpm.codec, mixed_precision=mixed_precision,
        )
        for r in requests
    ]
    return np.concatenate(images)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class BadRequest(MlflowException, MaskDMError):
    """A request predict refuses. ``mlflow models serve`` answers it with HTTP 400 and this message
    (any other exception is a 400 whose message is generic, the reason only in its stack trace)."""

    def __init__(self, message: str):
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class DDPMImageGenerator(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame(num_images, ddim_steps, seed) -> uint8 NHWC images (see the module doc)."""

    def load_context(self, context) -> None:
        from maskdm.ddpm.models import load_ddpm

        from maskdm.ddpm.sparse_storage import dense_folder

        config = {**DEFAULT_MODEL_CONFIG, **(context.model_config or {})}
        # A sparse pipeline (every version registered since weights are stored sparse) is rebuilt
        # dense in a temporary folder, loaded, and the folder dropped; an older dense one loads as is.
        with dense_folder(os.path.abspath(context.artifacts[PIPELINE_ARTIFACT])) as pipeline:
            self.ddpm = load_ddpm(str(pipeline))
        self.batch_size = int(config["batch_size"])
        self.device = resolve_device(str(config["device"]))
        self.max_image_steps = check_max_image_steps(config["max_image_steps"])
        self.kernel = str(config["kernel"])
        self.mixed_precision = "no"
        if self.kernel != "dense":
            from maskdm.evaluation.speed import prepare_kernel

            # 2:4 layers compressed once at load (bf16, on the GPU; one line where there is none).
            prepare_kernel(self.ddpm.unet, self.kernel, self.device, "auto")
            self.mixed_precision = "bf16"

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        # Checked before any work: a refused request costs the server nothing.
        try:
            requests = parse_requests(model_input)
            check_budget(requests, self.max_image_steps, int(self.ddpm.scheduler.config.num_train_timesteps))
        except MaskDMError as exc:
            raise BadRequest(str(exc)) from None
        return generate(self.ddpm, requests, self.batch_size, self.device, self.mixed_precision)


def generation_signature(height: int, width: int, channels: int):
    """Input: long columns num_images (required), ddim_steps and seed (optional). Output: a uint8 tensor (-1, H, W, C)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("long", name, required=name not in COLUMN_DEFAULTS) for name in INPUT_COLUMNS]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, height, width, channels))]),
    )


def input_example() -> pd.DataFrame:
    """The smallest request: logged with the model, and run once when it is logged as a check."""
    return pd.DataFrame({"num_images": [1], "ddim_steps": [1], "seed": [0]}, dtype=np.int64)


def pinned_requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            # A local version label (2.5.1+cpu) names a wheel index, not a version pip can resolve.
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_pyfunc_model(
    pipeline_dir: str | os.PathLike, name: str = "model", max_image_steps: int = DEFAULT_MAX_IMAGE_STEPS, kernel: str = "dense"
):
    """Log the pipeline folder as a pyfunc image generator in the active run; returns the ModelInfo.

    The logged copy of the folder stores its weights sparse (:func:`maskdm.ddpm.sparse_storage.pack_pipeline_copy`);
    ``pipeline_dir`` itself is left as it is.
    """
    from maskdm.ddpm.models import pipeline_image_shape
    from maskdm.ddpm.sparse_storage import pack_pipeline_copy

    channels, height, width = pipeline_image_shape(pipeline_dir)
    with tempfile.TemporaryDirectory(prefix="maskdm-pyfunc-") as tmp:
        pipeline = Path(tmp) / PIPELINE_ARTIFACT
        for packed in pack_pipeline_copy(pipeline_dir, pipeline):
            log.info("registered copy stores %s sparse: %d of %d bytes", packed.dense, packed.sparse_bytes, packed.dense_bytes)
        code_file = Path(tmp) / "maskdm_generator.py"
        code_file.write_text(MODEL_CODE)
        package = Path(tmp) / "maskdm"
        # The whole maskdm package (this file is maskdm/registry/pyfunc.py), so the version loads with the code that logged it.
        shutil.copytree(Path(__file__).resolve().parents[1], package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code_file),
            artifacts={PIPELINE_ARTIFACT: str(pipeline)},
            code_paths=[str(package)],
            signature=generation_signature(height, width, channels),
            input_example=input_example(),
            pip_requirements=pinned_requirements(),
            model_config={**DEFAULT_MODEL_CONFIG, "max_image_steps": check_max_image_steps(max_image_steps), "kernel": kernel},
        )
