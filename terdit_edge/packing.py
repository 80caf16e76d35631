"""The 2-bit packed ternary layout of .tdit files ("tdit2-k128").

A ternary matrix Q (N x K, values -1, 0, +1; y = x Q^T) is stored as uint8 with shape
(N, K_pad / 4), K_pad = K rounded up to a multiple of 128. Each weight is the 2-bit code
f = Q + 1 (0 -> -1, 1 -> 0, 2 -> +1; 3 is invalid). Row n is cut into blocks of 128 weights; block b
occupies bytes [32 b, 32 b + 32) of the row, and byte j of the block holds four weights 32 apart:

    bits 1-0: k = 128 b + j        bits 3-2: k = 128 b + 32 + j
    bits 5-4: k = 128 b + 64 + j   bits 7-6: k = 128 b + 96 + j

so one 32-byte load, four shifts and a mask give four vectors of 32 consecutive weights (one AVX2
register each, two NEON registers each). Padding weights (k >= K) hold code 1 (zero).
"""
from __future__ import annotations

import numpy as np

from .errors import FormatError, InputError

BLOCK_K = 128
PACKING_NAME = "tdit2-k128"


def padded_k(k: int) -> int:
    """K rounded up to the packing block (128)."""
    return -(-k // BLOCK_K) * BLOCK_K


def pack_ternary_2bit(q: np.ndarray) -> np.ndarray:
    """Pack a ternary int matrix (N, K) with values in {-1, 0, 1} into uint8 (N, padded_k(K) / 4)."""
    q = np.asarray(q)
    if q.ndim != 2:
        raise InputError(f"ternary matrix must be 2-D (N, K), got shape {q.shape}")
    if q.size and (q.min() < -1 or q.max() > 1):
        raise InputError("ternary matrix holds values outside {-1, 0, 1}")
    n, k = q.shape
    kp = padded_k(k)
    codes = np.ones((n, kp), dtype=np.uint8)
    codes[:, :k] = (q + 1).astype(np.uint8)
    blocks = codes.reshape(n, kp // BLOCK_K, 4, 32)  # [n, block, quarter, j]
    packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 2) | (blocks[:, :, 2] << 4) | (blocks[:, :, 3] << 6))
    return np.ascontiguousarray(packed.reshape(n, kp // 4))


def unpack_ternary_2bit(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_ternary_2bit`: uint8 (N, K_pad / 4) -> int8 (N, K)."""
    packed = np.asarray(packed, dtype=np.uint8)
    n, kb = packed.shape
    kp = kb * 4
    if kp % BLOCK_K or k > kp:
        raise FormatError(f"packed ternary matrix of {kb} bytes per row cannot hold K = {k}")
    blocks = packed.reshape(n, kp // BLOCK_K, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    codes = (blocks >> shifts) & 3
    q = codes.reshape(n, kp).astype(np.int8) - 1
    return np.ascontiguousarray(q[:, :k])


def check_ternary_codes(packed: np.ndarray, k: int, name: str, chunk_rows: int | None = None) -> None:
    """Raise FormatError if any 2-bit code is 3 or any padding weight (k >= K) is not zero.

    Works in row chunks so that checking a large model allocates only a few MB.
    """
    n, kb = packed.shape
    if chunk_rows is None:
        chunk_rows = max(1, (4 << 20) // max(kb, 1))
    for start in range(0, n, chunk_rows):
        part = packed[start:start + chunk_rows]
        bad = np.bitwise_and(part, np.right_shift(part, 1))
        np.bitwise_and(bad, 0x55, out=bad)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise FormatError(f"tensor {name!r} holds an invalid ternary code 3 (row {start + r}, byte {c}); "
                              "the file is corrupted")
    kp = kb * 4
    if k < kp:
        tail = unpack_ternary_2bit(packed[:, kb - BLOCK_K // 4:], BLOCK_K)[:, k - (kp - BLOCK_K):]
        if tail.any():
            raise FormatError(f"tensor {name!r} has non-zero padding weights beyond K = {k}; the file is corrupted")
