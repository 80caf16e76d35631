"""The text metadata a generated PNG carries: the one writer the CLI, the server and sampling jobs use.

Keys, in this order: model, class, seed, index, then the settings' keys
(:meth:`~terdit_edge.settings.GenerationSettings.png_items`: steps, sampler, cfg, eta,
activations), version, then the optional settings that are set (guidance_interval "LO,HI" when
guidance was limited to an interval of timesteps). An image file holds its own class, seed and
index; a grid of several images holds every image's value in grid order under the plural keys
``class``, ``seeds`` and ``indices``. With the model file, these values reproduce the image.
"""
from __future__ import annotations

import io

from ._version import __version__

PER_IMAGE_KEYS = ("class", "seed", "index")
_GRID_KEYS = {"class": "class", "seed": "seeds", "index": "indices"}


def generation_metadata(model: str, classes, seeds, settings, indices=None) -> dict:
    """The metadata of a generation: per-image lists for class/seed/index, one value for the rest.
    settings: the :class:`~terdit_edge.settings.GenerationSettings` the images were made with."""
    classes, seeds = list(classes), list(seeds)
    head, tail = settings.png_items()
    return {"model": model, "class": classes, "seed": seeds,
            "index": list(range(len(classes))) if indices is None else list(indices),
            **dict(head), "version": f"terdit-edge {__version__}", **dict(tail)}


def png_text(meta: dict, k: int | None = None) -> dict[str, str]:
    """The text chunks of one PNG: image ``k``'s own values, or with ``k=None`` one image's values
    (a single-image generation) or every image's (a grid)."""
    out = {}
    for key, value in meta.items():
        if key in PER_IMAGE_KEYS:
            if k is not None:
                value = value[k]
            elif len(value) == 1:
                value = value[0]
            else:
                key, value = _GRID_KEYS[key], ",".join(str(v) for v in value)
        out[key] = str(value)
    return out


def png_info(meta: dict, k: int | None = None):
    """A PIL ``PngInfo`` holding :func:`png_text`."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in png_text(meta, k).items():
        info.add_text(key, value)
    return info


def png_bytes(image, meta: dict, k: int | None = None) -> bytes:
    """A PIL image encoded as PNG with the metadata of :func:`png_text`."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(meta, k))
    return buf.getvalue()
