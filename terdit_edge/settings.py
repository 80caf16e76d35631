"""Generation settings: the one place where a setting is declared, checked, parsed and written.

:class:`GenerationSettings` is a frozen value holding everything that decides an image besides the
model file and the class: sampler, steps, guidance scale and interval, eta, activation mode and
seeds. Every front-end goes through it:

* the command line: :meth:`GenerationSettings.add_arguments` adds the options to a parser and
  :meth:`GenerationSettings.from_args` reads them back;
* JSON (server requests, sampling-job manifests and worker configs): :meth:`from_json` and
  :meth:`to_json`;
* PNG metadata: :meth:`png_items` (written by :mod:`terdit_edge.pngmeta`);
* the identity a sampling job records and compares on resume: :meth:`identity`;
* the key by which the server samples compatible requests together: :meth:`batch_key`;
* the library: ``Pipeline.__call__`` / ``Pipeline.latents`` take ``settings=`` (and the same names
  as keyword arguments), :meth:`sample_kwargs` is what they pass to :func:`terdit_edge.sample`.

Adding a setting means adding one :class:`Setting` to :data:`SETTINGS` (and the attribute with its
default to the class), its test, and its entry in the server's OpenAPI file when requests may set
it; no front-end names it. A setting that is absent or at its default is left out of the identity
and the PNG metadata when it is declared ``optional``, so jobs and images made before it existed
keep their identity and bytes.

Scopes: ``"model"`` settings are fixed when the model is loaded (the server has one value for all
requests, a request cannot set them); ``"sampling"`` settings may differ per request; ``"seed"``
settings say which noise each image gets (per request, never part of a batch key or job identity:
a job derives its seeds from its global seed).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .argtypes import checked
from .diffusion import (
    MAX_SEED,
    NUM_TRAIN_TIMESTEPS,
    SAMPLER_REGISTRY,
    named_schedules,
    respaced_timesteps,
    sampler_class,
    schedule_timesteps,
)
from .errors import InputError
from .kernels.base import ACTIVATION_MODES, ATTENTION_MODES
from .speed import PRESETS, SPEEDS, check_speed
from .stepcache import check_spec_text

MAX_CFG = 100.0   # guidance scales above this give saturated noise: a typo more likely than a wish
MAX_ETA = 10.0
SCOPES = ("model", "sampling", "seed")


# ----------------------------------------------------------------------------------------------
# Checks: value (from Python, JSON or parsed text) -> normalised value, or InputError
# ----------------------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def _check_sampler(v) -> str:
    try:
        if not isinstance(v, str) or len(v) > 40:
            raise InputError("")
        return sampler_class(v).name
    except InputError:
        raise InputError(f"unknown sampler {v!r}; choose one of {', '.join(SAMPLER_REGISTRY)}"[:300]) from None


def _check_steps(v):
    if v is None:
        return None
    if isinstance(v, str) and re.fullmatch(r"ddim[0-9]{1,4}", v):
        respaced_timesteps(v)  # an N no integer stride gives is refused here, with the reason
        return v
    if not _is_int(v):
        raise InputError(f"steps must be an integer or 'ddimN', got {v!r}"[:300])
    respaced_timesteps(int(v))  # 1..1000
    return int(v)


def _number(name: str, hi: float) -> Callable:
    def check(v) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise InputError(f"{name} must be a finite number, got {v!r}"[:300])
        if not 0 <= v <= hi:
            raise InputError(f"{name} must be in 0..{hi:g}, got {v!r}")
        return float(v)
    return check


def _check_interval(v):
    if v is None:
        return None
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != 2 or not all(_is_int(b) for b in v):
        raise InputError(f"guidance_interval must be [LO, HI], two integer timesteps, got {v!r}"[:300])
    lo, hi = int(v[0]), int(v[1])
    if not 0 <= lo <= hi <= NUM_TRAIN_TIMESTEPS - 1:
        raise InputError(f"guidance_interval must satisfy 0 <= lo <= hi <= {NUM_TRAIN_TIMESTEPS - 1}, got {v!r}")
    return lo, hi


def _check_schedule(v):
    if v is None:
        return None
    schedule_timesteps(v)  # InputError lists the names
    return v


def _check_activations(v) -> str:
    if v not in ACTIVATION_MODES:
        raise InputError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, got {v!r}"[:300])
    return v


def _check_attention(v) -> str:
    if v not in ATTENTION_MODES:
        raise InputError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {v!r}"[:300])
    return v


def _check_seed(v):
    if v is None:
        return None
    if not _is_int(v) or not 0 <= v <= MAX_SEED:
        raise InputError(f"seed must be in 0..{MAX_SEED} (2**64-1), got {v!r}"[:300])
    return int(v)


def _check_seeds(v):
    if v is None:
        return None
    if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__iter__"):
        raise InputError(f"seeds must be a list of integers (one per image), got {v!r}"[:300])
    v = tuple(v)
    if not v:
        raise InputError("seeds must list at least one seed")
    for s in v:
        if not _is_int(s) or not 0 <= s <= MAX_SEED:
            raise InputError(f"every seed must be an integer in 0..2**64-1, got {s!r}"[:300])
    return tuple(int(s) for s in v)


# ----------------------------------------------------------------------------------------------
# Text forms (command line) and JSON / PNG forms
# ----------------------------------------------------------------------------------------------

def _steps_text(text: str):
    return text if text.startswith("ddim") else int(text)


def _interval_text(text: str):
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise InputError(f"expected LO,HI (two integer timesteps), got {text!r}") from None


def _seeds_text(text: str):
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise InputError(f"expected comma-separated non-negative integers, got {text!r}")
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"expected comma-separated non-negative integers, got {text!r}") from None


def _int_text(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"expected an integer, got {text!r}") from None


def _float_text(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"expected a number, got {text!r}") from None


def _pair_text(v) -> str:
    return "{},{}".format(*v)


@dataclass(frozen=True)
class Setting:
    """How one setting is checked and appears on the command line, in JSON and in PNG metadata.

    name: the attribute and JSON key; check: value -> normalised value (InputError otherwise);
    flag/parse_text/metavar/help: the command-line option; png: the PNG text key (None: not
    written); optional: left out of the identity and the metadata while None (settings added
    after images and jobs were made keep those unchanged); group: options sharing a group are
    mutually exclusive on the command line.
    """

    name: str
    scope: str
    check: Callable[[Any], Any]
    flag: str
    parse_text: Callable[[str], Any]
    help: str
    metavar: str | None = None
    png: str | None = None
    png_text: Callable[[Any], str] = str
    optional: bool = False
    group: str | None = None
    json_out: Callable[[Any], Any] = lambda v: v

    def __post_init__(self):
        assert self.scope in SCOPES, self.scope


def _sampler_help() -> str:
    defaults = ", ".join(f"{n} {c.default_steps}" for n, c in SAMPLER_REGISTRY.items())
    return (f"sampler: {', '.join(SAMPLER_REGISTRY)} (default ddpm)", f"sampling steps N, or 'ddimN' for the "
            f"DDIM integer stride (default: {defaults})")


SETTINGS: tuple[Setting, ...] = (
    Setting("steps", "sampling", _check_steps, "--steps", _steps_text, "", metavar="N|ddimN", png="steps"),
    Setting("sampler", "sampling", _check_sampler, "--sampler", str, "", metavar="NAME", png="sampler"),
    Setting("cfg_scale", "sampling", _number("cfg_scale", MAX_CFG), "--cfg", _float_text,
            f"classifier-free guidance scale, 0..{MAX_CFG:g} (default 4)", png="cfg"),
    Setting("eta", "sampling", _number("eta", MAX_ETA), "--eta", _float_text, "DDIM eta (default 0)", png="eta"),
    Setting("activations", "model", _check_activations, "--activations", str,
            "fp32 (parity), int8 or int10 (per-token integer activations; faster)", metavar="fp32|int8|int10",
            png="activations"),
    Setting("attention", "model", _check_attention, "--attention", str,
            "fp32 (default) or int8 (int8 Q K^T and integer P V in the C kernels: within 1%% of fp32 attention, "
            "faster at many tokens)", metavar="fp32|int8", png="attention", optional=True),
    Setting("guidance_interval", "sampling", _check_interval, "--guidance-interval", _interval_text,
            "guide only at steps whose timestep t (0..999) has LO <= t <= HI (default: every step)",
            metavar="LO,HI", png="guidance_interval", png_text=_pair_text, optional=True,
            json_out=lambda v: None if v is None else list(v)),
    Setting("schedule", "sampling", _check_schedule, "--schedule", str,
            "a searched timestep schedule (sets the steps; searched for the sampler its name starts with: "
            "give that --sampler): " + ", ".join(named_schedules()), metavar="NAME",
            png="schedule", optional=True),
    Setting("cache", "sampling", check_spec_text("cache"), "--cache", str,
            "step cache: forecast the blocks on skipped steps, 'fixed:N' or 'adaptive:THRESH' with "
            "',order=M,first=F,last=L' (default off; docs/performance.md)", metavar="SPEC", png="cache",
            optional=True),
    Setting("guidance_reuse", "sampling", check_spec_text("guidance_reuse", kinds=("fixed",)), "--guidance-reuse",
            str, "compute the unconditional branch only every N-th guided step, 'fixed:N[,order=M,first=F,"
            "last=L]' (default off)", metavar="SPEC", png="guidance_reuse", optional=True),
    Setting("speed", "sampling", check_speed, "--speed", str,
            "preset: " + ", ".join(SPEEDS) + " (default exact); fills in sampler, steps, schedule, cache and "
            "guidance reuse unless given (`terdit-edge info` lists them)", metavar="|".join(SPEEDS), png="speed",
            optional=True),
    Setting("seed", "seed", _check_seed, "--seed", _int_text,
            "seed of the first image; image k gets SEED + k (default 0)", group="seed"),
    Setting("seeds", "seed", _check_seeds, "--seeds", _seeds_text,
            "one seed per image (as many as images); an image depends only on its class and seed",
            metavar="S1,S2,...", group="seed", json_out=lambda v: None if v is None else list(v)),
)
_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class GenerationSettings:
    """How images are generated (see the module docstring). Construction checks every value and
    normalises it (sampler aliases to names, numbers to float, pairs to tuples); a bad value raises
    :class:`~terdit_edge.errors.InputError` naming the setting.

    steps None means the sampler's default (:attr:`step_spec`); seed None means 0 for the library
    and the CLI, a random seed for the server (:meth:`image_seeds`).
    """

    steps: int | str | None = None
    sampler: str = "ddpm"
    cfg_scale: float = 4.0
    eta: float = 0.0
    activations: str = "fp32"
    attention: str = "fp32"
    guidance_interval: tuple[int, int] | None = None
    schedule: str | None = None
    cache: str | None = None
    guidance_reuse: str | None = None
    speed: str | None = None
    seed: int | None = None
    seeds: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.speed is not None and self.speed in PRESETS and self.sampler == "ddpm" and all(
                getattr(self, f) is None for f in ("steps", "schedule", "cache", "guidance_reuse")):
            # GenerationSettings(speed=...) with none of the preset's settings given: the preset fills them
            # (replace(), from_json() and from_args() apply presets so that the settings given win)
            for k, v in PRESETS[self.speed].items():
                object.__setattr__(self, k, v)
        for s in SETTINGS:
            object.__setattr__(self, s.name, s.check(getattr(self, s.name)))
        if self.seed is not None and self.seeds is not None:
            raise InputError("give seed or seeds, not both")
        if self.schedule is not None and self.steps is not None \
                and self.steps != len(schedule_timesteps(self.schedule)):
            raise InputError(f"schedule {self.schedule!r} has {len(schedule_timesteps(self.schedule))} steps; "
                             f"give no steps with it (got {self.steps!r})")

    # --- derived values ---------------------------------------------------------------------------
    @property
    def step_spec(self):
        """The steps to run: ``steps``, the schedule's number of steps, or the sampler's default."""
        if self.schedule is not None:
            return len(schedule_timesteps(self.schedule))
        return sampler_class(self.sampler).default_steps if self.steps is None else self.steps

    @property
    def n_steps(self) -> int:
        """Sampler steps per image: the length of the respaced (or named) schedule."""
        return len(respaced_timesteps(self.step_spec))

    def replace(self, **changes) -> "GenerationSettings":
        """A copy with some settings changed (checked like a new one). Unknown names raise InputError."""
        unknown = sorted(set(changes) - set(_BY_NAME))
        if unknown:
            raise InputError(f"unknown setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(_BY_NAME)}")
        if "seed" in changes and changes["seed"] is not None:
            changes.setdefault("seeds", None)  # a new seed replaces the seeds, as on the command line
        if "seeds" in changes and changes["seeds"] is not None:
            changes.setdefault("seed", None)
        if changes.get("speed") is not None:
            # a preset fills in what it sets; the settings given in the same call win
            fill = {"schedule": None, "cache": None, "guidance_reuse": None, **PRESETS[check_speed(changes["speed"])]}
            if "steps" in changes or "schedule" in changes:
                fill.pop("steps", None)
                fill.pop("schedule", None)
            elif fill.get("schedule") is not None:
                fill.setdefault("steps", None)
            for k, v in fill.items():
                changes.setdefault(k, v)
        elif changes.get("steps") is not None and "schedule" not in changes:
            changes["schedule"] = None  # new steps replace a schedule, as giving a schedule replaces the steps
        elif changes.get("schedule") is not None and "steps" not in changes:
            changes["steps"] = None
        return dataclasses.replace(self, **changes)

    def image_seeds(self, n: int, default_seed: int = 0) -> list[int]:
        """The seeds of n images: ``seeds`` (exactly n of them), or ``seed + k`` for image k
        (``default_seed`` when seed is None)."""
        if self.seeds is not None:
            if len(self.seeds) != n:
                raise InputError(f"seeds must be a list of {n} integers (one per image), got {len(self.seeds)} "
                                 f"seed(s)")
            return list(self.seeds)
        first = default_seed if self.seed is None else self.seed
        if first > MAX_SEED - (n - 1):
            raise InputError(f"seed must be in 0..{MAX_SEED - (n - 1)} for {n} images (image k gets seed + k, at "
                             f"most 2**64-1), got {first}")
        return [first + k for k in range(n)]

    def check_model(self, activations: str, attention: str = "fp32") -> None:
        """InputError unless the model-scope settings are those a model was loaded with."""
        if self.activations != activations:
            raise InputError(f"these settings ask for activations {self.activations!r} but the model was loaded with "
                             f"{activations!r}; load it with activations={self.activations!r}")
        if self.attention != attention:
            raise InputError(f"these settings ask for attention {self.attention!r} but the model was loaded with "
                             f"{attention!r}; load it with attention={self.attention!r}")

    # --- what the library is called with ----------------------------------------------------------------
    def sample_kwargs(self) -> dict:
        """Keyword arguments of :func:`terdit_edge.sample` for the sampling settings (seeds aside)."""
        kw = {s.name: getattr(self, s.name) for s in SETTINGS if s.scope == "sampling" and s.name != "speed"}
        kw["steps"] = None if self.schedule is not None else self.step_spec  # the preset is already applied
        return kw

    def model_kwargs(self) -> dict:
        """Keyword arguments of model loading (``Pipeline.load``, ``load_model``): the model settings."""
        return {s.name: getattr(self, s.name) for s in SETTINGS if s.scope == "model"}

    # --- identity, batching, metadata ---------------------------------------------------------------
    def _identity_items(self):
        for s in SETTINGS:
            if s.scope == "seed":
                continue
            v = self.step_spec if s.name == "steps" else getattr(self, s.name)
            if s.optional and (v is None or v == _DEFAULTS[s.name]):
                continue
            yield s, v

    def identity(self) -> dict:
        """What fixes the bytes of a sampling job's images besides the model, seeds and labels:
        JSON values, keyed by setting name (optional settings only when set)."""
        return {s.name: s.json_out(v) for s, v in self._identity_items()}

    def batch_key(self) -> tuple:
        """Requests with equal keys can be sampled in one batch (every setting but the seeds)."""
        return tuple((s.name, v) for s, v in self._identity_items())

    def png_items(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """PNG text (key, value) pairs: (those written before the version key, those after it).
        Optional settings come after the version and only when set, so older images keep their bytes."""
        head, tail = [], []
        for s, v in self._identity_items():
            if s.png is not None:
                (tail if s.optional else head).append((s.png, s.png_text(v)))
        return head, tail

    # --- JSON ---------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """Every setting as a JSON value (steps as given: None for the sampler's default)."""
        return {s.name: s.json_out(getattr(self, s.name)) for s in SETTINGS}

    @classmethod
    def from_json(cls, obj: dict, base: "GenerationSettings | None" = None,
                  scopes: tuple[str, ...] = SCOPES) -> "GenerationSettings":
        """Settings from a JSON object's keys that name settings of ``scopes`` (others are ignored:
        the caller checks for unknown keys); missing ones come from ``base`` (default: the defaults)."""
        if not isinstance(obj, dict):
            raise InputError("settings must be a JSON object")
        given = {s.name: obj[s.name] for s in SETTINGS if s.scope in scopes and s.name in obj}
        return (base or cls()).replace(**given)

    @staticmethod
    def json_fields(scopes: tuple[str, ...] = ("sampling", "seed")) -> tuple[str, ...]:
        """The JSON keys of the settings of ``scopes`` (default: those a server request may set)."""
        return tuple(s.name for s in SETTINGS if s.scope in scopes)

    # --- command line -------------------------------------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, scopes: tuple[str, ...] = SCOPES,
                      help_overrides: dict | None = None) -> None:
        """Add one option per setting of ``scopes`` to ``parser`` (default None: the setting's own
        default applies), checked with the same rule as every other way in."""
        sampler_help, steps_help = _sampler_help()
        groups: dict[str, Any] = {}
        for s in SETTINGS:
            if s.scope not in scopes:
                continue
            text = {"sampler": sampler_help, "steps": steps_help}.get(s.name, s.help)
            text = (help_overrides or {}).get(s.name, text)
            target = parser
            if s.group is not None:
                if s.group not in groups:
                    groups[s.group] = parser.add_mutually_exclusive_group()
                target = groups[s.group]
            target.add_argument(s.flag, dest=s.name, type=checked(s.parse_text, s.check, s.name), default=None,
                                metavar=s.metavar, help=text)

    @classmethod
    def from_args(cls, args: argparse.Namespace, base: "GenerationSettings | None" = None) -> "GenerationSettings":
        """Settings from parsed arguments (those :meth:`add_arguments` added and the user gave)."""
        given = {s.name: getattr(args, s.name) for s in SETTINGS if getattr(args, s.name, None) is not None}
        return (base or cls()).replace(**given)


# each setting's default (an optional setting at its default is left out of identities and PNG text)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationSettings)}
