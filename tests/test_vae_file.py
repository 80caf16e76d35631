"""VAE decoders inside .tdit files: convert-vae, convert --vae, load_vae, and pictures from a pipeline."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch  # noqa: F401 - the converter tests below need torch; fail early without it
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # importlib mode: tests/ is not on sys.path
import torch_reference as ref  # noqa: E402
from test_vae import SMALL, latents, make_autoencoder, reference_decode, to_legacy_names  # noqa: E402

from terdit_edge import load_model  # noqa: E402
from terdit_edge.errors import FormatError  # noqa: E402
from terdit_edge.format import read_tdit  # noqa: E402
from terdit_edge.frontends.cli import main  # noqa: E402
from terdit_edge.pipeline import Pipeline, load_vae  # noqa: E402


@pytest.fixture(scope="module")
def legacy_vae_folder(tmp_path_factory):
    """A small diffusers AutoencoderKL folder whose attention uses the older query/key/value/proj_attn names."""
    model = make_autoencoder(**SMALL)
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder, safe_serialization=True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(to_legacy_names(state), str(weights))
    return model, folder


@pytest.mark.parametrize("dtype, bound", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_convert_vae_then_decode_matches_diffusers(tmp_path, legacy_vae_folder, dtype, bound):
    model, folder = legacy_vae_folder
    out = tmp_path / "vae.tdit"
    assert main(["convert-vae", str(folder), str(out), "--vae-dtype", dtype]) == 0
    z = latents()
    err = np.abs(load_vae(out).decode(z) - reference_decode(model, z)).max()
    assert err <= bound, err


def test_vae_only_file_is_not_a_diffusion_model(tmp_path, legacy_vae_folder):
    _, folder = legacy_vae_folder
    out = tmp_path / "vae.tdit"
    assert main(["convert-vae", str(folder), str(out)]) == 0
    with pytest.raises(FormatError, match="only a VAE"):
        load_model(out)
    with pytest.raises(FormatError, match="holds no VAE"):
        load_vae(_dit_file(tmp_path))


def _dit_file(tmp_path, vae=None):
    ck = tmp_path / "ck"
    ref.save_checkpoint(ref.random_model(), str(ck), layout="released")
    out = tmp_path / ("pipe.tdit" if vae else "dit.tdit")
    args = ["convert", str(ck), str(out), "--label-map", "identity", "--n-heads", "4"]
    if vae:
        args += ["--vae", str(vae)]
    assert main(args) == 0
    return out


def test_pipeline_file_holds_model_and_vae_and_makes_rgb_pictures(tmp_path, legacy_vae_folder):
    _, folder = legacy_vae_folder
    path = _dit_file(tmp_path, vae=folder)
    tf = read_tdit(path)
    assert tf.config is not None and tf.vae_config_json is not None and tf.metadata["vae_dtype"] == "F16"
    pipe = Pipeline.load(path, backend="numpy")
    images = pipe([3], steps=3, sampler="ddim", progress=False)
    assert images[0].mode == "RGB" and images[0].size == (8 * 8 // 4, 8 * 8 // 4)  # latent 8x8, 2 VAE levels: x2
    out = tmp_path / "o.png"
    assert main(["generate", str(path), "--class", "3", "--steps", "3", "--sampler", "ddim", "--out", str(out),
                 "--no-progress", "--upscale", "1"]) == 0
    im = Image.open(out)
    assert im.mode == "RGB" and np.array_equal(np.asarray(im), np.asarray(images[0]))


def test_separate_vae_file_can_be_passed(tmp_path, legacy_vae_folder):
    _, folder = legacy_vae_folder
    dit = _dit_file(tmp_path)
    vae = tmp_path / "vae.tdit"
    assert main(["convert-vae", str(folder), str(vae)]) == 0
    out = tmp_path / "o.png"
    assert main(["generate", str(dit), "--vae", str(vae), "--class", "1", "--steps", "2", "--out", str(out),
                 "--no-progress"]) == 0
    assert Image.open(out).mode == "RGB"


def test_memory_saving_between_phases_changes_no_output_byte(tmp_path, legacy_vae_folder, monkeypatch):
    """The pipeline gives back mapped pages between sampling and decoding and after each VAE layer,
    and frees the DiT's buffers before decoding; the pictures are the same bytes as without."""
    import terdit_edge.format as fmt
    import terdit_edge.vae as vae_module

    _, folder = legacy_vae_folder
    pipe = Pipeline.load(_dit_file(tmp_path, vae=folder))
    kwargs = dict(steps=3, sampler="ddim", seeds=[4, 9], progress=False, output="np")
    released = []
    real = fmt.release_pages

    def recording(arrays):
        released.append(real(arrays))
        return released[-1]

    monkeypatch.setattr(fmt, "release_pages", recording)
    monkeypatch.setattr(vae_module, "release_pages", recording)
    with_release = pipe([3, 5], **kwargs)
    assert sum(released) > 0  # the mapped weights were given back at least once
    monkeypatch.setattr(fmt, "release_pages", lambda arrays: 0)
    monkeypatch.setattr(vae_module, "release_pages", lambda arrays: 0)
    pipe.model.release_buffers = lambda: None
    without = pipe([3, 5], **kwargs)
    assert with_release.tobytes() == without.tobytes()
