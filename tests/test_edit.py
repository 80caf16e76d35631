"""Image-to-image (SDEdit) and inpainting (issue 27): Pipeline.edit / Pipeline.inpaint / `terdit-edge edit`.

Mostly on the bundled digits model (pixel space, 16 x 16, fast), plus a tiny random latent model
with a random SD-VAE (encoder and decoder) written into one .tdit file, built with NumPy only.
"""
from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import terdit_edge.edit as edit_module
from terdit_edge import Pipeline
from terdit_edge.edit import edit_sample, latent_mask, repaint_plan
from terdit_edge.errors import InputError
from terdit_edge.format import VAE_PREFIX, write_tdit
from terdit_edge.frontends.cli import main
from terdit_edge.images import to_uint8
from terdit_edge.vae_config import VAEConfig, expected_vae_tensors
from tests.conftest import model_metadata, random_model_tensors, small_config

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_digits.py"
FAST = dict(steps=10, sampler="dpm++2m", output="np")


@pytest.fixture(scope="module")
def digits():
    return Pipeline.load()


def a_three() -> np.ndarray:
    """A hand-drawn-looking '3' (16 x 16 uint8, white on black like the model's digits)."""
    img = np.zeros((16, 16), np.uint8)
    img[2:4, 4:12] = 255
    img[7:9, 6:12] = 255
    img[12:14, 4:12] = 255
    img[2:14, 10:12] = 255
    return img


# --------------------------------------------------------------------------------------------
# strength 0 and 1
# --------------------------------------------------------------------------------------------

def test_strength_zero_returns_the_input(digits):
    img = a_three()
    out = digits.edit(img, [8, 1], strength=0.0, **FAST)
    assert out.shape == (2, 16, 16, 1)
    for k in range(2):
        assert np.array_equal(to_uint8(out[k, :, :, 0]), img)  # pixel model: the round trip is the identity


@pytest.mark.parametrize("sampler, steps, eta, interval", [
    ("ddpm", 12, 0.0, None), ("ddim", 10, 0.5, None), ("dpm++2m", 10, 0.0, None), ("ddim", 10, 0.0, (300, 800)),
    ("unipc", 10, 0.0, None)])
def test_strength_one_is_plain_generation_bit_for_bit(digits, sampler, steps, eta, interval):
    kw = dict(steps=steps, sampler=sampler, eta=eta, cfg_scale=3.0, seeds=[5, 17], guidance_interval=interval,
              output="np")
    edited = digits.edit(a_three(), [8, 2], strength=1.0, **kw)
    plain = digits([8, 2], progress=False, **kw)
    assert edited.tobytes() == plain.tobytes()


def test_middle_strengths_run_the_last_steps_and_keep_more_of_the_input(digits):
    img = a_three()
    seen = []
    dist = []
    for strength in (0.2, 0.5, 0.9):
        steps_run: list = []
        out = digits.edit(img, [8], strength=strength, callback=lambda i, n, x, runs=steps_run: runs.append(n),
                          seed=3, **FAST)
        seen.append(steps_run[0])
        dist.append(float(np.abs(out[0, :, :, 0] - img / 255).mean()))
    assert seen == [2, 5, 9]  # round(strength * 10) of the 10 steps
    assert dist[0] < dist[2]


# --------------------------------------------------------------------------------------------
# the acceptance check: a '3' edited toward 8
# --------------------------------------------------------------------------------------------

def test_editing_a_three_toward_eight_draws_an_eight(digits):
    pytest.importorskip("sklearn", reason="the judge is a scikit-learn classifier (test extras)")
    spec = importlib.util.spec_from_file_location("quality_digits", QUALITY)
    q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q)
    images, labels = q.real_digits(16)
    clf, heldout = q.fit_classifier(q.to_features(images), labels, seed=0)
    assert heldout >= 0.97
    three = to_uint8((images[labels == 3][0] + 1) / 2)
    assert clf.predict(q.to_features(three[None] / 127.5 - 1))[0] == 3
    seeds = list(range(20))
    out = digits.edit(three, [8] * len(seeds), strength=0.7, seeds=seeds, steps=20, sampler="dpm++2m", output="np")
    pred = clf.predict(q.to_features(out[..., 0] * 2 - 1))
    assert (pred == 8).mean() >= 0.9, f"classified as: {pred.tolist()}"


# --------------------------------------------------------------------------------------------
# batch invariance and seeds
# --------------------------------------------------------------------------------------------

def test_the_same_edit_is_byte_identical_alone_and_in_a_batch(digits):
    img, other = a_three(), np.rot90(a_three()).copy()
    kw = dict(strength=0.6, steps=10, sampler="ddpm", output="np")
    batch = digits.edit([img, other, img], [8, 5, 2], seeds=[4, 9, 11], batch_size=3, **kw)
    split = digits.edit([img, other, img], [8, 5, 2], seeds=[4, 9, 11], batch_size=1, **kw)
    alone = digits.edit(other, [5], seed=9, **kw)
    assert batch.tobytes() == split.tobytes()
    assert batch[1].tobytes() == alone[0].tobytes()
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    kw = dict(steps=10, sampler="ddim", eta=1.0, resample_jumps=2, jump_length=2, output="np")
    batch = digits.inpaint(img, mask, [8, 5], seeds=[1, 2], **kw)
    alone = digits.inpaint(img, mask, [5], seed=2, **kw)
    assert batch[1].tobytes() == alone[0].tobytes()


# --------------------------------------------------------------------------------------------
# inpainting
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler, jumps", [("ddpm", 0), ("ddim", 0), ("dpm++2m", 0), ("ddpm", 2), ("dpm++2m", 1),
                                            ("unipc", 0), ("unipc", 1)])
def test_inpainting_keeps_the_known_region(digits, sampler, jumps):
    img = a_three()
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :8] = 255  # regenerate the left half
    out = digits.inpaint(img, mask, [8, 0], steps=10, sampler=sampler, resample_jumps=jumps, jump_length=2,
                         mask_blur=0.0, seeds=[1, 2], output="np")
    for k in range(2):
        got = to_uint8(out[k, :, :, 0])
        assert np.array_equal(got[:, 8:], img[:, 8:])
        assert not np.array_equal(got[:, :8], img[:, :8])
    soft = digits.inpaint(img, mask, [8], steps=10, sampler=sampler, mask_blur=1.0, seed=1, output="np")
    assert np.array_equal(to_uint8(soft[0, :, 11:, 0]), img[:, 11:])  # beyond the soft edge (2 sigma)


@pytest.mark.parametrize("sampler", ["dpm++2m", "unipc"])
def test_multistep_samplers_edit_from_mid_schedule_and_inpaint_with_a_full_mask_as_plain_generation(digits, sampler):
    """A multistep solver starts fresh at the edit's first step (first order there), and a mask of ones
    changes nothing: UniPC's corrector adds its increment to the x it is given, which is then the x
    its predictor made."""
    img = a_three()
    seen: list = []
    out = digits.edit(img, [8], strength=0.5, steps=10, sampler=sampler, seed=3, output="np",
                      callback=lambda i, n, x: seen.append(n))
    assert seen == [5] * 5 and np.isfinite(out).all()
    assert not np.array_equal(out, digits.edit(img, [8], strength=0.5, steps=10, sampler="ddim", seed=3, output="np"))
    full = np.full((16, 16), 255, np.uint8)
    kw = dict(steps=8, sampler=sampler, seeds=[4, 6], output="np")
    assert digits.inpaint(img, full, [8, 2], mask_blur=0.0, **kw).tobytes() == \
        digits([8, 2], progress=False, **kw).tobytes()


def test_soft_mask_in_latent_space():
    mask = np.zeros((16, 16), np.float32)
    mask[:, :8] = 1
    m = latent_mask(mask, 4, blur=0.0)
    assert m.shape == (4, 4) and np.array_equal(m[:, :2], np.ones((4, 2))) and not m[:, 2:].any()
    mask[:, 6:8] = 0  # a block half to regenerate gets 0.5
    assert np.allclose(latent_mask(mask, 4, blur=0.0)[:, 1], 0.5)
    soft = latent_mask(mask, 1, blur=1.0)
    assert soft[0, 0] == 1 and 0 < soft[0, 7] < 1 and soft[0, 15] < 1e-3


def test_repaint_plan_walks_down_with_jumps_back_up():
    assert repaint_plan(4) == [("down", 3), ("down", 2), ("down", 1), ("down", 0)]
    plan = repaint_plan(10, resample_jumps=2, jump_length=2)
    level = 10
    for op, j in plan:  # every op starts at the current level
        if op == "down":
            assert j == level - 1
            level -= 1
        else:
            assert j == level
            level += 1
    assert level == 0
    downs = sum(op == "down" for op, _ in plan)
    assert downs == 10 + 2 * 2 * 4  # jumps at levels 2, 4, 6, 8, twice each, two levels each


# --------------------------------------------------------------------------------------------
# a latent model with an SD-VAE encoder
# --------------------------------------------------------------------------------------------

VAE_ARCH = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)


def random_vae_tensors(cfg: VAEConfig, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_vae_tensors(cfg).items():
        if len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            out[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        elif "norm" in name and name.endswith("weight"):
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    return out


def latent_file(tmp_path, encoder=True) -> Path:
    cfg = small_config()
    vcfg = VAEConfig(**VAE_ARCH, encoder=encoder)
    tensors = random_model_tensors(cfg)
    tensors.update({VAE_PREFIX + k: v for k, v in random_vae_tensors(vcfg).items()})
    meta = model_metadata(cfg)
    meta.update({"vae_config": vcfg.to_json(), "vae_dtype": "F32"})
    path = tmp_path / ("latent.tdit" if encoder else "latent_noenc.tdit")
    write_tdit(path, tensors, meta)
    return path


@pytest.fixture(scope="module")
def latent_pipe(tmp_path_factory):
    return Pipeline.load(latent_file(tmp_path_factory.mktemp("latent")), backend="numpy")


def photo(size=16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([yy, xx, 0.5 * (yy + xx)], axis=-1) * 200 + rng.integers(0, 40, (size, size, 3))
    return base.clip(0, 255).astype(np.uint8)


def test_latent_model_strength_zero_is_the_vae_round_trip(latent_pipe):
    img = photo()
    out = latent_pipe.edit(img, [3], strength=0.0, output="np")
    vae = latent_pipe.vae
    x = (img / np.float32(127.5) - 1).astype(np.float32).transpose(2, 0, 1)[None]
    round_trip = vae.decode(vae.encode(x) * np.float32(vae.cfg.scaling_factor))
    want = np.clip((round_trip.transpose(0, 2, 3, 1) + 1) / 2, 0, 1)
    assert out.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)


def test_latent_model_strength_one_is_plain_generation(latent_pipe):
    kw = dict(steps=4, sampler="ddpm", seeds=[3, 8], output="np")
    assert latent_pipe.edit(photo(), [1, 2], strength=1.0, **kw).tobytes() == \
        latent_pipe([1, 2], progress=False, **kw).tobytes()


def test_latent_inpainting_keeps_the_known_latents_exactly(latent_pipe):
    model = latent_pipe.model
    x0 = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    mask = np.zeros((2, 1, 8, 8), np.float32)
    mask[:, :, 2:6, 2:6] = 1
    for sampler in ("ddpm", "ddim", "dpm++2m", "unipc"):
        out = edit_sample(model, [1, 2], x0, strength=1.0, steps=6, sampler=sampler, mask=mask, seeds=[0, 1],
                          resample_jumps=1, jump_length=2)
        keep = np.broadcast_to(mask == 0, out.shape)
        assert np.array_equal(out[keep], x0[keep])
        assert not np.allclose(out[~keep], x0[~keep])
    # and through the pipeline: the picture's known region is the round trip's up to the decoder's reach
    img = photo()
    pmask = np.zeros((16, 16), np.uint8)
    pmask[4:12, 4:12] = 255
    inpainted = latent_pipe.inpaint(img, pmask, [3], steps=4, mask_blur=0.0, output="np")
    assert inpainted.shape == (1, 16, 16, 3)


def test_latent_model_without_encoder_says_how_to_fix_it(tmp_path):
    pipe = Pipeline.load(latent_file(tmp_path, encoder=False), backend="numpy")
    with pytest.raises(InputError, match="--vae-encoder"):
        pipe.edit(photo(), [1], steps=2)
    info = json.loads(pipe.vae.cfg.to_json())
    assert "encoder" not in info


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------

def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if img.mode in ("CMYK", "F", "I;16") else "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("bad, match", [
    (b"this is not an image", "not a readable image"),
    ("/nonexistent/picture.png", "no such file"),
    (12, "must be a PIL image"),
    (np.zeros((16, 16), np.float32), "must be uint8"),
    (Image.new("CMYK", (16, 16)), "mode 'CMYK'"),
    (Image.new("F", (16, 16)), "mode 'F'"),
    (Image.new("I;16", (16, 16)), "mode 'I;16'"),
])
def test_bad_images_are_clear_input_errors(digits, bad, match):
    with pytest.raises(InputError, match=match):
        digits.edit(bad, [8], **FAST)
    if isinstance(bad, Image.Image):  # the same as encoded bytes
        with pytest.raises(InputError, match=match):
            digits.edit(_png(bad), [8], **FAST)


def test_huge_images_are_refused(digits, monkeypatch):
    monkeypatch.setattr(edit_module, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match="more than"):
        digits.edit(_png(Image.new("L", (40, 40))), [8], **FAST)


def test_bad_masks_and_settings_are_clear_input_errors(digits):
    img = a_three()
    with pytest.raises(InputError, match="mask is 8 x 8 but the image is 16 x 16"):
        digits.inpaint(img, np.zeros((8, 8), np.uint8), [8], **FAST)
    with pytest.raises(InputError, match="not a readable image"):
        digits.inpaint(img, b"junk", [8], **FAST)
    for strength in (-0.1, 1.5, "0.5", float("nan")):
        with pytest.raises(InputError, match="strength"):
            digits.edit(img, [8], strength=strength, **FAST)
    with pytest.raises(InputError, match="fit"):
        digits.edit(img, [8], fit="squash", **FAST)
    with pytest.raises(InputError, match="one per class"):
        digits.edit([img, img], [8, 1, 2], **FAST)
    with pytest.raises(InputError, match="needs a mask"):
        edit_sample(digits.model, [8], np.zeros((1, 1, 16, 16), np.float32), resample_jumps=1)
    with pytest.raises(InputError, match="resample_jumps"):
        digits.inpaint(img, img, [8], resample_jumps=-1, **FAST)


def test_images_of_another_size_are_fitted(digits):
    wide = np.zeros((32, 64), np.uint8)
    wide[:, 16:48] = np.kron(a_three(), np.ones((2, 2), np.uint8))
    out = digits.edit(wide, [3], strength=0.0, **FAST)  # crop: the centre 32 x 32, halved (bicubic)
    want = np.asarray(Image.fromarray(wide[:, 16:48]).resize((16, 16), Image.BICUBIC))
    assert np.array_equal(to_uint8(out[0, :, :, 0]), want)
    out = digits.edit(wide, [3], strength=0.0, fit="stretch", **FAST)
    assert np.array_equal(to_uint8(out[0, :, :, 0]), np.asarray(Image.fromarray(wide).resize((16, 16), Image.BICUBIC)))
    rgba = Image.fromarray(np.stack([a_three()] * 3 + [np.full((16, 16), 255, np.uint8)], axis=-1), "RGBA")
    out = digits.edit(rgba, [3], strength=0.0, **FAST)
    assert np.array_equal(to_uint8(out[0, :, :, 0]), a_three())


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------

def test_cli_edit_and_inpaint(tmp_path):
    src, mask = tmp_path / "three.png", tmp_path / "mask.png"
    Image.fromarray(a_three()).save(src)
    m = np.zeros((16, 16), np.uint8)
    m[:, :8] = 255
    Image.fromarray(m).save(mask)
    out = tmp_path / "e.png"
    assert main(["edit", str(src), "--class", "8", "--strength", "0.7", "--steps", "10", "--sampler", "dpm++2m",
                 "--seed", "3", "--out", str(out), "--upscale", "1", "--no-progress"]) == 0
    im = Image.open(out)
    assert im.size == (16, 16) and im.text["strength"] == "0.7" and im.text["seed"] == "3"
    pipe = Pipeline.load()
    want = pipe.edit(a_three(), [8], strength=0.7, steps=10, sampler="dpm++2m", seed=3)[0]
    assert np.array_equal(np.asarray(im), np.asarray(want))
    out2 = tmp_path / "i.png"
    assert main(["edit", str(src), "--mask", str(mask), "--class", "0", "--resample-jumps", "1", "--steps", "6",
                 "--out", str(out2), "--upscale", "1", "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(out2))[:, 10:], a_three()[:, 10:])  # past the soft edge
    assert main(["edit", str(src), "--class", "8", "--resample-jumps", "1", "--out", str(out2)]) == 1
    assert main(["edit", str(tmp_path / "missing.png"), "--class", "8", "--out", str(out2)]) == 1
