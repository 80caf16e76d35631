"""The .tdit container: round trip, memory mapping, and every validation the reader performs.

Corrupt files are crafted by rewriting the safetensors header (8-byte little-endian length, JSON,
data). Helpers recompute checksums where a test wants only one specific check to be able to fire.
"""
from __future__ import annotations

import json
import mmap
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

import terdit_edge
from terdit_edge.errors import ChecksumError, FormatError
from terdit_edge.format import read_tdit, write_tdit
from tests.conftest import model_metadata, random_model_tensors, small_config

# --- helpers that take a file apart and put it back together ------------------------------------


def split_file(path) -> tuple[dict, bytes]:
    """(header dict, data bytes) of a safetensors file."""
    raw = Path(path).read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + hlen]), raw[8 + hlen:]


def crc_hex(buf: bytes) -> str:
    return f"{zlib.crc32(buf) & 0xFFFFFFFF:08x}"


def metadata_crc(meta: dict) -> str:
    """The documented metadata checksum: CRC-32 of the sorted-key JSON of every key but "checksums"."""
    return crc_hex(json.dumps({k: v for k, v in meta.items() if k != "checksums"}, sort_keys=True).encode())


def join_file(path, header: dict, data: bytes, fix_metadata_crc: bool = True) -> Path:
    """Write header + data as a safetensors file; by default re-sign the (possibly edited) metadata."""
    meta = header.get("__metadata__")
    if fix_metadata_crc and isinstance(meta, dict) and "checksums" in meta:
        sums = json.loads(meta["checksums"])
        sums["__metadata__"] = metadata_crc(meta)
        meta["checksums"] = json.dumps(sums, sort_keys=True)
    body = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(body)) + body + data)
    return Path(path)


def edit_header(path, edit, fix_metadata_crc: bool = True) -> Path:
    """Apply ``edit(header)`` (in place) and rewrite the file."""
    header, data = split_file(path)
    edit(header)
    return join_file(path, header, data, fix_metadata_crc)


def edit_tensor_bytes(path, name: str, edit, fix_checksum: bool = True) -> Path:
    """Apply ``edit(array)`` to a writable copy of one tensor and write it back into the file.

    With fix_checksum the tensor's CRC is recomputed, so only the value checks can catch the edit.
    """
    header, data = split_file(path)
    info = header[name]
    begin, end = info["data_offsets"]
    dtype = {"F32": np.float32, "F16": np.float16, "U8": np.uint8}[info["dtype"]]
    arr = np.frombuffer(data[begin:end], dtype=dtype).reshape(info["shape"]).copy()
    edit(arr)
    new = arr.tobytes()
    assert len(new) == end - begin
    data = data[:begin] + new + data[end:]
    if fix_checksum:
        meta = header["__metadata__"]
        sums = json.loads(meta["checksums"])
        sums[name] = crc_hex(new)
        meta["checksums"] = json.dumps(sums, sort_keys=True)
    return join_file(path, header, data)


def write_model(tmp_path, name="model.tdit", tensors=None, metadata=None, float_dtype="F32", **cfg_overrides) -> Path:
    """A model file written by write_tdit (valid checksums) from optionally edited tensors/metadata."""
    cfg = small_config(**cfg_overrides)
    tensors = random_model_tensors(cfg, float_dtype) if tensors is None else tensors
    metadata = model_metadata(cfg, float_dtype) if metadata is None else metadata
    path = tmp_path / name
    write_tdit(path, tensors, metadata)
    return path


def expect_format_error(path, match: str, exact_type=FormatError, verify: bool = True) -> FormatError:
    """read_tdit must raise exactly ``exact_type`` with a message matching ``match``."""
    with pytest.raises(FormatError, match=match) as info:
        read_tdit(path, verify=verify)
    assert type(info.value) is exact_type, f"{type(info.value).__name__}: {info.value}"
    return info.value


def tensors_by_end(header: dict) -> list[str]:
    return sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])


# --- round trip -------------------------------------------------------------------------------


def test_round_trip_returns_the_written_arrays_and_metadata(tmp_path):
    cfg = small_config()
    tensors = random_model_tensors(cfg)
    meta = model_metadata(cfg)
    path = tmp_path / "m.tdit"
    write_tdit(path, tensors, meta)
    tf = read_tdit(path)
    assert set(tf.tensors) == set(tensors)
    for name, arr in tensors.items():
        assert tf.tensors[name].dtype == arr.dtype and tf.tensors[name].shape == arr.shape, name
        assert np.array_equal(tf.tensors[name], arr), name
    assert tf.config == cfg
    assert tf.float_dtype == "F32"
    assert tf.label_map == list(range(cfg.num_classes)) and tf.label_map_name == "identity"
    for key, value in meta.items():
        assert tf.metadata[key] == value
    assert tf.metadata["format"] == "terdit-edge" and tf.metadata["format_version"] == "1"
    assert tf.file_size == path.stat().st_size


def test_tensors_are_read_only_views_of_one_memory_map(model_file):
    tf = read_tdit(model_file)
    whole = np.frombuffer(tf._mmap, dtype=np.uint8)
    for name, arr in tf.tensors.items():
        assert np.shares_memory(arr, whole), f"{name} is a copy, not a view of the mapping"
        base = arr
        while isinstance(base, np.ndarray):
            base = base.base
        if isinstance(base, memoryview):  # np.frombuffer keeps a memoryview of the exporting object
            base = base.obj
        assert isinstance(base, mmap.mmap), f"{name}: base chain ends in {type(base).__name__}"
        assert not arr.flags.writeable
    arr = tf.tensors["dit.x_embedder.bias"]
    with pytest.raises(ValueError):
        arr[0] = 1.0
    with pytest.raises(ValueError):
        arr.flags.writeable = True


def test_writer_leaves_no_partial_file_behind(tmp_path):
    cfg = small_config()
    (tmp_path / "m.tdit").mkdir()  # the final rename fails: a directory is in the way
    with pytest.raises(OSError):
        write_tdit(tmp_path / "m.tdit", random_model_tensors(cfg), model_metadata(cfg))
    assert [p.name for p in tmp_path.iterdir()] == ["m.tdit"]


def test_fp16_float_params_round_trip_and_load(tmp_path):
    path = write_model(tmp_path, float_dtype="F16")
    cfg = small_config()
    tensors = random_model_tensors(cfg, "F16")
    tf = read_tdit(path)
    assert tf.float_dtype == "F16"
    assert tf.tensors["dit.x_embedder.weight"].dtype == np.float16
    assert tf.tensors["dit.layers.0.attention.wq.alpha"].dtype == np.float32  # alphas stay F32
    for name, arr in tensors.items():
        assert np.array_equal(tf.tensors[name], arr), name
    model = terdit_edge.load_model(path, backend="numpy")
    assert model.params["x_embedder.weight"].dtype == np.float32
    x = np.zeros((1, 4, 8, 8), np.float32)
    out = model(x, np.array([3]), np.array([1]))
    assert out.shape == (1, 8, 8, 8) and np.isfinite(out).all()


def test_fp16_file_declaring_fp32_tensors_is_rejected(tmp_path):
    cfg = small_config()
    path = write_model(tmp_path, tensors=random_model_tensors(cfg, "F32"), metadata=model_metadata(cfg, "F16"))
    expect_format_error(path, r"requires F16")


# --- the container: size, header length, JSON --------------------------------------------------


def test_missing_file(tmp_path):
    expect_format_error(tmp_path / "nope.tdit", "cannot open")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.tdit"
    path.write_bytes(b"")
    expect_format_error(path, "empty")


@pytest.mark.parametrize("where", ["in_length", "length_only", "mid_header", "end_of_header",
                                   "first_data_byte", "mid_data", "last_byte"])
def test_truncated_file(model_file, where):
    raw = model_file.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    cut = {"in_length": 5, "length_only": 8, "mid_header": 8 + hlen // 2, "end_of_header": 8 + hlen,
           "first_data_byte": 8 + hlen + 1, "mid_data": (8 + hlen + len(raw)) // 2, "last_byte": len(raw) - 1}[where]
    model_file.write_bytes(raw[:cut])
    expect_format_error(model_file, "truncated")


def test_trailing_garbage(model_file):
    model_file.write_bytes(model_file.read_bytes() + b"\0" * 16)
    expect_format_error(model_file, "trailing garbage")


@pytest.mark.parametrize("hlen", [0, 1, "size", 2**63 + 5, 2**64 - 1])
def test_header_length_beyond_the_file(model_file, hlen):
    raw = model_file.read_bytes()
    hlen = len(raw) if hlen == "size" else hlen
    model_file.write_bytes(struct.pack("<Q", hlen) + raw[8:])
    expect_format_error(model_file, f"header length {hlen} is impossible")


@pytest.mark.parametrize("body", [b"{not json at all}", b"\xff\xfe{}", b"[" * 50000 + b"]" * 50000,
                                  b'{"a": 1', b"   "])
def test_header_that_is_not_json(tmp_path, body):
    path = tmp_path / "bad.tdit"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    expect_format_error(path, "not valid JSON")


def test_header_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.tdit"
    body = b"[1, 2, 3]"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    expect_format_error(path, "JSON object")


def test_plain_safetensors_file_is_not_a_tdit(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"weight": np.ones((3, 4), np.float32)}, str(path))
    expect_format_error(path, r"not a \.tdit file.*convert")


def test_safetensors_with_foreign_metadata_is_not_a_tdit(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"weight": np.ones((3, 4), np.float32)}, str(path), metadata={"format": "pt"})
    expect_format_error(path, r"not a \.tdit file \(format is 'pt'")


def test_non_string_metadata_value(model_file):
    edit_header(model_file, lambda h: h["__metadata__"].update(source={"nested": 1}), fix_metadata_crc=False)
    expect_format_error(model_file, "no string metadata")


# --- versions and checksums of the metadata ----------------------------------------------------


def test_newer_format_version_says_upgrade(model_file):
    edit_header(model_file, lambda h: h["__metadata__"].update(format_version="2"))
    expect_format_error(model_file, r"format_version 2 is not supported.*upgrade terdit-edge")


def test_older_format_version_says_reconvert(model_file):
    edit_header(model_file, lambda h: h["__metadata__"].update(format_version="0"))
    expect_format_error(model_file, r"format_version 0 is not supported.*re-convert")


@pytest.mark.parametrize("version", ["", "one", "1.0", "-1", "\u00b2", "\u2460"])
def test_format_version_that_is_not_a_number(model_file, version):
    # "\u00b2" (superscript two) and "\u2460" (circled one) pass str.isdigit() but int() rejects them
    edit_header(model_file, lambda h: h["__metadata__"].update(format_version=version))
    expect_format_error(model_file, "format_version")


def test_metadata_checksum_mismatch(model_file):
    edit_header(model_file, lambda h: h["__metadata__"].update(source='{"edited": true}'), fix_metadata_crc=False)
    expect_format_error(model_file, "metadata checksum mismatch", exact_type=ChecksumError)


def test_metadata_checksum_is_checked_even_without_verify(model_file):
    edit_header(model_file, lambda h: h["__metadata__"].update(source='{"edited": true}'), fix_metadata_crc=False)
    expect_format_error(model_file, "metadata checksum mismatch", exact_type=ChecksumError, verify=False)


def test_missing_checksums_key(model_file):
    edit_header(model_file, lambda h: h["__metadata__"].pop("checksums"))
    expect_format_error(model_file, "'checksums' is missing")


def test_checksum_list_that_misses_a_tensor(model_file):
    def drop_one(h):
        sums = json.loads(h["__metadata__"]["checksums"])
        del sums["dit.x_embedder.bias"]
        h["__metadata__"]["checksums"] = json.dumps(sums)
    edit_header(model_file, drop_one)
    expect_format_error(model_file, "checksum list does not match")


# --- the tensor table: dtypes, shapes, byte ranges ---------------------------------------------


def test_unsupported_dtype(model_file):
    edit_header(model_file, lambda h: h["dit.x_embedder.bias"].update(dtype="F64", shape=[32]))
    expect_format_error(model_file, r"'dit.x_embedder.bias' has dtype 'F64'")


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, None, 32])
def test_dtype_of_the_wrong_json_type(model_file, dtype):
    edit_header(model_file, lambda h: h["dit.x_embedder.bias"].update(dtype=dtype))
    expect_format_error(model_file, r"'dit.x_embedder.bias' has dtype")


def test_wrong_dtype_of_a_tensor(model_file):
    # same byte count, so only the check against the config can catch it
    edit_header(model_file, lambda h: h["dit.layers.0.attention.wq.alpha"].update(dtype="U8", shape=[4]))
    expect_format_error(model_file, r"'dit.layers.0.attention.wq.alpha' is U8\[4\], the config requires F32\[1\]")


def test_wrong_shape_of_a_tensor(model_file):
    edit_header(model_file, lambda h: h["dit.x_embedder.weight"].update(shape=[16, 64]))
    expect_format_error(model_file, r"'dit.x_embedder.weight' is F32\[16, 64\], the config requires F32\[64, 16\]")


@pytest.mark.parametrize("shape", [[-64], [64.0], "64", [1, 1, 1, 1, 64], [2**41]])
def test_invalid_shape(model_file, shape):
    edit_header(model_file, lambda h: h["dit.x_embedder.bias"].update(shape=shape))
    expect_format_error(model_file, "invalid shape")


@pytest.mark.parametrize("offsets", [[0], [-4, 252], [0.0, 256.0], "0-256", [0, 256, 512]])
def test_invalid_data_offsets(model_file, offsets):
    edit_header(model_file, lambda h: h["dit.x_embedder.bias"].update(data_offsets=offsets))
    expect_format_error(model_file, "invalid data_offsets")


def test_malformed_tensor_entry(model_file):
    edit_header(model_file, lambda h: h["dit.x_embedder.bias"].update(extra=1))
    expect_format_error(model_file, "'dit.x_embedder.bias' is malformed")


def test_byte_count_that_does_not_match_shape_and_dtype(model_file):
    edit_header(model_file, lambda h: h["dit.x_embedder.bias"].update(shape=[63]))
    expect_format_error(model_file, r"spans 256 bytes but its shape \[63\] and dtype F32 need 252")


def test_shape_whose_element_count_overflows_int64(model_file):
    # 64 * (2^29 + 2^15 + 1) * (2^29 - 2^15 + 1) = 64 * (2^58 + 1) = 2^64 + 64: in int64 this wraps to
    # 64 elements, exactly the 256 bytes of the range, so only a later check can refuse it
    shape = [64, 2**29 + 2**15 + 1, 2**29 - 2**15 + 1]
    edit_header(model_file, lambda h: h["dit.x_embedder.bias"].update(shape=shape))
    with pytest.raises(FormatError):
        read_tdit(model_file)


def test_overlapping_byte_ranges(model_file):
    def edit(h):  # two 4-byte alphas share a range; another 4-byte range is left uncovered
        h["dit.layers.1.attention.wq.alpha"]["data_offsets"] = list(h["dit.layers.0.attention.wq.alpha"]["data_offsets"])
    edit_header(model_file, edit)
    expect_format_error(model_file, "overlap or gap")


def test_byte_range_beyond_the_file(model_file):
    def edit(h):
        last = tensors_by_end(h)[-1]
        b, e = h[last]["data_offsets"]
        h[last]["data_offsets"] = [b + 8, e + 8]
    edit_header(model_file, edit)
    expect_format_error(model_file, "beyond the file")


def test_gap_between_byte_ranges(model_file):
    header, data = split_file(model_file)
    last = tensors_by_end(header)[-1]
    b, e = header[last]["data_offsets"]
    header[last]["data_offsets"] = [b + 8, e + 8]
    join_file(model_file, header, data[:b] + b"\0" * 8 + data[b:])
    expect_format_error(model_file, rf"'{last}' starts at {b + 8}, expected {b} \(overlap or gap")


# --- the tensor list against the config --------------------------------------------------------


def test_missing_tensor(tmp_path):
    cfg = small_config()
    tensors = random_model_tensors(cfg)
    del tensors["dit.layers.1.feed_forward.w2.qweight"]
    path = write_model(tmp_path, tensors=tensors)
    expect_format_error(path, r"missing \['dit.layers.1.feed_forward.w2.qweight'\]")


def test_unexpected_tensor(tmp_path):
    cfg = small_config()
    tensors = random_model_tensors(cfg)
    tensors["dit.layers.2.attention_norm.weight"] = np.ones(64, np.float32)
    path = write_model(tmp_path, tensors=tensors)
    expect_format_error(path, r"unexpected \['dit.layers.2.attention_norm.weight'\]")


def test_qk_norm_config_requires_the_norm_tensors(tmp_path):
    cfg = small_config()
    metadata = model_metadata(small_config(qk_norm=True))
    path = write_model(tmp_path, tensors=random_model_tensors(cfg), metadata=metadata)
    expect_format_error(path, r"missing \['dit.layers.0.attention.k_norm.bias'")


def test_neither_model_nor_vae(tmp_path):
    path = tmp_path / "m.tdit"
    write_tdit(path, {"dit.x": np.ones(3, np.float32)}, {"source": "{}"})
    expect_format_error(path, "neither a model config nor a VAE config")


# --- the values: ternary codes, padding, finiteness --------------------------------------------


def test_invalid_ternary_code_with_a_valid_checksum(model_file):
    def set_code_3(packed):
        packed[2, 5] |= 0b11 << 4  # the weight at bits 5-4 of byte 5 becomes code 3
    edit_tensor_bytes(model_file, "dit.layers.1.attention.wk.qweight", set_code_3)
    expect_format_error(model_file, r"'dit.layers.1.attention.wk' holds an invalid ternary code 3 \(row 2, byte 5\)")


def test_invalid_ternary_code_is_caught_without_verify(model_file):
    edit_tensor_bytes(model_file, "dit.layers.0.feed_forward.w1.qweight", lambda p: p.__setitem__((0, 0), 0xFF),
                      fix_checksum=False)
    expect_format_error(model_file, "invalid ternary code 3", verify=False)


@pytest.mark.parametrize("layer,code", [("layers.0.adaLN_modulation.1", 0), ("layers.1.feed_forward.w2", 2)])
def test_non_zero_padding_codes(model_file, layer, code):
    # adaLN_modulation.1 has K = 64 and w2 has K = 96 in 128-wide blocks; weight k = 64 + j (bits 5-4 of
    # byte j) and k = 96 + j (bits 7-6) are padding there.
    shift = 4 if layer.endswith("adaLN_modulation.1") else 6
    def set_padding(packed):
        packed[-1, 31] = (packed[-1, 31] & ~np.uint8(0b11 << shift)) | np.uint8(code << shift)
    edit_tensor_bytes(model_file, f"dit.{layer}.qweight", set_padding)
    expect_format_error(model_file, rf"'dit.{layer}' has non-zero padding weights beyond K")


@pytest.mark.parametrize("name,value", [("dit.final_layer.linear.bias", np.nan),
                                        ("dit.layers.1.ffn_norm.weight", np.inf),
                                        ("dit.y_embedder.embedding_table.weight", -np.inf)])
def test_non_finite_float_param(model_file, name, value):
    edit_tensor_bytes(model_file, name, lambda a: a.reshape(-1).__setitem__(7, value))
    expect_format_error(model_file, rf"'{name}' holds NaN or infinite values")


def test_nan_in_fp16_float_param(tmp_path):
    path = write_model(tmp_path, float_dtype="F16")
    edit_tensor_bytes(path, "dit.t_embedder.mlp.2.weight", lambda a: a.__setitem__((3, 3), np.nan))
    expect_format_error(path, r"'dit.t_embedder.mlp.2.weight' holds NaN")


def test_nan_alpha(model_file):
    edit_tensor_bytes(model_file, "dit.layers.1.attention.wo.alpha", lambda a: a.__setitem__(0, np.nan))
    expect_format_error(model_file, r"'dit.layers.1.attention.wo.alpha' is not finite")


# --- metadata values -----------------------------------------------------------------------------


def _meta_with(**changes) -> dict:
    meta = model_metadata(small_config())
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


@pytest.mark.parametrize("changes,match", [
    (dict(config="{dim: 64"), "config metadata is not valid JSON"),
    (dict(config="[1, 2]"), "config metadata must be a JSON object"),
    (dict(config=json.dumps({**json.loads(small_config().to_json()), "flash": True})), r"unknown keys \['flash'\]"),
    (dict(config=json.dumps({k: v for k, v in json.loads(small_config().to_json()).items() if k != "dim"})),
     r"missing keys \['dim'\]"),
    (dict(config=json.dumps({**json.loads(small_config().to_json()), "n_heads": 3})), "split into 3 heads"),
    (dict(config=json.dumps({**json.loads(small_config().to_json()), "dim": 64.0})), "config.dim must be an integer in"),
    (dict(config=json.dumps({**json.loads(small_config().to_json()), "qk_norm": 1})), "config.qk_norm must be a boolean"),
    (dict(float_dtype="BF16"), r"float_dtype 'BF16' must be one of"),
    (dict(float_dtype=None), "float_dtype None must be one of"),
    (dict(packing="tdit2-k64"), r"packing 'tdit2-k64' is not supported"),
    (dict(label_map="identity"), "metadata 'label_map' is not valid JSON"),
    (dict(label_map="[0, 1]"), "metadata 'label_map' must be a JSON dict"),
    (dict(label_map=None), "metadata key 'label_map' is missing"),
    (dict(label_map=json.dumps({"name": "identity", "map": [0] * 10})), "label_map must name a permutation"),
    (dict(label_map=json.dumps({"name": "identity", "map": list(range(9))})), "label_map must name a permutation"),
    (dict(label_map=json.dumps({"name": "identity", "map": list(range(1, 11))})), "label_map must name a permutation"),
    (dict(label_map=json.dumps({"name": 7, "map": list(range(10))})), "label_map name 7 must be one of"),
    (dict(label_map=json.dumps({"name": "bogus", "map": list(range(10))})), "label_map"),  # docs/format.md: terdit|identity
    (dict(label_map=json.dumps({"name": "identity", "map": [0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9]})),
     "label_map must name a permutation"),
    (dict(label_map=json.dumps({"name": "identity", "map": ["0", 1, 2, 3, 4, 5, 6, 7, 8, 9]})),
     "label_map must name a permutation"),
    (dict(label_map=json.dumps({"name": "identity", "map": [None, 1, 2, 3, 4, 5, 6, 7, 8, 9]})),
     "label_map must name a permutation"),
], ids=["config_not_json", "config_not_object", "config_unknown_key", "config_missing_key", "config_inconsistent",
        "config_float_dim", "config_int_bool", "float_dtype_unknown", "float_dtype_missing", "packing_unknown",
        "label_map_not_json", "label_map_not_object", "label_map_missing", "label_map_duplicates",
        "label_map_short", "label_map_shifted", "label_map_name_not_str", "label_map_name_unknown", "label_map_float_entry",
        "label_map_str_entry", "label_map_null_entry"])
def test_bad_metadata_values(tmp_path, changes, match):
    path = write_model(tmp_path, metadata=_meta_with(**changes))
    expect_format_error(path, match)


def test_config_whose_activations_cannot_exist_is_rejected_at_load(tmp_path):
    """input_size is bounded only per field (<= 2^20); (2^20 / 2)^2 tokens would need a RoPE table of
    terabytes. Loading must refuse with a FormatError instead of allocating (checked in a child with a
    2 GiB address-space limit so that a failure cannot take the machine's memory)."""
    import subprocess
    import sys
    import textwrap

    meta = _meta_with(config=json.dumps({**json.loads(small_config().to_json()), "input_size": 1 << 20}))
    path = write_model(tmp_path, metadata=meta)
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        import terdit_edge
        try:
            terdit_edge.load_model({str(path)!r}, backend="numpy", threads=1)
        except terdit_edge.FormatError as e:
            print("FormatError:", e); sys.exit(0)
        except BaseException as e:
            print("wrong error:", type(e).__name__, e); sys.exit(2)
        print("loaded"); sys.exit(3)
    """)
    from tests.conftest import child_env

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=child_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]


# --- per-tensor checksums and verify=False ------------------------------------------------------


def _nudge(a):
    a.reshape(-1)[0] += 1.0  # a plausible, finite, wrong value: only the checksum can catch it


def test_tensor_checksum_mismatch(model_file):
    edit_tensor_bytes(model_file, "dit.final_layer.linear.weight", _nudge, fix_checksum=False)
    expect_format_error(model_file, r"'dit.final_layer.linear.weight' fails its checksum", exact_type=ChecksumError)


def test_checksum_mismatch_through_load_model(model_file):
    edit_tensor_bytes(model_file, "dit.x_embedder.bias", _nudge, fix_checksum=False)
    with pytest.raises(ChecksumError, match="'dit.x_embedder.bias' fails its checksum"):
        terdit_edge.load_model(model_file, backend="numpy")


def test_verify_false_skips_only_the_tensor_checksums(model_file):
    original = read_tdit(model_file).tensors["dit.final_layer.linear.weight"].copy()
    edit_tensor_bytes(model_file, "dit.final_layer.linear.weight", _nudge, fix_checksum=False)
    with pytest.raises(ChecksumError):
        read_tdit(model_file, verify=True)
    tf = read_tdit(model_file, verify=False)
    loaded = tf.tensors["dit.final_layer.linear.weight"]
    assert loaded.reshape(-1)[0] == original.reshape(-1)[0] + np.float32(1)
    assert np.array_equal(loaded.reshape(-1)[1:], original.reshape(-1)[1:])
    model = terdit_edge.load_model(model_file, backend="numpy", verify=False)
    assert model(np.zeros((1, 4, 8, 8), np.float32), np.array([0]), np.array([0])).shape == (1, 8, 8, 8)


def test_an_error_found_after_mapping_tensors_is_still_a_format_error(tmp_path):
    """Errors raised once tensors already view the mapping (late checksum, code, NaN checks) must come
    out as FormatError, not as an error about closing a map that still has views."""
    cfg = small_config()
    tensors = random_model_tensors(cfg)
    tensors["dit.layers.1.attention.wq.qweight"] = tensors["dit.layers.1.attention.wq.qweight"].copy()
    tensors["dit.layers.1.attention.wq.qweight"][0, 0] = 0xFF
    path = write_model(tmp_path, tensors=tensors)
    with pytest.raises(FormatError):
        read_tdit(path)
