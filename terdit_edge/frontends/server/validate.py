"""Request bodies -> JobParams, with a 4xx ApiError that says what was wrong (no web framework here)."""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import re
import secrets

from ...edit import EditSettings, edit_geometry, fitted_inputs
from ...errors import InputError
from ...settings import GenerationSettings
from .jobs import EditInput, JobParams, Limits


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
# an edit's own settings (strength, mask_blur, resample_jumps, jump_length, fit): terdit_edge.edit.EditSettings
EDIT_SETTINGS = EditSettings.json_fields()
JOB_FIELDS = ("class", "n", *REQUEST_SETTINGS, "image", "mask", *EDIT_SETTINGS)
# OpenAI's image-generation fields, plus this server's sampling extensions
OPENAI_FIELDS = ("prompt", "n", "size", "response_format", "model", "quality", "style", "user", *REQUEST_SETTINGS)
# OpenAI's image-edit form fields (image and mask are file parts), plus the sampling and edit extensions
OPENAI_EDIT_FIELDS = ("image", "mask", "prompt", "n", "size", "response_format", "model", "quality", "user",
                      "background", "output_format", "input_fidelity", *REQUEST_SETTINGS, *EDIT_SETTINGS)


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
    """POST /v1/jobs body -> JobParams (an edit job when the body has an ``image``)."""
    check_fields(body, JOB_FIELDS)
    if "class" not in body:
        raise bad("missing field 'class' (a class id or name)")
    class_id = resolve_class(pipe, body["class"])
    n_default = len(body["seeds"]) if isinstance(body.get("seeds"), list) and body["seeds"] else 1
    n = _int(body, "n", 1, limits.max_n, n_default)
    edit = None
    if "image" in body:
        image = _b64(body["image"], "image")
        mask = None if body.get("mask") is None else _b64(body["mask"], "mask")
        edit = edit_input(pipe, limits, image, mask, _edit_settings(body))
    else:
        given = sorted(k for k in ("mask", *EDIT_SETTINGS) if k in body)
        if given:
            raise bad(f"{', '.join(map(repr, given))} belong to an edit job: give its input picture as 'image' "
                      "(base64)")
    return with_edit(sampling_params(body, limits, class_id, n, base), edit, limits)


def is_edit_body(data: bytes) -> bool:
    """Whether a raw /v1/jobs body may be an edit job (which may be larger than other requests)."""
    return b'"image"' in data


def _b64(value, name: str) -> bytes:
    """A picture given in JSON: base64 of its file bytes, or a data: URL of them."""
    if not isinstance(value, str) or not value:
        raise bad(f"{name} must be a non-empty string: the picture's file (PNG, JPEG, ...) in base64, or a data: URL",
                  "invalid_image")
    if value.startswith("data:"):
        head, sep, value = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise bad(f"{name}: a data: URL must be base64 (data:image/png;base64,...)", "invalid_image")
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{name} is not valid base64 (standard alphabet, padded)", "invalid_image") from None


def _edit_settings(fields: dict) -> EditSettings:
    try:
        return EditSettings.from_json(fields)
    except InputError as e:
        raise bad(str(e)) from None


def edit_input(pipe, limits: Limits, image: bytes, mask: bytes | None, settings: EditSettings,
               mask_alpha: bool = False) -> EditInput:
    """An upload -> EditInput: the picture and mask decoded once, checked (pixel limit, mode, mask
    size) and kept as PNGs fitted to the model's size (the values the upload itself would give).
    Runs off the event loop (decoding a large picture takes a while)."""
    try:
        settings = settings.for_mask(mask is not None)
        _, _, channels, size = edit_geometry(pipe)
        img, m = fitted_inputs(image, mask, size, channels, settings.fit, max_pixels=limits.max_image_pixels,
                               mask_alpha=mask_alpha)
    except InputError as e:
        raise bad(str(e), "invalid_image") from None
    return EditInput(_png(img), None if m is None else _png(m), settings)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def with_edit(params: JobParams, edit: EditInput | None, limits: Limits) -> JobParams:
    if edit is None:
        return params
    params = dataclasses.replace(params, edit=edit)
    if params.n_steps > limits.max_steps:
        raise bad(f"this edit runs {params.n_steps} denoising steps (steps x strength, with the RePaint jumps), more "
                  f"than the {limits.max_steps} this server allows")
    return params


def _openai_common(body: dict, pipe, limits: Limits, strings: tuple) -> tuple[int, int]:
    """(class id, n) of an OpenAI-style request, after its prompt, n, response_format, size and
    string-only fields are checked."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("prompt must be a non-empty string: a class name, or 'class:ID'")
    m = re.fullmatch(r"\s*class\s*:\s*([0-9]+)\s*", prompt)
    class_id = resolve_class(pipe, int(m.group(1)) if m else prompt.strip())
    n = _int(body, "n", 1, limits.max_n, 1)
    fmt = body.get("response_format", "b64_json")
    if fmt is not None and fmt != "b64_json":
        raise bad(f"response_format must be 'b64_json' (this server returns no URLs), got {fmt!r}")
    size = body.get("size")
    if size is not None and size != "auto":
        cfg = pipe.config
        side = cfg.input_size * (8 if cfg.latent else 1)
        if size != f"{side}x{side}":
            raise bad(f"size must be '{side}x{side}' for this model (or omitted), got {size!r}")
    for name in strings:
        if name in body and body[name] is not None and not isinstance(body[name], str):
            raise bad(f"{name} must be a string, got {body[name]!r}")
    return class_id, n


def openai_params(body, pipe, limits: Limits, base: GenerationSettings) -> JobParams:
    """POST /v1/images/generations body -> JobParams. prompt: a class name, an id, or "class:ID"."""
    check_fields(body, OPENAI_FIELDS)
    class_id, n = _openai_common(body, pipe, limits, ("model", "quality", "style", "user"))
    return sampling_params(body, limits, class_id, n, base)


@dataclasses.dataclass(frozen=True)
class Upload:
    """A file part of a multipart form."""

    filename: str
    data: bytes


def form_value(text: str):
    """A text form field -> a JSON value when it reads as one ("12" -> 12, "[100, 800]" -> a list,
    "true" -> True), else the text itself ("ddim"): the checks then say what was wrong."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def openai_edit_params(form: dict, pipe, limits: Limits, base: GenerationSettings) -> JobParams:
    """POST /v1/images/edits multipart form -> JobParams. ``form``: name -> text or Upload. The
    mask follows OpenAI's convention when it has an alpha channel (transparent = regenerate),
    else this server's (white = regenerate)."""
    check_fields(form, OPENAI_EDIT_FIELDS)
    files = {k: form.get(k) for k in ("image", "mask")}
    for k, v in files.items():
        if v is not None and not isinstance(v, Upload):
            raise bad(f"{k} must be a file part of the multipart form (with a filename), not a text field",
                      "invalid_image")
    if files["image"] is None:
        raise bad("missing field 'image': the picture to edit, as a file part of the multipart form",
                  "invalid_image")
    body = {k: (v if isinstance(v, Upload) else [form_value(x) for x in v] if isinstance(v, list) else form_value(v))
            for k, v in form.items()}
    for k in ("prompt", "size", "response_format", "model", "quality", "user", "background", "output_format",
              "input_fidelity", "sampler", "steps", "fit"):
        if isinstance(form.get(k), str):
            body[k] = form[k]  # text as sent ("3" is the class named 3, "ddim25" steps)
    if isinstance(body.get("steps"), str) and body["steps"].isdigit():
        body["steps"] = int(body["steps"])
    class_id, n = _openai_common(body, pipe, limits, ("model", "quality", "user", "background", "output_format",
                                                       "input_fidelity"))
    mask = files["mask"].data if files["mask"] is not None else None
    edit = edit_input(pipe, limits, files["image"].data, mask, _edit_settings(body), mask_alpha=True)
    return with_edit(sampling_params(body, limits, class_id, n, base), edit, limits)
