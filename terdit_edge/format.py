"""The .tdit model file: write, read (memory-mapped) and validate.

A .tdit file is a safetensors container (see docs/format.md). Its ``__metadata__`` holds the format
name and version, the model config, the label map, the source, the packing layout, the dtype of the
float parameters and a CRC-32 per tensor plus one over the metadata itself. Tensor names carry a
prefix: ``dit.`` for the diffusion transformer, ``vae.`` for an embedded SD-VAE decoder.

The reader validates everything before any byte is used, and maps the file instead of reading it:
tensors are read-only NumPy views into one ``mmap`` of the file.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from .config import TIMESTEP_FREQ_DIM, ModelConfig
from .errors import ChecksumError, FormatError
from .labels import LABEL_MAPS, make_label_map
from .packing import PACKING_NAME, check_ternary_codes, padded_k

FORMAT_NAME = "terdit-edge"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 << 20  # a 7B model's header is < 1 MB; anything larger is hostile
DIT_PREFIX = "dit."
VAE_PREFIX = "vae."

_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8}
# Offsets (in the file) at which a tensor is used in place: float tensors at a multiple of their
# itemsize; packed ternary bytes anywhere (every kernel reads them as bytes or with unaligned loads;
# the one that wants 32-bit words aligns its own copy, see NumbaBackend). Files from write_tdit always
# meet this (see docs/format.md, "Alignment"); a float tensor of another file that does not is
# copied once into a 64-byte aligned buffer, so the numbers a model computes never depend on where
# its tensors happen to sit in the file (NumPy and BLAS take other code paths, with another
# summation order, for misaligned float operands). Packed bytes are never copied: in a model file
# with an fp16 VAE they follow the VAE's fp16 tensors, whose total size (conv_out has 3 biases) leaves
# them 2 bytes off a multiple of 4, and copying them would double the weights' memory.
_IN_PLACE_ALIGNMENT = {"F32": 4, "F16": 2, "U8": 1}
COPY_ALIGNMENT = 64
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
FLOAT_DTYPES = {"fp32": "F32", "fp16": "F16"}

TERNARY_LAYERS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.1")


def ternary_layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(N, K) of every ternary layer of the model, by layer name (no prefix)."""
    d, kv, f, td = cfg.dim, cfg.kv_dim, cfg.ffn_dim, cfg.cond_dim
    per_block = {"attention.wq": (d, d), "attention.wk": (kv, d), "attention.wv": (kv, d),
                 "attention.wo": (d, d), "feed_forward.w1": (f, d), "feed_forward.w2": (d, f),
                 "feed_forward.w3": (f, d), "adaLN_modulation.1": (6 * d, td)}
    return {f"layers.{i}.{name}": shape for i in range(cfg.n_layers) for name, shape in per_block.items()}


def float_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the full-precision parameters, by checkpoint name (no prefix)."""
    d, td, p = cfg.dim, cfg.cond_dim, cfg.patch_size
    shapes = {
        "x_embedder.weight": (d, p * p * cfg.in_channels), "x_embedder.bias": (d,),
        "t_embedder.mlp.0.weight": (td, TIMESTEP_FREQ_DIM), "t_embedder.mlp.0.bias": (td,),
        "t_embedder.mlp.2.weight": (td, td), "t_embedder.mlp.2.bias": (td,),
        "y_embedder.embedding_table.weight": (cfg.num_classes + 1, td),
        "final_layer.adaLN_modulation.1.weight": (2 * d, td), "final_layer.adaLN_modulation.1.bias": (2 * d,),
        "final_layer.linear.weight": (p * p * cfg.out_channels, d),
        "final_layer.linear.bias": (p * p * cfg.out_channels,),
    }
    for i in range(cfg.n_layers):
        b = f"layers.{i}."
        shapes[b + "attention_norm.weight"] = (d,)
        shapes[b + "ffn_norm.weight"] = (d,)
        shapes[b + "adaLN_modulation.1.bias"] = (6 * d,)
        shapes[b + "adaLN_modulation.2.weight"] = (6 * d,)
        if cfg.qk_norm:
            shapes[b + "attention.q_norm.weight"] = (d,)
            shapes[b + "attention.q_norm.bias"] = (d,)
            shapes[b + "attention.k_norm.weight"] = (cfg.kv_dim,)
            shapes[b + "attention.k_norm.bias"] = (cfg.kv_dim,)
    return shapes


def expected_model_tensors(cfg: ModelConfig, float_dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name (with prefix) -> (safetensors dtype, shape) of every tensor a model section must hold."""
    out = {DIT_PREFIX + k: (float_dtype, s) for k, s in float_param_shapes(cfg).items()}
    for name, (n, k) in ternary_layer_shapes(cfg).items():
        out[DIT_PREFIX + name + ".qweight"] = ("U8", (n, padded_k(k) // 4))
        out[DIT_PREFIX + name + ".alpha"] = ("F32", (1,))
    return out


def _crc(buf) -> str:
    return f"{zlib.crc32(buf) & 0xFFFFFFFF:08x}"


def _metadata_crc(meta: dict[str, str]) -> str:
    body = json.dumps({k: v for k, v in meta.items() if k != "checksums"}, sort_keys=True)
    return _crc(body.encode())


def write_tdit(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write tensors and string metadata as a .tdit file, adding format, version and checksums.

    The file is written next to its destination and renamed into place, so a failure never leaves a
    half-written model behind.
    """
    from safetensors.numpy import save_file

    meta = {k: str(v) for k, v in metadata.items()}
    meta["format"] = FORMAT_NAME
    meta["format_version"] = str(FORMAT_VERSION)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    sums = {k: _crc(memoryview(v).cast("B")) for k, v in arrays.items()}
    sums["__metadata__"] = _metadata_crc(meta)
    meta["checksums"] = json.dumps(sums, sort_keys=True)
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tdit-", suffix=".part", dir=d)
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class TditFile:
    """A validated, memory-mapped .tdit file.

    ``tensors`` maps full tensor names (with ``dit.`` / ``vae.`` prefix) to read-only arrays that
    view the mapped file. ``config`` is the model config (None for a VAE-only file).
    """

    path: str
    metadata: dict[str, str]
    tensors: dict[str, np.ndarray]
    config: ModelConfig | None
    float_dtype: str | None
    label_map: list[int] | None
    label_map_name: str | None
    vae_config_json: str | None
    file_size: int
    _mmap: mmap.mmap | None = field(default=None, repr=False)

    def section(self, prefix: str) -> dict[str, np.ndarray]:
        """Tensors of one section with the prefix removed."""
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def release_pages(self, prefix: str = "") -> int:
        """Drop this process's resident pages of the tensors whose name starts with ``prefix`` (all
        by default); see :func:`release_pages`. Returns the bytes advised."""
        return release_pages(arr for name, arr in self.tensors.items() if name.startswith(prefix))

    @property
    def source(self) -> dict:
        try:
            return json.loads(self.metadata.get("source", "{}"))
        except ValueError:
            return {}


def _mapping_of(arr: np.ndarray):
    """The mmap an array views (through any chain of NumPy views), or None."""
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, mmap.mmap) and not base.closed else None


def release_pages(arrays) -> int:
    """Drop this process's resident pages of memory-mapped arrays (others are skipped); returns
    the bytes advised.

    The arrays stay valid: a .tdit mapping is a read-only view of the file, so a page read again
    is mapped again from the page cache (or the disk), with the same bytes. Used between phases
    that read different weights (checksums, sampling, each VAE layer) so that the resident set
    holds what the running phase reads, not every page read since loading. Pages shared with a
    neighbouring tensor go too and come back when read. A no-op where the platform has no
    MADV_DONTNEED.
    """
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None:  # pragma: no cover - not Linux/macOS
        return 0
    spans: dict[int, tuple] = {}
    for arr in arrays:
        mm = _mapping_of(arr) if arr.nbytes else None
        if mm is None:
            continue
        if id(mm) not in spans:
            spans[id(mm)] = (mm, np.frombuffer(mm, np.uint8, count=1).ctypes.data, [])
        entry = spans[id(mm)]
        start = arr.ctypes.data - entry[1]
        entry[2].append((start - start % mmap.PAGESIZE, start + arr.nbytes))
    done = 0
    for mm, _, ranges in spans.values():
        for lo, hi in _merged(ranges):
            try:
                mm.madvise(advice, lo, hi - lo)
            except (OSError, ValueError):  # pragma: no cover - refused: the pages simply stay
                continue
            done += hi - lo
    return done


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted [lo, hi) byte ranges with overlapping or touching ones joined."""
    out: list[list[int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _parse_header(mm, size: int, path: str) -> tuple[dict, int]:
    if size < 8:
        raise FormatError(f"{path}: file is {size} bytes, too short for a .tdit header (truncated?)")
    (hlen,) = struct.unpack("<Q", mm[:8])
    if hlen < 2 or hlen > MAX_HEADER_BYTES or 8 + hlen > size:
        raise FormatError(f"{path}: header length {hlen} is impossible for a {size}-byte file "
                          "(truncated or not a .tdit file)")
    raw = bytes(mm[8:8 + hlen])
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: header is not valid JSON ({type(e).__name__}); the file is corrupted") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object")
    return header, 8 + hlen


def _tensor_table(header: dict, data_start: int, size: int, path: str) -> dict[str, tuple[str, tuple, int, int]]:
    """Validate offsets, sizes and overlaps as the safetensors spec requires."""
    table = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"{path}: tensor entry {name!r} is malformed")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dt, str) or dt not in _DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has dtype {dt!r}; expected one of {sorted(_DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > 4
                or not all(type(s) is int and 0 <= s < (1 << 40) for s in shape)):
            raise FormatError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int and o >= 0 for o in offs):
            raise FormatError(f"{path}: tensor {name!r} has invalid data_offsets {offs!r}")
        nbytes = math.prod(shape) * np.dtype(_DTYPES[dt]).itemsize  # Python ints: no overflow
        begin, end = offs
        if end - begin != nbytes:
            raise FormatError(f"{path}: tensor {name!r} spans {end - begin} bytes but its shape {shape} "
                              f"and dtype {dt} need {nbytes}")
        if data_start + end > size:
            raise FormatError(f"{path}: tensor {name!r} ends at byte {data_start + end} beyond the file's "
                              f"{size} bytes (truncated?)")
        table[name] = (dt, tuple(shape), begin, end)
    spans = sorted((b, e, n) for n, (_, _, b, e) in table.items())
    pos = 0
    for b, e, n in spans:
        if b != pos:
            raise FormatError(f"{path}: tensor {n!r} starts at {b}, expected {pos} (overlap or gap in the data)")
        pos = e
    if data_start + pos != size:
        raise FormatError(f"{path}: data ends at byte {data_start + pos} but the file has {size} bytes "
                          "(truncated or trailing garbage)")
    return table


def _json_meta(meta: dict, key: str, path: str, kind):
    try:
        value = json.loads(meta[key])
    except KeyError:
        raise FormatError(f"{path}: metadata key {key!r} is missing") from None
    except (ValueError, TypeError, RecursionError):
        raise FormatError(f"{path}: metadata {key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise FormatError(f"{path}: metadata {key!r} must be a JSON {kind.__name__}")
    return value


def _aligned_copy(view: np.ndarray) -> np.ndarray:
    """A read-only copy of `view` whose data starts on a COPY_ALIGNMENT-byte boundary."""
    raw = np.empty(view.nbytes + COPY_ALIGNMENT, dtype=np.uint8)
    start = (-raw.ctypes.data) % COPY_ALIGNMENT
    out = raw[start:start + view.nbytes].view(view.dtype).reshape(view.shape)
    out[...] = view
    out.flags.writeable = False
    return out


def _check_finite(arr: np.ndarray, name: str, path: str) -> None:
    flat = arr.reshape(-1)
    step = 1 << 20
    for i in range(0, flat.size, step):
        if not np.isfinite(flat[i:i + step]).all():
            raise FormatError(f"{path}: tensor {name!r} holds NaN or infinite values")


def read_tdit(path: str | os.PathLike, verify: bool = True) -> TditFile:
    """Map and validate a .tdit file.

    verify=False skips only the per-tensor checksums (for slow storage); every structural check
    (header, versions, dtypes, shapes, byte ranges, ternary codes, metadata) always runs.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise FormatError(f"cannot open model file {path!r}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise FormatError(f"{path}: file is empty")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _read_mapped(mm, size, path, verify)
    except FormatError:
        try:
            mm.close()
        except BufferError:  # views made before the failing check still point into the map;
            pass             # it is released when they are collected
        raise


def _read_mapped(mm, size: int, path: str, verify: bool) -> TditFile:
    header, data_start = _parse_header(mm, size, path)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(f"{path}: not a .tdit file (no string metadata); convert checkpoints with "
                          "`terdit-edge convert`")
    if meta.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not a .tdit file (format is {meta.get('format')!r}, expected {FORMAT_NAME!r})")
    version = meta.get("format_version", "")
    if not (version.isascii() and version.isdigit()):
        raise FormatError(f"{path}: format_version {version!r} is not a number")
    if int(version) != FORMAT_VERSION:
        hint = "upgrade terdit-edge" if int(version) > FORMAT_VERSION else "re-convert the checkpoint"
        raise FormatError(f"{path}: format_version {version} is not supported (this terdit-edge reads "
                          f"version {FORMAT_VERSION}); {hint}")
    checksums = _json_meta(meta, "checksums", path, dict)
    if checksums.get("__metadata__") != _metadata_crc(meta):
        raise ChecksumError(f"{path}: metadata checksum mismatch; the file's metadata was altered or corrupted")
    table = _tensor_table(header, data_start, size, path)

    expected: dict[str, tuple[str, tuple]] = {}
    cfg = label_map = label_name = float_dtype = None
    if "config" in meta:
        cfg = ModelConfig.from_json(meta["config"])
        float_dtype = meta.get("float_dtype")
        if float_dtype not in FLOAT_DTYPES.values():
            raise FormatError(f"{path}: float_dtype {float_dtype!r} must be one of {sorted(FLOAT_DTYPES.values())}")
        if meta.get("packing") != PACKING_NAME:
            raise FormatError(f"{path}: packing {meta.get('packing')!r} is not supported (expected {PACKING_NAME!r})")
        lm = _json_meta(meta, "label_map", path, dict)
        label_name, label_map = lm.get("name"), lm.get("map")
        if (not isinstance(label_map, list) or len(label_map) != cfg.num_classes
                or not all(type(v) is int for v in label_map)
                or sorted(label_map) != list(range(cfg.num_classes))):
            raise FormatError(f"{path}: label_map must name a permutation of the {cfg.num_classes} class ids")
        if label_name not in LABEL_MAPS or label_map != make_label_map(label_name, cfg.num_classes):
            raise FormatError(f"{path}: label_map name {label_name!r} must be one of {LABEL_MAPS} and its map "
                              "must be that map")
        expected.update(expected_model_tensors(cfg, float_dtype))
    vae_json = meta.get("vae_config")
    if vae_json is not None:
        from .vae_config import VAEConfig, expected_vae_tensors  # light: no numba

        vcfg = VAEConfig.from_json(vae_json)
        vdt = meta.get("vae_dtype")
        if vdt not in FLOAT_DTYPES.values():
            raise FormatError(f"{path}: vae_dtype {vdt!r} must be one of {sorted(FLOAT_DTYPES.values())}")
        expected.update({VAE_PREFIX + k: (vdt, tuple(s)) for k, s in expected_vae_tensors(vcfg).items()})
    if cfg is None and vae_json is None:
        raise FormatError(f"{path}: the file holds neither a model config nor a VAE config")

    missing = sorted(set(expected) - set(table))
    unexpected = sorted(set(table) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{path}: tensor list does not match the config: missing {missing[:5]}"
                          f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                          f"{'...' if len(unexpected) > 5 else ''}")
    if set(checksums) != set(table) | {"__metadata__"}:
        raise FormatError(f"{path}: checksum list does not match the tensor list")

    tensors = {}
    for name, (dt, shape, begin, end) in table.items():
        want_dt, want_shape = expected[name]
        if dt != want_dt or shape != want_shape:
            raise FormatError(f"{path}: tensor {name!r} is {dt}{list(shape)}, the config requires "
                              f"{want_dt}{list(want_shape)}")
        arr = np.frombuffer(mm, dtype=_DTYPES[dt], count=int(np.prod(shape, dtype=np.int64)),
                            offset=data_start + begin).reshape(shape)
        if verify:
            crc = _crc(memoryview(mm)[data_start + begin:data_start + end])
            if crc != checksums[name]:
                raise ChecksumError(f"{path}: tensor {name!r} fails its checksum (file corrupted); "
                                    "re-copy or re-convert the model")
        if (data_start + begin) % _IN_PLACE_ALIGNMENT[dt]:
            arr = _aligned_copy(arr)  # a file from another writer: one aligned copy, see _IN_PLACE_ALIGNMENT
        tensors[name] = arr

    if cfg is not None:
        for name, (_, k) in ternary_layer_shapes(cfg).items():
            full = DIT_PREFIX + name
            check_ternary_codes(tensors[full + ".qweight"], k, full)
            alpha = float(tensors[full + ".alpha"][0])
            if not np.isfinite(alpha):
                raise FormatError(f"{path}: tensor {full + '.alpha'!r} is not finite")
    for name, arr in tensors.items():
        if arr.dtype != np.uint8:
            _check_finite(arr, name, path)

    tf = TditFile(path=path, metadata=dict(meta), tensors=tensors, config=cfg, float_dtype=float_dtype,
                  label_map=label_map, label_map_name=label_name, vae_config_json=vae_json,
                  file_size=size, _mmap=mm)
    # the checks above read every page of the file; the model and the VAE map back in what they use
    tf.release_pages()
    return tf
