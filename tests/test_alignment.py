"""A model computes the same bits whatever byte offset its tensors sit at in the file.

Another tool may rewrite a .tdit header (reformatted JSON, other key order): a valid safetensors
file, but every tensor then starts at another offset. The reader copies a tensor that is not at an
offset it can use in place (docs/format.md, "Alignment"), so that NumPy, BLAS and the kernels see
the same aligned operands as for a file from our writer. Here the same model is loaded with header
paddings of 0..63 bytes on every CPU backend and activation mode and must give identical outputs.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

import terdit_edge
from terdit_edge.format import _DTYPE_NAMES, _IN_PLACE_ALIGNMENT, read_tdit
from terdit_edge.kernels import ACTIVATION_MODES, available_backends, backend_names
from tests.conftest import build_model_file, skip_unavailable_backend

PADDINGS = range(64)
CPU_BACKENDS = list(backend_names("cpu"))
X = np.random.default_rng(7).standard_normal((3, 4, 8, 8), dtype=np.float32)
T = np.array([999, 500, 3])
Y = np.array([3, 10, 0])  # class labels and the null label


def padded_copies(path, directory):
    """Files equal to `path` but with the JSON header padded by 0..63 spaces (so every tensor moves)."""
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    body, data = raw[8:8 + hlen], raw[8 + hlen:]
    out = []
    for pad in PADDINGS:
        b = body + b" " * pad
        p = directory / f"pad{pad:02d}.tdit"
        p.write_bytes(struct.pack("<Q", len(b)) + b + data)
        out.append(p)
    return out


@pytest.fixture(scope="module", params=["F32", "F16"])
def padded_files(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"align-{request.param}")
    return padded_copies(build_model_file(d, float_dtype=request.param, name="writer.tdit"), d)


def test_writer_output_is_used_in_place(padded_files):
    """A file as the writer wrote it (padding 0): every tensor is a view of the mapping, no copies."""
    tf = read_tdit(padded_files[0])
    for name, arr in tf.tensors.items():
        assert arr.base is not None and not arr.flags.owndata, name
        assert np.shares_memory(arr, np.frombuffer(tf._mmap, dtype=np.uint8)), name


def test_every_tensor_is_aligned_whatever_the_padding(padded_files):
    copies = 0
    for path in padded_files:
        tf = read_tdit(path)
        mapped = np.frombuffer(tf._mmap, dtype=np.uint8)
        for name, arr in tf.tensors.items():
            need = _IN_PLACE_ALIGNMENT[_DTYPE_NAMES[arr.dtype]]
            assert arr.ctypes.data % need == 0, (path.name, name)
            if not np.shares_memory(arr, mapped):
                copies += 1
                assert arr.ctypes.data % 64 == 0 and not arr.flags.writeable, (path.name, name)
                assert arr.dtype != np.uint8, f"{path.name}: packed weights {name} were copied"
    assert copies > 0  # the odd paddings did move tensors off their alignment


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_outputs_identical_for_every_header_padding(padded_files, backend):
    if available_backends()[backend] != "ok":
        skip_unavailable_backend(backend, available_backends()[backend])
    for mode in ACTIVATION_MODES:
        ref = None
        for path in padded_files:
            model = terdit_edge.load_model(path, backend=backend, activations=mode, threads=1)
            out = model(X, T, Y)
            if ref is None:
                ref = out
            else:
                assert np.array_equal(out, ref), (
                    f"{backend}/{mode}: {path.name} computes other bits than the writer's file "
                    f"(max diff {np.abs(out - ref).max():.3g})")
