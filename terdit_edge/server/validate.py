"""Request bodies -> JobParams, with a 4xx ApiError that says what was wrong (no web framework here)."""
from __future__ import annotations

import math
import re
import secrets

from ..diffusion import MAX_SEED, SAMPLER_REGISTRY, check_guidance_interval, respaced_timesteps, sampler_class
from ..errors import InputError
from .jobs import JobParams, Limits


class ApiError(Exception):
    """An error answered as JSON: {"error": {"code", "message", "type"}} with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if 400 <= self.status < 500 else "server_error"
        return {"error": {"code": self.code, "message": self.message, "type": kind}}


def bad(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, code, message)


JOB_FIELDS = ("class", "n", "seed", "seeds", "steps", "sampler", "cfg_scale", "eta", "guidance_interval")
# OpenAI's image-generation fields, plus this server's sampling extensions
OPENAI_FIELDS = ("prompt", "n", "size", "response_format", "model", "quality", "style", "user",
                 "seed", "seeds", "steps", "sampler", "cfg_scale", "eta", "guidance_interval")
MAX_CFG = 100.0
MAX_ETA = 10.0


def _int(body: dict, name: str, lo: int, hi: int, default=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{name} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise bad(f"{name} must be in {lo}..{hi}, got {v}")
    return v


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    v = body.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"{name} must be a finite number, got {v!r}")
    if not lo <= v <= hi:
        raise bad(f"{name} must be in {lo:g}..{hi:g}, got {v!r}")
    return float(v)


def check_fields(body, allowed: tuple) -> None:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise bad(f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")


def resolve_class(pipe, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise bad(f"class must be a class id or name, got {value!r}", "unknown_class")
    if isinstance(value, str) and len(value) > 200:
        raise bad("class name is too long (at most 200 characters)", "unknown_class")
    try:
        return pipe.resolve_classes([value])[0]
    except InputError as e:
        raise bad(str(e), "unknown_class") from None


def sampling_params(body: dict, limits: Limits, class_id: int, n: int) -> JobParams:
    """The shared part of both APIs: seeds, steps, sampler, cfg_scale, eta, guidance_interval."""
    sampler = body.get("sampler", "ddpm")
    try:
        if not isinstance(sampler, str) or len(sampler) > 40:
            raise InputError("")
        sampler_cls = sampler_class(sampler)
    except InputError:
        raise bad(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_REGISTRY)}") from None
    sampler = sampler_cls.name
    steps = body.get("steps", sampler_cls.default_steps)
    if isinstance(steps, bool) or not isinstance(steps, (int, str)) or (
            isinstance(steps, str) and not re.fullmatch(r"ddim[0-9]{1,4}", steps)):
        raise bad(f"steps must be an integer or 'ddimN', got {steps!r}")
    try:
        n_steps = len(respaced_timesteps(steps))
    except InputError as e:
        raise bad(str(e)) from None
    if n_steps > limits.max_steps:
        raise bad(f"steps must be at most {limits.max_steps} on this server, got {n_steps}")
    cfg = _number(body, "cfg_scale", 0.0, MAX_CFG, 4.0)
    eta = _number(body, "eta", 0.0, MAX_ETA, 0.0)
    interval = body.get("guidance_interval")
    if interval is not None:
        if not isinstance(interval, list) or len(interval) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in interval):
            raise bad(f"guidance_interval must be [LO, HI], two integer timesteps, got {interval!r}"[:300])
        try:
            interval = tuple(check_guidance_interval(interval))
        except InputError as e:
            raise bad(str(e)) from None
    if body.get("seeds") is not None:
        if "seed" in body and body["seed"] is not None:
            raise bad("give seed or seeds, not both")
        seeds = body["seeds"]
        if not isinstance(seeds, list) or len(seeds) != n:
            raise bad(f"seeds must be a list of {n} integers (one per image), got {seeds!r}"[:300])
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
                raise bad(f"every seed must be an integer in 0..2**64-1, got {s!r}")
        seeds = tuple(seeds)
    else:
        seed = _int(body, "seed", 0, MAX_SEED - (n - 1), None)
        if seed is None:
            seed = secrets.randbelow(2**31)  # no seed: a random one, reported with the job
        seeds = tuple(seed + k for k in range(n))
    return JobParams(classes=(class_id,) * n, seeds=seeds, steps=steps, n_steps=n_steps, sampler=sampler,
                     cfg_scale=cfg, eta=eta, guidance_interval=interval)


def job_params(body, pipe, limits: Limits) -> JobParams:
    """POST /v1/jobs body -> JobParams."""
    check_fields(body, JOB_FIELDS)
    if "class" not in body:
        raise bad("missing field 'class' (a class id or name)")
    class_id = resolve_class(pipe, body["class"])
    n_default = len(body["seeds"]) if isinstance(body.get("seeds"), list) and body["seeds"] else 1
    n = _int(body, "n", 1, limits.max_n, n_default)
    return sampling_params(body, limits, class_id, n)


def openai_params(body, pipe, limits: Limits) -> JobParams:
    """POST /v1/images/generations body -> JobParams. prompt: a class name, an id, or "class:ID"."""
    check_fields(body, OPENAI_FIELDS)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("prompt must be a non-empty string: a class name, or 'class:ID'")
    m = re.fullmatch(r"\s*class\s*:\s*([0-9]+)\s*", prompt)
    class_id = resolve_class(pipe, int(m.group(1)) if m else prompt.strip())
    n = _int(body, "n", 1, limits.max_n, 1)
    fmt = body.get("response_format", "b64_json")
    if fmt != "b64_json":
        raise bad(f"response_format must be 'b64_json' (this server returns no URLs), got {fmt!r}")
    size = body.get("size")
    if size is not None:
        cfg = pipe.config
        side = cfg.input_size * (8 if cfg.latent else 1)
        if size != f"{side}x{side}":
            raise bad(f"size must be '{side}x{side}' for this model (or omitted), got {size!r}")
    for name in ("model", "quality", "style", "user"):
        if name in body and body[name] is not None and not isinstance(body[name], str):
            raise bad(f"{name} must be a string, got {body[name]!r}")
    return sampling_params(body, limits, class_id, n)
