"""TerDiT checkpoints -> .tdit model files.

Reads the official release layout (packed uint8 ternary weights, ``consolidated_ema_ternary``) and
training / QAT checkpoints (float weights ternarized with the absmean rule), infers the config from
tensor shapes and ``model_args.pth``, packs the ternary weights 2 bits each and writes one file.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from terdit_edge._version import __version__
from terdit_edge.config import ModelConfig
from terdit_edge.errors import ConvertError, TerditError
from terdit_edge.format import (
    DIT_PREFIX,
    FLOAT_DTYPES,
    float_param_shapes,
    read_tdit,
    ternary_layer_shapes,
    write_tdit,
)
from terdit_edge.labels import LABEL_MAPS, make_label_map
from terdit_edge.packing import PACKING_NAME, pack_ternary_2bit

from .torch_io import _torch, load_torch_file

DEFAULT_N_HEADS = 32
_IGNORED_BUFFERS = re.compile(r"(^|\.)freqs_cis$")
# Key renames applied to every layout: wrapper prefixes of training code are dropped, and a bare
# label-table parameter gets the nn.Embedding's ".weight" name (docs/model.md §2).
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_RENAMED_KEYS = {"y_embedder.embedding_table": "y_embedder.embedding_table.weight"}


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout of the ternary weights (docs/model.md §3): the converter's extension point.

    ``weight_files``: this layout's file names in a checkpoint directory, EMA first.
    ``detect(wq)``: whether a state dict is in this layout, from its first ``attention.wq.weight``.
    ``rows_per_stored_row``: rows of Q per stored weight row (packed layouts hold several).
    ``to_codes(w, n, k)``: the stored weight of an (n, k) layer -> Q as int8 (n, k) in {-1, 0, 1};
    raises ConvertError (without the layer name, which the caller adds) on a malformed weight.
    """

    name: str
    weight_files: tuple[str, ...]
    detect: Callable
    rows_per_stored_row: int
    to_codes: Callable


def _released_codes(w, n: int, k: int) -> np.ndarray:
    if w.dtype != _torch().uint8 or tuple(w.shape) != (n // 4, k):
        raise ConvertError(f"is {w.dtype}{tuple(w.shape)}, expected packed uint8 ({n // 4}, {k})")
    return unpack_released_ternary(w.numpy())


def _qat_codes(w, n: int, k: int) -> np.ndarray:
    if not w.is_floating_point() or tuple(w.shape) != (n, k):
        raise ConvertError(f"is {w.dtype}{tuple(w.shape)}, expected float ({n}, {k})")
    if not bool(_torch().isfinite(w).all()):
        raise ConvertError("holds NaN or infinite values")
    return ternarize_absmean(w)


# Detection runs in this order; the first match wins. A new layout is one entry here (plus its tests).
LAYOUTS = (
    Layout("released-packed", ("consolidated_ema_ternary.00-of-01.pth", "consolidated_ternary.00-of-01.pth"),
           detect=lambda wq: wq.dtype == _torch().uint8, rows_per_stored_row=4, to_codes=_released_codes),
    Layout("qat-float", ("consolidated_ema.00-of-01.pth", "consolidated.00-of-01.pth"),
           detect=lambda wq: wq.is_floating_point(), rows_per_stored_row=1, to_codes=_qat_codes),
)
# Preference order inside a checkpoint directory: EMA before raw, then the layouts in table order.
WEIGHT_FILES = tuple(f for i in range(2) for lay in LAYOUTS for f in lay.weight_files[i:i + 1])


def layout_of(state: dict) -> Layout:
    """The layout of a state dict, by its first wq weight; ConvertError when no layout matches."""
    wq = state["layers.0.attention.wq.weight"]
    for lay in LAYOUTS:
        if lay.detect(wq):
            return lay
    raise ConvertError(f"layers.0.attention.wq.weight is {wq.dtype}: not a known ternary checkpoint layout "
                       f"({', '.join(lay.name for lay in LAYOUTS)})")


@dataclass
class Checkpoint:
    state: dict          # name -> torch.Tensor
    model_args: dict     # from model_args.pth (may be empty)
    weights_path: str
    source_bytes: int


def _namespace_dict(ns) -> dict:
    if ns is None:
        return {}
    if isinstance(ns, dict):
        return dict(ns)
    return dict(vars(ns))


def read_checkpoint(src: str, weights: str | None = None) -> Checkpoint:
    """Load the state dict (and model_args when present) of a checkpoint directory or file."""
    torch = _torch()
    model_args = {}
    if os.path.isdir(src):
        args_path = os.path.join(src, "model_args.pth")
        if os.path.isfile(args_path):
            model_args = _namespace_dict(load_torch_file(args_path))
        if weights is None:
            found = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(src, f))]
            if not found:
                raise ConvertError(f"{src}: no TerDiT weights file found; expected one of {list(WEIGHT_FILES)} "
                                   "(or pass --weights FILE)")
            weights = found[0]
        inside = os.path.join(src, weights)
        weights_path = inside if os.path.isfile(inside) else weights  # the directory's own file first
    elif os.path.isfile(src):
        if weights is not None:
            raise ConvertError("--weights only applies when SRC is a checkpoint directory")
        weights_path = src
    else:
        raise ConvertError(f"checkpoint {src!r} does not exist")
    obj = load_torch_file(weights_path)
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict", "module"):  # training checkpoints nest the weights
            if key in obj and isinstance(obj[key], dict) and not torch.is_tensor(obj[key]):
                if not model_args and "args" in obj:
                    model_args = _namespace_dict(obj["args"])
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ConvertError(f"{weights_path}: not a TerDiT state dict (found {type(obj).__name__})")
    state = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not torch.is_tensor(v):
            raise ConvertError(f"{weights_path}: entry {k!r} is not a tensor; not a TerDiT state dict")
        for prefix in _STRIP_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[_RENAMED_KEYS.get(k, k)] = v
    return Checkpoint(state, model_args, weights_path, os.path.getsize(weights_path))


def _shape(state, name) -> tuple[int, ...]:
    if name not in state:
        raise ConvertError(f"not a TerDiT checkpoint: tensor {name!r} is missing")
    return tuple(state[name].shape)


def infer_config(ck: Checkpoint, n_heads: int | None = None, image_size: int | None = None,
                 guided_channels: int | None = None) -> tuple[ModelConfig, str]:
    """Config from tensor shapes and model_args. Returns (config, layout name) with the layout one of
    :data:`LAYOUTS` ("released-packed" or "qat-float")."""
    s, args = ck.state, ck.model_args
    if "x_embedder.weight" not in s or "layers.0.attention.wq.weight" not in s:
        raise ConvertError("not a TerDiT checkpoint: expected DiT-LLaMA tensors such as 'x_embedder.weight' "
                           f"and 'layers.0.attention.wq.weight'; found e.g. {sorted(s)[:4]}")
    dim, in_feat = _shape(s, "x_embedder.weight")
    cond_dim = _shape(s, "t_embedder.mlp.0.weight")[0]
    num_classes = _shape(s, "y_embedder.embedding_table.weight")[0] - 1
    out_feat = _shape(s, "final_layer.linear.weight")[0]
    n_layers = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"layers\.(\d+)\.", k)))
    layout = layout_of(s)
    rows = layout.rows_per_stored_row
    kv_dim = _shape(s, "layers.0.attention.wk.weight")[0] * rows
    ffn_dim = _shape(s, "layers.0.feed_forward.w1.weight")[0] * rows

    patch = args.get("patch_size")
    if patch is None:
        m = re.search(r"patch(\d+)", str(args.get("model", "")))
        patch = int(m.group(1)) if m else 2
    if in_feat % (patch * patch):
        raise ConvertError(f"x_embedder input width {in_feat} is not patch_size^2 x channels (patch {patch})")
    in_channels = in_feat // (patch * patch)
    if out_feat != 2 * in_feat:
        raise ConvertError(f"final_layer.linear has {out_feat} outputs; a learn_sigma TerDiT needs {2 * in_feat}")
    heads = n_heads or args.get("n_heads") or DEFAULT_N_HEADS
    if dim % heads:
        raise ConvertError(f"dim {dim} does not split into {heads} heads; pass --n-heads")
    head_dim = dim // heads
    if kv_dim % head_dim:
        raise ConvertError(f"wk has {kv_dim} outputs, not a multiple of head_dim {head_dim}; check --n-heads")
    vae = args.get("vae", "ema" if in_channels == 4 else "none")
    latent = vae not in (None, "none", "", False)
    size = image_size or args.get("image_size") or (256 if latent else None)
    if size is None:
        raise ConvertError("cannot tell the image size of a pixel-space model; pass --image-size")
    input_size = size // 8 if latent else size
    qk_norm = "layers.0.attention.q_norm.weight" in s
    if "qk_norm" in args and bool(args["qk_norm"]) != qk_norm:
        raise ConvertError(f"model_args says qk_norm={args['qk_norm']} but the weights "
                           f"{'have' if qk_norm else 'lack'} q_norm/k_norm tensors")
    if "num_classes" in args and int(args["num_classes"]) != num_classes:
        raise ConvertError(f"model_args says num_classes={args['num_classes']} but y_embedder has "
                           f"{num_classes} + 1 rows")
    if guided_channels is None:
        guided_channels = 3 if (latent and in_channels == 4) else in_channels
    try:
        cfg = ModelConfig(dim=dim, n_layers=n_layers, n_heads=heads, n_kv_heads=kv_dim // head_dim,
                          ffn_dim=ffn_dim, cond_dim=cond_dim, patch_size=patch, in_channels=in_channels,
                          input_size=input_size, learn_sigma=True, num_classes=num_classes, qk_norm=qk_norm,
                          guided_channels=guided_channels, latent=latent).validate()
    except TerditError as e:
        raise ConvertError(f"inferred config is invalid: {e}") from None
    return cfg, layout.name


def unpack_released_ternary(packed: np.ndarray) -> np.ndarray:
    """Released layout uint8 (out/4, in) -> int8 Q (out, in).

    Row r of the packed matrix holds rows r, r + out/4, r + 2 out/4, r + 3 out/4 of Q in bits 7-6,
    5-4, 3-2, 1-0; a 2-bit field f means Q = f - 1, and f = 3 is invalid.
    """
    packed = np.asarray(packed, dtype=np.uint8)
    fields = [(packed >> shift) & 3 for shift in (6, 4, 2, 0)]
    codes = np.concatenate(fields, axis=0)
    if (codes == 3).any():
        raise ConvertError("holds the invalid 2-bit code 3 (a released packed weight never does)")
    return codes.astype(np.int8) - 1


def ternarize_absmean(weight) -> np.ndarray:
    """QAT float weight (out, in) -> Q = clip(round(w / (mean|w| + 1e-6)), -1, 1), one gamma per tensor
    (torch.round: half to even), computed with torch in float32 as in training."""
    w = weight.float()
    gamma = w.abs().mean()
    return (w / (gamma + 1e-6)).round().clamp(-1, 1).to(_torch().int8).numpy()


def _expected_checkpoint_keys(cfg: ModelConfig) -> set[str]:
    keys = set(float_param_shapes(cfg))
    for name in ternary_layer_shapes(cfg):
        keys |= {name + ".weight", name + ".alphas"}
    return keys


def build_tensors(ck: Checkpoint, cfg: ModelConfig, layout: str, dtype: str, log=print):
    """Checkpoint state -> (tensors with "dit." prefix, stats)."""
    s = {k: v for k, v in ck.state.items() if not _IGNORED_BUFFERS.search(k)}
    expected = _expected_checkpoint_keys(cfg)
    missing, unexpected = sorted(expected - set(s)), sorted(set(s) - expected)
    if missing or unexpected:
        raise ConvertError(f"state dict does not match a TerDiT model with config {cfg.to_json()}: "
                           f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                           f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    np_float = np.float16 if dtype == "fp16" else np.float32
    tensors, n_ternary, n_zero, n_float = {}, 0, 0, 0
    for name, shape in float_param_shapes(cfg).items():
        t = s[name]
        if tuple(t.shape) != shape:
            raise ConvertError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point():
            raise ConvertError(f"tensor {name!r} must be floating point, found {t.dtype}")
        arr = t.float().numpy()
        if not np.isfinite(arr).all():
            raise ConvertError(f"tensor {name!r} holds NaN or infinite values")
        if dtype == "fp16" and np.abs(arr).max(initial=0) > np.finfo(np.float16).max:
            raise ConvertError(f"tensor {name!r} holds values beyond the fp16 (float16) range "
                               f"(max |x| = {np.abs(arr).max():.4g}); convert with --dtype fp32")
        tensors[DIT_PREFIX + name] = arr.astype(np_float)
        n_float += arr.size
    layers = ternary_layer_shapes(cfg)
    lay = next((entry for entry in LAYOUTS if entry.name == layout), None)
    if lay is None:
        raise ConvertError(f"unknown checkpoint layout {layout!r}; known: {[entry.name for entry in LAYOUTS]}")
    t0 = time.time()
    for idx, (name, (n, k)) in enumerate(layers.items()):
        try:
            q = lay.to_codes(s[name + ".weight"], n, k)
        except ConvertError as e:
            raise ConvertError(f"tensor {name}.weight {e}") from None
        alphas = s[name + ".alphas"]
        if alphas.numel() != 1 or not alphas.is_floating_point():
            raise ConvertError(f"tensor {name}.alphas must hold one float, found {alphas.dtype}{tuple(alphas.shape)}")
        alpha = np.float32(alphas.float().reshape(-1)[0].item())
        if not np.isfinite(alpha):
            raise ConvertError(f"tensor {name}.alphas is not finite")
        tensors[DIT_PREFIX + name + ".qweight"] = pack_ternary_2bit(q)
        tensors[DIT_PREFIX + name + ".alpha"] = np.array([alpha], dtype=np.float32)
        n_ternary += q.size
        n_zero += int(np.count_nonzero(q == 0))
        if log and (idx + 1) % 8 == 0 and time.time() - t0 > 2:
            log(f"  packed {idx + 1}/{len(layers)} ternary layers")
    return tensors, {"ternary_params": n_ternary, "ternary_zero_fraction": n_zero / max(1, n_ternary),
                     "float_params": n_float}


def _human(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024
    return ""


def convert(src: str, out: str, label_map: str | None = None, n_heads: int | None = None, dtype: str = "fp32",
            weights: str | None = None, image_size: int | None = None, guided_channels: int | None = None,
            vae: str | None = None, vae_dtype: str = "fp16", log=print, vae_encoder: bool = False) -> dict:
    """Convert a TerDiT checkpoint (and optionally an SD-VAE) into one .tdit file; returns a summary.
    ``vae_encoder``: keep the VAE's encoder too (image-to-image and inpainting need it)."""
    if dtype not in FLOAT_DTYPES:
        raise ConvertError(f"--dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
    if label_map is not None and label_map not in LABEL_MAPS:
        raise ConvertError(f"--label-map must be one of {LABEL_MAPS}, got {label_map!r}")
    log = log or (lambda *a: None)
    ck = read_checkpoint(src, weights)
    cfg, layout = infer_config(ck, n_heads=n_heads, image_size=image_size, guided_channels=guided_channels)
    if label_map is None:
        label_map = "terdit" if cfg.num_classes == 1000 else "identity"
    log(f"reading {ck.weights_path} ({layout}, {_human(ck.source_bytes)})")
    tensors, stats = build_tensors(ck, cfg, layout, dtype, log)
    # the checkpoint's name only: a path would publish the converting machine's directories
    source = {"path": os.path.basename(os.path.abspath(src)), "weights": os.path.basename(ck.weights_path),
              "layout": layout,
              "model": str(ck.model_args.get("model", "")), "converter": f"terdit-edge {__version__}",
              "model_args": {k: v for k, v in ck.model_args.items() if isinstance(v, (int, float, str, bool))}}
    metadata = {
        "config": cfg.to_json(),
        "float_dtype": FLOAT_DTYPES[dtype],
        "packing": PACKING_NAME,
        "label_map": json.dumps({"name": label_map, "map": make_label_map(label_map, cfg.num_classes)}),
        "source": json.dumps(source, sort_keys=True, default=str),
    }
    if vae is not None:
        from .vae import vae_tensors_for_file
        vae_meta, vae_tensors = vae_tensors_for_file(vae, vae_dtype, log=log, encoder=vae_encoder)
        metadata.update(vae_meta)
        tensors.update(vae_tensors)
    write_tdit(out, tensors, metadata)
    tf = read_tdit(out, verify=True)  # the converter checks its own output
    first = next(iter(ternary_layer_shapes(cfg)))
    if not np.array_equal(tf.tensors[DIT_PREFIX + first + ".qweight"], tensors[DIT_PREFIX + first + ".qweight"]):
        raise ConvertError(f"{out}: re-read weights differ from what was written")
    size = os.path.getsize(out)
    summary = {"config": json.loads(cfg.to_json()), "layout": layout, "label_map": label_map,
               "file_bytes": size, "source_bytes": ck.source_bytes, **stats}
    log(f"config: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.n_kv_heads} kv), ffn "
        f"{cfg.ffn_dim}, {cfg.in_channels} channels, input {cfg.input_size}x{cfg.input_size}, patch "
        f"{cfg.patch_size}, {cfg.num_classes} classes, qk_norm {cfg.qk_norm}, "
        f"{'latent' if cfg.latent else 'pixel-space'}, guided channels {cfg.guided_channels}")
    log(f"parameters: {stats['ternary_params'] / 1e6:.1f} M ternary ({stats['ternary_zero_fraction']:.1%} zeros), "
        f"{stats['float_params'] / 1e6:.2f} M float ({dtype}); label map {label_map}")
    log(f"wrote {out}: {_human(size)} (source {_human(ck.source_bytes)}, {size / max(1, ck.source_bytes):.1%}); "
        "verified by reloading")
    return summary


def main_convert(args) -> int:  # used by the CLI
    convert(args.src, args.out, label_map=args.label_map, n_heads=args.n_heads, dtype=args.dtype,
            weights=args.weights, image_size=args.image_size, guided_channels=args.guided_channels,
            vae=args.vae, vae_dtype=args.vae_dtype, log=lambda m: print(m, file=sys.stderr),
            vae_encoder=getattr(args, "vae_encoder", False))
    return 0
