"""The model configuration: one frozen dataclass, stored as JSON in every .tdit file."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .errors import FormatError

TIMESTEP_FREQ_DIM = 256  # width of the sinusoidal timestep features (docs/model.md §2)

# Upper bounds that keep a hostile config from asking for absurd memory (7B: dim 4096, 32 layers).
_INT_LIMITS = {"dim": 16384, "n_layers": 512, "n_heads": 1024, "n_kv_heads": 1024, "ffn_dim": 65536,
               "cond_dim": 16384, "patch_size": 16, "in_channels": 64, "input_size": 4096,
               "num_classes": 100000, "guided_channels": 64}
MAX_TOKENS = 65536


def ffn_hidden_dim(dim: int, multiple_of: int = 256) -> int:
    """Hidden width of the SwiGLU feed-forward: multiple_of * ceil(int(2 * 4 * dim / 3) / multiple_of)."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def strict_config_from_json(cls, text: str, what: str, require_all: bool = False, convert=None):
    """A validated frozen-dataclass config from its JSON metadata string, strictly.

    Refuses (FormatError naming ``what``) anything but a JSON object whose keys are fields of cls:
    unknown keys (a newer writer), missing keys (fields without a default, or every field with
    ``require_all``), values the constructor or ``validate()`` reject. ``convert(raw)`` may adjust
    the parsed dict first (e.g. lists to tuples). One helper for every config stored in a file.
    """
    try:
        raw = json.loads(text)
    except (ValueError, TypeError, RecursionError) as e:
        raise FormatError(f"{what} metadata is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise FormatError(f"{what} metadata must be a JSON object, found {type(raw).__name__}")
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = set(raw) - names
    if unknown:
        raise FormatError(f"{what} has unknown keys {sorted(unknown)}; was the file written by a newer terdit-edge?")
    required = names if require_all else {f.name for f in fields if f.default is dataclasses.MISSING}
    missing = required - set(raw)
    if missing:
        raise FormatError(f"{what} is missing keys {sorted(missing)}")
    if convert is not None:
        convert(raw)
    try:
        cfg = cls(**raw)
    except TypeError as e:
        raise FormatError(f"{what} cannot be built: {e}") from None
    return cfg.validate()


@dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of a ternary DiT ("DiT-LLaMA") model.

    ``input_size`` is the spatial size of the model input (latent size for latent models, image
    size for pixel-space models). ``guided_channels`` is how many leading eps channels classifier-free
    guidance mixes (3 for the converted TerDiT latent models, all eps channels otherwise).
    ``latent`` says whether samples are SD-VAE latents (decode with a VAE) or pixels in [-1, 1].
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    cond_dim: int
    patch_size: int = 2
    in_channels: int = 4
    input_size: int = 32
    learn_sigma: bool = True
    num_classes: int = 1000
    qk_norm: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    guided_channels: int = 3
    latent: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def n_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def validate(self) -> "ModelConfig":
        """Check internal consistency; raise FormatError naming the first problem."""
        for name, limit in _INT_LIMITS.items():
            v = getattr(self, name)
            if type(v) is not int or v < 1 or v > limit:
                raise FormatError(f"config.{name} must be an integer in 1..{limit}, found {v!r}")
        for name in ("learn_sigma", "qk_norm", "latent"):
            if type(getattr(self, name)) is not bool:
                raise FormatError(f"config.{name} must be a boolean, found {getattr(self, name)!r}")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if type(v) not in (int, float) or not (0 < v < 1e9):
                raise FormatError(f"config.{name} must be a positive number, found {v!r}")
        if self.dim % self.n_heads or self.head_dim % 2:
            raise FormatError(f"config.dim {self.dim} must split into {self.n_heads} heads of even width")
        if self.n_heads % self.n_kv_heads:
            raise FormatError(f"config.n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if self.input_size % self.patch_size:
            raise FormatError(f"config.input_size {self.input_size} must be a multiple of patch_size {self.patch_size}")
        if self.guided_channels > self.in_channels:
            raise FormatError(f"config.guided_channels {self.guided_channels} exceeds in_channels {self.in_channels}")
        if self.n_tokens > MAX_TOKENS:
            raise FormatError(f"config gives {self.n_tokens} tokens (input_size {self.input_size}, patch "
                              f"{self.patch_size}); at most {MAX_TOKENS} are supported")
        if not self.learn_sigma:
            raise FormatError("config.learn_sigma must be true: the samplers use the learned-range variance")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return strict_config_from_json(cls, text, "config")
