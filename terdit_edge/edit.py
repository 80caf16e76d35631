"""Editing instead of generating: image-to-image (SDEdit) and inpainting (with optional RePaint
resampling), model-agnostic like :mod:`terdit_edge.diffusion`.

Image-to-image (Meng et al. 2021, arXiv 2108.01073): the input's latents x0 are noised to the
level of sampler step ``n - 1`` (``n = round(strength * len(schedule))``) and the sampler runs the
remaining n steps toward the requested class. ``strength`` 0 runs no step (the result is x0, i.e.
the input's VAE round trip); ``strength`` 1 starts from pure noise and is plain generation, bit for
bit.

Inpainting: a mask (1 = regenerate, 0 = keep; soft values blend) at the sampler's resolution; after
every step the known region is re-imposed as x0 noised to the new step's level,
``x = m * x + (1 - m) * (sqrt(abar) x0 + sqrt(1 - abar) noise)``, and at the end it is x0 exactly.
RePaint (Lugmayr et al. 2022, arXiv 2201.09865) resampling: every ``jump_length`` steps the
sample is noised back up ``jump_length`` levels (one forward-diffusion step at a time) and
denoised again, ``resample_jumps`` times, which lets the generated region agree with the known one
at the seams.

Randomness (extends the contract of docs/reproducibility.md): image k's generator
``default_rng(seeds[k])`` draws, each of shape (C, H, W): the initial noise (used to noise x0, or as
the start itself at strength 1); then per denoising step the step's noise (as generation), then,
when inpainting, the noise of the re-imposed known region; per upward RePaint step one draw. The
result is a pure function of the model, the input, the class, the seed and the settings, whatever
the batch.
"""
from __future__ import annotations

import io
import math
import os
from typing import Callable

import numpy as np

from .diffusion import (
    Schedule,
    check_guidance_interval,
    guided_model_output,
    image_seeds,
    sampler_class,
)
from .errors import InputError

__all__ = ["edit_sample", "edit_start_steps", "repaint_plan", "load_image", "load_mask", "latent_mask",
           "FIT_MODES", "IMAGE_MODES", "MAX_IMAGE_PIXELS"]

FIT_MODES = ("crop", "stretch")
# PIL modes an input image may have (converted to RGB or L for the model); others are refused
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX")
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # refuse bigger inputs (decompression bombs, accidental photos of 100 MP)


# --------------------------------------------------------------------------------------------
# the sampling loop
# --------------------------------------------------------------------------------------------

def edit_start_steps(strength, total: int) -> int:
    """How many of the ``total`` sampler steps an edit of ``strength`` runs: round(strength * total)
    (Python round), 0 .. total. InputError unless 0 <= strength <= 1."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)) \
            or not np.isfinite(strength) or not 0 <= strength <= 1:
        raise InputError(f"strength must be a number in [0, 1], got {strength!r}")
    return int(round(float(strength) * total))


def repaint_plan(n: int, resample_jumps: int = 0, jump_length: int = 1) -> list[tuple[str, int]]:
    """The RePaint schedule over levels n .. 0 (level L: the noise level of sampler step L - 1,
    level 0 clean): a list of ("down", j) (apply sampler step j: level j + 1 -> j) and ("up", L)
    (forward-diffuse level L -> L + 1). At every level that is a multiple of ``jump_length`` (not 0,
    and at least ``jump_length`` below n) the walk goes back up ``jump_length`` levels,
    ``resample_jumps`` times (RePaint's get_schedule_jump with jump_n_sample = resample_jumps + 1)."""
    jumps = {lvl: resample_jumps for lvl in range(jump_length, n - jump_length + 1, jump_length)} \
        if resample_jumps > 0 else {}
    plan, lvl = [], n
    while lvl > 0:
        plan.append(("down", lvl - 1))
        lvl -= 1
        if jumps.get(lvl, 0) > 0:
            jumps[lvl] -= 1
            for _ in range(jump_length):
                plan.append(("up", lvl))
                lvl += 1
    return plan


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def edit_sample(model, class_labels, init: np.ndarray, strength: float = 0.6, steps=None, sampler: str = "ddpm",
                cfg_scale: float = 4.0, seed: int = 0, eta: float = 0.0,
                callback: Callable[[int, int, np.ndarray], None] | None = None, seeds=None,
                guidance_interval=None, mask: np.ndarray | None = None, resample_jumps: int = 0,
                jump_length: int = 1) -> np.ndarray:
    """Edit latents (or pixels of a pixel-space model) ``init`` float32 (B, C, H, W), already in the
    sampler's space (SD-VAE latents times scaling_factor), toward the classes; returns (B, C, H, W).

    Arguments as :func:`terdit_edge.sample`, plus ``strength`` (0..1, see the module docstring),
    ``mask`` float (B, 1 or C, H, W) in [0, 1] at the sampler's resolution, 1 = regenerate
    (None: image-to-image), ``resample_jumps`` / ``jump_length`` (RePaint, needs a mask).
    ``callback(i, total, x)`` runs after each denoising step (total counts the RePaint repeats).
    """
    cls = sampler_class(sampler)
    for name, value in (("cfg_scale", cfg_scale), ("eta", eta)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value) or value < 0:
            raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    interval = check_guidance_interval(guidance_interval)
    labels = model.map_labels(class_labels)
    seed_list = image_seeds(len(labels), seed, seeds)
    sched = Schedule.create(cls.default_steps if steps is None else steps)
    total = len(sched)
    n = edit_start_steps(strength, total)
    resample_jumps = _check_int(resample_jumps, "resample_jumps", 0)
    jump_length = _check_int(jump_length, "jump_length", 1)
    cfg = model.config
    image_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    shape = (len(labels), *image_shape)
    x0 = np.asarray(init)
    if x0.shape != shape:
        raise InputError(f"the input must have shape {shape} (one per class), found {x0.shape}")
    if not np.issubdtype(x0.dtype, np.floating) or not np.isfinite(x0).all():
        raise InputError("the input must be finite floating point")
    x0 = np.ascontiguousarray(x0, dtype=np.float32)
    m = None
    if mask is not None:
        m = np.asarray(mask)
        if m.ndim != 4 or m.shape[0] != shape[0] or m.shape[1] not in (1, shape[1]) or m.shape[2:] != shape[2:]:
            raise InputError(f"the mask must have shape ({shape[0]}, 1, {shape[2]}, {shape[3]}), found {m.shape}")
        if not np.issubdtype(m.dtype, np.floating) or not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
            raise InputError("the mask must be floating point in [0, 1] (1 = regenerate)")
        m = np.ascontiguousarray(m, dtype=np.float32)
    elif resample_jumps:
        raise InputError("resample_jumps (RePaint) needs a mask: it resamples the seams of an inpainting")
    if n == 0:
        return x0.copy()

    rngs = [np.random.default_rng(s) for s in seed_list]  # one stream per image (the contract)

    def draw() -> np.ndarray:
        x = np.empty(shape, dtype=np.float32)
        for k, rng in enumerate(rngs):
            x[k] = rng.standard_normal(image_shape, dtype=np.float32)
        return x

    abar = sched.alphas_cumprod

    def level_abar(lvl: int) -> float:
        return 1.0 if lvl == 0 else float(abar[lvl - 1])

    def noised(lvl: int, noise: np.ndarray) -> np.ndarray:
        a = level_abar(lvl)
        return np.float32(math.sqrt(a)) * x0 + np.float32(math.sqrt(1.0 - a)) * noise

    noise0 = draw()
    x = noise0 if n == total else noised(n, noise0)
    if m is not None:
        x = m * x + (np.float32(1) - m) * noised(n, noise0)
    plan = repaint_plan(n, resample_jumps if m is not None else 0, jump_length)
    n_down = sum(1 for op, _ in plan if op == "down")
    solver = cls(sched, eta=float(eta))
    done = 0
    for op, j in plan:
        if op == "up":  # forward diffusion from level j to j + 1, then a fresh solver (no stale history)
            ratio = level_abar(j + 1) / level_abar(j)
            x = np.float32(math.sqrt(ratio)) * x + np.float32(math.sqrt(1.0 - ratio)) * draw()
            solver = cls(sched, eta=float(eta))
            continue
        t = int(sched.timesteps[j])
        guided = interval is None or interval[0] <= t <= interval[1]
        out = guided_model_output(model, x, t, labels, cfg_scale if guided else 1.0)
        noise = draw()  # drawn every step (the contract)
        x = solver.step(j, x, out, noise)
        if m is not None:
            x = (m * x + (np.float32(1) - m) * noised(j, draw())).astype(np.float32, copy=False)
        if callback is not None:
            callback(done, n_down, x)
        done += 1
    return x


# --------------------------------------------------------------------------------------------
# input images and masks
# --------------------------------------------------------------------------------------------

def _open_image(image, what: str):
    """A PIL image from a PIL image, a path, bytes or a uint8 array; InputError for anything else."""
    from PIL import Image

    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise InputError(f"{what} as an array must be uint8 (H, W) or (H, W, 1|3|4), found {arr.dtype} "
                             f"{arr.shape}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        img = Image.fromarray(np.ascontiguousarray(arr))
    elif isinstance(image, (bytes, bytearray, memoryview, str, os.PathLike)):
        if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
            raise InputError(f"{what} {os.fspath(image)!r}: no such file")
        src = io.BytesIO(bytes(image)) if isinstance(image, (bytes, bytearray, memoryview)) else image
        try:
            img = Image.open(src)
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise InputError(f"{what} is {img.width} x {img.height} pixels, more than the "
                                 f"{MAX_IMAGE_PIXELS // (1024 * 1024)} MP accepted")
            img.load()
        except InputError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise InputError(f"{what} is not a readable image ({type(e).__name__}: {e})") from None
    else:
        raise InputError(f"{what} must be a PIL image, a file path, encoded image bytes or a uint8 array, "
                         f"got {type(image).__name__}")
    if img.width < 1 or img.height < 1:
        raise InputError(f"{what} is empty ({img.width} x {img.height})")
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise InputError(f"{what} is {img.width} x {img.height} pixels, more than the "
                         f"{MAX_IMAGE_PIXELS // (1024 * 1024)} MP accepted")
    if img.mode not in IMAGE_MODES:
        raise InputError(f"{what} has mode {img.mode!r}, which is not supported; give one of {IMAGE_MODES} "
                         "(8-bit gray, palette or RGB, with or without alpha)")
    return img


def _fit(img, size: int, fit: str, resample):
    """Resize a PIL image to size x size: "crop" scales the shorter side to size and cuts the
    centre, "stretch" scales each side. An image already size x size is left as it is."""
    if fit not in FIT_MODES:
        raise InputError(f"fit must be one of {FIT_MODES}, got {fit!r}")
    w, h = img.size
    if (w, h) == (size, size):
        return img
    if fit == "stretch":
        return img.resize((size, size), resample)
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image(image, size: int, channels: int, fit: str = "crop") -> np.ndarray:
    """An input picture -> float32 (channels, size, size) in [-1, 1] (v / 255 * 2 - 1 of 8-bit
    values). ``image``: PIL image, path, encoded bytes or uint8 array, of a mode of IMAGE_MODES;
    alpha is dropped; channels 3 -> RGB, 1 -> gray (L). Resized with bicubic resampling by ``fit``
    ("crop": shorter side to size, centre cut; "stretch")."""
    from PIL import Image

    img = _open_image(image, "the image")
    if channels not in (1, 3):
        raise InputError(f"models with {channels} image channels cannot take pictures")
    img = img.convert("RGB" if channels == 3 else "L")
    img = _fit(img, size, fit, Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32).reshape(size, size, channels)
    return np.ascontiguousarray((arr / np.float32(127.5) - np.float32(1)).transpose(2, 0, 1))


def load_mask(mask, image_size: tuple[int, int], size: int, fit: str = "crop") -> np.ndarray:
    """A mask picture (white = regenerate, black = keep, grays blend) of the same size as the
    input image -> float32 (size, size) in [0, 1], fitted like the image (bilinear)."""
    from PIL import Image

    img = _open_image(mask, "the mask")
    if img.size != tuple(image_size):
        raise InputError(f"the mask is {img.width} x {img.height} but the image is {image_size[0]} x "
                         f"{image_size[1]}; give a mask of the image's size")
    img = _fit(img.convert("L"), size, fit, Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / np.float32(255)


def image_size_of(image) -> tuple[int, int]:
    """(width, height) of an input picture (as load_image would read it)."""
    return _open_image(image, "the image").size


def latent_mask(mask: np.ndarray, factor: int, blur: float = 1.0) -> np.ndarray:
    """A pixel mask float32 (H, W) in [0, 1] -> the sampler's mask (H/factor, W/factor): the mean
    over each factor x factor block (a block partly to regenerate gets a soft value), then a soft
    edge: the maximum of that and its Gaussian blur of standard deviation ``blur`` (sampler
    pixels; 0: none), so the regenerated region keeps its full weight and a ramp reaches into the
    known one."""
    if isinstance(blur, bool) or not isinstance(blur, (int, float)) or not math.isfinite(blur) or blur < 0:
        raise InputError(f"mask_blur must be a finite number >= 0, got {blur!r}")
    h, w = mask.shape
    m = mask.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3)).astype(np.float32)
    if blur > 0:
        r = max(1, int(math.ceil(2 * blur)))
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / blur) ** 2)
        k = (k / k.sum()).astype(np.float32)
        p = np.pad(m, r, mode="edge")
        rows = sum(k[i] * p[i:i + m.shape[0], :] for i in range(2 * r + 1))
        b = sum(k[i] * rows[:, i:i + m.shape[1]] for i in range(2 * r + 1))
        m = np.maximum(m, b.astype(np.float32))
    return np.clip(m, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# the pipeline's edit and inpaint (Pipeline.edit / Pipeline.inpaint are thin wrappers)
# --------------------------------------------------------------------------------------------

def _per_image(value, n: int, what: str) -> list:
    """One input for every image: a list/tuple of n (or 1) inputs, or one input for all."""
    if isinstance(value, (list, tuple)):
        if len(value) not in (1, n):
            raise InputError(f"give one {what} for all images or one per class: {len(value)} for {n} classes")
        return list(value) * (n if len(value) == 1 else 1)
    return [value] * n


def run_edit(pipe, image, class_labels, mask=None, strength: float = 0.6, steps=None, sampler: str = "ddpm",
             cfg_scale: float = 4.0, seed: int = 0, eta: float = 0.0, progress: bool = False, output: str = "pil",
             fit: str = "crop", vae_tile: int | None = None, callback=None, seeds=None,
             batch_size: int | None = None, guidance_interval=None, resample_jumps: int = 0,
             jump_length: int = 1, mask_blur: float = 1.0):
    """The work of :meth:`Pipeline.edit` and :meth:`Pipeline.inpaint` (see there)."""
    from .batching import default_batch_size
    from .format import VAE_PREFIX
    from .images import to_pil

    if output not in ("pil", "np"):
        raise InputError(f"output must be 'pil' or 'np', got {output!r}")
    if fit not in FIT_MODES:
        raise InputError(f"fit must be one of {FIT_MODES}, got {fit!r}")
    cfg = pipe.config
    ids = pipe.resolve_classes(class_labels)
    seed_list = image_seeds(len(ids), seed, seeds)
    if cfg.latent:
        vae = pipe.vae
        if vae is None:
            raise InputError("this model samples SD-VAE latents but the file holds no VAE: convert with "
                             "`--vae VAE_SRC --vae-encoder` or pass vae=PATH")
        if not vae.has_encoder:
            raise InputError("editing a latent model needs the VAE's encoder, which this file lacks: convert "
                             "again with --vae-encoder (or `terdit-edge pull NAME --force`)")
        factor, channels = vae.cfg.upsample_factor, vae.cfg.out_channels
    else:
        vae, factor, channels = None, 1, cfg.in_channels
    size = cfg.input_size * factor
    images = _per_image(image, len(ids), "image")
    masks = _per_image(mask, len(ids), "mask") if mask is not None else None
    if batch_size is None:
        batch_size = default_batch_size(cfg, len(ids), guided=cfg_scale > 1)
    elif isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")

    # inputs in the sampler's space, one image at a time (each encoded alone: batch invariance);
    # the same object given for several classes is read and encoded once
    x0 = np.empty((len(ids), cfg.in_channels, cfg.input_size, cfg.input_size), np.float32)
    m = None if masks is None else np.empty((len(ids), 1, cfg.input_size, cfg.input_size), np.float32)
    done_x: dict = {}
    done_m: dict = {}
    for k in range(len(ids)):
        key = id(images[k])
        if key not in done_x:
            pixels = load_image(images[k], size, channels, fit)
            if vae is not None:
                mean = vae.encode(pixels[None], tile=vae_tile)[0]
                lat = (mean - np.float32(vae.cfg.shift_factor)) * np.float32(vae.cfg.scaling_factor)
            else:
                lat = pixels
            done_x[key] = lat.astype(np.float32)
        x0[k] = done_x[key]
        if masks is not None:
            mkey = (id(masks[k]), key)
            if mkey not in done_m:
                pix = load_mask(masks[k], image_size_of(images[k]), size, fit)
                done_m[mkey] = latent_mask(pix, factor, mask_blur)
            m[k, 0] = done_m[mkey]
    if vae is not None:
        pipe._release(VAE_PREFIX, getattr(vae, "source", None))

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=None, unit="step", desc="editing", leave=True, dynamic_ncols=True)
    starts = range(0, len(ids), int(batch_size))
    finished = 0

    def on_step(i, total, x):
        if bar is not None:
            bar.total = total * len(starts)
            bar.update(1)
        if callback is not None:
            callback(finished * total + i, total * len(starts), x)

    parts = []
    try:
        for b0 in starts:
            b1 = b0 + int(batch_size)
            parts.append(edit_sample(pipe.model, ids[b0:b1], x0[b0:b1], strength=strength, steps=steps,
                                     sampler=sampler, cfg_scale=cfg_scale, eta=eta, seeds=seed_list[b0:b1],
                                     callback=on_step, guidance_interval=guidance_interval,
                                     mask=None if m is None else m[b0:b1], resample_jumps=resample_jumps,
                                     jump_length=jump_length))
            finished += 1
    finally:
        if bar is not None:
            bar.close()
    lat = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    out = np.concatenate([pipe.decode(lat[k:k + 1], vae_tile=vae_tile) for k in range(lat.shape[0])])
    if output == "np":
        return out
    return [to_pil(img) for img in out]
