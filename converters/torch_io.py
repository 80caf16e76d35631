"""Loading torch checkpoint files safely (weights_only=True with an explicit allow-list)."""
from __future__ import annotations

import argparse
import os

from terdit_edge.errors import ConvertError

# Classes a TerDiT checkpoint may legitimately pickle besides tensors and containers.
SAFE_GLOBALS = [argparse.Namespace]


def _torch():
    try:
        import torch
    except ImportError:
        raise ConvertError("converting PyTorch checkpoints needs torch: pip install 'terdit-edge[convert]'") from None
    return torch


def load_torch_file(path: str):
    """torch.load with weights_only=True and only SAFE_GLOBALS allowed; .safetensors files too."""
    torch = _torch()
    if not os.path.isfile(path):
        raise ConvertError(f"checkpoint file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an UnpicklingError for disallowed globals, zip errors for corrupt files...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConvertError(f"{path}: cannot be loaded safely as a torch checkpoint ({msg}). Only tensors, "
                           "plain containers and argparse.Namespace are accepted.") from None
