"""speed: the dense model and pruned/finetuned ones timed side by side in one process.

Every model makes the same DDIM batch (``batch_size`` images, ``ddim_steps`` steps, one dtype, one
device, fixed CPU threads) in interleaved rounds (A B B A ..., :mod:`maskdm.evaluation.speed`), warm-up
excluded; the run logs per model the median seconds with quartiles and min/max, and the speed-up
against the dense reference (median of per-round ratios) with a bootstrap interval. With
``served`` it also times each model as registered (packed weights, :mod:`maskdm.ddpm.sparse_storage`):
its bytes, the pyfunc's load time and its predict time per image, against the dense model's.
Metrics are named ``<quantity>/<model run ID>``; docs/details/speed.md lists them.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace

import click
import pandas as pd
import torch

from entrypoints.common import optional, stage
from maskdm.evaluation import speed
from maskdm.errors import MaskDMError, positive_or_auto
from maskdm.tracking import MODEL_STAGES, Upstream, get_upstream

log = logging.getLogger(__name__)

VARIANT_TAG = "maskdm.variant"
MIXED_PRECISION = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


@click.command("speed", help="Time model runs side by side against the dense one (ratios with their spread).")
@click.option("--model_run_ids", default="", help="Comma-separated model run IDs (prune, train_masks, finetune, pretrain).")
@click.option("--run_id", default=None, help="Or a driver run: its model runs (those tagged maskdm.variant).")
@click.option("--dense", default="auto", show_default=True,
              help="The reference's run ID; auto: the prune run with pruning_ratio 0 among the model runs.")
@click.option("--kernel", default="dense", show_default=True,
              help="dense, or semi_structured: 2:4 layers on PyTorch's sparse kernels (CUDA sm80+; the dense model stays dense).")
@click.option("--batch_size", type=int, default=16, show_default=True, help="Images per timed DDIM batch.")
@click.option("--ddim_steps", type=int, default=10, show_default=True, help="DDIM steps of a timed batch.")
@click.option("--repeats", type=int, default=7, show_default=True, help="Timed rounds (each model once per round).")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed calls of each model first.")
@click.option("--dtype", default="auto", show_default=True, help="auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16, float16.")
@click.option("--threads", default="auto", show_default=True, help="CPU threads (torch.set_num_threads); auto: as started (OMP_NUM_THREADS).")
@click.option("--served", type=click.BOOL, default=True, show_default=True,
              help="Also time the registered form: its bytes, pyfunc load and predict per image.")
def command(**params) -> None:
    with stage("speed", params) as run:
        kernel = speed.check_kernel(params["kernel"])
        for key in ("batch_size", "ddim_steps", "repeats"):
            if params[key] < 1:
                raise MaskDMError(f"{key} must be at least 1, not {params[key]}")
        if params["warmup"] < 0:
            raise MaskDMError(f"warmup must be at least 0, not {params['warmup']}")
        models, dense = model_runs(params)
        if kernel == "semi_structured":
            for up in models:
                if up.run_id != dense.run_id:
                    check_has_masks(up)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        speed.check_kernel_device(kernel, device)
        dtype = speed.resolve_dtype(params["dtype"], device, kernel)
        threads = set_threads(params["threads"])
        settings = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "resolved_dtype": str(dtype).removeprefix("torch."), "threads_used": threads,
            "dense_run_id": dense.run_id, "model_count": len(models),
            **{f"version_{name}": version for name, version in speed.library_versions().items()},
        }
        run.log_params(settings)
        run.set_tags({"maskdm.device": settings["device"], "maskdm.kernel": kernel})
        result = measure_models(models, dense, params, kernel, device, dtype)
        if params["served"]:
            served = measure_served(models, dense, params, kernel, device, dtype)
            result = {**result, **served, "metrics": {**result["metrics"], **served["metrics"]}}
        run.log_metrics(result["metrics"])
        (run.out / "speed.json").write_text(json.dumps({**result, "settings": settings, "params": params}, indent=2, default=str))
        for up in models:
            rid = up.run_id
            log.info("%s (%s): %.4g s per batch [%.4g, %.4g], speed-up %.3f [%.3f, %.3f]", rid, up.stage,
                     *(result["metrics"][f"{k}/{rid}"] for k in ("sample_s", "sample_s_q1", "sample_s_q3", "speedup", "speedup_low", "speedup_high")))


def model_runs(params: dict) -> tuple[list[Upstream], Upstream]:
    """The model runs (reference first) and the dense reference, each checked FINISHED with a model/."""
    ids = [i.strip() for i in params["model_run_ids"].split(",") if i.strip()]
    variants: dict[str, str] = {}
    driver = optional(params["run_id"])
    if driver:
        from maskdm.report import runs_frame

        frame = runs_frame(parent_run_id=driver)
        column = f"tags.{VARIANT_TAG}"
        stage_column = "tags.maskdm.stage"
        if column in frame.columns:
            for row in frame.to_dict("records"):
                if row.get("status") == "FINISHED" and isinstance(row.get(column), str) and row.get(stage_column) in MODEL_STAGES:
                    ids.append(row["run_id"])
                    variants[row["run_id"]] = row[column]
    ids = list(dict.fromkeys(ids))
    dense_ref = (params["dense"] or "auto").strip()
    if dense_ref != "auto" and dense_ref not in ids:
        ids.insert(0, dense_ref)
    if not ids:
        raise MaskDMError("no model runs: pass model_run_ids=<id>,<id>,... or run_id=<driver run ID>")
    ups = [get_upstream(i, MODEL_STAGES, "model", "model_run_ids") for i in ids]
    if dense_ref == "auto":
        found = [u for u in ups if variants.get(u.run_id) == "dense"] or [
            u for u in ups if u.stage == "prune" and _ratio(u.params.get("pruning_ratio")) == 0.0
        ]
        if not found:
            raise MaskDMError("dense=auto: no prune run with pruning_ratio 0 among the model runs; pass dense=<run ID of the dense model>")
        dense = found[0]
    else:
        dense = next(u for u in ups if u.run_id == get_upstream(dense_ref, MODEL_STAGES, "model", "dense").run_id)
    ups.remove(dense)
    return [dense, *ups], dense


def _ratio(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_has_masks(up: Upstream) -> None:
    """semi_structured serves pruned models: a run without a prune (ratio > 0) in its lineage has no masks."""
    prune_id = up.lineage.get("prune")
    ratio = _ratio(get_upstream(prune_id, ["prune"], None, "prune").params.get("pruning_ratio")) if prune_id else None
    if not ratio:
        raise MaskDMError(
            f"kernel=semi_structured: model run {up.run_id} ({up.stage}) has no masks (no pruned ancestor); "
            "it serves 2:4-pruned models: list pruned/finetuned runs, the dense one as dense=<run ID>"
        )


def set_threads(threads: str) -> int:
    count = positive_or_auto("threads", threads, "it is the CPU threads the timing runs on")
    if count is not None:
        torch.set_num_threads(count)
    return torch.get_num_threads()


def kernel_of(up: Upstream, dense: Upstream, kernel: str) -> str:
    return "dense" if up.run_id == dense.run_id else kernel


def _metrics(prefix: str, timed: dict[str, speed.Timed]) -> dict[str, float]:
    metrics = {}
    for rid, t in timed.items():
        s = t.spread
        metrics.update({
            f"{prefix}_s/{rid}": s.median, f"{prefix}_s_q1/{rid}": s.q1, f"{prefix}_s_q3/{rid}": s.q3,
            f"{prefix}_s_min/{rid}": s.min, f"{prefix}_s_max/{rid}": s.max,
        })
    return metrics


def _ratios(name: str, timed: dict[str, speed.Timed]) -> dict[str, float]:
    return {
        key: value for rid, t in timed.items()
        for key, value in ((f"{name}/{rid}", t.ratio.value), (f"{name}_low/{rid}", t.ratio.low), (f"{name}_high/{rid}", t.ratio.high))
    }


def measure_models(models, dense, params, kernel, device, dtype) -> dict:
    from tqdm import tqdm

    from maskdm.ddpm.models import load_ddpm
    from maskdm.ddpm.sampling import make_run, prepare_unet, sample_batch

    fns, swapped_counts = {}, {}
    indices = list(range(params["batch_size"]))
    for up in models:
        ddpm = load_ddpm(str(up.download("model")))
        swapped = speed.prepare_kernel(ddpm.unet, kernel_of(up, dense, kernel), device, str(dtype).removeprefix("torch."))
        swapped_counts[up.run_id] = len(swapped)
        sampling = make_run(
            ddpm.unet, ddpm.scheduler, steps=params["ddim_steps"], seed=0, batch_size=params["batch_size"], device=device,
            mixed_precision=MIXED_PRECISION[dtype], channels_last="auto", compile=False, clip_sample=False, codec=ddpm.codec,
        )
        model = prepare_unet(ddpm.unet, sampling)
        fns[up.run_id] = lambda model=model, sampling=sampling: sample_batch(model, sampling, indices)
    with tqdm(total=params["repeats"], desc="speed rounds", unit="round") as bar:
        times = speed.measure(fns, params["repeats"], params["warmup"], timer=lambda fn: speed.time_call(fn, device),
                              progress=lambda done, total: bar.update(1))
    timed = speed.summarize(times, dense.run_id)
    metrics = {**_metrics("sample", timed), **_ratios("speedup", timed)}
    for rid, t in timed.items():
        metrics[f"images_per_s/{rid}"] = params["batch_size"] / t.spread.median
        metrics[f"semi_structured_layers/{rid}"] = swapped_counts[rid]
    return {"metrics": metrics, "sample_times": times, "order": speed.interleaved_order(list(fns), params["repeats"])}


def measure_served(models, dense, params, kernel, device, dtype) -> dict:
    """The registered form: packed bytes, pyfunc load time, pyfunc predict time per image."""
    from maskdm.registry import DDPMImageGenerator, PIPELINE_ARTIFACT
    from maskdm.ddpm.sparse_storage import folder_bytes, pack_pipeline_copy

    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="maskdm-speed-") as tmp:
        packed, loads, generators = {}, {}, {}
        for up in models:
            folder = up.download("model", Path(tmp) / "dense" / up.run_id)
            packed[up.run_id] = Path(tmp) / "packed" / up.run_id / PIPELINE_ARTIFACT
            pack_pipeline_copy(folder, packed[up.run_id])
            metrics[f"registered_bytes/{up.run_id}"] = folder_bytes(packed[up.run_id])
            metrics[f"dense_bytes/{up.run_id}"] = folder_bytes(folder)
            context = SimpleNamespace(
                artifacts={PIPELINE_ARTIFACT: str(packed[up.run_id])},
                model_config={"device": str(device), "batch_size": params["batch_size"], "kernel": kernel_of(up, dense, kernel),
                              "max_image_steps": params["batch_size"] * params["ddim_steps"]},
            )

            def load(context=context):
                generator = DDPMImageGenerator()
                generator.load_context(context)
                return generator

            loads[up.run_id] = load
            generators[up.run_id] = load()
        # Loading is CPU work (read, unpack, build) whatever the device: wall clock.
        load_times = speed.measure(loads, params["repeats"], 0, timer=lambda fn: speed.time_call(fn, "cpu"))
        request = pd.DataFrame({"num_images": [params["batch_size"]], "ddim_steps": [params["ddim_steps"]], "seed": [0]})
        predicts = {rid: (lambda g=g: g.predict(None, request)) for rid, g in generators.items()}
        predict_times = speed.measure(predicts, params["repeats"], params["warmup"], timer=lambda fn: speed.time_call(fn, device))
    load_timed = speed.summarize(load_times, dense.run_id)
    predict_timed = speed.summarize(predict_times, dense.run_id)
    metrics.update({**_metrics("load", load_timed), **_ratios("load_speedup", load_timed)})
    metrics.update(_ratios("served_speedup", predict_timed))
    for rid, t in predict_timed.items():
        metrics[f"served_s_per_image/{rid}"] = t.spread.median / params["batch_size"]
    return {"metrics": metrics, "load_times": load_times, "predict_times": predict_times}
