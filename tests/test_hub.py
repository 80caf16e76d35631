"""`terdit-edge pull` / `Pipeline.from_pretrained` offline, against a Hugging Face cache laid out as
the real one (HF_HUB_OFFLINE=1): small random checkpoints in the release layout and a small diffusers
VAE. Each case runs the installed CLI in a subprocess so that the Hub's environment variables apply."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest

pytest.importorskip("huggingface_hub", reason="the [hub] extra (huggingface_hub) is not installed")
torch = pytest.importorskip("torch", reason="converting downloads needs torch (the [hub] extra)")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # importlib mode: tests/ is not on sys.path
import torch_reference as ref  # noqa: E402
from test_vae import SMALL, make_autoencoder  # noqa: E402

from terdit_edge.converters.terdit import convert  # noqa: E402
from terdit_edge.format import read_tdit  # noqa: E402
from tests.conftest import child_env  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL_REPO = "lucky-lance/TerDiT"
VAE_REPO = "stabilityai/sd-vae-ft-ema"


def snapshot(cache, repo) -> str:
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(COMMIT)
    snap = os.path.join(root, "snapshots", COMMIT)
    os.makedirs(snap, exist_ok=True)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache with two model folders (64 and 128 px) and the VAE; a table naming two models."""
    base = tmp_path_factory.mktemp("hub")
    cache = str(base / "hf")
    snap = snapshot(cache, MODEL_REPO)
    small = ref.random_model(dim=64, n_heads=4, seed=51)
    ref.save_checkpoint(small, os.path.join(snap, "tiny_64"), "released")
    big = ref.random_model(dim=64, n_heads=4, seed=52, input_size=16)
    ref.save_checkpoint(big, os.path.join(snap, "tiny_128"), "released")
    vae_snap = snapshot(cache, VAE_REPO)
    make_autoencoder(**SMALL).save_pretrained(vae_snap, safe_serialization=True)
    table = json.loads(resources.files("terdit_edge").joinpath("data", "hub_models.json").read_text())
    table["models"] = {
        "tiny-64": {"repo_id": MODEL_REPO, "subfolder": None, "model": "DiT_Llama_tiny_patch2", "image_size": 64,
                    "download_mb": 1, "description": "test model, 64 px"},
        "tiny-128": {"repo_id": MODEL_REPO, "subfolder": "tiny_128", "model": "DiT_Llama_tiny_patch2",
                     "image_size": 128, "download_mb": 1, "description": "test model, 128 px"},
        "missing": {"repo_id": MODEL_REPO, "subfolder": None, "model": "DiT_Llama_600M_patch2", "image_size": 256,
                    "download_mb": 170, "description": "not in the cache"},
    }
    table_path = base / "table.json"
    table_path.write_text(json.dumps(table))
    return {"cache": cache, "snap": snap, "vae": vae_snap, "table": str(table_path), "base": base}


def run(hub, home, *args, code=None):
    """The installed CLI in a child started outside the repository (tests/conftest.py: child_env)."""
    env = child_env(HF_HUB_CACHE=hub["cache"], HF_HUB_OFFLINE="1", TERDIT_EDGE_HOME=str(home),
                    TERDIT_EDGE_HUB_TABLE=hub["table"], HF_HUB_DISABLE_PROGRESS_BARS="1")
    return subprocess.run([sys.executable, "-m", "terdit_edge.frontends.cli", *args] if code is None
                          else [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=str(hub["base"]))


def test_pull_finds_the_folder_converts_with_the_vae_and_caches(hub, tmp_path):
    home = tmp_path / "home"
    r = run(hub, home, "pull", "tiny-64")
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip().splitlines()[-1]
    assert path == str(home / "tiny-64.tdit") and "found DiT_Llama_tiny_patch2 at 64 px" in r.stderr
    got = read_tdit(path)
    assert got.vae_config_json is not None and got.config.input_size == 8
    assert json.loads(got.vae_config_json)["encoder"] is True  # pull keeps the encoder (edit needs it)
    want_path = tmp_path / "want.tdit"
    convert(os.path.join(hub["snap"], "tiny_64"), str(want_path), vae=hub["vae"], vae_encoder=True, log=None)
    want = read_tdit(want_path)
    assert set(got.tensors) == set(want.tensors)
    for name, arr in want.tensors.items():
        assert np.array_equal(got.tensors[name], arr), name

    mtime = os.path.getmtime(path)
    again = run(hub, home, "pull", "tiny-64")
    assert again.returncode == 0 and "already converted" in again.stderr and os.path.getmtime(path) == mtime
    listing = run(hub, home, "pull", "--list")
    assert listing.returncode == 0
    assert any(line.split()[0] == "tiny-64" and "cached" in line for line in listing.stdout.splitlines()[1:])
    assert any(line.split()[0] == "missing" and "download about 170 MB" in line
               for line in listing.stdout.splitlines()[1:])


def test_a_subfolder_in_the_table_is_used_and_from_pretrained_loads_it(hub, tmp_path):
    code = ("import sys; from terdit_edge import Pipeline; p = Pipeline.from_pretrained(sys.argv[1], backend='numpy');"
            "im = p([3], steps=2, sampler='ddim', progress=False)[0]; print(p.config.input_size, im.size, p.path)")
    r = run(hub, tmp_path / "home", "tiny-128", code=code)
    assert r.returncode == 0, r.stderr
    size, *_ = r.stdout.split()
    assert size == "16" and r.stdout.strip().endswith("tiny-128.tdit")


def test_unknown_name_and_model_missing_from_the_offline_cache(hub, tmp_path):
    r = run(hub, tmp_path, "pull", "terdit-9b")
    assert r.returncode == 1 and "unknown model 'terdit-9b'" in r.stderr and "tiny-64" in r.stderr
    r = run(hub, tmp_path, "pull", "missing")
    assert r.returncode == 1 and "DiT_Llama_600M_patch2 at 256 px" in r.stderr
    assert not (tmp_path / "missing.tdit").exists()


def test_a_damaged_download_is_refused_and_leaves_no_model(hub, tmp_path):
    weights = os.path.join(hub["snap"], "tiny_64", "consolidated_ema_ternary.00-of-01.pth")
    good = open(weights, "rb").read()
    try:
        with open(weights, "wb") as f:
            f.write(good[: len(good) // 2])  # an interrupted download
        r = run(hub, tmp_path, "pull", "tiny-64")
        assert r.returncode == 1 and "do not convert" in r.stderr and "--force" in r.stderr, r.stderr
        assert not (tmp_path / "tiny-64.tdit").exists()
        assert [f for f in os.listdir(tmp_path) if not f.startswith(".")] == []
    finally:
        with open(weights, "wb") as f:
            f.write(good)


def test_a_missing_vae_is_a_clear_error(hub, tmp_path):
    safetensors = os.path.join(hub["vae"], "diffusion_pytorch_model.safetensors")
    moved = safetensors + ".away"
    os.rename(safetensors, moved)
    try:
        r = run(hub, tmp_path, "pull", "tiny-64")
        assert r.returncode == 1 and "diffusion_pytorch_model.safetensors" in r.stderr and VAE_REPO in r.stderr
    finally:
        os.rename(moved, safetensors)


def test_a_damaged_cached_model_is_converted_again(hub, tmp_path):
    home = tmp_path / "home"
    assert run(hub, home, "pull", "tiny-64").returncode == 0
    path = home / "tiny-64.tdit"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    r = run(hub, home, "pull", "tiny-64")
    assert r.returncode == 0 and "damaged" in r.stderr, r.stderr
    read_tdit(path)  # verified again
