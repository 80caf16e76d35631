"""Fuzzing the reader: a damaged file is either refused with a terdit_edge error or loads a model that
computes exactly what the undamaged file computes. Anything else (another exception type, a hang, a
crash that kills pytest) fails.

Hypothesis runs derandomized (a fixed sequence of examples, no example database), so CI sees the same
files every run.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import signal
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import terdit_edge
from terdit_edge.errors import TerditError
from tests.conftest import build_model_file

FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HANG_SECONDS = 30


class Hang(Exception):
    """Raised when one load + forward takes longer than HANG_SECONDS (not a TerditError: it fails)."""


@contextlib.contextmanager
def hang_guard(seconds: int = HANG_SECONDS):
    if not hasattr(signal, "SIGALRM"):  # no alarms on Windows: rely on the CI job's timeout there
        yield
        return

    def on_alarm(signum, frame):
        raise Hang(f"load + forward did not finish in {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


X = np.random.default_rng(42).standard_normal((2, 4, 8, 8), dtype=np.float32)
T = np.array([999, 37])
Y = np.array([3, 10])  # a class label and the null label


def forward(path) -> np.ndarray:
    model = terdit_edge.load_model(path, backend="numpy", threads=1)
    return model(X, T, Y)


class Pristine:
    """The undamaged file: raw bytes, parsed header and reference output; writes numbered mutants."""

    def __init__(self, directory):
        self.dir = directory
        self.path = build_model_file(directory, name="pristine.tdit")
        self.raw = self.path.read_bytes()
        (self.hlen,) = struct.unpack("<Q", self.raw[:8])
        self.header = json.loads(self.raw[8:8 + self.hlen])
        self.data = self.raw[8 + self.hlen:]
        self.reference = forward(self.path)
        self.counter = itertools.count()

    def write(self, raw: bytes):
        path = self.dir / f"mutant-{next(self.counter)}.tdit"
        path.write_bytes(raw)
        return path

    def with_header(self, header: dict) -> bytes:
        body = json.dumps(header).encode()
        return struct.pack("<Q", len(body)) + body + self.data


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return Pristine(tmp_path_factory.mktemp("fuzz"))


def load_or_refuse(path):
    """The output of the loaded model, or None when a terdit_edge error refused the file."""
    try:
        with hang_guard():
            return forward(path)
    except TerditError:
        return None
    finally:
        path.unlink()


# --- mutations -----------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(allow_nan=True),
                         st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)


def mutate(p: Pristine, data) -> bytes:
    """Draw one damage of the pristine file."""
    raw, size, data_start = p.raw, len(p.raw), 8 + p.hlen
    kind = data.draw(st.sampled_from(["truncate", "flip_header", "flip_data", "zero_span", "random_header_bytes",
                                      "edit_metadata", "edit_tensor_entry", "swap_offsets", "append"]), label="kind")
    buf = bytearray(raw)
    if kind == "truncate":
        return raw[:data.draw(st.integers(0, size - 1), label="cut")]
    if kind in ("flip_header", "flip_data"):
        lo, hi = (0, data_start - 1) if kind == "flip_header" else (data_start, size - 1)
        for pos in data.draw(st.lists(st.integers(lo, hi), min_size=1, max_size=4), label="positions"):
            buf[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        return bytes(buf)
    if kind == "zero_span":
        start = data.draw(st.integers(0, size - 1), label="start")
        length = data.draw(st.integers(1, 512), label="length")
        buf[start:start + length] = bytes(len(buf[start:start + length]))
        return bytes(buf)
    if kind == "random_header_bytes":
        start = data.draw(st.integers(8, data_start - 1), label="start")
        junk = data.draw(st.binary(min_size=1, max_size=24), label="junk")
        buf[start:start + len(junk)] = junk[:data_start - start]
        return bytes(buf)
    if kind == "append":
        return raw + data.draw(st.binary(min_size=1, max_size=64), label="tail")
    header = json.loads(json.dumps(p.header))  # deep copy
    names = sorted(n for n in header if n != "__metadata__")
    if kind == "edit_metadata":  # the metadata checksum is NOT recomputed: this is damage, not an edit
        meta = header["__metadata__"]
        key = data.draw(st.sampled_from(sorted(meta) + ["vae_config", "new_key"]), label="key")
        value = data.draw(st.one_of(st.text(max_size=40), json_values.map(json.dumps)), label="value")
        meta[key] = value
    elif kind == "edit_tensor_entry":
        name = data.draw(st.sampled_from(names), label="tensor")
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="field")
        header[name][field] = data.draw(st.one_of(json_values, st.sampled_from(["F32", "F16", "U8", "F64", "I8"]),
                                                  st.lists(st.integers(-2, 2**20), max_size=5)), label="value")
    else:  # swap_offsets
        a, b = data.draw(st.lists(st.sampled_from(names), min_size=2, max_size=2, unique=True), label="pair")
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    return p.with_header(header)


@FUZZ
@given(data=st.data())
def test_damaged_file_is_refused_or_computes_the_same(pristine, data):
    mutant = mutate(pristine, data)
    out = load_or_refuse(pristine.write(mutant))
    event("refused" if out is None else "loaded")
    if out is not None:
        assert np.array_equal(out, pristine.reference), "a damaged file loaded and computes something else"


@settings(FUZZ, max_examples=20)
@given(indent=st.one_of(st.none(), st.integers(0, 4)), sort_keys=st.booleans(), ascii_only=st.booleans(),
       reverse=st.booleans())
def test_reformatted_header_still_loads_and_computes_the_same(pristine, indent, sort_keys, ascii_only, reverse):
    """The header is JSON: whitespace and key order are not part of the format."""
    items = list(pristine.header.items())
    header = dict(reversed(items) if reverse else items)
    body = json.dumps(header, indent=indent, sort_keys=sort_keys, ensure_ascii=ascii_only).encode()
    path = pristine.write(struct.pack("<Q", len(body)) + body + pristine.data)
    try:
        with hang_guard():
            out = forward(path)
    finally:
        path.unlink()
    assert np.array_equal(out, pristine.reference)


# --- hostile but self-consistent files -------------------------------------------------------------

def resign(header: dict) -> None:
    """Recompute the metadata checksum, as a hostile writer would."""
    meta = header["__metadata__"]
    sums = json.loads(meta["checksums"])
    body = json.dumps({k: v for k, v in meta.items() if k != "checksums"}, sort_keys=True).encode()
    sums["__metadata__"] = f"{zlib.crc32(body) & 0xFFFFFFFF:08x}"
    meta["checksums"] = json.dumps(sums, sort_keys=True)


# config values stay small: an input_size of thousands is a legal config whose RoPE table takes
# gigabytes, which test_format covers in a memory-limited child instead of here
small_json = st.one_of(st.none(), st.booleans(), st.integers(-2, 64), st.sampled_from([0.0, 1e-5, 2.5, 1e12]),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                       st.lists(st.integers(-1, 12), max_size=12))


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_signed_metadata_edits_never_raise_a_foreign_error(pristine, data):
    """Metadata edited and re-signed: the file may be refused (TerditError) or load and run, but no
    other exception may escape load_model or the forward pass."""
    header = json.loads(json.dumps(pristine.header))
    meta = header["__metadata__"]
    kind = data.draw(st.sampled_from(["config_field", "label_map", "other_key"]), label="kind")
    if kind == "config_field":
        cfg = json.loads(meta["config"])
        field = data.draw(st.sampled_from(sorted(cfg) + ["unknown"]), label="field")
        cfg[field] = data.draw(small_json, label="value")
        meta["config"] = json.dumps(cfg)
    elif kind == "label_map":
        lm = {"name": data.draw(st.one_of(st.just("identity"), small_json), label="name"),
              "map": data.draw(st.one_of(st.permutations(list(range(10))), small_json,
                                         st.lists(small_json, min_size=10, max_size=10)), label="map")}
        meta["label_map"] = json.dumps(lm)
    else:
        key = data.draw(st.sampled_from(["format_version", "float_dtype", "packing", "source", "vae_config",
                                         "vae_dtype"]), label="key")
        meta[key] = data.draw(st.one_of(st.text(max_size=8), small_json.map(json.dumps)), label="value")
    resign(header)
    path = pristine.write(pristine.with_header(header))
    try:
        with hang_guard():
            model = terdit_edge.load_model(path, backend="numpy", threads=1)
            x = np.zeros((1, 4, 8, 8), np.float32)
            out = model(x, np.array([5]), np.array([0]))
        assert out.dtype == np.float32
        event("loaded and ran")
    except TerditError as e:
        event(f"refused: {type(e).__name__}")
    finally:
        path.unlink()
