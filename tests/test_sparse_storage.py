"""Sparse storage: bit-exact round trips, real training checkpoints packed and resumed, the
registered model stored sparse, the dense export, and the bytes saved at 50 % and 2:4."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from conftest import REPO
from maskdm import registry
from maskdm.ddpm import sparse_storage as ss
from maskdm.errors import MaskDMError
from maskdm.ddpm.models import DDPM, build_unet, default_scheduler, load_ddpm, save_ddpm
from maskdm.method.pruning import PruneConfig, prune
from maskdm.ddpm.training import train_ddpm
from test_training import BASE, fresh_ddpm, half_masks


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert ss.bit_equal(a[name], b[name]), name


# --------------------------------------------------------------------------------------------
# Tensors and one file


def awkward_tensors() -> dict[str, torch.Tensor]:
    """-0.0 among the zeros, NaN payloads, inf, subnormals, several dtypes."""
    gen = torch.Generator().manual_seed(0)
    half_zero = torch.randn(7, 5, generator=gen) * (torch.rand(7, 5, generator=gen) < 0.5)  # -0.0 where negative
    half_zero[0, 1:3] = torch.tensor([float("inf"), 1e-45])
    nan_payload = torch.tensor([0x7FC00001, 0, 0, 0x7F800001], dtype=torch.int32).view(torch.float32)
    return {
        "half_zero": half_zero,
        "nan_payload": nan_payload,
        "bf16": (torch.randn(33, generator=gen) * (torch.arange(33) % 3 == 0)).to(torch.bfloat16),
        "fp16": torch.zeros(9, dtype=torch.float16),
        "fp64": torch.tensor([0.0, -0.0, 2.5, 0.0], dtype=torch.float64),
        "few_zeros": torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]),  # 20 % zeros: below the threshold, dense
        "ints": torch.tensor([0, 0, 0, 5]),
        "flags": torch.tensor([True, False, False]),
        "scalar": torch.tensor(0.0),
    }


def test_pack_state_stores_values_and_bitmasks_and_unpacks_bit_exactly():
    tensors = awkward_tensors()
    stored, packing = ss.pack_state(tensors)

    assert set(packing) == {"half_zero", "nan_payload", "bf16", "fp16", "fp64", "scalar"}
    for name in ("few_zeros", "ints", "flags"):
        assert ss.bit_equal(stored[name], tensors[name]), name
    # Kept values in their dtype, 1 bit per entry, and 1 sign bit per zero where a zero is -0.0.
    half = tensors["half_zero"]
    zeros = int((half == 0).sum())
    negative_zeros = int(((half == 0) & torch.signbit(half)).sum())
    assert 0 < negative_zeros < zeros
    assert stored["half_zero::sparse_values"].dtype == torch.float32
    assert stored["half_zero::sparse_values"].numel() == half.numel() - zeros
    assert stored["half_zero::sparse_mask"].dtype == torch.uint8 and stored["half_zero::sparse_mask"].numel() == 5  # ceil(35 / 8)
    assert stored["half_zero::sparse_negzero"].numel() == (zeros + 7) // 8 and packing["half_zero"]["negzero"]
    assert "nan_payload::sparse_negzero" not in stored and not packing["nan_payload"]["negzero"]
    assert stored["nan_payload::sparse_values"].numel() == 2
    assert packing["bf16"] == {"shape": [33], "dtype": "bfloat16", "negzero": bool(torch.signbit(tensors["bf16"][tensors["bf16"] == 0]).any())}

    unpacked = ss.unpack_state(stored, packing)
    assert list(unpacked) == list(tensors)
    assert_same_tensors(unpacked, tensors)
    assert torch.equal(torch.signbit(unpacked["half_zero"]), torch.signbit(half))
    assert torch.signbit(unpacked["fp64"][1]) and not torch.signbit(unpacked["fp64"][0])

    # The threshold decides: at 1.0 only an all-zero tensor packs, at 0.0 every float tensor with a zero.
    assert set(ss.pack_state(tensors, min_zero_fraction=1.0)[1]) == {"fp16", "scalar"}
    assert "few_zeros" in ss.pack_state(tensors, min_zero_fraction=0.0)[1]
    with pytest.raises(MaskDMError, match="min_zero_fraction"):
        ss.pack_state(tensors, min_zero_fraction=1.5)
    with pytest.raises(MaskDMError, match="reserved suffix"):
        ss.pack_state({"w::sparse_mask": torch.zeros(3)})


def test_save_and_load_sparse_keep_metadata_and_read_plain_files(tmp_path):
    tensors = awkward_tensors()
    path = tmp_path / "t.safetensors"
    packing = ss.save_sparse(tensors, path, metadata={"format": "pt"})
    assert "half_zero" in packing
    loaded, metadata = ss.load_sparse_with_metadata(path)
    assert metadata == {"format": "pt"}
    assert_same_tensors(loaded, tensors)
    assert_same_tensors(ss.load_sparse(path), tensors)
    # A plain safetensors file loads as it is.
    save_file({"w": torch.zeros(4)}, str(tmp_path / "plain.safetensors"), metadata={"k": "v"})
    plain, plain_meta = ss.load_sparse_with_metadata(tmp_path / "plain.safetensors")
    assert plain_meta == {"k": "v"} and torch.equal(plain["w"], torch.zeros(4))
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left beside it


def _tampered(tmp_path, change) -> Path:
    """A sparse file whose parts or header ``change`` edits (stored dict, header dict) in place."""
    stored, packing = ss.pack_state({"w": torch.tensor([0.0, 1.0, -0.0, 2.0, 0.0, 0.0])})
    header = {"maskdm_sparse.format": ss.FORMAT, "maskdm_sparse.version": "1",
              "maskdm_sparse.packed": json.dumps(packing), "maskdm_sparse.metadata": "null"}
    change(stored, header)
    path = tmp_path / "bad.safetensors"
    save_file(stored, str(path), metadata=header)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s, h: s.update({"w::sparse_values": torch.tensor([1.0])}), "holds 1 torch.float32 values for 2 kept"),
        (lambda s, h: s.update({"w::sparse_values": torch.tensor([1.0, 2.0], dtype=torch.float64)}), "values for 2 kept"),
        (lambda s, h: s.update({"w::sparse_mask": torch.tensor([0b01010001], dtype=torch.uint8)}), "mask bits set past"),
        (lambda s, h: h.update({"maskdm_sparse.packed": json.dumps({"w": {"shape": [6], "dtype": "float32"}})}), "zero signs its packing record does not mention"),
        (lambda s, h: s.update({"w::sparse_mask": torch.zeros(3, dtype=torch.uint8)}), "a mask of 3"),
        (lambda s, h: s.pop("w::sparse_mask"), "lacks its mask"),
        (lambda s, h: s.pop("w::sparse_negzero"), "lacks its zero signs"),
        (lambda s, h: s.update({"w::sparse_negzero": torch.tensor([0b01001], dtype=torch.uint8)}), "zero signs bits set past"),
        (lambda s, h: h.update({"maskdm_sparse.version": "2"}), "format version 2; this maskdm reads up to version 1"),
        (lambda s, h: h.update({"maskdm_sparse.packed": "{"}), "packing record is not a JSON object"),
        (lambda s, h: h.update({"maskdm_sparse.packed": json.dumps({"w": {"shape": [6], "dtype": "int64"}})}), "bad dtype"),
        (lambda s, h: h.update({"maskdm_sparse.packed": "{}"}), "packed part with no packing record"),
    ],
)
def test_a_corrupt_or_mismatched_file_is_a_one_line_error(tmp_path, change, message):
    path = _tampered(tmp_path, change)
    with pytest.raises(MaskDMError, match=message) as raised:
        ss.load_sparse(path)
    assert "\n" not in str(raised.value)


def test_a_truncated_or_missing_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "t.safetensors"
    ss.save_sparse({"w": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(MaskDMError, match="cannot read sparse tensors file"):
        ss.load_sparse(path)
    with pytest.raises(MaskDMError, match="does not exist"):
        ss.load_sparse(tmp_path / "missing.safetensors")


def test_a_torch_state_keeps_its_exact_structure(tmp_path):
    """Tuples stay tuples, int keys stay ints, inf and None survive: what torch.load gives back is equal."""
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.tensor([0.0, 0.5, 0.0, 0.0])}, 2: {},
                  # The moments of a channels_last model (the CUDA fast path) are channels_last.
                  3: {"exp_avg": (torch.randn(4, 3, 2, 2) * (torch.arange(48).reshape(4, 3, 2, 2) % 2)).contiguous(
                      memory_format=torch.channels_last)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "eps": float("inf"), "foreach": None, "params": [0, 2],
                          "$odd": "a key with a dollar"}],
    }
    torch.save(state, tmp_path / "optimizer.bin")
    packed = ss.pack_file(tmp_path / "optimizer.bin")
    assert packed.sparse == "optimizer.sparse.safetensors" and not (tmp_path / "optimizer.bin").exists()
    out = tmp_path / "out"
    out.mkdir()
    back = torch.load(ss.unpack_file(tmp_path / "optimizer.sparse.safetensors", out), weights_only=True)
    assert ss.objects_bit_equal(back, state)
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and list(back["state"]) == [0, 2, 3]
    moment = back["state"][3]["exp_avg"]
    assert moment.is_contiguous(memory_format=torch.channels_last) and not moment.is_contiguous()
    assert not ss.objects_bit_equal({"m": moment.contiguous()}, {"m": moment})  # the layout counts
    # The comparison itself notices a changed type or value.
    assert not ss.objects_bit_equal({**state, "param_groups": [{**state["param_groups"][0], "betas": [0.9, 0.999]}]}, state)
    assert not ss.objects_bit_equal({"t": torch.tensor([-0.0])}, {"t": torch.tensor([0.0])})

    # A file torch cannot read safely is a one-line error, and stays where it is.
    (tmp_path / "broken.bin").write_bytes(b"not a torch file")
    with pytest.raises(MaskDMError, match=r"cannot read .*broken.bin with torch.load\(weights_only=True\)") as raised:
        ss.pack_file(tmp_path / "broken.bin")
    assert "\n" not in str(raised.value) and (tmp_path / "broken.bin").exists()
    assert not (tmp_path / "broken.sparse.safetensors").exists()

    # Something that is not tensors, numbers, strings and containers stays dense, untouched.
    torch.save({"d": torch.float32}, tmp_path / "odd.bin")
    assert ss.pack_file(tmp_path / "odd.bin") is None and (tmp_path / "odd.bin").exists()


# --------------------------------------------------------------------------------------------
# Training checkpoints


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A real checkpoint of train_ddpm (tiny UNet, random 50 % masks), and its masks."""
    tmp = tmp_path_factory.mktemp("ckpt")
    images = TensorDataset(torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    ddpm = fresh_ddpm()
    masks = half_masks(ddpm.unet)
    config = replace(BASE, num_iters=3, save_model_steps=3)
    train_ddpm(ddpm, images, config, masks=masks, checkpoint_dir=tmp / "run")
    written = tmp / "run" / "checkpoint-3"
    # train_ddpm stores its checkpoints packed; the tests below start from the dense form accelerate wrote.
    assert sorted(p.name for p in written.iterdir()) == [
        "ema.json", "ema.sparse.safetensors", "model.sparse.safetensors", "optimizer.sparse.safetensors",
        "random_states_0.pkl", "scheduler.bin",
    ]
    return ss.unpack_folder(written, tmp / "dense" / "checkpoint-3"), masks, images, config


def test_a_packed_checkpoint_unpacks_bit_exactly_and_resumes_as_the_dense_one(trained_checkpoint, tmp_path):
    checkpoint, masks, images, config = trained_checkpoint
    dense = shutil.copytree(checkpoint, tmp_path / "dense")
    packed_dir = shutil.copytree(checkpoint, tmp_path / "packed")

    packed = {p.dense: p for p in ss.pack_checkpoint(packed_dir)}

    assert set(packed) == {"model.safetensors", "ema.safetensors", "optimizer.bin"}
    assert sorted(p.name for p in packed_dir.iterdir()) == [
        "ema.json", "ema.sparse.safetensors", "model.sparse.safetensors", "optimizer.sparse.safetensors",
        "random_states_0.pkl", "scheduler.bin",
    ]
    for p in packed.values():
        assert p.sparse_bytes < p.dense_bytes and (packed_dir / p.sparse).stat().st_size == p.sparse_bytes, p
    # Every masked layer's weight is stored packed in the model, the EMA and both AdamW moments.
    for sparse_name in ("model.sparse.safetensors", "ema.sparse.safetensors"):
        with safe_open(str(packed_dir / sparse_name), framework="pt") as f:
            packing = json.loads(f.metadata()["maskdm_sparse.packed"])
        assert {f"{n}.parametrizations.weight.original" for n in masks} <= set(packing), sparse_name
    with safe_open(str(packed_dir / "optimizer.sparse.safetensors"), framework="pt") as f:
        packing = json.loads(f.metadata()["maskdm_sparse.packed"])
    assert sum(k.endswith(".exp_avg") for k in packing) >= len(masks) and sum(k.endswith(".exp_avg_sq") for k in packing) >= len(masks)

    # Unpacked: every file as the dense checkpoint held it, tensors and metadata bit for bit.
    with ss.dense_folder(packed_dir) as unpacked:
        assert unpacked != packed_dir
        assert sorted(p.name for p in unpacked.iterdir()) == sorted(p.name for p in dense.iterdir())
        for original in dense.iterdir():
            rebuilt = unpacked / original.name
            if original.suffix == ".safetensors":
                with safe_open(str(original), framework="pt") as a, safe_open(str(rebuilt), framework="pt") as b:
                    assert a.metadata() == b.metadata()
                    assert_same_tensors({k: a.get_tensor(k) for k in a.keys()}, {k: b.get_tensor(k) for k in b.keys()})
            elif original.name == "optimizer.bin":
                assert ss.objects_bit_equal(torch.load(original, weights_only=True), torch.load(rebuilt, weights_only=True))
            else:
                assert original.read_bytes() == rebuilt.read_bytes(), original.name
        # Resuming from it trains on exactly as resuming from the dense checkpoint does.
        longer = replace(config, num_iters=5, save_model_steps=100)
        from_packed = train_ddpm(fresh_ddpm(), images, longer, masks=masks, resume_from=unpacked)
    assert not unpacked.exists()  # the temporary dense copy is gone
    from_dense = train_ddpm(fresh_ddpm(), images, longer, masks=masks, resume_from=dense)
    assert from_packed.steps == from_dense.steps == 5
    a, b = from_packed.ddpm.unet.state_dict(), from_dense.ddpm.unet.state_dict()
    assert_same_tensors(a, b)
    stored_ema = ss.load_sparse(packed_dir / "ema.sparse.safetensors")
    name = next(iter(masks)) + ".weight"
    assert not torch.equal(a[name], stored_ema[next(iter(masks)) + ".parametrizations.weight.original"])  # it trained on


def test_a_dense_checkpoint_is_its_own_dense_folder_and_a_corrupt_one_leaves_nothing(trained_checkpoint, tmp_path):
    checkpoint, *_ = trained_checkpoint
    with ss.dense_folder(checkpoint) as folder:
        assert folder == checkpoint
    packed_dir = shutil.copytree(checkpoint, tmp_path / "packed")
    ss.pack_checkpoint(packed_dir, verify=False)
    bad = packed_dir / "model.sparse.safetensors"
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(MaskDMError, match="model.sparse.safetensors"):
        ss.unpack_folder(packed_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(MaskDMError, match="already exists"):
        ss.unpack_folder(packed_dir, packed_dir)


# --------------------------------------------------------------------------------------------
# Bytes at 50 % unstructured and 2:4 (the ddpm-cifar10 arch, random init, pruned per layer)


@pytest.fixture(scope="module")
def cifar10_unet():
    torch.manual_seed(0)
    return build_unet("ddpm-cifar10")


def file_ratio(unet, tmp: Path) -> tuple[float, float]:
    """(whole-file bytes sparse / dense, bytes of the packed tensors' parts / their dense bytes)."""
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    save_file(state, str(tmp / "dense.safetensors"))
    ss.save_sparse(state, tmp / "sparse.safetensors")
    whole = (tmp / "sparse.safetensors").stat().st_size / (tmp / "dense.safetensors").stat().st_size
    stored, packing = ss.pack_state(state)
    parts = sum(stored[n + s].nbytes for n in packing for s in ("::sparse_values", "::sparse_mask"))
    return whole, parts / sum(state[n].nbytes for n in packing)


@pytest.mark.parametrize("pattern, bound", [("unstructured", 0.55), ("2:4", 0.6)])
def test_at_half_sparsity_the_stored_weights_take_at_most_the_bound(cifar10_unet, tmp_path, pattern, bound):
    """Counted: every byte of the UNet weights file (header, norms, biases, dense layers included).

    With ``protect=""`` every Conv2d/Linear layer is pruned, so the model is about 50 % sparse and
    the whole file must be within the bound. With the default protection (conv_in, conv_out and
    every ``time_emb*`` layer, the resnets' ``time_emb_proj`` included: 8 % of the weights stay
    dense) the whole file is about 0.57x: there only the pruned layers' bytes meet the bound.
    """
    everything = copy.deepcopy(cifar10_unet)
    prune(everything, PruneConfig(ratio=0.5, pattern=pattern, protect=""))
    whole, parts = file_ratio(everything, tmp_path)
    print(f"\n{pattern}, every layer pruned: file {whole:.4f}x dense, packed tensors {parts:.4f}x")
    assert whole <= bound and parts <= bound

    protected = copy.deepcopy(cifar10_unet)
    prune(protected, PruneConfig(ratio=0.5, pattern=pattern))
    whole, parts = file_ratio(protected, tmp_path)
    print(f"{pattern}, default protection: file {whole:.4f}x dense, packed tensors {parts:.4f}x")
    assert parts <= bound and whole < 0.6


# --------------------------------------------------------------------------------------------
# The registered model and the export


@pytest.fixture
def pruned_model_dir(tmp_path, tiny_ddpm):
    prune(tiny_ddpm.unet, PruneConfig(ratio=0.5, protect=""))
    return save_ddpm(tiny_ddpm, tmp_path / "model")


def test_the_registered_copy_is_sparse_and_loads_bit_exactly_and_exports_dense(tracking, pruned_model_dir, tmp_path):
    from diffusers import DDPMPipeline

    dense_file = pruned_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    dense_bytes = dense_file.read_bytes()
    with mlflow.start_run():
        info = registry.log_pyfunc_model(pruned_model_dir)

    # The run's model/ folder is untouched: dense, and diffusers opens it.
    assert dense_file.read_bytes() == dense_bytes
    DDPMPipeline.from_pretrained(pruned_model_dir)
    # The logged copy stores the UNet sparse, and smaller.
    artifacts = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "logged")))
    pipeline = artifacts / "artifacts" / registry.PIPELINE_ARTIFACT
    unet_files = sorted(p.name for p in (pipeline / "unet").iterdir())
    assert unet_files == ["config.json", "diffusion_pytorch_model.sparse.safetensors"]
    assert (pipeline / "unet" / "diffusion_pytorch_model.sparse.safetensors").stat().st_size < 0.75 * len(dense_bytes)

    # Loaded through pyfunc: the dense UNet bit for bit.
    model = mlflow.pyfunc.load_model(info.model_uri)
    loaded = model.unwrap_python_model().ddpm.unet.state_dict()
    assert_same_tensors(loaded, load_ddpm(str(pruned_model_dir)).unet.state_dict())

    # The one-line export gives the dense diffusers folder back, the weights file byte for byte.
    out = tmp_path / "exported"
    done = subprocess.run(
        [sys.executable, "-m", "maskdm.ddpm.sparse_storage", "export", str(pipeline), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == dense_bytes
    assert not list(out.rglob("*.sparse.safetensors"))
    DDPMPipeline.from_pretrained(out)


def test_export_command_errors(tmp_path, capsys):
    assert ss.main(["export", str(tmp_path)]) == 2
    assert "usage: python -m maskdm.ddpm.sparse_storage export" in capsys.readouterr().err
    assert ss.main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"maskdm: error: {tmp_path / 'missing'} is not a folder"
    assert ss.main(["export", str(tmp_path), str(tmp_path)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_a_model_folder_without_zeros_still_round_trips(tiny_model_dir, tmp_path):
    """A dense (unpruned) model: nothing packs, the sparse file holds it as it is and loads back equal."""
    packed = ss.pack_pipeline_copy(tiny_model_dir, tmp_path / "copy")
    assert [p.dense for p in packed] == ["diffusion_pytorch_model.safetensors"]
    with ss.dense_folder(tmp_path / "copy") as dense:
        assert_same_tensors(load_ddpm(str(dense)).unet.state_dict(), load_ddpm(str(tiny_model_dir)).unet.state_dict())
    assert np.isclose(packed[0].sparse_bytes / packed[0].dense_bytes, 1.0, atol=0.05)


# --------------------------------------------------------------------------------------------
# Measurement (opt in): a real ddpm-cifar10 checkpoint, packed


@pytest.mark.skipif(
    not os.environ.get("MASKDM_MEASURE_CHECKPOINT_BYTES"),
    reason="a measurement (minutes on a CPU): set MASKDM_MEASURE_CHECKPOINT_BYTES=1",
)
@pytest.mark.parametrize("pattern, protect", [("unstructured", None), ("2:4", None), ("unstructured", ""), ("2:4", "")])
def test_checkpoint_bytes_of_the_cifar10_arch(cifar10_unet, tmp_path, pattern, protect):
    """model + EMA + optimizer of a checkpoint of one training step of the ddpm-cifar10 arch (random
    init, pruned 50 % per layer), packed: whole files, headers and the pickled optimizer included."""
    unet = copy.deepcopy(cifar10_unet)
    kwargs = {} if protect is None else {"protect": protect}
    masks = prune(unet, PruneConfig(ratio=0.5, pattern=pattern, **kwargs)).masks
    images = TensorDataset(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    config = replace(BASE, num_iters=1, save_model_steps=1, train_batch_size=2)
    train_ddpm(DDPM(unet, default_scheduler()), images, config, masks=masks, checkpoint_dir=tmp_path)
    folder = tmp_path / "checkpoint-1"
    start = time.perf_counter()
    packed = ss.pack_checkpoint(folder)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    with ss.dense_folder(folder):
        unpacked_s = time.perf_counter() - start
    dense_bytes, sparse_bytes = sum(p.dense_bytes for p in packed), sum(p.sparse_bytes for p in packed)
    what = "default protection" if protect is None else "every layer pruned"
    for p in packed:
        print(f"\n{pattern}, {what}: {p.dense} {p.dense_bytes:,} B -> {p.sparse} {p.sparse_bytes:,} B ({p.sparse_bytes / p.dense_bytes:.4f}x)", end="")
    print(f"\n{pattern}, {what}: model+EMA+optimizer {dense_bytes:,} B -> {sparse_bytes:,} B "
          f"({sparse_bytes / dense_bytes:.4f}x); pack with verify {seconds:.1f} s, unpack {unpacked_s:.1f} s")
    assert sparse_bytes / dense_bytes <= (0.6 if protect is None else 0.55)


@pytest.mark.parametrize("skeleton", [
    {"$tuple": 5}, {"$dict": [[["unhashable"], 1]]}, {"$dict": [[1]]}, {"$float": "not a float"}, {"$tensor": ["a"]},
])
def test_a_malformed_structure_record_is_a_one_line_error(tmp_path, skeleton):
    from safetensors import safe_open

    torch.save({"state": {0: {"exp_avg": torch.tensor([0.0, 1.0, 0.0, 0.0])}}}, tmp_path / "optimizer.bin")
    ss.pack_file(tmp_path / "optimizer.bin")
    path = tmp_path / "optimizer.sparse.safetensors"
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
        stored = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k, v in header.items() if v.startswith("{") and '"$' in v and "exp_avg" in v)
    header[key] = json.dumps(skeleton)
    save_file(stored, str(path), metadata=header)
    with pytest.raises(MaskDMError, match="structure record is malformed") as raised:
        ss.unpack_file(path, tmp_path / "out")
    assert "\n" not in str(raised.value)
