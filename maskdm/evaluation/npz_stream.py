"""``.npz`` files written and read a chunk of rows at a time, so no stage holds a whole image set in memory.

``samples.npz`` is the hand-over between ``sample`` and ``fid``: at 50,000 CIFAR images it is 150 MB,
but 20,000 images at 256x256 are 3.9 GB. :class:`NpzWriter` writes an array's rows into the
archive as they are made; :func:`iter_rows` reads them back in pieces. The files are ordinary
``.npz`` archives (``np.load`` opens them); arrays that would need a pickle are refused both ways.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def _member(path: str | os.PathLike, key: str):
    """The header (shape, dtype) of array ``key`` and the stream positioned at its first row."""
    with zipfile.ZipFile(path) as archive:
        name = f"{key}.npy"
        if name not in archive.namelist():
            raise KeyError(key)
        with archive.open(name) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
            if dtype.hasobject:
                raise ValueError(f"array '{key}' holds Python objects (a pickle); refused")
            if fortran and len(shape) > 1:
                raise ValueError(f"array '{key}' is stored in Fortran order; rows cannot be streamed")
            yield tuple(shape), dtype, stream


def array_header(path: str | os.PathLike, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of array ``key`` of an .npz, from its header alone."""
    with _member(path, key) as (shape, dtype, _):
        return shape, dtype


def iter_rows(path: str | os.PathLike, key: str, rows: int) -> Iterator[np.ndarray]:
    """Array ``key`` of an .npz (compressed or not), ``rows`` leading-axis entries at a time, never all at once."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, not {rows}")
    with _member(path, key) as (shape, dtype, stream):
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], rows):
            count = min(rows, shape[0] - start)
            # Filled piece by piece: ``bytearray(stream.read(n))`` held the chunk twice (1,000 images
            # at 256x256: 197 MB more at the peak). Writable, as torch.from_numpy wants.
            data = bytearray(count * row_bytes)
            filled = _read_into(stream, data)
            if filled != len(data):
                raise ValueError(f"array '{key}' ends after {start + filled // max(row_bytes, 1)} of {shape[0]} rows")
            yield np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:])


#: Bytes read from the archive at a time into a chunk's buffer.
READ_PIECE_BYTES = 4 << 20


def _read_into(stream, buffer: bytearray) -> int:
    """Fill ``buffer`` from ``stream`` :data:`READ_PIECE_BYTES` at a time; the bytes filled (fewer at the end of the stream)."""
    view, filled = memoryview(buffer), 0
    while filled < len(buffer):
        piece = stream.read(min(READ_PIECE_BYTES, len(buffer) - filled))
        if not piece:
            break
        view[filled : filled + len(piece)] = piece
        filled += len(piece)
    return filled


class NpzWriter:
    """Write an uncompressed ``.npz`` whose big array arrives in chunks of rows.

    ``open_array(key, shape, dtype)`` starts the array (its full shape known up front, as the
    ``.npy`` header needs it); ``write_rows(chunk)`` appends rows; small arrays go in whole with
    ``add``. The archive is written to ``<path>.partial`` and renamed on a clean close, so a crash
    never leaves a truncated ``.npz`` under the real name. Not thread-safe; one array streams at a time.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._archive = zipfile.ZipFile(self._partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._stream = None
        self._key: str | None = None
        self._rows_left = 0
        self._row_shape: tuple[int, ...] = ()
        self._dtype: np.dtype | None = None

    def add(self, key: str, array) -> None:
        self._check_idle()
        array = np.asanyarray(array)
        if array.dtype.hasobject:
            raise ValueError(f"array '{key}' holds Python objects; refused (it would need a pickle)")
        with self._archive.open(f"{key}.npy", "w", force_zip64=True) as stream:
            np.lib.format.write_array(stream, array, allow_pickle=False)

    def open_array(self, key: str, shape: tuple[int, ...], dtype) -> None:
        self._check_idle()
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise ValueError(f"array '{key}' holds Python objects; refused (it would need a pickle)")
        self._stream = self._archive.open(f"{key}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(int(s) for s in shape)}
        np.lib.format.write_array_header_2_0(self._stream, header)
        self._key, self._rows_left, self._row_shape, self._dtype = key, int(shape[0]), tuple(shape[1:]), dtype

    def write_rows(self, chunk: np.ndarray) -> None:
        if self._stream is None:
            raise RuntimeError("write_rows before open_array")
        chunk = np.ascontiguousarray(chunk, dtype=self._dtype)
        if chunk.shape[1:] != self._row_shape or len(chunk) > self._rows_left:
            raise ValueError(
                f"array '{self._key}': rows of shape {chunk.shape[1:]} x {len(chunk)} do not fit "
                f"({self._rows_left} rows of {self._row_shape} left)"
            )
        self._stream.write(chunk.tobytes())
        self._rows_left -= len(chunk)
        if self._rows_left == 0:
            self._stream.close()
            self._stream = None

    def _check_idle(self) -> None:
        if self._stream is not None:
            raise RuntimeError(f"array '{self._key}' still has {self._rows_left} rows to write")

    def close(self) -> Path:
        """Finish the archive under its real name; every opened array must be complete."""
        self._check_idle()
        self._archive.close()
        os.replace(self._partial, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial archive."""
        with contextlib.suppress(Exception):
            if self._stream is not None:
                self._stream.close()
        with contextlib.suppress(Exception):
            self._archive.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
