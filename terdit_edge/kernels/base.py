"""Types shared by every backend."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..packing import padded_k

ACTIVATION_MODES = ("fp32", "int8", "int10")


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
