"""How many images to sample together when the caller does not say (generation and editing)."""
from __future__ import annotations

import os

MAX_DEFAULT_BATCH = 16


def _available_memory() -> int | None:
    """Bytes of physical memory available now (Linux/macOS sysconf), or None when unknown."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def default_batch_size(config, n_images: int, guided: bool = True) -> int:
    """Images per batch when the caller does not say: as many as fit in a quarter of the memory
    available now, by the activation buffers one image needs (its tokens, twice with guidance, times
    the widest per-token buffers of a block), at most MAX_DEFAULT_BATCH and at most n_images.
    Any batch size gives the same images (batch invariance); this only trades memory for speed."""
    rows = config.n_tokens * (2 if guided else 1)
    per_row = 4 * (6 * config.dim + 2 * config.kv_dim + 2 * config.ffn_dim)  # float32 workspace + temporaries
    per_image = rows * per_row + 4 * rows * config.n_tokens  # + one score row per token in attention
    avail = _available_memory()
    fit = MAX_DEFAULT_BATCH if avail is None else max(1, (avail // 4) // max(per_image, 1))
    return int(max(1, min(n_images, MAX_DEFAULT_BATCH, fit)))
