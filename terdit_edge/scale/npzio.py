"""Streaming .npz reading and writing: one array entry at a time, a bounded number of bytes in memory.

The reader follows the path of guided-diffusion's ``evaluations/evaluator.py`` (the ADM evaluator):
``zipfile`` opens the ``NAME.npy`` entry, ``numpy.lib.format`` reads the magic and the v1/v2 header,
then the raw C-order data is read in slices. Pickled object arrays are refused (no pickle is ever
loaded). The writer produces what that reader (and ``numpy.load``) accepts: an uncompressed
(ZIP_STORED, zip64 when needed) archive whose entries are npy files, format v1 (v2 only if the
header needs it), C order.
"""
from __future__ import annotations

import contextlib
import zipfile

import numpy as np
from numpy.lib import format as npy_format

from ..errors import InputError

COPY_CHUNK = 8 << 20  # bytes copied per read/write when streaming array data


class NpzArrayReader:
    """One array of an .npz file, read in slices along its first axis without loading the rest.

    ``with NpzArrayReader(path, "arr_0") as r: r.shape, r.dtype, r.read(start, stop)`` or iterate
    ``r.batches(n)``. The entry must be a C-order, non-object npy array.
    """

    def __init__(self, path, key: str):
        self.path = str(path)
        self.key = key
        try:
            self._zip = zipfile.ZipFile(self.path, "r")
        except (OSError, zipfile.BadZipFile) as e:
            raise InputError(f"{self.path}: not a readable .npz file ({e})") from None
        name = key + ".npy"
        if name not in self._zip.namelist():
            self._zip.close()
            raise InputError(f"{self.path}: has no array {key!r} (it holds {self.keys()})")
        self._fp = self._zip.open(name, "r")
        try:
            version = npy_format.read_magic(self._fp)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(self._fp)
            elif version == (2, 0):
                shape, fortran, dtype = npy_format.read_array_header_2_0(self._fp)
            else:
                raise ValueError(f"npy format version {version} is not supported")
        except ValueError as e:
            self.close()
            raise InputError(f"{self.path}: bad npy header in {name}: {e}") from None
        if fortran:
            self.close()
            raise InputError(f"{self.path}: {name} is Fortran-ordered; expected C order")
        if dtype.hasobject:
            self.close()
            raise InputError(f"{self.path}: {name} holds Python objects (a pickle); refused")
        self.shape = tuple(shape)
        self.dtype = dtype
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize if self.shape else dtype.itemsize
        self._pos = 0  # rows read so far

    def keys(self) -> list[str]:
        return [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def read_rows(self, count: int) -> np.ndarray:
        """The next ``count`` rows (fewer at the end)."""
        count = max(0, min(count, len(self) - self._pos))
        want = count * self.row_bytes
        data = self._fp.read(want)
        if len(data) != want:
            raise InputError(f"{self.path}: {self.key} is truncated ({len(data)} of {want} bytes at row {self._pos})")
        self._pos += count
        return np.frombuffer(data, dtype=self.dtype).reshape((count,) + self.shape[1:])

    def batches(self, rows: int):
        """Yield consecutive slices of at most ``rows`` rows from the current position to the end."""
        rows = max(1, int(rows))
        while self._pos < len(self):
            yield self.read_rows(rows)

    def copy_data_to(self, out, chunk: int = COPY_CHUNK) -> int:
        """Copy the remaining raw array bytes to the file object ``out``; returns the byte count.
        At the end, zipfile checks the entry's CRC (a corrupted entry raises)."""
        total = 0
        remaining = (len(self) - self._pos) * self.row_bytes
        while remaining > 0:
            data = self._fp.read(min(chunk, remaining))
            if not data:
                raise InputError(f"{self.path}: {self.key} is truncated")
            out.write(data)
            total += len(data)
            remaining -= len(data)
        self._fp.read(1)  # reach the end of the entry so the CRC is checked
        self._pos = len(self)
        return total

    def close(self):
        with contextlib.suppress(Exception):
            self._fp.close()
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_npz_array(path, key: str) -> np.ndarray:
    """A whole (small) array of an .npz file, without pickle."""
    with NpzArrayReader(path, key) as r:
        out = r.read_rows(len(r)) if r.shape else np.frombuffer(r._fp.read(r.dtype.itemsize), r.dtype).reshape(())
        r._fp.read(1)
        return out.copy()


def npz_keys(path) -> list[str]:
    try:
        with zipfile.ZipFile(str(path), "r") as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable .npz file ({e})") from None


class NpzWriter:
    """Write an .npz entry by entry; ``array_stream(key, shape, dtype)`` opens an entry whose data
    the caller writes in pieces (exactly the byte count of ``shape``)."""

    def __init__(self, fileobj_or_path):
        self._zip = zipfile.ZipFile(fileobj_or_path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    @contextlib.contextmanager
    def array_stream(self, key: str, shape, dtype):
        dtype = np.dtype(dtype)
        header = {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": tuple(int(s) for s in shape)}
        nbytes = int(np.prod(header["shape"], dtype=np.int64)) * dtype.itemsize
        with self._zip.open(key + ".npy", "w", force_zip64=True) as fp:
            try:
                npy_format.write_array_header_1_0(fp, header)
            except ValueError:  # header too long for v1
                npy_format.write_array_header_2_0(fp, header)
            counter = _CountingWriter(fp)
            yield counter
            if counter.count != nbytes:
                raise RuntimeError(f"{key}: wrote {counter.count} data bytes, expected {nbytes}")

    def write_array(self, key: str, arr: np.ndarray):
        arr = np.ascontiguousarray(arr)
        with self.array_stream(key, arr.shape, arr.dtype) as out:
            out.write(arr.tobytes())

    def close(self):
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _CountingWriter:
    def __init__(self, fp):
        self.fp = fp
        self.count = 0

    def write(self, data):
        self.fp.write(data)
        self.count += len(data)
