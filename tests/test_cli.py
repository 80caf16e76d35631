"""The terdit-edge command line end to end, on small random models built in code."""
from __future__ import annotations

import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from terdit_edge.frontends.cli import main
from tests.conftest import build_model_file, child_env

PIXEL = dict(latent=False, in_channels=1, guided_channels=1, input_size=8, num_classes=10)

# A subprocess in which `import torch` fails, running the CLI.
_NO_TORCH_CLI = r"""
import sys
class _BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _BlockTorch())
from terdit_edge.frontends.cli import main
rc = main(sys.argv[1:])
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
sys.exit(rc)
"""


def run_cli(*args) -> subprocess.CompletedProcess:
    """The installed CLI in a child, started outside the repository (paths in args are absolute)."""
    return subprocess.run([sys.executable, "-c", _NO_TORCH_CLI, *map(str, args)], capture_output=True, text=True,
                          env=child_env(), cwd=tempfile.gettempdir())


def test_generate_writes_a_png_with_reproducible_metadata_without_torch(tmp_path):
    model = build_model_file(tmp_path, **PIXEL)
    out = tmp_path / "a.png"
    r = run_cli("generate", model, "--class", "3", "--steps", "6", "--seed", "5", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    im = Image.open(out)
    assert im.text["class"] == "3" and im.text["seed"] == "5" and im.text["steps"] == "6"
    assert im.text["sampler"] == "ddpm" and im.text["cfg"] == "4.0" and im.text["model"] == "model.tdit"
    assert im.text["version"].startswith("terdit-edge ")


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    model = build_model_file(tmp_path, **PIXEL)
    paths = []
    for name, seed in (("a.png", 1), ("b.png", 1), ("c.png", 2)):
        assert main(["generate", str(model), "--class", "2", "--steps", "4", "--sampler", "ddim", "--seed", str(seed),
                     "--out", str(tmp_path / name), "--no-progress"]) == 0
        paths.append((tmp_path / name).read_bytes())
    assert paths[0] == paths[1]
    assert paths[0] != paths[2]


@pytest.mark.parametrize("activations", ["int8", "int10"])
def test_integer_activations_generate_and_are_recorded(tmp_path, activations):
    model = build_model_file(tmp_path, **PIXEL)
    out = tmp_path / "i.png"
    assert main(["generate", str(model), "--class", "1", "--steps", "4", "--activations", activations,
                 "--out", str(out), "--no-progress"]) == 0
    assert Image.open(out).text["activations"] == activations


def test_default_classes_make_one_grid_of_every_class(tmp_path):
    model = build_model_file(tmp_path, **PIXEL)
    out = tmp_path / "grid.png"
    assert main(["generate", str(model), "--steps", "2", "--out", str(out), "--no-progress", "--upscale", "1"]) == 0
    im = Image.open(out)
    assert im.size == (10 * 8, 8)  # ten 8x8 tiles in one row
    assert im.text["class"] == ",".join(str(i) for i in range(10))


def test_several_classes_without_grid_write_one_file_each(tmp_path):
    model = build_model_file(tmp_path, **PIXEL)
    assert main(["generate", str(model), "--class", "1", "--class", "7", "--steps", "2",
                 "--out", str(tmp_path / "x.png"), "--no-progress"]) == 0
    assert Image.open(tmp_path / "x-0.png").text["class"] == "1"
    assert Image.open(tmp_path / "x-1.png").text["class"] == "7"


def test_small_images_are_upscaled_to_at_least_64_pixels(tmp_path):
    model = build_model_file(tmp_path, **PIXEL)
    out = tmp_path / "u.png"
    assert main(["generate", str(model), "--class", "0", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize("args, message", [
    (["--class", "10"], "out of range"),
    (["--class", "-1"], "out of range"),
    (["--class", "golden retriever"], "unknown class name"),
])
def test_bad_classes_exit_1_with_a_message(tmp_path, capsys, args, message):
    model = build_model_file(tmp_path, **PIXEL)
    assert main(["generate", str(model), *args, "--steps", "2", "--out", str(tmp_path / "o.png"),
                 "--no-progress"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("args", [["--steps", "0"], ["--steps", "x"], ["--cfg", "-1"], ["--seed", "-3"],
                                  ["--sampler", "euler"], ["--threads", "0"], ["--backend", "tpu"],
                                  ["--activations", "int4"]])
def test_bad_arguments_exit_2(tmp_path, args):
    model = build_model_file(tmp_path, **PIXEL)
    with pytest.raises(SystemExit) as e:
        main(["generate", str(model), *args])
    assert e.value.code == 2


def test_missing_or_corrupt_model_exits_1(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope.tdit"), "--out", str(tmp_path / "o.png")]) == 1
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.tdit"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert main(["generate", str(bad), "--out", str(tmp_path / "o.png")]) == 1
    assert "error" in capsys.readouterr().err


def test_latent_model_without_vae_is_refused_before_sampling_unless_latents_are_asked(tmp_path, capsys):
    model = build_model_file(tmp_path)  # latent, no VAE
    assert main(["generate", str(model), "--class", "1", "--steps", "2", "--out", str(tmp_path / "o.png")]) == 1
    assert "VAE" in capsys.readouterr().err
    npy = tmp_path / "z.npy"
    assert main(["generate", str(model), "--class", "1", "--steps", "2", "--save-latents", str(npy),
                 "--no-progress"]) == 0
    assert np.load(npy).shape == (1, 4, 8, 8)


def test_info_prints_cpu_backend_and_model(tmp_path, capsys):
    model = build_model_file(tmp_path, **PIXEL)
    assert main(["info", str(model)]) == 0
    out = capsys.readouterr().out
    assert "auto backend:" in out and "dim=64" in out and "label map: identity" in out and "vae: none" in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().err
