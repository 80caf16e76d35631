"""The Starlette application: routes, authentication, limits, JSON errors, SSE and the web page.

Every request is answered from memory (the job store and the page's files read from the package at
start-up); no part of a request is ever used to build a file-system path.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..._version import __version__
from ...diffusion import SAMPLER_REGISTRY, named_schedules
from ...speed import describe as describe_speeds
from .jobs import AlreadyFinished, JobManager, NotReady, QueueFull, StoreFailed
from .validate import (
    ApiError,
    Upload,
    bad,
    is_edit_body,
    job_params,
    openai_edit_params,
    openai_params,
)

log = logging.getLogger("terdit_edge.server")

PAGE_FILES = {"/": ("static/index.html", "text/html; charset=utf-8"),
              "/ui/app.js": ("static/app.js", "text/javascript; charset=utf-8"),
              "/ui/style.css": ("static/style.css", "text/css; charset=utf-8")}
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "X-Frame-Options": "DENY",
                    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                               "style-src 'self'; script-src 'self'; connect-src 'self'; "
                                               "frame-ancestors 'none'"}
SSE_KEEPALIVE_SECONDS = 15.0
CANCEL_WAIT_SECONDS = 30.0


def package_text(name: str) -> str:
    return resources.files("terdit_edge.frontends.server").joinpath(name).read_text("utf-8")


def read_key_file(path) -> list[str]:
    """API keys, one per line (blank lines and lines starting with # are ignored)."""
    from ...errors import InputError

    try:
        with open(path, encoding="utf-8") as f:
            keys = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except OSError as e:
        raise InputError(f"cannot read the API key file {path!r}: {e.strerror}") from None
    if not keys:
        raise InputError(f"the API key file {path!r} holds no key (one key per line)")
    for k in keys:
        if len(k) < 16 or any(c.isspace() for c in k):
            raise InputError(f"every key in {path!r} must be at least 16 characters without spaces")
    return keys


def _favicon_png() -> bytes:
    """A 16x16 icon (a dark square with a light diagonal), made at start-up: browsers ask for
    /favicon.ico on every page and would log a 404."""
    import io

    import numpy as np
    from PIL import Image

    a = np.full((16, 16, 3), 40, np.uint8)
    for i in range(16):
        a[i, max(0, i - 1):i + 2] = (230, 230, 230)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _json_error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class Server:
    """Holds the job manager and configuration; its methods are the endpoints."""

    def __init__(self, manager: JobManager, api_keys: list[str] | None = None, backend: str = "auto"):
        self.m = manager
        self.keys = [k.encode("utf-8") for k in api_keys] if api_keys else None
        self.fingerprints = [hashlib.sha256(b"terdit-edge-owner/" + k).hexdigest()[:32] for k in self.keys or ()]
        self.favicon = _favicon_png()
        self.backend_requested = backend
        self.started = time.time()
        self.page = {path: (package_text(name).encode("utf-8"), ctype) for path, (name, ctype) in PAGE_FILES.items()}
        self.openapi = package_text("openapi.json").encode("utf-8")

    # -- helpers ----------------------------------------------------------------------------------

    def owner(self, request: Request):
        """The caller's key fingerprint (None when keys are off); 401 without a valid bearer key. A
        fingerprint, not the key's position in the file: stored jobs keep their owner across a
        restart with a reordered key file, and the store never holds a key."""
        if self.keys is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer KEY'",
                           {"WWW-Authenticate": "Bearer"})
        given = token.strip().encode("utf-8")
        found = None
        for i, key in enumerate(self.keys):  # every key compared, in constant time each
            if hmac.compare_digest(given, key) and found is None:
                found = i
        if found is None:
            raise ApiError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "Bearer"})
        return self.fingerprints[found]

    def pipe(self):
        if self.m.state == "ready":
            return self.m.pipe
        if self.m.state == "loading":
            raise ApiError(503, "loading", "the model is still loading; retry shortly", {"Retry-After": "1"})
        raise ApiError(503, "load_failed", f"the model failed to load: {self.m.load_error}")

    async def read_body(self, request: Request, limit: int, message: str) -> bytes:
        """The raw body, at most ``limit`` bytes (413 with ``message`` over it)."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise ApiError(413, "body_too_large", message)
        data = bytearray()
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > limit:
                    raise ApiError(413, "body_too_large", message)
        except ClientDisconnect:
            raise ApiError(400, "client_disconnect", "the client went away") from None
        return bytes(data)

    async def body(self, request: Request, edit: bool = False):
        """The JSON body. ``edit``: it may be an edit job, up to max_upload_bytes when it holds an image."""
        lim = self.m.limits
        limit = lim.max_body_bytes
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, "unsupported_media_type", f"send a JSON body (Content-Type: application/json), "
                           f"not {ctype!r}")
        small = f"the request body is over {limit} bytes"
        if edit:
            upload = max(limit, lim.max_upload_bytes)
            data = await self.read_body(request, upload, f"the request body is over {upload} bytes (the limit "
                                        "of an edit job with its pictures)")
            if len(data) > limit and not is_edit_body(data):
                raise ApiError(413, "body_too_large", small + " (only an edit job, with an 'image', may be larger)")
        else:
            data = await self.read_body(request, limit, small)
        if not data:
            raise bad("the request body is empty: send a JSON object")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from None
        except RecursionError:  # "[" * 5000: under the size limit, over the parser's nesting depth
            raise bad("the request body is nested too deeply") from None

    def job_for(self, request: Request, owner):
        job_id = request.path_params["job_id"]
        job = self.m.get(job_id, owner, check_owner=self.keys is not None) if len(job_id) <= 64 else None
        if job is None:
            lost = "" if self.m.store is not None else (", or accepted before a restart of this server (it runs with "
                                                        "--ephemeral: jobs live in memory only)")
            raise ApiError(404, "job_not_found", f"no job {job_id[:64]!r}: unknown, made with another key, "
                           f"finished more than {self.m.limits.keep_seconds:g} s ago and dropped{lost}")
        return job

    def job_json(self, job) -> dict:
        d = self.m.snapshot(job)
        base = f"/v1/jobs/{job.id}"
        done = d["status"] == "succeeded"
        d.update(status_url=base, events_url=base + "/events", cancel_url=base + "/cancel",
                 images=[f"{base}/images/{k}.png" for k in range(len(job.images))] if done else [])
        return d

    # -- service endpoints ----------------------------------------------------------------------------

    async def health(self, request: Request):
        state = self.m.state
        body = {"status": "ok" if state == "ready" else state, "version": __version__}
        if state == "failed":
            body["error"] = self.m.load_error
        return JSONResponse(body, status_code=200 if state == "ready" else 503)

    async def capabilities(self, request: Request):
        self.owner(request)
        pipe = self.pipe()
        cfg = pipe.config
        lim = self.m.limits
        side = cfg.input_size * (8 if cfg.latent else 1)
        return JSONResponse({
            "model": self.model_id(), "version": __version__,
            "classes": [{"id": i, "name": n} for i, n in enumerate(pipe.class_names)],
            "samplers": list(SAMPLER_REGISTRY),
            "default_steps": {name: cls.default_steps for name, cls in SAMPLER_REGISTRY.items()},
            "schedules": {name: len(e["timesteps"]) for name, e in named_schedules().items()},
            "speed_presets": describe_speeds(),
            "image": {"width": side, "height": side, "channels": 3 if cfg.latent else cfg.in_channels},
            "backend": pipe.model.backend.describe(), **self.m.settings.model_kwargs(),
            "limits": {"max_queue": lim.max_queue, "max_batch": lim.max_batch, "max_n": lim.max_n,
                       "max_steps": lim.max_steps, "max_body_bytes": lim.max_body_bytes,
                       "max_upload_bytes": lim.max_upload_bytes, "max_image_pixels": lim.max_image_pixels,
                       "keep_seconds": lim.keep_seconds, "keep_jobs": lim.keep_jobs},
            "edit": self.edit_capability(pipe),
            "auth": self.keys is not None, "durable_jobs": self.m.store is not None})

    @staticmethod
    def edit_capability(pipe) -> dict:
        """Whether this model can edit (a latent model needs its VAE's encoder), and why not."""
        from ...edit import edit_geometry
        from ...errors import InputError

        try:
            edit_geometry(pipe)
        except InputError as e:
            return {"available": False, "reason": str(e)}
        return {"available": True, "modes": ["image-to-image", "inpainting"]}

    def model_id(self) -> str:
        return os.path.splitext(self.m.model_name)[0]

    async def models(self, request: Request):
        self.owner(request)
        return JSONResponse({"object": "list", "data": [{"id": self.model_id(), "object": "model",
                                                         "created": int(self.started), "owned_by": "terdit-edge"}]})

    async def metrics(self, request: Request):
        self.owner(request)
        s = self.m.stats()
        lines = ["# HELP terdit_queue_depth Jobs waiting in the queue.", "# TYPE terdit_queue_depth gauge",
                 f"terdit_queue_depth {s['queue_depth']}",
                 "# HELP terdit_jobs Retained jobs by state.", "# TYPE terdit_jobs gauge"]
        lines += [f'terdit_jobs{{state="{k}"}} {v}' for k, v in s["jobs_by_state"].items()]
        lines += ["# HELP terdit_jobs_submitted_total Jobs accepted.", "# TYPE terdit_jobs_submitted_total counter",
                  f"terdit_jobs_submitted_total {s['jobs_total']}",
                  "# HELP terdit_jobs_finished_total Jobs that reached a final state.",
                  "# TYPE terdit_jobs_finished_total counter"]
        lines += [f'terdit_jobs_finished_total{{state="{k}"}} {v}' for k, v in s["finished_total"].items()]
        lines += ["# HELP terdit_images_total Images generated.", "# TYPE terdit_images_total counter",
                  f"terdit_images_total {s['images_total']}",
                  "# HELP terdit_batches_total Batches run by the worker.", "# TYPE terdit_batches_total counter",
                  f"terdit_batches_total {s['batches_total']}",
                  "# HELP terdit_step_seconds Seconds per sampler step of a batch.",
                  "# TYPE terdit_step_seconds summary",
                  f"terdit_step_seconds_sum {s['step_seconds_sum']:.6f}",
                  f"terdit_step_seconds_count {s['step_seconds_count']}",
                  "# HELP terdit_seconds_per_step Recent seconds per step (moving average).",
                  "# TYPE terdit_seconds_per_step gauge",
                  f"terdit_seconds_per_step {s['seconds_per_step'] or 0:.6f}",
                  "# HELP terdit_model_ready 1 once the model is loaded.", "# TYPE terdit_model_ready gauge",
                  f"terdit_model_ready {1 if self.m.state == 'ready' else 0}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi_file(self, request: Request):
        self.owner(request)
        return Response(self.openapi, media_type="application/json")

    async def favicon_file(self, request: Request):
        return Response(self.favicon, media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    async def page_file(self, request: Request):
        content, ctype = self.page[request.url.path]
        return Response(content, media_type=ctype, headers={"Cache-Control": "no-cache"})

    # -- the job API --------------------------------------------------------------------------------

    def submit(self, params, owner, durable: bool = True):
        try:
            return self.m.submit(params, owner, durable=durable)
        except StoreFailed as e:
            raise ApiError(503, "store_unavailable", f"the job could not be stored on disk ({e}); it was not "
                           "accepted: retry later", {"Retry-After": "5"}) from None
        except QueueFull as e:
            raise ApiError(429, "queue_full", f"the queue is full ({self.m.limits.max_queue} jobs); retry in "
                           f"{e.retry_after} s", {"Retry-After": str(e.retry_after)}) from None
        except NotReady:
            self.pipe()
            raise

    async def create_job(self, request: Request):
        owner = self.owner(request)
        pipe = self.pipe()
        body = await self.body(request, edit=True)
        if isinstance(body, dict) and "image" in body:  # decoding a picture takes a while: off the event loop
            params = await asyncio.to_thread(job_params, body, pipe, self.m.limits, self.m.settings)
        else:
            params = job_params(body, pipe, self.m.limits, self.m.settings)
        job = self.submit(params, owner)
        d = self.job_json(job)
        return JSONResponse({"id": job.id, "status_url": d["status_url"], "events_url": d["events_url"],
                             "queue_position": d["queue_position"], "status": d["status"], "seeds": d["seeds"],
                             "classes": d["classes"]}, status_code=202, headers={"Location": d["status_url"]})

    async def get_job(self, request: Request):
        job = self.job_for(request, self.owner(request))
        return JSONResponse(self.job_json(job))

    async def cancel_job(self, request: Request):
        job = self.job_for(request, self.owner(request))
        try:
            self.m.cancel(job)
        except AlreadyFinished as e:
            raise ApiError(409, "job_finished", f"job {job.id} already finished ({e}); nothing to cancel") from None
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS  # a running job stops at the end of its step
        while not job.final and time.monotonic() < deadline:
            await self.m.wait_for_change(job, job.seq, 0.5)
        return JSONResponse(self.job_json(job), status_code=200 if job.final else 202)

    async def job_image(self, request: Request):
        job = self.job_for(request, self.owner(request))
        k = request.path_params["k"]
        if job.status != "succeeded":  # 409 in every other state, as docs/server.md says
            raise ApiError(409, "no_image", f"job {job.id} is {job.status}: images exist only once it has succeeded")
        if not 0 <= k < len(job.images):
            raise ApiError(404, "no_image", f"job {job.id} has images 0..{len(job.images) - 1}, not {k}")
        return Response(job.images[k], media_type="image/png",
                        headers={"Content-Disposition": f'attachment; filename="{job.id}-{k}.png"',
                                 "Cache-Control": "private, max-age=600"})

    async def job_events(self, request: Request):
        job = self.job_for(request, self.owner(request))
        last = request.headers.get("last-event-id", "0")
        seen = int(last) if last.isdigit() and len(last) < 12 else 0

        async def stream():
            nonlocal seen
            while True:
                events, final = self.m.events_after(job, seen)
                for seq, name, data in events:
                    seen = seq
                    yield f"id: {seq}\nevent: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
                if final and not events:
                    return
                if not events:
                    await self.m.wait_for_change(job, seen, SSE_KEEPALIVE_SECONDS)
                    if job.seq <= seen and not job.final:
                        yield ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- OpenAI-compatible ----------------------------------------------------------------------------

    async def openai_generate(self, request: Request):
        owner = self.owner(request)
        pipe = self.pipe()
        params = openai_params(await self.body(request), pipe, self.m.limits, self.m.settings)
        return await self.openai_answer(request, params, owner, pipe)

    async def form(self, request: Request) -> dict:
        """A multipart/form-data body (at most max_upload_bytes) -> {name: text or Upload}."""
        from starlette.datastructures import UploadFile

        lim = self.m.limits
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "multipart/form-data":
            raise ApiError(415, "unsupported_media_type", "send a multipart/form-data body with the picture as the "
                           f"file field 'image' (as OpenAI's images.edit does), not {ctype or 'no content type'!r}")
        upload = max(lim.max_body_bytes, lim.max_upload_bytes)
        data = await self.read_body(request, upload, f"the request body is over {upload} bytes")
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}

        try:
            from starlette.formparsers import MultiPartException
        except ImportError:  # pragma: no cover - older Starlette
            MultiPartException = ValueError  # noqa: N806
        try:
            form = await Request(request.scope, replay).form(max_files=4, max_fields=64, max_part_size=64 * 1024)
        except AssertionError:  # Starlette asserts python-multipart is installed
            raise ApiError(500, "multipart_unavailable", "this server cannot read multipart forms: install "
                           "python-multipart (pip install \"terdit-edge[server]\")") from None
        except (MultiPartException, HTTPException, ValueError, KeyError) as e:
            detail = getattr(e, "message", None) or getattr(e, "detail", None) or str(e)
            raise bad(f"the multipart form could not be read: {detail}") from None
        out: dict = {}
        arrays = set()
        try:
            for name, value in form.multi_items():
                key = name[:-2] if name.endswith("[]") else name  # OpenAI's clients send lists as key[]
                if isinstance(value, UploadFile):
                    value = Upload(value.filename or "", await value.read())
                if name.endswith("[]") and (key in arrays or key not in out):
                    arrays.add(key)
                    out.setdefault(key, []).append(value)
                elif key in out:
                    raise bad(f"field {key!r} is given more than once")
                else:
                    out[key] = value
        finally:
            await form.close()
        for key in arrays:  # one picture per request: image[] with one file is the picture
            if key in ("image", "mask"):
                if len(out[key]) != 1:
                    raise bad(f"give one {key} per request, got {len(out[key])}", "invalid_image")
                out[key] = out[key][0]
        return out

    async def openai_edit(self, request: Request):
        owner = self.owner(request)
        pipe = self.pipe()
        form = await self.form(request)
        params = await asyncio.to_thread(openai_edit_params, form, pipe, self.m.limits, self.m.settings)
        return await self.openai_answer(request, params, owner, pipe)

    async def openai_answer(self, request: Request, params, owner, pipe):
        """Run a synchronous OpenAI-style request and answer {"created", "data": [{"b64_json", ...}]}."""
        # not stored: the answer goes to this open connection, which a restart ends (the client sees it)
        job = self.submit(params, owner, durable=False)
        while not job.final:
            await self.m.wait_for_change(job, job.seq, 0.25)
            if not job.final and await request.is_disconnected():
                try:
                    self.m.cancel(job)
                except AlreadyFinished:
                    pass
                log.info("client went away: cancelled job %s", job.id)
                return Response(status_code=499)
        if job.status != "succeeded":
            if job.status == "cancelled":
                raise ApiError(409, "cancelled", f"job {job.id} was cancelled")
            raise ApiError(500, "generation_failed", f"job {job.id} failed: {job.error}")
        names = pipe.class_names
        data = [{"b64_json": base64.b64encode(png).decode("ascii"),
                 "revised_prompt": f"class {params.classes[k]} ({names[params.classes[k]]}), seed {params.seeds[k]}"}
                for k, png in enumerate(job.images)]
        return JSONResponse({"created": int(job.finished or time.time()), "data": data})


def create_app(manager: JobManager, api_keys: list[str] | None = None, backend: str = "auto",
               start_manager: bool = True) -> Starlette:
    """The ASGI app. With ``start_manager`` its lifespan starts the worker and stops it at shutdown."""
    srv = Server(manager, api_keys, backend=backend)

    def guarded(fn):
        async def endpoint(request: Request):
            try:
                response = await fn(request)
            except ApiError as e:
                response = _json_error(e)
            response.headers.update(SECURITY_HEADERS)
            return response
        return endpoint

    routes = [Route(path, guarded(srv.page_file), methods=["GET"]) for path in PAGE_FILES]
    routes += [
        Route("/favicon.ico", guarded(srv.favicon_file), methods=["GET"]),
        Route("/health", guarded(srv.health), methods=["GET"]),
        Route("/metrics", guarded(srv.metrics), methods=["GET"]),
        Route("/v1/capabilities", guarded(srv.capabilities), methods=["GET"]),
        Route("/v1/models", guarded(srv.models), methods=["GET"]),
        Route("/v1/openapi.json", guarded(srv.openapi_file), methods=["GET"]),
        Route("/v1/jobs", guarded(srv.create_job), methods=["POST"]),
        Route("/v1/jobs/{job_id}", guarded(srv.get_job), methods=["GET"]),
        Route("/v1/jobs/{job_id}/events", guarded(srv.job_events), methods=["GET"]),
        Route("/v1/jobs/{job_id}/cancel", guarded(srv.cancel_job), methods=["POST"]),
        Route("/v1/jobs/{job_id}/images/{k:int}.png", guarded(srv.job_image), methods=["GET"]),
        Route("/v1/images/generations", guarded(srv.openai_generate), methods=["POST"]),
        Route("/v1/images/edits", guarded(srv.openai_edit), methods=["POST"]),
    ]

    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = {404: f"no such endpoint: {request.method} {request.url.path[:200]} (see /v1/openapi.json)",
                   405: f"{request.method} is not allowed on {request.url.path[:200]}"}.get(exc.status_code,
                                                                                             str(exc.detail))
        response = _json_error(ApiError(exc.status_code, code, message, dict(exc.headers or {})))
        response.headers.update(SECURITY_HEADERS)
        return response

    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _json_error(ApiError(500, "internal_error", f"internal error ({type(exc).__name__}); the server "
                                    "keeps running"))

    @asynccontextmanager
    async def lifespan(app):
        if start_manager:
            manager.start()
        try:
            yield
        finally:
            if start_manager:
                await asyncio.to_thread(manager.stop)

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error},
                    lifespan=lifespan)
    app.state.server = srv
    return app
