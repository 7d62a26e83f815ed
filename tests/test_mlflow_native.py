"""MLflow's own features on the stage runs: dataset inputs with content digests and contexts,
system metrics (on by default for the heavy stages, off by MASKDM_SYSTEM_METRICS=false), and
images logged over steps (training previews, train_masks' per-layer flips)."""

from __future__ import annotations

import shutil

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import shapes_image_folder, tiny_unet, tracking_store
from entrypoints.cli import cli
from inception_fixture import _planted_torch_home  # noqa: F401
from maskdm import dataset_inputs
from maskdm.ddpm.models import DDPM, default_scheduler, save_ddpm
from maskdm.tracking import STAGE_TAG


def invoke(*args: str) -> str:
    """Run a stage in process; its run ID."""
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, (result.output, result.stderr)
    stage = args[0]
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{STAGE_TAG}` = '{stage}'",
                              order_by=["attributes.start_time DESC"], output_format="list", max_results=1)
    return runs[0].info.run_id


def inputs_of(run_id: str) -> dict[str, tuple[str, str]]:
    """context -> (dataset name, digest), for every dataset input of a run (one per context here)."""
    found = {}
    for item in MlflowClient().get_run(run_id).inputs.dataset_inputs:
        context = next(t.value for t in item.tags if t.key == "mlflow.data.context")
        assert context not in found, f"two {context} inputs on one run"
        found[context] = (item.dataset.name, item.dataset.digest)
    return found


def system_metric_keys(run_id: str) -> set[str]:
    return {k for k in MlflowClient().get_run(run_id).data.metrics if k.startswith("system/")}


def image_steps(run_id: str, key: str) -> list[int]:
    """The steps at which ``key`` was logged with mlflow.log_image (its files under images/)."""
    steps = set()
    for item in MlflowClient().list_artifacts(run_id, "images"):
        name = item.path.split("/")[-1]
        if name.startswith(f"{key}+step+") and name.endswith(".png"):  # <key>+step+<step>+timestamp+...
            steps.add(int(name.split("+")[2]))
    return sorted(steps)


@pytest.fixture(scope="module")
def store(tmp_path_factory, _planted_torch_home):
    root = tmp_path_factory.mktemp("native")
    patch = pytest.MonkeyPatch()
    # Short sampling so that even seconds-long stages record system metrics: MLflow publishes a
    # sample only after one full interval (and a run lookup), and drops what a run ending sooner
    # collected, so under load a 0.2 s interval left a seconds-long stage without any.
    patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    patch.setenv("MASKDM_DATA_DIR", str(root / "data"))
    patch.setenv("TORCH_HOME", str(_planted_torch_home))
    patch.delenv("MASKDM_SYSTEM_METRICS", raising=False)
    with tracking_store(root):
        folder = shapes_image_folder(root / "images", 48, 16)
        yield root, save_ddpm(DDPM(tiny_unet(), default_scheduler()), root / "tiny_model"), folder
    patch.undo()


@pytest.fixture(scope="module")
def chain(store):
    """Every stage from prune to fid on an image folder, in process, with tiny settings."""
    _, model_dir, folder = store
    ids = {}
    ids["prune"] = invoke("prune", "--model", str(model_dir), "--dataset", folder, "--pruning_ratio", "0.5",
                          "--pruner", "taylor", "--taylor_batches", "2", "--taylor_batch_size", "8")
    ids["extract_masks"] = invoke("extract_masks", "--prune_run_id", ids["prune"])
    ids["baseline_loss"] = invoke("baseline_loss", "--masks_run_id", ids["extract_masks"], "--dataset_size", "32", "--batch_size", "8")
    ids["train_masks"] = invoke("train_masks", "--baseline_run_id", ids["baseline_loss"], "--max_step", "6", "--accumulation", "2",
                                "--heldout_size", "16", "--eval_every", "2", "--lr", "30")
    ids["finetune"] = invoke("finetune", "--masks_run_id", ids["train_masks"], "--num_iters", "4", "--train_batch_size", "8",
                             "--save_model_steps", "2")
    ids["sample"] = invoke("sample", "--model_run_id", ids["finetune"], "--total_samples", "8", "--batch_size", "4", "--ddim_steps", "2")
    ids["fid"] = invoke("fid", "--sample_run_id", ids["sample"], "--dims", "64")
    return ids


def test_every_stage_logs_the_datasets_it_read(store, chain):
    root, _, folder = store
    name = f"imagefolder:{(root / 'images').name}"
    prune, baseline, masks, finetune, fid = (inputs_of(chain[s]) for s in ("prune", "baseline_loss", "train_masks", "finetune", "fid"))
    assert set(prune) == {"evaluation", "calibration"}
    assert set(baseline) == {"training"}
    assert set(masks) == {"training", "heldout", "evaluation"}
    assert set(finetune) == {"training", "evaluation"}
    assert set(fid) == {"samples", "fid_reference"}
    assert inputs_of(chain["extract_masks"]) == {} and inputs_of(chain["sample"]) == {}  # they read no data

    # The whole folder: one digest, whichever split and stage (an image folder's eval split is its images).
    folder_digest = dataset_inputs.folder_digest(folder.split(":", 1)[1])
    for inputs, context in ((prune, "evaluation"), (masks, "evaluation"), (finetune, "training"), (finetune, "evaluation"),
                            (fid, "fid_reference")):
        assert inputs[context][1] == folder_digest, context
    assert finetune["training"][0] == f"{name}:train" and finetune["evaluation"][0] == f"{name}:eval"
    # The replayed batches: train_masks reads the baseline's batches, so the same digest; the held-out
    # and taylor's batches are other images.
    assert masks["training"] == baseline["training"] and masks["training"][0] == f"{name}:train[replay]"
    assert len({masks["training"][1], masks["heldout"][1], prune["calibration"][1], folder_digest}) == 4
    # fid's samples: the sample run's samples.npz, by its bytes.
    local = mlflow.artifacts.download_artifacts(run_id=chain["sample"], artifact_path="samples.npz", dst_path=str(root / "dl"))
    assert fid["samples"][1] == dataset_inputs.file_digest(local)


def test_the_same_images_give_the_same_digest_and_a_changed_image_another(store, tmp_path):
    _, model_dir, folder = store
    source = folder.split(":", 1)[1]
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)

    def prune_eval_digest(dataset: str) -> str:
        run_id = invoke("prune", "--model", str(model_dir), "--dataset", dataset, "--pruning_ratio", "0.3")
        return inputs_of(run_id)["evaluation"][1]

    first = prune_eval_digest(folder)
    assert prune_eval_digest(folder) == first
    assert prune_eval_digest(f"imagefolder:{copy}") == first  # same files elsewhere (the path is the source, not the digest)
    image = copy / "all" / "007.png"
    pixels = Image.open(image).convert("RGB")
    pixels.putpixel((3, 3), tuple(255 - c for c in pixels.getpixel((3, 3))))
    pixels.save(image)
    assert prune_eval_digest(f"imagefolder:{copy}") != first


def test_shapes_digest_is_the_rendered_pixels_and_its_cache_agrees(store):
    from maskdm.ddpm.data import load_dataset

    loaded = load_dataset("shapes", 16, split="eval", augment=False)
    fresh = dataset_inputs.dataset_digest("shapes", "eval", 16, loaded)
    assert dataset_inputs.dataset_digest("shapes", "eval", 16) == fresh  # computed, then cached
    assert dataset_inputs.dataset_digest("shapes", "eval", 16) == fresh  # from the cache
    assert dataset_inputs.dataset_digest("shapes", "train", 16) != fresh
    assert dataset_inputs.dataset_digest("shapes", "eval", 8) != fresh


def test_images_are_logged_over_steps(chain):
    assert image_steps(chain["finetune"], "preview") == [2, 4]
    steps = image_steps(chain["train_masks"], "mask_flips")
    assert steps[0] == 0 and steps[-1] == 6 and len(steps) >= 3
    # The checkpoints' grids stay artifacts too; the images are enlarged to 64 px (from 16).
    grid = mlflow.artifacts.download_artifacts(run_id=chain["finetune"], artifact_path="samples/step-4.png")
    assert Image.open(grid).size == (2 + 8 * 66, 2 + 8 * 66)


def test_system_metrics_on_heavy_stages_by_default_and_off_when_asked(store, chain, monkeypatch):
    for stage in ("baseline_loss", "train_masks", "finetune", "sample", "fid"):
        keys = system_metric_keys(chain[stage])
        assert "system/cpu_utilization_percentage" in keys and "system/system_memory_usage_megabytes" in keys, stage
    assert system_metric_keys(chain["prune"]) == set()  # not a heavy stage

    pretrain = ("pretrain", "--arch", "tiny", "--resolution", "16", "--num_iters", "4", "--train_batch_size", "8",
                "--save_model_steps", "2", "--lr_warmup_steps", "0")
    on = invoke(*pretrain)
    assert "system/cpu_utilization_percentage" in system_metric_keys(on)
    assert image_steps(on, "preview") == [2, 4]
    assert set(inputs_of(on)) == {"training", "evaluation"}
    assert inputs_of(on)["training"] == ("shapes:train", dataset_inputs.dataset_digest("shapes", "train", 16))
    monkeypatch.setenv("MASKDM_SYSTEM_METRICS", "false")
    off = invoke(*pretrain)
    assert system_metric_keys(off) == set()
    assert inputs_of(off) == inputs_of(on)  # the same data, the same digests, in another run


def test_a_dataset_logged_by_another_run_at_the_same_moment_is_linked_not_a_failure(tracking, monkeypatch):
    """Two runs logging one dataset at once: MLflow's store inserts its row for both, and the
    second insert fails on the unique key (seen with four drivers on one tracking server). Here the
    other run's row is written between this run's look and its insert; logging again links it."""
    from mlflow.exceptions import MlflowException

    real, calls = mlflow.log_input, []

    def racing(dataset, **kwargs):
        calls.append(dataset.name)
        if len(calls) == 1:
            with mlflow.start_run(nested=True):  # the other run, first to insert the row
                real(dataset, **kwargs)
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                  "datasets.name, datasets.digest")
        return real(dataset, **kwargs)

    monkeypatch.setattr(dataset_inputs.mlflow, "log_input", racing)
    with mlflow.start_run() as run:
        digest = dataset_inputs.log_dataset("shapes", "eval", dataset_inputs.EVALUATION, 16)
    assert len(calls) == 2 and inputs_of(run.info.run_id) == {dataset_inputs.EVALUATION: ("shapes:eval", digest)}

    # Any other failure is not retried.
    calls.clear()

    def failing(dataset, **kwargs):
        calls.append(dataset.name)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run gone")

    monkeypatch.setattr(dataset_inputs.mlflow, "log_input", failing)
    with mlflow.start_run(), pytest.raises(MlflowException, match="run gone"):
        dataset_inputs.log_dataset("shapes", "eval", dataset_inputs.EVALUATION, 16)
    assert calls == ["shapes:eval"]
