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

import dataclasses
import io
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .diffusion import (
    Schedule,
    check_guidance_args,
    guided_model_output,
    image_seeds,
    sampler_class,
)
from .errors import InputError

__all__ = ["edit_sample", "edit_start_steps", "repaint_plan", "load_image", "load_mask", "latent_mask",
           "EditSettings", "FIT_MODES", "IMAGE_MODES", "MAX_IMAGE_PIXELS"]

FIT_MODES = ("crop", "stretch")
# PIL modes an input image may have (converted to RGB or L for the model); others are refused
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX")
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # refuse bigger inputs (decompression bombs, accidental photos of 100 MP)


# --------------------------------------------------------------------------------------------
# the edit settings: one definition for the library, the command line and the server
# --------------------------------------------------------------------------------------------

DEFAULT_STRENGTH = 0.6  # image-to-image; inpainting regenerates the masked region from noise (1.0)
DEFAULT_INPAINT_STRENGTH = 1.0
MAX_MASK_BLUR = 64.0  # sampler pixels: a wider edge is a blur of the whole mask (and costs O(blur) per pixel)
MAX_RESAMPLE_JUMPS = 100
MAX_JUMP_LENGTH = 1000


def _check_strength(v):
    if v is None:
        return None
    edit_start_steps(v, 1)  # the library's own check and message
    return float(v)


def _check_blur(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v) \
            or not 0 <= v <= MAX_MASK_BLUR:
        raise InputError(f"mask_blur must be a number in 0..{MAX_MASK_BLUR:g} (sampler pixels), got {v!r}"[:300])
    return float(v)


def _check_count(name: str, lo: int, hi: int):
    def check(v) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
            raise InputError(f"{name} must be an integer in {lo}..{hi}, got {v!r}"[:300])
        return int(v)
    return check


def _check_fit(v) -> str:
    if v not in FIT_MODES:
        raise InputError(f"fit must be one of {', '.join(FIT_MODES)}, got {v!r}"[:300])
    return v


def _float_text(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"expected a number, got {text!r}") from None


def _int_text(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"expected an integer, got {text!r}") from None


# name -> (check, command-line flag, text parser, metavar, help, applies only with a mask)
_EDIT_SETTINGS = {
    "strength": (_check_strength, "--strength", _float_text, "S",
                 f"0..1: how far the input is noised before sampling toward the class (0 keeps the input, 1 is plain "
                 f"generation; default {DEFAULT_STRENGTH}, with a mask {DEFAULT_INPAINT_STRENGTH:g})", False),
    "mask_blur": (_check_blur, "--mask-blur", _float_text, "PX",
                  f"soft mask edge, in latent pixels (pixels for pixel-space models; 0..{MAX_MASK_BLUR:g}, default 1)",
                  True),
    "resample_jumps": (_check_count("resample_jumps", 0, MAX_RESAMPLE_JUMPS), "--resample-jumps", _int_text, "N",
                       "RePaint resampling with a mask: go back up jump_length steps this many times (default 0)",
                       True),
    "jump_length": (_check_count("jump_length", 1, MAX_JUMP_LENGTH), "--jump-length", _int_text, "N",
                    "RePaint jump length in steps (default 1)", True),
    "fit": (_check_fit, "--fit", str, "crop|stretch",
            "bring the input to the model's size: crop (shorter side, centre cut; default) or stretch", False),
}


@dataclass(frozen=True)
class EditSettings:
    """What an edit adds to :class:`~terdit_edge.settings.GenerationSettings`: ``strength`` (None:
    0.6 for image-to-image, 1 with a mask), ``mask_blur``, ``resample_jumps`` and ``jump_length``
    (inpainting only) and ``fit``. Construction checks every value (InputError naming it); the
    command line (:meth:`add_arguments` / :meth:`from_args`) and the server (:meth:`from_json`)
    read them with the same checks, and :meth:`for_mask` resolves them for an edit with or
    without a mask."""

    strength: float | None = None
    mask_blur: float = 1.0
    resample_jumps: int = 0
    jump_length: int = 1
    fit: str = "crop"

    def __post_init__(self):
        for name, (check, *_rest) in _EDIT_SETTINGS.items():
            object.__setattr__(self, name, check(getattr(self, name)))

    @staticmethod
    def json_fields() -> tuple[str, ...]:
        return tuple(_EDIT_SETTINGS)

    def for_mask(self, has_mask: bool) -> "EditSettings":
        """These settings for an edit with (inpainting) or without a mask: strength resolved to its
        default when None; InputError when a mask-only setting is given without a mask."""
        if not has_mask and self.resample_jumps:
            raise InputError("resample_jumps (RePaint) needs a mask: it resamples the seams of an inpainting")
        if self.strength is not None:
            return self
        return dataclasses.replace(self, strength=DEFAULT_INPAINT_STRENGTH if has_mask else DEFAULT_STRENGTH)

    def edit_kwargs(self, has_mask: bool) -> dict:
        """Keyword arguments of :meth:`Pipeline.edit` (no mask) or :meth:`Pipeline.inpaint` (with one)."""
        s = self.for_mask(has_mask)
        kw = {"strength": s.strength, "fit": s.fit}
        if has_mask:
            kw.update(mask_blur=s.mask_blur, resample_jumps=s.resample_jumps, jump_length=s.jump_length)
        return kw

    def model_steps(self, n_steps: int, has_mask: bool) -> int:
        """Denoising steps (model evaluations, guidance aside) of an edit over a schedule of n_steps."""
        s = self.for_mask(has_mask)
        n = edit_start_steps(s.strength, n_steps)
        if not has_mask:
            return n
        return sum(1 for op, _ in repaint_plan(n, s.resample_jumps, s.jump_length) if op == "down")

    def png_items(self, has_mask: bool) -> list[tuple[str, str]]:
        """PNG text items of an edited image (after the generation's)."""
        s = self.for_mask(has_mask)
        items = [("edit", "inpainting" if has_mask else "image-to-image"), ("strength", f"{s.strength:g}")]
        if s.fit != "crop":
            items.append(("fit", s.fit))
        if has_mask:
            items += [("resample_jumps", str(s.resample_jumps)), ("jump_length", str(s.jump_length)),
                      ("mask_blur", f"{s.mask_blur:g}")]
        return items

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in _EDIT_SETTINGS}

    @classmethod
    def from_json(cls, obj: dict) -> "EditSettings":
        """Edit settings from a JSON object's keys that name them (others are ignored)."""
        if not isinstance(obj, dict):
            raise InputError("edit settings must be a JSON object")
        return cls(**{k: obj[k] for k in _EDIT_SETTINGS if k in obj and obj[k] is not None})

    @staticmethod
    def add_arguments(parser) -> None:
        """One command-line option per edit setting (default None: the setting's default)."""
        from .argtypes import checked

        for name, (check, flag, parse_text, metavar, text, _mask_only) in _EDIT_SETTINGS.items():
            parser.add_argument(flag, dest=name, type=checked(parse_text, check, name), default=None,
                                metavar=metavar, help=text)

    @classmethod
    def from_args(cls, args) -> "EditSettings":
        return cls(**{k: getattr(args, k) for k in _EDIT_SETTINGS if getattr(args, k, None) is not None})


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
    interval = check_guidance_args(cfg_scale, eta, guidance_interval)
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

def _open_image(image, what: str, max_pixels: int | None = None):
    """A PIL image from a PIL image, a path, bytes or a uint8 array; InputError for anything else
    (and for more than ``max_pixels`` pixels, default MAX_IMAGE_PIXELS)."""
    from PIL import Image

    limit = MAX_IMAGE_PIXELS if max_pixels is None else min(max_pixels, MAX_IMAGE_PIXELS)

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
            if img.width * img.height > limit:
                raise InputError(f"{what} is {img.width} x {img.height} pixels, more than the "
                                 f"{_pixels_text(limit)} accepted")
            img.load()
        except InputError:
            raise
        except Image.UnidentifiedImageError:
            raise InputError(f"{what} is not a readable image: not a picture format Pillow knows (PNG, JPEG, WebP, "
                             "BMP, GIF, TIFF...)") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise InputError(f"{what} is not a readable image ({type(e).__name__}: {e})") from None
    else:
        raise InputError(f"{what} must be a PIL image, a file path, encoded image bytes or a uint8 array, "
                         f"got {type(image).__name__}")
    if img.width < 1 or img.height < 1:
        raise InputError(f"{what} is empty ({img.width} x {img.height})")
    if img.width * img.height > limit:
        raise InputError(f"{what} is {img.width} x {img.height} pixels, more than the "
                         f"{_pixels_text(limit)} accepted")
    if img.mode not in IMAGE_MODES:
        raise InputError(f"{what} has mode {img.mode!r}, which is not supported; give one of {IMAGE_MODES} "
                         "(8-bit gray, palette or RGB, with or without alpha)")
    return img


def _pixels_text(n: int) -> str:
    return f"{n // (1024 * 1024)} MP" if n >= 1024 * 1024 and n % (1024 * 1024) == 0 else f"{n} pixels"


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


def fitted_image(image, size: int, channels: int, fit: str = "crop", max_pixels: int | None = None):
    """An input picture as the PIL image :func:`load_image` reads its values from: converted to RGB
    (channels 3) or L (channels 1) and fitted to size x size (bicubic). Saved losslessly (PNG) and
    given back, it gives the same values as the original (the server keeps that instead of the upload)."""
    from PIL import Image

    img = _open_image(image, "the image", max_pixels)
    if channels not in (1, 3):
        raise InputError(f"models with {channels} image channels cannot take pictures")
    return _fit(img.convert("RGB" if channels == 3 else "L"), size, fit, Image.BICUBIC)


def load_image(image, size: int, channels: int, fit: str = "crop") -> np.ndarray:
    """An input picture -> float32 (channels, size, size) in [-1, 1] (v / 255 * 2 - 1 of 8-bit
    values). ``image``: PIL image, path, encoded bytes or uint8 array, of a mode of IMAGE_MODES;
    alpha is dropped; channels 3 -> RGB, 1 -> gray (L). Resized with bicubic resampling by ``fit``
    ("crop": shorter side to size, centre cut; "stretch")."""
    img = fitted_image(image, size, channels, fit)
    arr = np.asarray(img, dtype=np.float32).reshape(size, size, channels)
    return np.ascontiguousarray((arr / np.float32(127.5) - np.float32(1)).transpose(2, 0, 1))


def fitted_mask(mask, image_size: tuple[int, int], size: int, fit: str = "crop", max_pixels: int | None = None):
    """A mask picture as the PIL image (mode L, size x size) :func:`load_mask` reads its values
    from (see :func:`fitted_image`). InputError unless it has the input image's size."""
    from PIL import Image

    img = _open_image(mask, "the mask", max_pixels)
    if img.size != tuple(image_size):
        raise InputError(f"the mask is {img.width} x {img.height} but the image is {image_size[0]} x "
                         f"{image_size[1]}; give a mask of the image's size")
    return _fit(img.convert("L"), size, fit, Image.BILINEAR)


def alpha_mask(img):
    """OpenAI's mask convention -> this one: a mask picture with an alpha channel marks the region to
    regenerate by full transparency; it becomes a gray mask (mode L) of 255 - alpha, white =
    regenerate. A mask without alpha is returned as it is (white = regenerate)."""
    from PIL import ImageOps

    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("P", "L", "RGB", "1") and "transparency" in img.info):
        return ImageOps.invert(img.convert("RGBA").getchannel("A"))
    return img


def fitted_inputs(image, mask, size: int, channels: int, fit: str = "crop", max_pixels: int | None = None,
                  mask_alpha: bool = False):
    """(picture, mask or None) as the PIL images :func:`load_image` / :func:`load_mask` read their
    values from, checked as those check them (InputError); each picture is decoded once.
    ``mask_alpha``: read the mask by :func:`alpha_mask` (OpenAI's convention)."""
    img = _open_image(image, "the image", max_pixels)
    m = None
    if mask is not None:
        m = _open_image(mask, "the mask", max_pixels)
        if mask_alpha:
            m = alpha_mask(m)
        m = fitted_mask(m, img.size, size, fit)
    return fitted_image(img, size, channels, fit), m


def load_mask(mask, image_size: tuple[int, int], size: int, fit: str = "crop") -> np.ndarray:
    """A mask picture (white = regenerate, black = keep, grays blend) of the same size as the
    input image -> float32 (size, size) in [0, 1], fitted like the image (bilinear)."""
    img = fitted_mask(mask, image_size, size, fit)
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


def edit_geometry(pipe) -> tuple:
    """(vae or None, pixels per sampler pixel, picture channels, picture side) of a pipeline's edits;
    InputError when it cannot edit (a latent model without a VAE encoder)."""
    cfg = pipe.config
    if not cfg.latent:
        return None, 1, cfg.in_channels, cfg.input_size
    vae = pipe.vae
    if vae is None:
        raise InputError("this model samples SD-VAE latents but the file holds no VAE: convert with "
                         "`--vae VAE_SRC --vae-encoder` or pass vae=PATH")
    if not vae.has_encoder:
        raise InputError("editing a latent model needs the VAE's encoder, which this file lacks: convert "
                         "again with --vae-encoder (or `terdit-edge pull NAME --force`)")
    factor = vae.cfg.upsample_factor
    return vae, factor, vae.cfg.out_channels, cfg.input_size * factor


def run_edit(pipe, image, class_labels, mask=None, strength: float = 0.6, steps=None, sampler: str = "ddpm",
             cfg_scale: float = 4.0, seed: int = 0, eta: float = 0.0, progress: bool = False, output: str = "pil",
             fit: str = "crop", vae_tile: int | None = None, callback=None, seeds=None,
             batch_size: int | None = None, guidance_interval=None, resample_jumps: int = 0,
             jump_length: int = 1, mask_blur: float = 1.0, schedule=None, cache=None, guidance_reuse=None):
    """The work of :meth:`Pipeline.edit` and :meth:`Pipeline.inpaint` (see there). ``schedule``: a
    searched schedule's name (its timesteps are the steps); the step cache and guidance reuse are
    not supported by edits (InputError when given)."""
    from .batching import default_batch_size
    from .diffusion import schedule_timesteps
    from .format import VAE_PREFIX
    from .images import to_pil
    from .stepcache import parse_spec

    if parse_spec(cache, "cache") is not None or parse_spec(guidance_reuse, "guidance_reuse", ("fixed",)) is not None:
        raise InputError("edit and inpainting do not support the step cache or guidance reuse (cache, guidance_reuse, "
                         "or a speed preset that sets them); use speed 'exact' or 'balanced', or a schedule")
    if schedule is not None:
        ts = schedule_timesteps(schedule)
        if steps is not None and steps != len(ts):
            raise InputError(f"schedule {schedule!r} has {len(ts)} steps; give no steps with it (got {steps!r})")
        steps = ts

    if output not in ("pil", "np"):
        raise InputError(f"output must be 'pil' or 'np', got {output!r}")
    if fit not in FIT_MODES:
        raise InputError(f"fit must be one of {FIT_MODES}, got {fit!r}")
    cfg = pipe.config
    ids = pipe.resolve_classes(class_labels)
    seed_list = image_seeds(len(ids), seed, seeds)
    vae, factor, channels, size = edit_geometry(pipe)
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
