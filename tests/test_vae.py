"""The torch-free SD-VAE decoder and its checkpoint converter, against diffusers' AutoencoderKL.

Fixtures are small random AutoencoderKL models built in code (no downloads), saved in the layouts
the converter accepts: a diffusers folder (current and legacy attention names) and original LDM
single files.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from terdit_edge.converters.vae import load_vae_checkpoint  # noqa: E402
from terdit_edge.errors import ConvertError, FormatError, InputError  # noqa: E402
from terdit_edge.images import to_uint8  # noqa: E402
from terdit_edge.kernels.conv import CONV_METHODS, conv3x3, group_norm  # noqa: E402
from terdit_edge.vae import VAEDecoder  # noqa: E402
from terdit_edge.vae_config import VAEConfig, expected_vae_tensors  # noqa: E402

SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
THREE_LEVELS = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=16)


def make_autoencoder(block_out_channels, layers_per_block, norm_num_groups, seed=0, mid_attention=True):
    """A random diffusers AutoencoderKL with non-trivial GroupNorm affines."""
    torch.manual_seed(seed)
    n = len(block_out_channels)
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, latent_channels=4, norm_num_groups=norm_num_groups,
        mid_block_add_attention=mid_attention).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def reference_decode(model, latents: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.decode(torch.from_numpy(latents) / model.config.scaling_factor).sample.numpy()


def decoder_state(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
            if k.startswith(("decoder.", "post_quant_conv."))}


def latents(shape=(2, 4, 8, 8), seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def to_legacy_names(state: dict) -> dict:
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for k, v in state.items():
        for new, old in legacy.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        out[k] = v
    return out


def to_ldm_names(state: dict, n_levels: int) -> dict:
    """diffusers decoder names -> original LDM names, attention projections as 1x1 convolutions."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in state.items():
        new = k
        if k.startswith("decoder.up_blocks."):
            parts = k.split(".")
            level = n_levels - 1 - int(parts[2])
            if parts[3] == "resnets":
                new = f"decoder.up.{level}.block.{parts[4]}." + ".".join(parts[5:])
            else:  # upsamplers.0.conv.*
                new = f"decoder.up.{level}.upsample." + ".".join(parts[5:])
        elif k.startswith("decoder.mid_block.resnets."):
            parts = k.split(".")
            new = f"decoder.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
        elif k.startswith("decoder.mid_block.attentions.0."):
            rest = k[len("decoder.mid_block.attentions.0."):]
            layer, leaf = rest.rsplit(".", 1)
            new = f"decoder.mid.attn_1.{attn[layer]}.{leaf}"
            if leaf == "weight" and v.ndim == 2:
                v = v[:, :, None, None]
        elif k.startswith("decoder.conv_norm_out."):
            new = "decoder.norm_out." + k.rsplit(".", 1)[1]
        out[new.replace(".conv_shortcut.", ".nin_shortcut.")] = v
    return out


@pytest.fixture(scope="module")
def small_model():
    return make_autoencoder(**SMALL)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

def test_config_json_round_trip():
    cfg = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, shift_factor=0.1)
    assert VAEConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("change", [
    {"block_out_channels": 64},
    {"block_out_channels": [32, "64"]},
    {"layers_per_block": 0},
    {"layers_per_block": True},
    {"norm_num_groups": 7},  # 32 and 64 channels are not divisible by 7
    {"mid_block_attention": 1},
    {"scaling_factor": -1.0},
    {"norm_eps": "1e-6"},
    {"unknown_key": 3},
])
def test_config_from_json_rejects_bad_values(change):
    raw = json.loads(VAEConfig(block_out_channels=(32, 64), norm_num_groups=8).to_json())
    raw.update(change)
    with pytest.raises(FormatError):
        VAEConfig.from_json(json.dumps(raw))


@pytest.mark.parametrize("text", ["not json", "[1, 2]", json.dumps({"layers_per_block": 2})])
def test_config_from_json_rejects_malformed_text(text):
    with pytest.raises(FormatError):
        VAEConfig.from_json(text)


@pytest.mark.parametrize("arch", [SMALL, THREE_LEVELS])
def test_expected_tensors_are_the_diffusers_decoder_tensors(arch):
    state = decoder_state(make_autoencoder(**arch))
    cfg = VAEConfig(**arch)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_vae_tensors(cfg)


# --------------------------------------------------------------------------------------------
# kernels against plain NumPy references
# --------------------------------------------------------------------------------------------

def conv3x3_reference(x, weight, bias, up=1):
    """Direct convolution: x float64 (h, w, C), weight (K, C, 3, 3) -> (h*up, w*up, K)."""
    x = np.repeat(np.repeat(x.astype(np.float64), up, axis=0), up, axis=1)
    h, w, _ = x.shape
    pad = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    out = np.zeros((h, w, weight.shape[0])) + bias
    for r in range(3):
        for s in range(3):
            out += pad[r:r + h, s:s + w] @ weight[:, :, r, s].astype(np.float64).T
    return out


@pytest.mark.parametrize("method", CONV_METHODS)
@pytest.mark.parametrize("h,w,c,k,up", [(1, 1, 3, 5, 1), (3, 5, 4, 7, 1), (7, 4, 16, 3, 1), (5, 3, 8, 8, 2),
                                         (1, 2, 3, 1, 2), (9, 9, 33, 17, 1)])
def test_conv3x3_matches_direct_convolution(method, h, w, c, k, up):
    rng = np.random.default_rng(h * 100 + w)
    x = rng.standard_normal((h, w, c), dtype=np.float32)
    weight = rng.standard_normal((k, c, 3, 3), dtype=np.float32)
    bias = rng.standard_normal(k, dtype=np.float32)
    residual = rng.standard_normal((h * up, w * up, k), dtype=np.float32)
    got = conv3x3(x, weight, bias, up=up, residual=residual, method=method)
    want = conv3x3_reference(x, weight, bias, up) + residual
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())


def test_group_norm_matches_reference_with_large_mean():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 5, 32)) * 0.5 + 300.0).astype(np.float32)
    gamma = rng.standard_normal(32).astype(np.float32)
    beta = rng.standard_normal(32).astype(np.float32)
    got = group_norm(x, gamma, beta, groups=4, eps=1e-6, silu=True)
    g = x.astype(np.float64).reshape(30, 4, 8)
    norm = (g - g.mean(axis=(0, 2), keepdims=True)) / np.sqrt(g.var(axis=(0, 2), keepdims=True) + 1e-6)
    y = norm.reshape(6, 5, 32) * gamma + beta
    want = y / (1 + np.exp(-y))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)


# --------------------------------------------------------------------------------------------
# parity with diffusers through every checkpoint layout
# --------------------------------------------------------------------------------------------

def assert_parity(cfg, tensors, model, z, atol, **kw):
    got = VAEDecoder(cfg, tensors, **kw).decode(z)
    want = reference_decode(model, z)
    scale = 2 ** (len(cfg.block_out_channels) - 1)
    assert got.shape == want.shape == (z.shape[0], 3, scale * z.shape[2], scale * z.shape[3])
    err = np.abs(got - want).max()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"
    return err


@pytest.mark.parametrize("method", CONV_METHODS)
def test_diffusers_folder_decodes_like_diffusers(tmp_path, small_model, method):
    small_model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, tensors = load_vae_checkpoint(tmp_path)
    assert cfg == VAEConfig(**SMALL)
    z = latents((2, 4, 8, 6))
    assert_parity(cfg, tensors, small_model, z, atol=1e-4, conv=method)


def test_three_level_decoder_matches_diffusers(tmp_path):
    model = make_autoencoder(**THREE_LEVELS, seed=5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, tensors = load_vae_checkpoint(tmp_path)
    got = VAEDecoder(cfg, tensors).decode(latents((1, 4, 5, 7)))
    assert got.shape == (1, 3, 20, 28)
    assert np.abs(got - reference_decode(model, latents((1, 4, 5, 7)))).max() <= 1e-4


def test_decoder_without_mid_attention_matches_diffusers(tmp_path):
    model = make_autoencoder(**SMALL, mid_attention=False)
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, tensors = load_vae_checkpoint(tmp_path)
    assert cfg.mid_block_attention is False
    assert_parity(cfg, tensors, model, latents(), atol=1e-4)


def test_legacy_attention_names_decode_like_diffusers(tmp_path, small_model):
    small_model.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    legacy = to_legacy_names(small_model.state_dict())
    assert any(".attentions.0.query." in k for k in legacy)
    torch.save(legacy, tmp_path / "diffusion_pytorch_model.bin")
    cfg, tensors = load_vae_checkpoint(tmp_path)
    assert_parity(cfg, tensors, small_model, latents(), atol=1e-4)


LDM_ARCH = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32)


@pytest.mark.parametrize("container", ["ckpt", "safetensors"])
def test_ldm_single_file_decodes_like_diffusers(tmp_path, container):
    # original LDM files carry no config: GroupNorm uses its fixed 32 groups
    model = make_autoencoder(**LDM_ARCH, seed=2)
    ldm = to_ldm_names(model.state_dict(), n_levels=len(LDM_ARCH["block_out_channels"]))
    assert "decoder.mid.attn_1.q.weight" in ldm and ldm["decoder.mid.attn_1.q.weight"].ndim == 4
    full = {"first_stage_model." + k: v.contiguous() for k, v in ldm.items()}
    # a full SD checkpoint carries other models' tensors too; they must be ignored
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    full["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(4)
    if container == "ckpt":
        path = tmp_path / "sd.ckpt"
        torch.save({"state_dict": full, "global_step": 1}, path)
    else:
        from safetensors.torch import save_file
        path = tmp_path / "vae.safetensors"
        save_file(full, path)
    cfg, tensors = load_vae_checkpoint(path)
    assert cfg == VAEConfig(**LDM_ARCH)
    assert_parity(cfg, tensors, model, latents(), atol=1e-4)


def test_single_file_norm_groups_can_be_given(tmp_path, small_model):
    path = tmp_path / "vae.ckpt"
    torch.save(small_model.state_dict(), path)
    cfg, tensors = load_vae_checkpoint(path, norm_num_groups=8)
    assert cfg == VAEConfig(**SMALL)
    assert_parity(cfg, tensors, small_model, latents(), atol=1e-4)


def test_float16_weights_decode_within_fp16_tolerance(tmp_path, small_model):
    small_model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, tensors = load_vae_checkpoint(tmp_path)
    half = {k: v.astype(np.float16) for k, v in tensors.items()}
    z = latents()
    got = VAEDecoder(cfg, half).decode(z)
    # against the original float32 model: the acceptance bound for float16 storage
    assert np.abs(got - reference_decode(small_model, z)).max() <= 2e-2
    # against diffusers running the same float16-rounded weights in float32: only arithmetic differs
    rounded = make_autoencoder(**SMALL)
    rounded.load_state_dict({k: v.to(torch.float16).to(torch.float32)
                             for k, v in small_model.state_dict().items()})
    assert np.abs(got - reference_decode(rounded, z)).max() <= 1e-4


def test_read_only_memory_mapped_float16_tensors_are_accepted(tmp_path, small_model):
    cfg = VAEConfig(**SMALL)
    state = decoder_state(small_model)
    mapped = {}
    for i, (k, v) in enumerate(state.items()):
        path = tmp_path / f"t{i}.npy"
        np.save(path, v.astype(np.float16))
        mapped[k] = np.load(path, mmap_mode="r")
    z = latents((1, 4, 6, 6))
    got = VAEDecoder(cfg, mapped).decode(z)
    want = VAEDecoder(cfg, {k: np.asarray(v) for k, v in mapped.items()}).decode(z)
    np.testing.assert_array_equal(got, want)


def test_thread_count_does_not_change_the_result(small_model):
    cfg, state = VAEConfig(**SMALL), decoder_state(small_model)
    z = latents((1, 4, 12, 10))
    one = VAEDecoder(cfg, state, threads=1).decode(z)
    three = VAEDecoder(cfg, state, threads=3).decode(z)
    np.testing.assert_allclose(one, three, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# tiled decoding
# --------------------------------------------------------------------------------------------

def test_tile_larger_than_latent_is_the_untiled_decode(small_model):
    cfg, state = VAEConfig(**SMALL), decoder_state(small_model)
    dec, z = VAEDecoder(cfg, state), latents((1, 4, 8, 8))
    np.testing.assert_array_equal(dec.decode(z, tile=8), dec.decode(z))


def test_tiled_decode_error_is_no_worse_than_diffusers_tiling(small_model):
    """Tiles see less context (GroupNorm statistics, attention), so any tiled decode differs from
    the full one. The bound is diffusers' own tiled decode with the same 12-latent tiles (it
    overlaps them by 3 and blends 6 pixels; we overlap by 4 and ramp over 8 pixels)."""
    cfg, state = VAEConfig(**SMALL), decoder_state(small_model)
    dec = VAEDecoder(cfg, state)
    z = latents((1, 4, 24, 20), seed=7)
    full = dec.decode(z)
    tiled = dec.decode(z, tile=12, overlap=4)
    assert tiled.shape == full.shape
    ours = np.abs(tiled - full)

    want_full = reference_decode(small_model, z)
    small_model.enable_tiling()
    small_model.tile_latent_min_size, small_model.tile_sample_min_size = 12, 24
    try:
        want_tiled = reference_decode(small_model, z)
    finally:
        small_model.disable_tiling()
    theirs = np.abs(want_tiled - want_full)
    assert ours.mean() <= theirs.mean() and ours.max() <= theirs.max(), \
        (ours.mean(), theirs.mean(), ours.max(), theirs.max())
    # no hard seam: the largest jump between neighbouring columns stays near the untiled one
    assert np.abs(np.diff(tiled, axis=3)).max() <= 1.25 * np.abs(np.diff(full, axis=3)).max()


def _blend_of_tiles_decoded_alone(dec, z, tile, overlap):
    """The tiled decode as it was first written: each tile's latent crop through the whole decoder
    on its own (untiled), blended with the same ramps in the same order."""
    from terdit_edge.vae import _ramp

    f, (_, _, h, w) = dec.cfg.upsample_factor, z.shape
    stride = tile - overlap

    def starts(n):
        count = 1 + -(-(n - tile) // stride)
        return [round(i * (n - tile) / (count - 1)) for i in range(count)] if n > tile else [0]

    acc = np.zeros((h * f, w * f, dec.cfg.out_channels), np.float32)
    wsum = np.zeros((h * f, w * f, 1), np.float32)
    for y0 in starts(h):
        for x0 in starts(w):
            th, tw = min(tile, h - y0), min(tile, w - x0)
            img = dec.decode(z[:, :, y0:y0 + th, x0:x0 + tw])[0].transpose(1, 2, 0)
            wgt = (_ramp(th * f, overlap * f, y0 > 0, y0 + th < h)[:, None]
                   * _ramp(tw * f, overlap * f, x0 > 0, x0 + tw < w)[None, :])[:, :, None]
            acc[y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += img * wgt
            wsum[y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += wgt
    return (acc / wsum).transpose(2, 0, 1)[None]


@pytest.mark.parametrize("conv", ["auto", "im2col"])
def test_tiled_decode_equals_each_tile_decoded_alone_and_blended(conv):
    """Preparing the trunk's weights once for all tiles changes no bit of any tile."""
    model = make_autoencoder(**THREE_LEVELS, seed=3)
    dec = VAEDecoder(VAEConfig(**THREE_LEVELS), decoder_state(model), threads=2, conv=conv)
    z = latents((1, 4, 20, 14), seed=5)
    np.testing.assert_array_equal(dec.decode(z, tile=8, overlap=2), _blend_of_tiles_decoded_alone(dec, z, 8, 2))


def test_tiled_decode_prepares_each_trunk_weight_once(monkeypatch):
    """The trunk (the layers at the latent's resolution: wide, costly weights) is prepared once per
    decode whatever the tile count; the later layers once per tile."""
    import terdit_edge.vae as vae_module

    model = make_autoencoder(**THREE_LEVELS, seed=3)
    state = decoder_state(model)
    dec = VAEDecoder(VAEConfig(**THREE_LEVELS), state)
    names = {id(v): k for k, v in dec.tensors.items()}
    counts: dict[str, int] = {}
    real = vae_module.prepare_conv3x3

    def counting(weight, method, workers=None):
        counts[names[id(weight)]] = counts.get(names[id(weight)], 0) + 1
        return real(weight, method, workers)

    monkeypatch.setattr(vae_module, "prepare_conv3x3", counting)
    dec.decode(latents((1, 4, 16, 16)), tile=8, overlap=2)  # 3 x 3 tiles
    trunk = [k for k in counts if k.startswith(("decoder.conv_in.", "decoder.mid_block.",
                                                "decoder.up_blocks.0.resnets."))]
    head = [k for k in counts if k not in trunk]
    assert trunk and head
    assert {counts[k] for k in trunk} == {1}, counts
    assert {counts[k] for k in head} == {9}, counts


@pytest.mark.parametrize("tile,overlap", [(1, 0), (8, 8), (8, -1), (8.0, 2), (8, 2.0)])
def test_bad_tiling_arguments_are_rejected(small_model, tile, overlap):
    dec = VAEDecoder(VAEConfig(**SMALL), decoder_state(small_model))
    with pytest.raises(InputError):
        dec.decode(latents((1, 4, 16, 16)), tile=tile, overlap=overlap)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (4, 8, 8), (1, 4, 0, 8)])
def test_wrong_latent_shape_is_an_input_error(small_model, shape):
    dec = VAEDecoder(VAEConfig(**SMALL), decoder_state(small_model))
    with pytest.raises(InputError):
        dec.decode(np.zeros(shape, np.float32))


def test_missing_or_misshapen_tensors_are_format_errors(small_model):
    cfg, state = VAEConfig(**SMALL), decoder_state(small_model)
    missing = dict(state)
    del missing["decoder.conv_out.bias"]
    with pytest.raises(FormatError, match="missing"):
        VAEDecoder(cfg, missing)
    bad = dict(state)
    bad["decoder.conv_in.weight"] = bad["decoder.conv_in.weight"][:, :3]
    with pytest.raises(FormatError, match="shape"):
        VAEDecoder(cfg, bad)
    ints = dict(state)
    ints["decoder.conv_in.bias"] = ints["decoder.conv_in.bias"].astype(np.int32)
    with pytest.raises(FormatError, match="dtype"):
        VAEDecoder(cfg, ints)


def test_non_vae_file_is_a_convert_error(tmp_path):
    from safetensors.numpy import save_file
    path = tmp_path / "model.safetensors"
    save_file({"layers.0.attention.wq.weight": np.zeros((4, 4), np.float32)}, str(path))
    with pytest.raises(ConvertError, match="not a VAE"):
        load_vae_checkpoint(path)


def test_garbage_and_missing_files_are_convert_errors(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"definitely not a zip or a pickle")
    with pytest.raises(ConvertError):
        load_vae_checkpoint(junk)
    with pytest.raises(ConvertError, match="no such"):
        load_vae_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(ConvertError, match="no VAE weights"):
        load_vae_checkpoint(tmp_path)


def test_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.ckpt"
    torch.save({"decoder.conv_in.weight": Payload()}, path)
    with pytest.raises(ConvertError, match="weights only"):
        load_vae_checkpoint(path)


def test_incomplete_decoder_is_a_convert_error(tmp_path, small_model):
    state = {k: v for k, v in small_model.state_dict().items() if ".up_blocks.1." not in k or "conv2" in k}
    path = tmp_path / "partial.ckpt"
    torch.save(state, path)
    with pytest.raises(ConvertError, match="missing"):
        load_vae_checkpoint(path)


def test_config_json_disagreeing_with_tensors_is_a_convert_error(tmp_path, small_model):
    small_model.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["block_out_channels"] = [32, 128]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvertError, match="block_out_channels"):
        load_vae_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------
# 8-bit conversion
# --------------------------------------------------------------------------------------------

def test_to_uint8_clamps_and_rounds_as_specified():
    x = np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], np.float32)
    images = np.broadcast_to(x[None, None, :, None], (1, 1, 6, 3))  # decoder output, channels last
    got = to_uint8((images + 1) / 2)
    assert got.shape == (1, 1, 6, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[0, 0, :, 0], [0, 0, 128, 191, 255, 255])
