"""Latent diffusion: a tiny LDM pipeline (VQModel + UNet saved with save_pretrained) through every stage.

The autoencoder here has random weights: what is tested is the plumbing (latents in, decoded images
out, the cache, the lineage), never image quality.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from inception_fixture import _planted_torch_home  # noqa: F401
from mlflow.tracking import MlflowClient
from torch.utils.data import Subset

from conftest import mlflow_run, run_whole_chain, shapes_image_folder, tracking_store
from maskdm.ddpm.data import load_dataset, render_shapes
from maskdm.errors import MaskDMError
from maskdm.ddpm.latent import LATENTS_FILE, LatentCodec, LatentDataset, encode_dataset
from maskdm.ddpm.models import DDPM, default_scheduler, load_ddpm, pipeline_image_shape, save_ddpm
from maskdm.ddpm.sampling import make_run, sample_images, sample_tensors, to_uint8
from maskdm.tracking import STAGE_TAG, UPSTREAM_TAG_PREFIX

#: Images 16x16 -> latents 3x8x8 (two encoder levels).
IMAGE_SIZE = 16


def tiny_vqvae():
    from diffusers import VQModel

    torch.manual_seed(1)
    return VQModel(
        in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4, num_vq_embeddings=32, sample_size=IMAGE_SIZE,
    )


def tiny_latent_ddpm() -> DDPM:
    from conftest import tiny_unet

    return DDPM(tiny_unet(resolution=IMAGE_SIZE // 2), default_scheduler(), tiny_vqvae())


@pytest.fixture
def ldm_dir(tmp_path):
    return save_ddpm(tiny_latent_ddpm(), tmp_path / "tiny_ldm")


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    """Local copies of latent caches go under $MASKDM_DATA_DIR/latents: here, not in the home folder."""
    monkeypatch.setenv("MASKDM_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_an_autoencoder_config_without_a_scale_means_unscaled_latents(ldm_dir, tmp_path):
    # CompVis/ldm-celebahq-256's autoencoder names no scaling_factor; diffusers would fill in
    # 0.18215, Stable Diffusion's, and decode noise.
    config_file = ldm_dir / "vqvae" / "config.json"
    config = json.loads(config_file.read_text())
    assert config.pop("scaling_factor") == pytest.approx(0.18215)
    config_file.write_text(json.dumps(config))
    ddpm = load_ddpm(str(ldm_dir))
    assert ddpm.codec.scaling_factor == 1.0
    saved = save_ddpm(ddpm, tmp_path / "resaved")  # and every model/ made from it says so
    assert json.loads((saved / "vqvae" / "config.json").read_text())["scaling_factor"] == 1.0
    assert load_ddpm(str(saved)).codec.scaling_factor == 1.0
    # A scale the config names is kept.
    assert load_ddpm(str(save_ddpm(tiny_latent_ddpm(), tmp_path / "named"))).codec.scaling_factor == pytest.approx(0.18215)


def test_a_latent_pipeline_saves_and_loads_with_its_autoencoder(ldm_dir):
    from diffusers import LDMPipeline

    index = json.loads((ldm_dir / "model_index.json").read_text())
    assert index["_class_name"] == "LDMPipeline" and index["vqvae"][1] == "VQModel"
    ddpm = load_ddpm(str(ldm_dir))
    assert ddpm.is_latent and ddpm.resolution == IMAGE_SIZE and ddpm.channels == 3
    assert int(ddpm.unet.config.sample_size) == IMAGE_SIZE // 2
    original = tiny_vqvae().state_dict()
    assert all(torch.equal(original[k], v) for k, v in ddpm.vqvae.state_dict().items())
    assert not any(p.requires_grad for p in ddpm.vqvae.parameters())  # frozen
    assert pipeline_image_shape(ldm_dir) == (3, IMAGE_SIZE, IMAGE_SIZE)
    # diffusers' own pipeline opens what we save and makes images of the decoded size.
    images = LDMPipeline.from_pretrained(ldm_dir)(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_a_pixel_pipeline_is_not_latent(tiny_model_dir):
    ddpm = load_ddpm(str(tiny_model_dir))
    assert not ddpm.is_latent and ddpm.codec is None and ddpm.resolution == 16
    assert pipeline_image_shape(tiny_model_dir) == (3, 16, 16)


def test_a_missing_autoencoder_is_one_line(ldm_dir):
    shutil.rmtree(ldm_dir / "vqvae")
    with pytest.raises(MaskDMError, match=r"names an autoencoder \(vqvae\).*no vqvae/ folder"):
        load_ddpm(str(ldm_dir))


def test_an_autoencoder_without_weights_is_one_line(ldm_dir):
    for weights in (ldm_dir / "vqvae").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(MaskDMError, match=r"autoencoder \(vqvae/\) cannot be loaded"):
        load_ddpm(str(ldm_dir))


def test_a_unet_that_does_not_fit_the_latents_is_one_line(tmp_path):
    from conftest import tiny_unet

    folder = save_ddpm(DDPM(tiny_unet(resolution=8, channels=4), default_scheduler(), tiny_vqvae()), tmp_path / "mismatch")
    with pytest.raises(MaskDMError, match="UNet takes 4 channels but the autoencoder's latents have 3"):
        load_ddpm(str(folder))


def test_codec_follows_the_diffusers_scaling_convention():
    vqvae = tiny_vqvae().eval()
    codec = LatentCodec(vqvae)
    images = torch.from_numpy(render_shapes(4, seed=0, resolution=IMAGE_SIZE)[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = codec.encode(images)
    assert latents.shape == (4, 3, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    with torch.no_grad():
        assert torch.allclose(latents, vqvae.encode(images).latents * vqvae.config.scaling_factor)
        assert torch.allclose(codec.decode(latents), vqvae.decode(latents / vqvae.config.scaling_factor).sample)
    assert codec.image_shape((3, 8, 8)) == (3, IMAGE_SIZE, IMAGE_SIZE)
    other = LatentCodec(tiny_vqvae())
    assert codec.digest() == other.digest()
    with tempfile.TemporaryDirectory() as folder:  # where it was loaded from is not part of it
        vqvae.save_pretrained(folder)
        assert LatentCodec(type(vqvae).from_pretrained(folder)).digest() == codec.digest()
    with torch.no_grad():
        next(other.vqvae.parameters()).add_(1e-3)
    assert codec.digest() != other.digest()  # a changed autoencoder is a new cache


def test_encoded_dataset_reads_back_the_latents_of_every_image(tmp_path):
    codec = LatentCodec(tiny_vqvae())
    images = Subset(load_dataset("shapes", IMAGE_SIZE, split="eval"), range(70))
    folder = encode_dataset(images, codec, tmp_path / "latents", batch_size=32, progress=False)  # 70 = 32 + 32 + 6
    assert sorted(p.name for p in folder.iterdir()) == ["labels.npy", "latents.npy"]
    dataset = LatentDataset(folder)
    assert len(dataset) == 70 and dataset.latent_shape == (3, 8, 8)
    for i in (0, 31, 32, 69):  # batch edges
        latent, label = dataset[i]
        assert torch.allclose(latent, codec.encode(images[i][0][None])[0], atol=1e-6)
        assert label == images[i][1]
    with pytest.raises(IndexError):
        dataset[70]
    # Loader processes read the images; the files are the same byte for byte.
    again = encode_dataset(images, codec, tmp_path / "with_workers", batch_size=32, progress=False, workers=2)
    for name in (LATENTS_FILE, "labels.npy"):
        assert (again / name).read_bytes() == (folder / name).read_bytes()
    # A cut-off file is one line, not a short tensor.
    data = (folder / LATENTS_FILE).read_bytes()
    (folder / LATENTS_FILE).write_bytes(data[: len(data) - 10])
    with pytest.raises(MaskDMError, match="truncated at latent 69"):
        LatentDataset(folder)[69]


def test_samples_of_a_latent_model_are_its_decoded_latents():
    ddpm = tiny_latent_ddpm()
    latents = sample_tensors(ddpm.unet, make_run(ddpm.unet, ddpm.scheduler, steps=3, batch_size=2), range(3))
    assert latents.shape == (3, 3, 8, 8)
    images = sample_images(ddpm.unet, ddpm.scheduler, range(3), steps=3, batch_size=2, codec=ddpm.codec)
    assert images.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(images, to_uint8(ddpm.codec.decode(latents)))


@pytest.fixture
def shapes_folder(tmp_path):
    """An image folder of 48 shapes at 16x16: small enough to encode and score in a test."""
    return shapes_image_folder(tmp_path / "shapes_png", 48, IMAGE_SIZE)


def test_stage_dataset_encodes_once_per_key_and_reuses_the_cache(tracking, ldm_dir, shapes_folder, data_dir):
    from entrypoints.datasets import LATENT_CACHE_STAGE, stage_dataset

    ddpm = load_ddpm(str(ldm_dir))
    first = stage_dataset(ddpm, shapes_folder, "train")
    assert isinstance(first, LatentDataset) and len(first) == 48

    def cache_runs():
        return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{STAGE_TAG}` = '{LATENT_CACHE_STAGE}'", output_format="list")

    assert len(cache_runs()) == 1
    again = stage_dataset(ddpm, shapes_folder, "train")
    assert len(cache_runs()) == 1  # found by its key, not encoded again
    assert torch.equal(again[7][0], first[7][0])
    (run,) = cache_runs()
    assert run.data.params["latent_shape"] == "3x8x8" and run.data.metrics["num_images"] == 48
    # An image folder's eval split is the same images: the same latents, no second cache.
    assert torch.equal(stage_dataset(ddpm, shapes_folder, "eval")[7][0], first[7][0])
    assert len(cache_runs()) == 1
    # One local copy per cache run, however many stages read it.
    assert [p.name for p in (data_dir / "latents").iterdir()] == [run.info.run_id]
    # shapes' eval split is other images: another cache.
    evaluation = stage_dataset(ddpm, "shapes", "eval")
    assert len(evaluation) == 2000 and len(cache_runs()) == 2
    # An image added to the folder is another dataset: not the stale latents.
    folder = Path(shapes_folder.split(":", 1)[1])
    shutil.copy(folder / "all" / "000.png", folder / "all" / "extra.png")
    grown = stage_dataset(ddpm, shapes_folder, "train")
    assert len(grown) == 49 and len(cache_runs()) == 3
    # A pixel model gets the images themselves.
    pixels = stage_dataset(DDPM(ddpm.unet, ddpm.scheduler), shapes_folder, "train")
    assert pixels[0][0].shape == (3, 8, 8) and not isinstance(pixels, LatentDataset)


# --- end to end, through MLflow Projects -----------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_every_stage_of_a_latent_pipeline_through_mlflow_projects(tmp_path, ldm_dir, shapes_folder, _planted_torch_home, monkeypatch, warm_stages):
    monkeypatch.setenv("TORCH_HOME", str(_planted_torch_home))
    with tracking_store(tmp_path) as uri:
        client = MlflowClient(uri)
        ids = run_whole_chain(ldm_dir, shapes_folder, uri)
        prune, baseline, trained, finetuned = ids["prune"], ids["baseline_loss"], ids["train_masks"], ids["finetune"]
        sampled, scored = ids["sample"], ids["fid"]

        caches = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], f"tags.`{STAGE_TAG}` = 'latent_cache'"
        )
        # An image folder's eval split is its training images, unflipped, and latents are never
        # flipped: one cache serves both splits of the whole chain.
        (cache,) = caches
        assert cache.data.params["split"] == "train" and cache.data.metrics["num_images"] == 48
        for run_id, splits in ((prune, ("eval",)), (baseline, ("train",)), (trained, ("train", "eval")), (finetuned, ("train", "eval"))):
            tags = client.get_run(run_id).data.tags
            for split in splits:
                assert tags[f"maskdm.latent_cache.{split}"] == cache.info.run_id, (run_id, split)

        # Every model stage saved the whole latent pipeline; the finetuned one keeps the autoencoder
        # bit for bit and its UNet as sparse as the masks.
        original = load_ddpm(str(ldm_dir))
        for run_id in (prune, trained, finetuned):
            folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model", dst_path=str(tmp_path / run_id))
            model = load_ddpm(folder)
            assert model.is_latent
            assert all(torch.equal(original.vqvae.state_dict()[k], v) for k, v in model.vqvae.state_dict().items())
        assert client.get_run(finetuned).data.metrics["sparsity"] >= 0.5 - 1e-6

        path = mlflow.artifacts.download_artifacts(run_id=sampled, artifact_path="samples.npz", dst_path=str(tmp_path / "samples"))
        with np.load(path, allow_pickle=False) as f:
            assert f["images"].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)  # decoded, not latents
        fid_run = client.get_run(scored)
        assert np.isfinite(fid_run.data.metrics["fid_inception_64"])
        assert fid_run.data.tags[f"{UPSTREAM_TAG_PREFIX}finetune"] == finetuned

        # promote registers the finetuned latent pipeline; the registered model generates decoded images.
        from click.testing import CliRunner

        from entrypoints.promote import command as promote

        done = CliRunner().invoke(promote, ["--finetune_run_id", finetuned, "--registered_model", "tiny-ldm"])
        assert done.exit_code == 0, done.output
        (version,) = client.search_model_versions("name = 'tiny-ldm'")
        assert version.tags["finetune_run_id"] == finetuned
        generator = mlflow.pyfunc.load_model("models:/tiny-ldm@champion")
        images = generator.predict(pd.DataFrame({"num_images": [2], "ddim_steps": [1], "seed": [0]}))
        assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8


def test_latent_pipeline_missing_its_autoencoder_fails_the_run(tracking, ldm_dir, tmp_path):
    shutil.rmtree(ldm_dir / "vqvae")
    done = mlflow_run("prune", tracking, tmp_path, model=ldm_dir, dataset="shapes", pruning_ratio="0.5")
    assert done.returncode != 0
    (line,) = [l for l in done.stderr.splitlines() if l.startswith("maskdm: error:")]
    assert "names an autoencoder (vqvae)" in line
    (run,) = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{STAGE_TAG}` = 'prune'", output_format="list")
    assert run.info.status == "FAILED"


def test_the_registered_generator_makes_decoded_images(ldm_dir):
    from maskdm.registry import GenerationRequest, generate

    ddpm = load_ddpm(str(ldm_dir))
    images = generate(ddpm, [GenerationRequest(num_images=2, ddim_steps=2, seed=0)], batch_size=2)
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8


def test_ldm_celebahq_preset_needs_an_image_folder(tmp_path):
    from maskdm import driver

    with pytest.raises(MaskDMError, match="preset 'ldm-celebahq' has no dataset of its own: pass dataset=imagefolder:"):
        driver.resolve_config("ldm-celebahq")
    config = driver.resolve_config("ldm-celebahq", dataset=f"imagefolder:{tmp_path}")
    assert config.model == "CompVis/ldm-celebahq-256" and config.dataset == f"imagefolder:{tmp_path}"
    # FID against the same folder (from the lineage), not the paper preset's CIFAR-10.
    assert "reference" not in config.stages["fid"] and config.stages["fid"]["features"] == "inception"
    assert driver.resolve_config("paper").stages["fid"]["reference"] == "cifar10"  # the paper preset is untouched
    stages = [step.stage for step in driver.build_plan(config)]
    assert "pretrain" not in stages and stages.count("prune") == 4  # dense + 3 ratios


def _hub_cache_with(folder, cache, repo: str = "maskdm-test/tiny-ldm"):
    """``folder`` laid out as huggingface_hub's cache holds a downloaded repo (offline loading reads it)."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(folder, root / "snapshots" / commit)
    return repo, root / "snapshots" / commit


def test_a_latent_pipeline_loads_from_the_hub_cache(ldm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo, snapshot = _hub_cache_with(ldm_dir, tmp_path / "hub")
    ddpm = load_ddpm(repo, cache_dir=str(tmp_path / "hub"))
    assert ddpm.is_latent and ddpm.resolution == IMAGE_SIZE
    shutil.rmtree(snapshot / "vqvae")
    with pytest.raises(MaskDMError, match=r"latent pipeline 'maskdm-test/tiny-ldm' names an autoencoder \(vqvae\) that cannot be fetched"):
        load_ddpm(repo, cache_dir=str(tmp_path / "hub"))
    # A pipeline repo (unet/) whose index cannot be read is one line, not a pixel model.
    (snapshot / "model_index.json").unlink()
    with pytest.raises(MaskDMError, match=r"cannot read the pipeline index \(model_index.json\) of 'maskdm-test/tiny-ldm'"):
        load_ddpm(repo, cache_dir=str(tmp_path / "hub"))
