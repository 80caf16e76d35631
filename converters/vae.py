"""Read a Stable Diffusion VAE (AutoencoderKL) decoder from diffusers or original LDM checkpoints.

Accepted sources:

* a diffusers AutoencoderKL folder (``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors``
  or ``.bin``), or a pipeline folder holding one in ``vae/``; attention projections named
  ``to_q/to_k/to_v/to_out.0`` or the older ``query/key/value/proj_attn``;
* a single file (.safetensors, .ckpt, .pt, .pth, .bin) with diffusers names or original LDM names
  (``decoder.up.3.block.0.conv1``, ``decoder.mid.attn_1.q`` as 1x1 convolutions, ``nin_shortcut``,
  up levels numbered in reverse), with or without the ``first_stage_model.`` prefix of a full
  Stable Diffusion checkpoint (whose other tensors are ignored).

Only ``post_quant_conv`` and the decoder are kept unless the encoder is asked for
(``encoder=True``, the CLI's ``--vae-encoder``): then ``encoder.*`` and ``quant_conv`` too (LDM
names ``encoder.down.N.block.M``, ``encoder.down.N.downsample.conv``, ``encoder.mid.*``,
``encoder.norm_out`` are renamed as the decoder's). The result uses the canonical names of
:func:`terdit_edge.vae.expected_vae_tensors` and float32 arrays.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from terdit_edge.errors import ConvertError, FormatError
from terdit_edge.vae_config import VAEConfig, expected_vae_tensors

__all__ = ["load_vae_checkpoint"]

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_PREFIXES = ("first_stage_model.", "vae.", "module.")

# diffusers' older attention names -> current ones
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# LDM mid-block attention names -> diffusers
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def load_vae_checkpoint(src, norm_num_groups: int | None = None, encoder: bool = False) -> tuple:
    """Load a VAE decoder (and with ``encoder`` its encoder): returns (VAEConfig, {canonical name:
    float32 ndarray}).

    src: path of a diffusers folder or a single checkpoint file (see the module docstring).
    norm_num_groups: GroupNorm groups, which tensor shapes cannot reveal; default: config.json's
    value, else 32 (the Stable Diffusion VAE's, fixed in the original LDM code).
    Raises ConvertError when the source is missing, is not a VAE, lacks tensors or has shapes that
    do not fit the architecture, or, with ``encoder``, holds no encoder.
    """
    src = os.fspath(src)
    config: dict = {}
    if os.path.isdir(src):
        folder = src
        if not os.path.exists(os.path.join(folder, "config.json")) and os.path.isdir(os.path.join(src, "vae")):
            folder = os.path.join(src, "vae")
        config = _read_config(os.path.join(folder, "config.json"))
        weights = next((os.path.join(folder, f) for f in _WEIGHT_FILES
                        if os.path.exists(os.path.join(folder, f))), None)
        if weights is None:
            raise ConvertError(f"{folder}: no VAE weights found; expected one of {list(_WEIGHT_FILES)}")
    elif os.path.isfile(src):
        weights = src
    else:
        raise ConvertError(f"{src}: no such file or folder")
    state = _read_state_dict(weights)
    tensors = _canonical_decoder_tensors(state, weights, encoder)
    if norm_num_groups is not None:
        if "norm_num_groups" in config and config["norm_num_groups"] != norm_num_groups:
            raise ConvertError(f"{src}: norm_num_groups={norm_num_groups} contradicts config.json's "
                               f"{config['norm_num_groups']}")
        config = dict(config, norm_num_groups=norm_num_groups)
    cfg = _infer_config(tensors, config, weights, encoder)
    _check_against(cfg, tensors, weights)
    return cfg, tensors


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def _read_config(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: cannot read the VAE config: {e}") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{path}: the config must be a JSON object")
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise ConvertError(f"{path}: _class_name is {name!r}; only AutoencoderKL decoders are supported")
    act = config.get("act_fn", "silu")
    if act != "silu":
        raise ConvertError(f"{path}: act_fn {act!r} is not supported (only silu)")
    ups = config.get("up_block_types")
    if ups is not None and any(u != "UpDecoderBlock2D" for u in ups):
        raise ConvertError(f"{path}: up_block_types {ups} are not supported (only UpDecoderBlock2D)")
    return config


def _read_state_dict(path: str) -> dict:
    """name -> numpy array (any float dtype) from a safetensors or torch file."""
    if path.endswith(".safetensors"):
        try:
            from safetensors import safe_open
            out = {}
            with safe_open(path, framework="np") as fh:
                for k in fh.keys():
                    out[k] = fh.get_tensor(k)
            return out
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
            if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
                return _read_with_torch(path, safetensors=True)
            raise ConvertError(f"{path}: not a readable safetensors file: {e}") from None
    if path.endswith(_TORCH_SUFFIXES):
        return _read_with_torch(path, safetensors=False)
    raise ConvertError(f"{path}: unknown file type; expected .safetensors, .ckpt, .pt, .pth or .bin")


def _read_with_torch(path: str, safetensors: bool) -> dict:
    try:
        import torch
    except ImportError:
        raise ConvertError("reading torch checkpoints needs torch: pip install 'terdit-edge[convert]'") from None
    try:
        if safetensors:
            from safetensors.torch import load_file
            raw = load_file(path)
        else:
            # weights_only: never execute code from an untrusted pickle
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad or hostile files
        raise ConvertError(f"{path}: cannot load as a torch checkpoint (weights only): {e}") from None
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise ConvertError(f"{path}: expected a state dict, found {type(raw).__name__}")
    out = {}
    for k, v in raw.items():
        if isinstance(k, str) and isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = v.detach().to(torch.float32).numpy()
    return out


# --------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------

def _strip_prefix(state: dict, encoder: bool = False) -> dict:
    """Drop a container prefix (first_stage_model., vae., ...) and keep decoder + post_quant_conv
    (and with ``encoder`` encoder + quant_conv)."""
    keep = ("decoder.", "post_quant_conv.") + (("encoder.", "quant_conv.") if encoder else ())
    for prefix in ("",) + _PREFIXES:
        picked = {k[len(prefix):]: v for k, v in state.items()
                  if k.startswith(tuple(prefix + p for p in keep))}
        if any(k.startswith("decoder.") for k in picked):
            return picked
    return {}


def _canonical_decoder_tensors(state: dict, where: str, encoder: bool = False) -> dict:
    """Rename to canonical diffusers names, reshape 1x1-conv attention to linear, cast to float32."""
    dec = _strip_prefix(state, encoder)
    if not dec:
        sample = sorted(state)[:3]
        raise ConvertError(f"{where}: not a VAE checkpoint: no 'decoder.*' tensors found "
                           f"(first keys: {sample})")
    if encoder and not any(k.startswith("encoder.") for k in dec):
        raise ConvertError(f"{where}: the encoder was asked for (--vae-encoder) but the checkpoint holds "
                           "no 'encoder.*' tensors")
    if any(k.startswith(("decoder.up.", "decoder.mid.")) for k in dec):
        dec = _rename_ldm(dec, where)
    if any(k.startswith(("encoder.down.", "encoder.mid.")) for k in dec):
        dec = _rename_ldm(dec, where, "encoder")
    out = {}
    for name, arr in dec.items():
        parts = name.split(".")
        if ".attentions." in name and len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
            name = ".".join(parts[:-2] + [_LEGACY_ATTENTION[parts[-2]], parts[-1]])
        arr = np.asarray(arr)
        if not np.issubdtype(arr.dtype, np.floating):
            raise ConvertError(f"{where}: tensor {name} has dtype {arr.dtype}, expected floating point")
        if ".attentions." in name and name.endswith(".weight") and arr.ndim == 4:
            if arr.shape[2:] != (1, 1):
                raise ConvertError(f"{where}: attention weight {name} has shape {arr.shape}; "
                                   "expected (C, C) or a 1x1 convolution (C, C, 1, 1)")
            arr = arr[:, :, 0, 0]
        if name in out:
            raise ConvertError(f"{where}: tensor {name} appears twice under different names")
        out[name] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def _rename_ldm(dec: dict, where: str, part: str = "decoder") -> dict:
    """Original LDM names of one part ("decoder" or "encoder") -> diffusers names; other tensors pass.

    The decoder's up levels are numbered in reverse in diffusers (up.0 is the last up_block); the
    encoder's down levels keep their order."""
    level_kind = {"decoder": ("up", "up_blocks", "upsample", "upsamplers"),
                  "encoder": ("down", "down_blocks", "downsample", "downsamplers")}[part]
    ldm_level, hf_level, ldm_resample, hf_resample = level_kind
    level_re = re.compile(rf"{part}\.{ldm_level}\.(\d+)\.(block|{ldm_resample})\.(.*)$")
    levels = {int(m.group(1)) for k in dec for m in [level_re.match(k)] if m}
    if part == "decoder" and not levels:
        raise ConvertError(f"{where}: LDM-style decoder without any 'decoder.up.N' level")
    n = max(levels, default=-1) + 1
    out = {}
    for k, v in dec.items():
        if not k.startswith(part + "."):
            out[k] = v
            continue
        new = k
        m = level_re.match(k)
        if m:
            i = n - 1 - int(m.group(1)) if part == "decoder" else int(m.group(1))
            if m.group(2) == "block":
                new = f"{part}.{hf_level}.{i}.resnets.{m.group(3)}"
            else:
                new = f"{part}.{hf_level}.{i}.{hf_resample}.0.{m.group(3)}"
        elif k.startswith(f"{part}.mid.block_"):
            m = re.match(rf"{part}\.mid\.block_(\d+)\.(.*)$", k)
            if not m:
                raise ConvertError(f"{where}: unexpected LDM tensor name {k}")
            new = f"{part}.mid_block.resnets.{int(m.group(1)) - 1}.{m.group(2)}"
        elif k.startswith(f"{part}.mid.attn_1."):
            layer, _, leaf = k[len(f"{part}.mid.attn_1."):].partition(".")
            if layer not in _LDM_ATTENTION:
                raise ConvertError(f"{where}: unexpected LDM attention tensor {k}")
            new = f"{part}.mid_block.attentions.0.{_LDM_ATTENTION[layer]}.{leaf}"
        elif k.startswith(f"{part}.norm_out."):
            new = f"{part}.conv_norm_out." + k[len(f"{part}.norm_out."):]
        out[new.replace(".nin_shortcut.", ".conv_shortcut.")] = v
    return out


# --------------------------------------------------------------------------------------------
# architecture
# --------------------------------------------------------------------------------------------

def _shape(tensors: dict, name: str, where: str) -> tuple:
    if name not in tensors:
        raise ConvertError(f"{where}: missing tensor {name}; is this a complete AutoencoderKL decoder?")
    return tensors[name].shape


def _infer_config(tensors: dict, config: dict, where: str, encoder: bool = False) -> VAEConfig:
    """VAEConfig from tensor shapes; config.json values are checked against them and supply
    what shapes cannot tell (norm groups, scaling and shift factors)."""
    n_up = 1 + max((int(m.group(1)) for k in tensors
                    for m in [re.match(r"decoder\.up_blocks\.(\d+)\.", k)] if m), default=-1)
    if n_up == 0:
        raise ConvertError(f"{where}: no decoder up blocks found")
    rev = [_shape(tensors, f"decoder.up_blocks.{i}.resnets.0.conv2.weight", where)[0] for i in range(n_up)]
    n_res = 1 + max(int(m.group(1)) for k in tensors
                    for m in [re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k)] if m)
    conv_in = _shape(tensors, "decoder.conv_in.weight", where)
    conv_out = _shape(tensors, "decoder.conv_out.weight", where)
    if len(conv_in) != 4 or len(conv_out) != 4:
        raise ConvertError(f"{where}: decoder.conv_in / conv_out weights must be 4-D convolutions")
    values = dict(
        block_out_channels=tuple(int(c) for c in reversed(rev)),
        layers_per_block=n_res - 1,
        in_latent_channels=int(conv_in[1]),
        out_channels=int(conv_out[0]),
        mid_block_attention=any(".mid_block.attentions." in k for k in tensors),
        use_post_quant_conv="post_quant_conv.weight" in tensors,
        encoder=bool(encoder),
    )
    if encoder:
        if ("quant_conv.weight" in tensors) != values["use_post_quant_conv"]:
            raise ConvertError(f"{where}: quant_conv and post_quant_conv must both be present or both absent")
        for key in ("use_quant_conv", "use_post_quant_conv"):
            if config.get(key) is False and values["use_post_quant_conv"]:
                raise ConvertError(f"{where}: config.json says {key}=false but the tensors exist")
        if "in_channels" in config and config["in_channels"] != values["out_channels"]:
            raise ConvertError(f"{where}: in_channels {config['in_channels']} differs from out_channels "
                               f"{values['out_channels']}; such VAEs are not supported")
        if config.get("double_z", True) is not True:
            raise ConvertError(f"{where}: double_z=false encoders are not supported")
        dbt = config.get("down_block_types")
        if dbt is not None and any(d != "DownEncoderBlock2D" for d in dbt):
            raise ConvertError(f"{where}: down_block_types {dbt} are not supported (only DownEncoderBlock2D)")
    for key, field in (("block_out_channels", "block_out_channels"), ("layers_per_block", "layers_per_block"),
                       ("latent_channels", "in_latent_channels"), ("out_channels", "out_channels")):
        if key in config:
            cv = tuple(config[key]) if isinstance(config[key], list) else config[key]
            if cv != values[field]:
                raise ConvertError(f"{where}: config.json says {key}={config[key]!r} but the tensors "
                                   f"imply {values[field]!r}")
    if config.get("mid_block_add_attention") is False and values["mid_block_attention"]:
        raise ConvertError(f"{where}: config.json disables the mid-block attention but its tensors exist")
    values["norm_num_groups"] = int(config.get("norm_num_groups", 32))
    values["scaling_factor"] = float(config.get("scaling_factor", 0.18215))
    shift = config.get("shift_factor")
    values["shift_factor"] = float(shift) if shift is not None else 0.0
    try:
        return VAEConfig(**values).validate()
    except FormatError as e:
        raise ConvertError(f"{where}: the VAE architecture is not valid: {e}") from None


def _check_against(cfg: VAEConfig, tensors: dict, where: str) -> None:
    expected = expected_vae_tensors(cfg)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ConvertError(f"{where}: missing {len(missing)} VAE tensors, e.g. {missing[:4]}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ConvertError(f"{where}: unexpected decoder tensors {unexpected[:4]}"
                           f"{' ...' if len(unexpected) > 4 else ''}; unsupported VAE variant?")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ConvertError(f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                               f"expected {shape} for {cfg}")


def vae_tensors_for_file(src, dtype: str = "fp16", log=print, norm_num_groups: int | None = None,
                         encoder: bool = False) -> tuple:
    """Read a VAE checkpoint -> (metadata entries, tensors with the "vae." prefix) for a .tdit file.

    dtype "fp16" (default: half the size; decoding widens each layer to float32) or "fp32".
    encoder: keep the encoder and quant_conv too (for image-to-image and inpainting).
    """
    from terdit_edge.format import FLOAT_DTYPES, VAE_PREFIX

    if dtype not in FLOAT_DTYPES:
        raise ConvertError(f"--vae-dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
    cfg, tensors = load_vae_checkpoint(src, norm_num_groups=norm_num_groups, encoder=encoder)
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    out = {}
    for name, arr in tensors.items():
        if dtype == "fp16" and np.abs(arr).max(initial=0) > np.finfo(np.float16).max:
            raise ConvertError(f"VAE tensor {name!r} exceeds the fp16 range; use --vae-dtype fp32")
        out[VAE_PREFIX + name] = np.ascontiguousarray(arr, dtype=np_dtype)
    n = sum(a.size for a in tensors.values())
    if log:
        what = "encoder and decoder" if encoder else "decoder"
        log(f"VAE {what}: channels {list(cfg.block_out_channels)}, {cfg.layers_per_block + 1} resnets per "
            f"level, {n / 1e6:.1f} M parameters stored as {dtype}")
    return {"vae_config": cfg.to_json(), "vae_dtype": FLOAT_DTYPES[dtype]}, out


def convert_vae_file(src, out: str, dtype: str = "fp16", log=print, encoder: bool = False) -> dict:
    """Convert a VAE alone into a VAE-only .tdit file (verified by reloading); ``encoder``: keep
    the encoder too."""
    from terdit_edge._version import __version__
    from terdit_edge.format import read_tdit, write_tdit

    meta, tensors = vae_tensors_for_file(src, dtype, log=log, encoder=encoder)
    # the checkpoint's name only: a path would publish the converting machine's directories
    meta["source"] = json.dumps({"path": os.path.basename(os.path.abspath(str(src))),
                                 "converter": f"terdit-edge {__version__}"})
    write_tdit(out, tensors, meta)
    tf = read_tdit(out, verify=True)
    size = os.path.getsize(out)
    if log:
        log(f"wrote {out}: {size / 1e6:.1f} MB; verified by reloading ({len(tf.tensors)} tensors)")
    return {"file_bytes": size, "tensors": len(tf.tensors)}
