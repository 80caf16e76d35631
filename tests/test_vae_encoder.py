"""The torch-free SD-VAE encoder (issue 27) against diffusers' AutoencoderKL.encode.

Small random AutoencoderKL models built in code (tests/test_vae.py), converted with the encoder
kept; parity is measured as max abs error / std of diffusers' latent mean (bound 1e-4), on the
small configs and (marked slow) the full-size SD-VAE configuration.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # importlib mode: tests/ is not on sys.path
from test_vae import SMALL, THREE_LEVELS, make_autoencoder, to_ldm_names  # noqa: E402

from terdit_edge.converters.vae import load_vae_checkpoint  # noqa: E402
from terdit_edge.errors import ConvertError, InputError  # noqa: E402
from terdit_edge.frontends.cli import main  # noqa: E402
from terdit_edge.kernels.conv import _Workers, conv3x3_down2  # noqa: E402
from terdit_edge.pipeline import load_vae  # noqa: E402
from terdit_edge.vae import VAEDecoder  # noqa: E402
from terdit_edge.vae_config import VAEConfig, expected_vae_encoder_tensors, expected_vae_tensors  # noqa: E402

FULL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)


def images(shape=(2, 3, 16, 24), seed=3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def reference_encode(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.encode(torch.from_numpy(x)).latent_dist.mean.numpy()


def relative_error(got, want) -> float:
    return float(np.abs(got - want).max() / want.std())


@pytest.fixture(scope="module")
def small_model():
    return make_autoencoder(**SMALL)


@pytest.fixture(scope="module")
def small_folder(small_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    small_model.save_pretrained(folder, safe_serialization=True)
    return folder


# --------------------------------------------------------------------------------------------
# configuration and tensor list
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", [SMALL, THREE_LEVELS])
def test_expected_encoder_tensors_are_the_diffusers_encoder_tensors(arch):
    state = make_autoencoder(**arch).state_dict()
    want = {k: tuple(v.shape) for k, v in state.items() if k.startswith(("encoder.", "quant_conv."))}
    assert expected_vae_encoder_tensors(VAEConfig(**arch, encoder=True)) == want
    assert set(want) < set(expected_vae_tensors(VAEConfig(**arch, encoder=True)))
    assert not set(want) & set(expected_vae_tensors(VAEConfig(**arch)))


def test_encoder_key_is_written_only_when_true():
    plain = VAEConfig(**SMALL)
    assert "encoder" not in json.loads(plain.to_json())  # decoder-only files: what older readers accept
    assert VAEConfig.from_json(plain.to_json()) == plain
    with_enc = VAEConfig(**SMALL, encoder=True)
    assert json.loads(with_enc.to_json())["encoder"] is True
    assert VAEConfig.from_json(with_enc.to_json()) == with_enc


# --------------------------------------------------------------------------------------------
# the stride-2 convolution
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h, w, c, k, threads", [(8, 8, 4, 6, 1), (9, 7, 5, 3, 1), (2, 2, 3, 2, 1), (33, 20, 8, 16, 3)])
def test_stride2_convolution_matches_torch(h, w, c, k, threads):
    rng = np.random.default_rng(h * w)
    x = rng.standard_normal((h, w, c), dtype=np.float32)
    wt = rng.standard_normal((k, c, 3, 3), dtype=np.float32)
    b = rng.standard_normal(k, dtype=np.float32)
    got = conv3x3_down2(x, wt, b, _Workers(threads))
    xt = torch.nn.functional.pad(torch.from_numpy(x.transpose(2, 0, 1))[None], (0, 1, 0, 1))
    want = torch.nn.functional.conv2d(xt, torch.from_numpy(wt), torch.from_numpy(b), stride=2)[0]
    want = want.numpy().transpose(1, 2, 0)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------
# parity with diffusers
# --------------------------------------------------------------------------------------------

def test_diffusers_folder_encodes_like_diffusers(small_folder, small_model):
    cfg, tensors = load_vae_checkpoint(small_folder, encoder=True)
    assert cfg == VAEConfig(**SMALL, encoder=True)
    x = images()
    got = VAEDecoder(cfg, tensors).encode(x)
    assert got.shape == (2, 4, 8, 12) and got.dtype == np.float32
    assert relative_error(got, reference_encode(small_model, x)) <= 1e-4


@pytest.mark.parametrize("mid_attention", [True, False])
def test_three_level_encoder_matches_diffusers(tmp_path, mid_attention):
    model = make_autoencoder(**THREE_LEVELS, seed=5, mid_attention=mid_attention)
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, tensors = load_vae_checkpoint(tmp_path, encoder=True)
    x = images((1, 3, 40, 24))
    got = VAEDecoder(cfg, tensors, threads=2).encode(x)
    assert relative_error(got, reference_encode(model, x)) <= 1e-4


def test_moments_and_samples_follow_diffusers(small_folder, small_model):
    cfg, tensors = load_vae_checkpoint(small_folder, encoder=True)
    vae = VAEDecoder(cfg, tensors)
    x = images((1, 3, 16, 16))
    mean, logvar = vae.encode_moments(x)
    with torch.no_grad():
        dist = small_model.encode(torch.from_numpy(x)).latent_dist
    assert relative_error(logvar, dist.logvar.numpy()) <= 1e-4
    sample = vae.encode(x, generators=[np.random.default_rng(7)])
    noise = np.random.default_rng(7).standard_normal(mean.shape[1:], dtype=np.float32)
    np.testing.assert_allclose(sample[0], mean[0] + np.exp(0.5 * logvar[0]) * noise, rtol=1e-6, atol=1e-6)


def test_ldm_single_file_encoder_matches_diffusers(tmp_path):
    from test_vae import LDM_ARCH

    model = make_autoencoder(**LDM_ARCH, seed=2)
    state = model.state_dict()
    ldm = to_ldm_names({k: v for k, v in state.items() if not k.startswith("encoder.")}, n_levels=2)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for k, v in state.items():
        if not k.startswith("encoder."):
            continue
        new = k
        if k.startswith("encoder.down_blocks."):
            p = k.split(".")
            new = (f"encoder.down.{p[2]}.block.{p[4]}." + ".".join(p[5:]) if p[3] == "resnets"
                   else f"encoder.down.{p[2]}.downsample." + ".".join(p[5:]))
        elif k.startswith("encoder.mid_block.resnets."):
            p = k.split(".")
            new = f"encoder.mid.block_{int(p[3]) + 1}." + ".".join(p[4:])
        elif k.startswith("encoder.mid_block.attentions.0."):
            layer, leaf = k[len("encoder.mid_block.attentions.0."):].rsplit(".", 1)
            new = f"encoder.mid.attn_1.{attn[layer]}.{leaf}"
            v = v[:, :, None, None] if leaf == "weight" and v.ndim == 2 else v
        elif k.startswith("encoder.conv_norm_out."):
            new = "encoder.norm_out." + k.rsplit(".", 1)[1]
        ldm[new.replace(".conv_shortcut.", ".nin_shortcut.")] = v
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {"first_stage_model." + k: v.contiguous() for k, v in ldm.items()}}, path)
    cfg, tensors = load_vae_checkpoint(path, encoder=True)
    x = images((1, 3, 16, 16))
    assert relative_error(VAEDecoder(cfg, tensors).encode(x), reference_encode(model, x)) <= 1e-4


@pytest.mark.slow
def test_full_size_sd_vae_encoder_matches_diffusers(tmp_path):
    """The SD-VAE architecture itself (128..512 channels, 2 resnets per level, 34 M encoder
    parameters), random weights, a 64 x 64 picture."""
    model = make_autoencoder(**FULL, seed=11)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    cfg = VAEConfig(**FULL, encoder=True)
    x = images((1, 3, 64, 64))
    got = VAEDecoder(cfg, {k: state[k] for k in expected_vae_tensors(cfg)}).encode(x)
    assert relative_error(got, reference_encode(model, x)) <= 1e-4


# --------------------------------------------------------------------------------------------
# tiles, files, errors
# --------------------------------------------------------------------------------------------

def test_tiled_encode_blends_tiles_encoded_alone(small_folder):
    cfg, tensors = load_vae_checkpoint(small_folder, encoder=True)
    vae = VAEDecoder(cfg, tensors)
    x = images((1, 3, 24, 24))
    assert np.array_equal(vae.encode(x, tile=12), vae.encode(x))  # a tile larger than the image
    tiled = vae.encode(x, tile=8, overlap=4)  # latent 12 x 12: tiles at 0 and 4
    a = vae.encode(x[:, :, :16, :16])[0]
    b = vae.encode(x[:, :, :16, 8:])[0]
    # the top-left latent pixels belong to tile (0, 0) alone
    np.testing.assert_array_equal(tiled[0, :, :4, :4], a[:, :4, :4])
    np.testing.assert_array_equal(tiled[0, :, :4, 8:], b[:, :4, 4:])
    for tile, overlap in ((1, None), (8, 8), (8, -1), (2.5, None)):
        with pytest.raises(InputError):
            vae.encode(x, tile=tile, overlap=overlap)


def test_convert_vae_keeps_the_encoder_only_when_asked(tmp_path, small_folder, small_model):
    plain, full = tmp_path / "vae.tdit", tmp_path / "vae_enc.tdit"
    assert main(["convert-vae", str(small_folder), str(plain)]) == 0
    assert main(["convert-vae", str(small_folder), str(full), "--vae-encoder", "--vae-dtype", "fp32"]) == 0
    x = images((1, 3, 16, 16))
    with pytest.raises(InputError, match="--vae-encoder"):
        load_vae(plain).encode(x)
    vae = load_vae(full)
    assert vae.has_encoder and not load_vae(plain).has_encoder
    assert relative_error(vae.encode(x), reference_encode(small_model, x)) <= 1e-4


def test_fp16_storage_encodes_within_fp16_tolerance(tmp_path, small_folder, small_model):
    out = tmp_path / "vae16.tdit"
    assert main(["convert-vae", str(small_folder), str(out), "--vae-encoder"]) == 0
    x = images((1, 3, 16, 16))
    assert relative_error(load_vae(out).encode(x), reference_encode(small_model, x)) <= 2e-2


def test_a_checkpoint_without_encoder_is_a_convert_error(tmp_path, small_model):
    path = tmp_path / "dec.ckpt"
    torch.save({k: v for k, v in small_model.state_dict().items() if not k.startswith("encoder.")}, path)
    with pytest.raises(ConvertError, match="no 'encoder"):
        load_vae_checkpoint(path, encoder=True, norm_num_groups=8)


@pytest.mark.parametrize("shape, dtype", [((1, 3, 16), np.float32), ((1, 4, 16, 16), np.float32),
                                          ((1, 3, 15, 16), np.float32), ((1, 3, 16, 16), np.int32)])
def test_bad_images_are_input_errors(small_folder, shape, dtype):
    cfg, tensors = load_vae_checkpoint(small_folder, encoder=True)
    with pytest.raises(InputError):
        VAEDecoder(cfg, tensors).encode(np.zeros(shape, dtype))


def test_round_trip_psnr_of_a_photo_is_diffusers(small_folder, small_model):
    """A real photo (scikit-learn ships two): encode + decode PSNR within 0.5 dB of diffusers' round
    trip (random weights: the PSNR itself is low; what is compared is the two implementations)."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    photo = sklearn_datasets.load_sample_image("china.jpg")[100:164, 200:264]
    x = (photo.astype(np.float32) / 127.5 - 1).transpose(2, 0, 1)[None]
    cfg, tensors = load_vae_checkpoint(small_folder, encoder=True)
    vae = VAEDecoder(cfg, tensors)
    ours = np.clip(vae.decode(vae.encode(x) * np.float32(cfg.scaling_factor)), -1, 1)
    with torch.no_grad():
        theirs = np.clip(small_model.decode(small_model.encode(torch.from_numpy(x)).latent_dist.mean).sample.numpy(),
                         -1, 1)

    def psnr(y):
        return 10 * np.log10(4.0 / np.mean((y - x) ** 2))

    assert abs(psnr(ours) - psnr(theirs)) <= 0.5


def test_three_level_tiled_encode_matches_each_tile_alone():
    """With three levels the tail at the latent's resolution (run on all tiles together) is a
    proper part of the graph; every tile still gets the bits of its encode alone."""
    model = make_autoencoder(**THREE_LEVELS, seed=8)
    cfg = VAEConfig(**THREE_LEVELS, encoder=True)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    vae = VAEDecoder(cfg, {k: state[k] for k in expected_vae_tensors(cfg)}, threads=2)
    x = images((1, 3, 48, 32))  # latent 12 x 8; tile 8, overlap 4: rows at 0, 4; columns at 0
    tiled = vae.encode(x, tile=8, overlap=4)
    top, bottom = vae.encode(x[:, :, :32])[0], vae.encode(x[:, :, 16:])[0]
    np.testing.assert_array_equal(tiled[0, :, :4], top[:, :4])
    np.testing.assert_array_equal(tiled[0, :, 8:], bottom[:, 4:])
    mid = tiled[0, :, 4:8]
    lo, hi = np.minimum(top[:, 4:8], bottom[:, :4]), np.maximum(top[:, 4:8], bottom[:, :4])
    assert np.all(mid >= lo - 1e-6) and np.all(mid <= hi + 1e-6)
