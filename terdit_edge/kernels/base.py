"""Types shared by every backend."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..packing import padded_k

ACTIVATION_MODES = ("fp32", "int8", "int10")
# attention products: "fp32" (float32 throughout) or "int8" (int8 Q K^T after centring K over the tokens,
# integer P V; the C kernels only: td_attention_int8, docs/kernels.md)
ATTENTION_MODES = ("fp32", "int8")


def activation_bits(activations: str) -> int:
    """Bits of the per-token integer activations of a mode: 0 for "fp32", 8 for "int8", 10 for "int10"."""
    return 0 if activations == "fp32" else int(activations[3:])


@dataclass
class TernaryWeight:
    """One ternary linear layer: y = alpha * x Q^T + bias.

    packed: uint8 (N, padded_k(K) / 4) in the tdit2-k128 layout (see :mod:`terdit_edge.packing`);
    alpha: the layer's learned scale (float32 value); bias: float32 (N,) or None.
    """

    packed: np.ndarray
    n: int
    k: int
    alpha: float
    bias: np.ndarray | None = None
    name: str = ""

    def __post_init__(self):
        assert self.packed.dtype == np.uint8 and self.packed.shape == (self.n, padded_k(self.k) // 4), \
            (self.name, self.packed.shape, self.n, self.k)
        self.alpha = float(np.float32(self.alpha))


def check_matmul_args(x, w: TernaryWeight, out=None) -> np.ndarray:
    """The checks every backend's ternary_matmul makes (one message per rule, for every backend):
    x real (M, K) with K = w.k, out None or a writable float32 (M, N) array. Returns x as a C-contiguous
    float32 array (no copy when it is one already)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"ternary_matmul expects x of shape (M, K), got {x.shape}")
    if x.shape[1] != w.k:
        raise InputError(f"ternary layer {w.name or '(unnamed)'} expects K = {w.k} input features, "
                         f"got x with shape {x.shape}")
    if x.dtype.kind not in "fiub":
        raise InputError(f"x must hold real numbers, got dtype {x.dtype}")
    if out is not None:
        if not isinstance(out, np.ndarray) or out.dtype != np.float32 or not out.flags.writeable:
            raise InputError("out must be a writable float32 array")
        if out.shape != (x.shape[0], w.n):
            raise InputError(f"out has shape {out.shape}, expected {(x.shape[0], w.n)}")
    return np.ascontiguousarray(x, dtype=np.float32)
