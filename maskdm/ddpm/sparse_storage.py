"""Sparse models stored sparse: tensors with many zeros as their kept values plus a bitmask.

A float tensor in which at least ``min_zero_fraction`` of the entries are zero is stored as its
other entries (1-D, row-major, original dtype) and a bitmask of where they go (``numpy.packbits``
of the flattened "kept" pattern, uint8, 8 entries per byte, big-endian bit order). Every other
tensor is stored as it is. A pruned layer at 50 % then costs half its values plus 1 bit per weight
(1/32 of fp32): about 0.53x its dense bytes, unstructured or N:M alike (a 2:4 index code would also
cost 1 bit per weight, so the bitmask is as small and serves both).

Zeros are read off the bit pattern, so unpacking gives back every tensor bit for bit, whatever it
holds: NaN payloads, subnormals and the sign of zero. A -0.0 is a zero too (``weight * mask``
leaves -0.0 where a negative weight is masked, and an optimizer step keeps it), and a tensor that
holds one also stores the sign of each of its zeros, 1 bit per zero. No masks are needed: the
zeros are read off the tensors, which is also why the same code packs optimizer state (AdamW's
moments are exactly zero where a weight is masked, since a masked weight gets zero gradient).

On disk a packed file is one ``.safetensors`` file (:func:`save_sparse` / :func:`load_sparse`,
drop-ins for ``safetensors.torch.save_file`` / ``load_file``). Its header metadata records the
format and its version, which tensors are packed (shape and dtype) and the caller's own metadata.
A packed tensor ``W`` is stored under ``W::sparse_values``, ``W::sparse_mask`` and, with a -0.0,
``W::sparse_negzero`` (state-dict keys never hold ``::``), so a reader that does not know the
format fails loudly on missing keys instead of loading 1-D tensors.

Folders: a ``<name>.sparse.safetensors`` file is the sparse form of one dense file whose name its
metadata records (``<name>.safetensors``, or a torch-pickled state such as accelerate's
``optimizer.bin``, whose tensors are packed and whose structure is kept as JSON in the metadata).
:func:`pack_checkpoint` packs a training checkpoint in place, :func:`unpack_folder` rebuilds the
dense files into a new folder, :func:`dense_folder` does that into a temporary folder for a
reader (``accelerate.load_state``, ``diffusers.from_pretrained``), and ``python -m
maskdm.ddpm.sparse_storage export <sparse folder> <dense folder>`` is the one-line export to a folder
diffusers and accelerate open.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from maskdm.errors import MaskDMError

log = logging.getLogger(__name__)

FORMAT = "maskdm-sparse"
#: Bumped when a file written by this version cannot be read by an older reader.
FORMAT_VERSION = 1
SPARSE_SUFFIX = ".sparse.safetensors"
DEFAULT_MIN_ZERO_FRACTION = 0.25

_VALUES = "::sparse_values"
_MASK = "::sparse_mask"
_NEGZERO = "::sparse_negzero"
_PARTS = (_VALUES, _MASK, _NEGZERO)
# Header metadata keys (safetensors metadata is str -> str).
_META_FORMAT = "maskdm_sparse.format"
_META_VERSION = "maskdm_sparse.version"
_META_PACKED = "maskdm_sparse.packed"
_META_USER = "maskdm_sparse.metadata"
_META_RESTORES = "maskdm_sparse.restores"
_META_KIND = "maskdm_sparse.kind"
_META_SKELETON = "maskdm_sparse.skeleton"
KIND_SAFETENSORS = "safetensors"
KIND_TORCH = "torch"

# The integer type of each float width, to read a float's bit pattern, and that type's value of a
# float whose only set bit is the sign bit (-0.0).
_BITS_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SIGN_ONLY = {1: 0x80, 2: -(2**15), 4: -(2**31), 8: -(2**63)}


def _packable(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.element_size() in _BITS_OF and tensor.numel() > 0


def pack_state(
    tensors: Mapping[str, torch.Tensor], min_zero_fraction: float = DEFAULT_MIN_ZERO_FRACTION
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``(stored tensors, packing)``: each float tensor with at least ``min_zero_fraction`` zeros
    (+0.0 or -0.0) as its other values plus a bitmask; every other tensor as it is (CPU, contiguous).

    Zeros are read off the bit pattern. A tensor holding a -0.0 also stores the sign of each of its
    zeros (1 bit per zero, ``::sparse_negzero``), so every bit comes back. ``packing`` maps each
    packed name to ``{"shape", "dtype", "negzero"}``; :func:`unpack_state` inverts.
    """
    if not 0.0 <= min_zero_fraction <= 1.0:
        raise MaskDMError(f"min_zero_fraction must be in [0, 1], got {min_zero_fraction!r}")
    stored: dict[str, torch.Tensor] = {}
    packing: dict[str, dict] = {}
    for name, tensor in tensors.items():
        if any(part in name for part in _PARTS):
            raise MaskDMError(f"tensor name '{name}' holds a reserved suffix ({', '.join(_PARTS)}); rename it")
        tensor = tensor.detach().cpu().contiguous()
        if not _packable(tensor):
            stored[name] = tensor
            continue
        # numpy on the integer view: its compress/put are several times faster than torch's boolean
        # indexing on a CPU, and work for bf16 and fp8 too.
        bits = tensor.view(_BITS_OF[tensor.element_size()]).flatten().numpy()
        negative_zero = bits == np.array(_SIGN_ONLY[tensor.element_size()], dtype=bits.dtype)
        kept = (bits != 0) & ~negative_zero
        zeros = tensor.numel() - int(np.count_nonzero(kept))
        if zeros == 0 or zeros < min_zero_fraction * tensor.numel():
            stored[name] = tensor
            continue
        stored[name + _VALUES] = torch.from_numpy(np.compress(kept, bits)).view(tensor.dtype)
        stored[name + _MASK] = torch.from_numpy(np.packbits(kept))
        has_negative_zero = bool(negative_zero.any())
        if has_negative_zero:
            stored[name + _NEGZERO] = torch.from_numpy(np.packbits(np.compress(~kept, negative_zero)))
        packing[name] = {
            "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."), "negzero": has_negative_zero,
        }
    return stored, packing


def unpack_state(
    stored: Mapping[str, torch.Tensor], packing: Mapping[str, Mapping], where: str = "the tensors"
) -> dict[str, torch.Tensor]:
    """The tensors :func:`pack_state` was given, bit for bit; a one-line MaskDMError for anything inconsistent."""
    values_of = {n + _VALUES: n for n in packing}
    parts = {n + part for n in packing for part in _PARTS}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in stored.items():  # in stored order, each packed tensor where its values are
        if name in values_of:
            out[values_of[name]] = _unpack_one(stored, values_of[name], packing[values_of[name]], where)
        elif name in parts:
            continue
        elif any(part in name for part in _PARTS):
            raise MaskDMError(f"{where} is corrupt: '{name}' is a packed part with no packing record")
        else:
            out[name] = tensor
    for name, spec in packing.items():
        if name not in out:
            out[name] = _unpack_one(stored, name, spec, where)  # raises: its values are missing
    return out


def _unpack_bits(bits: torch.Tensor | None, count: int, what: str, corrupt) -> np.ndarray:
    if bits is None:
        raise corrupt(f"lacks its {what}")
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (count + 7) // 8:
        raise corrupt(f"has a {what} of {bits.numel()} {bits.dtype} bytes for {count} entries")
    unpacked = np.unpackbits(bits.numpy())
    if unpacked[count:].any():
        raise corrupt(f"has {what} bits set past its last entry")
    return unpacked[:count].view(bool)


def _unpack_one(stored: Mapping[str, torch.Tensor], name: str, spec: Mapping, where: str) -> torch.Tensor:
    def corrupt(why: str) -> MaskDMError:
        return MaskDMError(f"{where} is corrupt: packed tensor '{name}' {why}")

    try:
        shape = tuple(int(d) for d in spec["shape"])
        dtype = getattr(torch, str(spec["dtype"]))
        has_negative_zero = bool(spec.get("negzero", False))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise corrupt(f"has a bad packing record {dict(spec)!r}") from None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize not in _BITS_OF:
        raise corrupt(f"has a bad dtype {spec['dtype']!r}")
    numel = math.prod(shape)
    kept = _unpack_bits(stored.get(name + _MASK), numel, "mask", corrupt)
    count = int(np.count_nonzero(kept))
    values = stored.get(name + _VALUES)
    if values is None:
        raise corrupt("lacks its values")
    if values.dtype != dtype or values.dim() != 1 or values.numel() != count:
        raise corrupt(f"holds {values.numel()} {values.dtype} values for {count} kept {dtype} entries")
    # Built on the bit pattern: all-zero bits are +0.0, the sign bit alone is -0.0.
    int_type = _BITS_OF[dtype.itemsize]
    dense = np.zeros(numel, dtype=torch.empty(0, dtype=int_type).numpy().dtype)
    dense.put(np.flatnonzero(kept), values.view(int_type).numpy())
    if has_negative_zero:
        negative = _unpack_bits(stored.get(name + _NEGZERO), numel - count, "zero signs", corrupt)
        dense.put(np.flatnonzero(~kept)[negative], _SIGN_ONLY[dtype.itemsize])
    elif name + _NEGZERO in stored:
        raise corrupt("has zero signs its packing record does not mention")
    return torch.from_numpy(dense).view(dtype).reshape(shape)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN payloads and the sign of zero included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() and a.element_size() in _BITS_OF:
        bits = _BITS_OF[a.element_size()]
        return torch.equal(a.detach().cpu().contiguous().view(bits), b.detach().cpu().contiguous().view(bits))
    return torch.equal(a.detach().cpu(), b.detach().cpu())


# --------------------------------------------------------------------------------------------
# One file


def save_sparse(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
    min_zero_fraction: float = DEFAULT_MIN_ZERO_FRACTION, extra: Mapping[str, str] | None = None,
) -> dict[str, dict]:
    """Write ``tensors`` packed (:func:`pack_state`) into one safetensors file; returns the packing.

    ``metadata`` is the caller's own (given back by :func:`load_sparse_with_metadata`). The file is
    written beside ``path`` and renamed into place, so ``path`` is never half-written.
    """
    stored, packing = pack_state(tensors, min_zero_fraction)
    header = {
        _META_FORMAT: FORMAT,
        _META_VERSION: str(FORMAT_VERSION),
        _META_PACKED: json.dumps(packing),
        _META_USER: json.dumps(dict(metadata) if metadata is not None else None),
        **(extra or {}),
    }
    _atomic_write(Path(path), lambda tmp: save_file(stored, str(tmp), metadata=header))
    return packing


def load_sparse(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a file written by :func:`save_sparse` (a plain safetensors file loads as it is)."""
    return load_sparse_with_metadata(path)[0]


def load_sparse_with_metadata(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """``(tensors, the caller's metadata)`` of a :func:`save_sparse` file, or of a plain safetensors file."""
    stored, header = _read(Path(path))
    if _META_FORMAT not in header:
        return stored, header or None
    packing = _packing(header, path)
    try:
        user = json.loads(header.get(_META_USER, "null"))
    except ValueError:
        raise MaskDMError(f"sparse tensors file {path} is corrupt: its metadata is not valid JSON") from None
    return unpack_state(stored, packing, f"sparse tensors file {path}"), user


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise MaskDMError(f"sparse tensors file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a truncated or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MaskDMError(f"cannot read sparse tensors file {path}: {first}") from None
    return stored, header


def _packing(header: Mapping[str, str], path) -> dict[str, dict]:
    if header.get(_META_FORMAT) != FORMAT:
        raise MaskDMError(f"{path} is not a {FORMAT} file (format '{header.get(_META_FORMAT)}')")
    version = header.get(_META_VERSION, "")
    if not version.isdigit():
        raise MaskDMError(f"sparse tensors file {path} is corrupt: format version '{version}'")
    if int(version) > FORMAT_VERSION:
        raise MaskDMError(
            f"sparse tensors file {path} has format version {version}; this maskdm reads up to version "
            f"{FORMAT_VERSION}: upgrade maskdm"
        )
    try:
        packing = json.loads(header.get(_META_PACKED, ""))
    except ValueError:
        packing = None
    if not isinstance(packing, dict) or not all(isinstance(v, dict) for v in packing.values()):
        raise MaskDMError(f"sparse tensors file {path} is corrupt: its packing record is not a JSON object")
    return packing


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Torch-pickled states (accelerate's optimizer.bin): tensors packed, structure as JSON


class _NotEncodable(Exception):
    pass


def _encode(obj, path: str, tensors: dict[str, torch.Tensor]):
    """JSON of ``obj`` with each tensor replaced by a reference into ``tensors`` (filled here).

    Containers keep their exact types: a tuple is ``{"$tuple": [...]}``, a dict whose keys are not
    all strings (an optimizer's state is keyed by int) is ``{"$dict": [[key, value], ...]}``.
    """
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        while key in tensors:
            key += "'"
        tensors[key] = obj
        layout = _memory_format_of(obj)
        # A channels_last model's optimizer moments are channels_last: they come back so.
        return {"$tensor": key, "memory_format": layout} if layout else {"$tensor": key}
    if obj is None or isinstance(obj, (bool, str)) or (isinstance(obj, int) and type(obj) is int):
        return obj
    if type(obj) is float:
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if type(obj) is list:
        return [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return {"$tuple": [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]}
    if type(obj) is dict:
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, _join(path, k), tensors) for k, v in obj.items()}
        if not all(type(k) in (str, int) for k in obj):
            raise _NotEncodable(f"{path or 'the object'} has a dict key that is neither str nor int")
        return {"$dict": [[k, _encode(v, _join(path, k), tensors)] for k, v in obj.items()]}
    raise _NotEncodable(f"{path} is a {type(obj).__name__}")


_MEMORY_FORMATS = {"channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d}


def _memory_format_of(tensor: torch.Tensor) -> str | None:
    """The name of a channels-last layout ``tensor`` is in (and is not also row-major), else None."""
    if tensor.is_contiguous():
        return None
    for name, layout in _MEMORY_FORMATS.items():
        if tensor.dim() == (4 if layout is torch.channels_last else 5) and tensor.is_contiguous(memory_format=layout):
            return name
    return None  # any other layout comes back row-major, its values bit for bit


def _join(path: str, part) -> str:
    return f"{path}.{part}" if path else str(part)


def _decode(obj, tensors: Mapping[str, torch.Tensor], where: str):
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "$tensor" in obj:
        try:
            tensor = tensors[obj["$tensor"]]
        except KeyError:
            raise MaskDMError(f"{where} is corrupt: its structure names a tensor '{obj['$tensor']}' it does not hold") from None
        layout = _MEMORY_FORMATS.get(obj.get("memory_format", ""))
        return tensor.contiguous(memory_format=layout) if layout is not None else tensor
    if "$float" in obj:
        return float(obj["$float"])
    if "$tuple" in obj:
        return tuple(_decode(v, tensors, where) for v in obj["$tuple"])
    if "$dict" in obj:
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["$dict"]}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def objects_bit_equal(a, b) -> bool:
    """Same structure, container types and scalar values, and bit-equal tensors in the same layout."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and bit_equal(a, b)
            and _memory_format_of(a) == _memory_format_of(b)
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):  # key order carries no meaning in a state dict
        return set(a) == set(b) and all(objects_bit_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(objects_bit_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


# --------------------------------------------------------------------------------------------
# Files and folders


def sparse_name(name: str) -> str:
    """``model.safetensors`` / ``optimizer.bin`` -> ``model.sparse.safetensors`` / ``optimizer.sparse.safetensors``."""
    stem = name.removesuffix(".safetensors").removesuffix(".bin")
    return stem + SPARSE_SUFFIX


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of its packed form beside it (``<stem>.sparse.safetensors``)."""
    path = Path(path)
    if path.exists() and not is_sparse_file(path):
        from safetensors.torch import load_file

        return load_file(str(path))
    packed = path if is_sparse_file(path) else path.with_name(sparse_name(path.name))
    if not packed.exists():
        raise MaskDMError(f"neither {path.name} nor {packed.name} is in {path.parent}")
    return load_sparse(packed)


def is_sparse_file(path: Path) -> bool:
    return path.name.endswith(SPARSE_SUFFIX)


@dataclass(frozen=True)
class PackedFile:
    """One dense file and its sparse form: names and bytes on disk (whole files, headers included)."""

    dense: str
    sparse: str
    dense_bytes: int
    sparse_bytes: int


def pack_file(
    path: str | os.PathLike, verify: bool = True, min_zero_fraction: float = DEFAULT_MIN_ZERO_FRACTION
) -> PackedFile | None:
    """Write ``path``'s sparse form beside it and remove ``path``; None (nothing changed) for a
    torch-pickled file holding something other than tensors, numbers, strings and containers.

    ``path`` is a ``.safetensors`` file or a torch-pickled state (loaded with ``weights_only=True``).
    With ``verify`` the sparse file is read back and compared bit for bit before ``path`` goes.
    """
    path = Path(path)
    target = path.with_name(sparse_name(path.name))
    if is_sparse_file(path) or target == path:
        raise MaskDMError(f"{path} is already a sparse file")
    dense_bytes = path.stat().st_size
    if path.suffix == ".safetensors":
        tensors, metadata = _read(path)
        extra = {_META_RESTORES: path.name, _META_KIND: KIND_SAFETENSORS}
        save_sparse(tensors, target, metadata or None, min_zero_fraction, extra)
        original = tensors
    else:
        try:
            original = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated file, or a pickle weights_only refuses
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MaskDMError(f"cannot read {path} with torch.load(weights_only=True): {first}") from None
        tensors: dict[str, torch.Tensor] = {}
        try:
            skeleton = _encode(original, "", tensors)
        except _NotEncodable as exc:
            log.warning("%s stays dense: %s", path, exc)
            return None
        extra = {_META_RESTORES: path.name, _META_KIND: KIND_TORCH, _META_SKELETON: json.dumps(skeleton)}
        save_sparse(tensors, target, None, min_zero_fraction, extra)
    if verify:
        restored = _restore(target)
        if not objects_bit_equal(restored, original):
            target.unlink()
            raise AssertionError(f"{target} does not read back bit-exactly as {path}")  # a bug, not a user error
    packed = PackedFile(path.name, target.name, dense_bytes, target.stat().st_size)
    path.unlink()
    return packed


def _restore(sparse: Path):
    """What the dense file held: a dict of tensors (safetensors kind) or the unpickled object (torch kind)."""
    stored, header = _read(sparse)
    packing = _packing(header, sparse)
    tensors = unpack_state(stored, packing, f"sparse tensors file {sparse}")
    if header.get(_META_KIND) == KIND_TORCH:
        try:
            skeleton = json.loads(header[_META_SKELETON])
        except (KeyError, ValueError):
            raise MaskDMError(f"sparse tensors file {sparse} is corrupt: its structure record is missing or not JSON") from None
        try:
            return _decode(skeleton, tensors, f"sparse tensors file {sparse}")
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
            # Valid JSON that _encode never writes ({"$tuple": 5}, an unhashable key, a bad float).
            raise MaskDMError(
                f"sparse tensors file {sparse} is corrupt: its structure record is malformed ({type(exc).__name__})"
            ) from None
    return tensors


def unpack_file(sparse: str | os.PathLike, dst_folder: str | os.PathLike) -> Path:
    """Write the dense file ``sparse`` stands for into ``dst_folder``; returns its path."""
    sparse = Path(sparse)
    stored, header = _read(sparse)
    name = header.get(_META_RESTORES)
    kind = header.get(_META_KIND)
    if not name or kind not in (KIND_SAFETENSORS, KIND_TORCH) or Path(name).name != name:
        raise MaskDMError(f"{sparse} does not say which dense file it stands for; it was not written by pack_file")
    target = Path(dst_folder) / name
    if kind == KIND_TORCH:
        obj = _restore(sparse)
        _atomic_write(target, lambda tmp: torch.save(obj, tmp))
    else:
        tensors, metadata = load_sparse_with_metadata(sparse)
        _atomic_write(target, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return target


def unpack_folder(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy folder ``src`` to ``dst`` (which must not exist) with every ``*.sparse.safetensors`` file
    replaced by the dense file it stands for: a folder diffusers' ``from_pretrained`` and
    accelerate's ``load_state`` open. ``dst`` is complete or absent."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise MaskDMError(f"{src} is not a folder")
    if dst.exists():
        raise MaskDMError(f"{dst} already exists: pass a new folder to write the dense copy to")
    building = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    try:
        shutil.copytree(src, building, ignore=lambda folder, names: [n for n in names if n.endswith(SPARSE_SUFFIX)])
        for sparse in sorted(src.rglob("*" + SPARSE_SUFFIX)):
            unpack_file(sparse, building / sparse.parent.relative_to(src))
        os.replace(building, dst)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return dst


def has_sparse_files(folder: str | os.PathLike) -> bool:
    return any(Path(folder).rglob("*" + SPARSE_SUFFIX))


@contextlib.contextmanager
def dense_folder(folder: str | os.PathLike, tmp_root: str | os.PathLike | None = None) -> Iterator[Path]:
    """``folder`` itself when it holds no sparse file, else a temporary dense copy (removed after)."""
    folder = Path(folder)
    if not has_sparse_files(folder):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="maskdm-dense-", dir=tmp_root, ignore_cleanup_errors=True) as tmp:
        yield unpack_folder(folder, Path(tmp) / folder.name)


# --------------------------------------------------------------------------------------------
# Checkpoints and pipeline folders


def checkpoint_files_to_pack(folder: Path) -> list[Path]:
    """A training checkpoint's tensors: every dense ``*.safetensors`` (accelerate's model, our EMA)
    and accelerate's optimizer states (``optimizer.bin``, ``optimizer_<i>.bin``)."""
    files = [p for p in folder.glob("*.safetensors") if not is_sparse_file(p)]
    files += [p for p in folder.glob("optimizer*.bin")]
    return sorted(files)


def pack_checkpoint(folder: str | os.PathLike, verify: bool = True) -> list[PackedFile]:
    """Pack a checkpoint folder written by :mod:`maskdm.ddpm.training` in place (main process only).

    Each file of :func:`checkpoint_files_to_pack` is replaced by its ``*.sparse.safetensors`` form;
    the scheduler and RNG states stay as they are. :func:`dense_folder` gives back the folder
    accelerate's ``load_state`` expects, every tensor bit for bit.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MaskDMError(f"checkpoint {folder} is not a folder")
    packed = []
    for path in checkpoint_files_to_pack(folder):
        done = pack_file(path, verify=verify)
        if done is not None:
            packed.append(done)
    return packed


def pack_pipeline_copy(src: str | os.PathLike, dst: str | os.PathLike) -> list[PackedFile]:
    """Copy a diffusers pipeline folder to ``dst`` with every ``*.safetensors`` weights file packed
    (the UNet's ``diffusion_pytorch_model.safetensors`` becomes ``...sparse.safetensors``)."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    return [
        done for path in sorted(dst.rglob("*.safetensors"))
        if not is_sparse_file(path) and (done := pack_file(path)) is not None
    ]


def folder_bytes(folder: str | os.PathLike, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob(pattern) if p.is_file())


# --------------------------------------------------------------------------------------------
# The one-line export


USAGE = """usage: python -m maskdm.ddpm.sparse_storage export SPARSE_FOLDER DENSE_FOLDER

Writes DENSE_FOLDER (new): a copy of SPARSE_FOLDER (a registered model's pipeline artifact or a
packed checkpoint) with every *.sparse.safetensors file replaced by the dense file it stands for,
bit for bit, so diffusers' from_pretrained or accelerate's load_state opens it."""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "export":
        print(USAGE, file=sys.stderr)
        return 2
    try:
        out = unpack_folder(args[1], args[2])
    except MaskDMError as exc:
        print(f"maskdm: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote dense folder {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
