"""terdit-edge: run ternary diffusion transformers (TerDiT) on CPUs without PyTorch.

    import terdit_edge
    model = terdit_edge.load_model("model.tdit")
    latents = terdit_edge.sample(model, [207, 360], steps=50, sampler="ddim", cfg_scale=4.0, seed=0)
"""
from __future__ import annotations

from ._version import __version__
from .config import ModelConfig
from .diffusion import sample
from .errors import BackendError, ChecksumError, ConvertError, FormatError, InputError, TerditError
from .pipeline import Pipeline, load_vae

__all__ = ["load_model", "sample", "Pipeline", "load_vae", "ModelConfig", "TerditError", "FormatError", "ChecksumError",
           "ConvertError", "InputError", "BackendError", "__version__"]


def load_model(path, backend: str = "auto", activations: str = "fp32", threads: int | None = None,
               verify: bool = True, attention: str = "fp32"):
    """Map and validate a .tdit file and return a callable model ``model(x, t, y)``.

    backend: "auto" | "cython" | "numba" | "numpy" | "cuda"; activations: "fp32" (parity), "int8"
    (per-token dynamic int8, fastest) or "int10" (per-token 10-bit integers: about 4x less error than
    int8 for about 5% more time on the CPU; not on CUDA); threads: None = all CPUs this process may use; verify=False
    skips only the per-tensor checksums; attention: "fp32" (default) or "int8" (int8 Q K^T and integer
    P V in the C kernels, within 1% of fp32 attention and about 1.7-2x faster at 1024 tokens; cython backend only).
    """
    from .format import read_tdit
    from .model import model_from_file

    tf = read_tdit(path, verify=verify)
    if tf.config is None:
        raise FormatError(f"{path}: holds only a VAE, no diffusion model; use terdit_edge.load_vae")
    return model_from_file(tf, backend=backend, activations=activations, threads=threads, attention=attention)
