"""The text metadata a generated PNG carries, shared by the CLI and the server.

Keys, in this order: model, class, seed, index, steps, sampler, cfg, eta, activations, version (and
guidance_interval when guidance was limited to an interval of timesteps). An
image file holds its own class, seed and index; a grid of several images holds every image's value
in grid order under the plural keys ``class``, ``seeds`` and ``indices``. With the model file,
these values reproduce the image.
"""
from __future__ import annotations

import io

from . import __version__

PER_IMAGE_KEYS = ("class", "seed", "index")
_GRID_KEYS = {"class": "class", "seed": "seeds", "index": "indices"}


def generation_metadata(model: str, classes, seeds, steps, sampler: str, cfg, eta, activations: str,
                        indices=None, guidance_interval=None) -> dict:
    """The metadata of a generation: per-image lists for class/seed/index, one value for the rest;
    ``guidance_interval`` (LO, HI) adds the key ``guidance_interval`` = "LO,HI" when guidance was limited."""
    classes, seeds = list(classes), list(seeds)
    meta = {"model": model, "class": classes, "seed": seeds,
            "index": list(range(len(classes))) if indices is None else list(indices),
            "steps": steps, "sampler": sampler, "cfg": cfg, "eta": eta, "activations": activations,
            "version": f"terdit-edge {__version__}"}
    if guidance_interval is not None:
        meta["guidance_interval"] = "{},{}".format(*guidance_interval)
    return meta


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
