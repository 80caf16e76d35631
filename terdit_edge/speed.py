"""The speed dial: ``speed="exact" | "balanced" | "fast"`` (docs/performance.md, "Which setting when").

A preset fills in the settings that trade work for quality: sampler, steps (or a searched
schedule), the step cache and guidance reuse. Any of them given explicitly wins over the preset;
giving steps or a schedule explicitly replaces the preset's steps and schedule together (they are
one choice: which timesteps run). ``exact`` sets nothing: the user's (or the default) sampler and
steps, nothing cached. The figures behind the presets (network FLOPs against DPM-Solver++ 20
steps, judged quality) are in docs/performance.md.
"""
from __future__ import annotations

from .errors import InputError

PRESET_FIELDS = ("sampler", "steps", "schedule", "cache", "guidance_reuse")

PRESETS: dict[str, dict] = {
    "exact": {},
    # 10 network evaluations per image (DPM++ 20 guided: 40), 4.0x: the searched 5-step schedule alone
    # was judged better than DPM++ 20 on five seeds of the digits model, with the highest fidelity of
    # the 4x settings (docs/performance.md); the same work on every model (no adaptive policy).
    "balanced": {"sampler": "dpm++2m", "schedule": "dpm++2m-5"},
    # 8 evaluations, 5.0x; judged no worse, lower fidelity to the exact sample.
    "fast": {"sampler": "dpm++2m", "schedule": "dpm++2m-5", "guidance_reuse": "fixed:3,first=1,last=0"},
}
SPEEDS = tuple(PRESETS)


def check_speed(v):
    """None or one of :data:`SPEEDS` (InputError otherwise)."""
    if v is None or v in PRESETS:
        return v
    raise InputError(f"speed must be one of {', '.join(SPEEDS)}, got {v!r}"[:300])


def apply_preset(speed, **given) -> dict:
    """The values of :data:`PRESET_FIELDS`: each given (not None) one, else the preset's, else None."""
    preset = dict(PRESETS[check_speed(speed) or "exact"])
    if given.get("steps") is not None or given.get("schedule") is not None:
        preset.pop("steps", None)
        preset.pop("schedule", None)
    return {f: given[f] if given.get(f) is not None else preset.get(f) for f in PRESET_FIELDS}


def describe() -> dict:
    """What each preset sets (``terdit-edge info``)."""
    return {name: {f: p.get(f) for f in PRESET_FIELDS if p.get(f) is not None} or "nothing: the given sampler and "
            "steps, nothing cached" for name, p in PRESETS.items()}
