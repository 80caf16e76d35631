"""Float pictures to 8-bit ones: the one conversion every output path (pipeline, CLI, server, jobs) uses."""
from __future__ import annotations

import numpy as np

from .errors import InputError


def to_uint8(images01: np.ndarray) -> np.ndarray:
    """float images in [0, 1] (any shape) -> uint8: clip, x * 255 + 0.5, truncated (the authors'
    conversion of decoded images, docs/model.md §6). Decoder output in [-1, 1] is (x + 1) / 2 first."""
    return (np.clip(images01, 0, 1) * 255 + 0.5).astype(np.uint8)


def to_pil(image01: np.ndarray):
    """(H, W, C) float in [0, 1] -> PIL image (L for one channel, RGB for three)."""
    from PIL import Image

    arr = to_uint8(image01)
    if arr.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(arr[:, :, 0]))
    if arr.shape[2] == 3:
        return Image.fromarray(arr)
    raise InputError(f"cannot make a picture of {arr.shape[2]} channels")
