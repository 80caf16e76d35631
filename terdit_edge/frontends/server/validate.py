"""Request bodies -> JobParams, with a 4xx ApiError that says what was wrong (no web framework here)."""
from __future__ import annotations

import re
import secrets

from ...errors import InputError
from ...settings import GenerationSettings
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


# the settings a request may set (seeds and sampling settings; the model settings are the server's)
REQUEST_SETTINGS = GenerationSettings.json_fields(("sampling", "seed"))
JOB_FIELDS = ("class", "n", *REQUEST_SETTINGS)
# OpenAI's image-generation fields, plus this server's sampling extensions
OPENAI_FIELDS = ("prompt", "n", "size", "response_format", "model", "quality", "style", "user", *REQUEST_SETTINGS)


def _int(body: dict, name: str, lo: int, hi: int, default=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{name} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise bad(f"{name} must be in {lo}..{hi}, got {v}")
    return v


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


def sampling_params(body: dict, limits: Limits, class_id: int, n: int, base: GenerationSettings) -> JobParams:
    """The shared part of both APIs: the request's settings over the server's ``base`` settings,
    and one seed per image (a random first seed when the request gives none)."""
    try:
        settings = GenerationSettings.from_json(body, base=base, scopes=("sampling", "seed"))
        if settings.n_steps > limits.max_steps:
            raise InputError(f"steps must be at most {limits.max_steps} on this server, got {settings.n_steps}")
        seeds = settings.image_seeds(n, default_seed=secrets.randbelow(2**31))  # reported with the job
    except InputError as e:
        raise bad(str(e)) from None
    return JobParams(classes=(class_id,) * n, seeds=tuple(seeds), settings=settings.replace(seed=None, seeds=None))


def job_params(body, pipe, limits: Limits, base: GenerationSettings) -> JobParams:
    """POST /v1/jobs body -> JobParams."""
    check_fields(body, JOB_FIELDS)
    if "class" not in body:
        raise bad("missing field 'class' (a class id or name)")
    class_id = resolve_class(pipe, body["class"])
    n_default = len(body["seeds"]) if isinstance(body.get("seeds"), list) and body["seeds"] else 1
    n = _int(body, "n", 1, limits.max_n, n_default)
    return sampling_params(body, limits, class_id, n, base)


def openai_params(body, pipe, limits: Limits, base: GenerationSettings) -> JobParams:
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
    return sampling_params(body, limits, class_id, n, base)
