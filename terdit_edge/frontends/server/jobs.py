"""Jobs, the queue and the one worker thread that owns the pipeline (no web framework in here).

The worker loads the model, then repeatedly takes the oldest queued job plus every later queued job
with the same settings (:meth:`GenerationSettings.batch_key`; up to ``max_batch`` images in all), and samples them in one
``Pipeline.latents`` call. Per-image seeds and batch invariance make each image byte-identical to
the same request run alone. Progress, previews and cancellation go through the pipeline's
per-step callback: a cancelled job is final at the end of the step in progress; when every job of
a batch is cancelled the callback raises and the batch stops there, freeing the worker for the next.

Everything shared between the worker and the web threads is guarded by one lock; web code waits
for changes through :meth:`JobManager.wait_for_change` (asyncio events set thread-safely).

With a :class:`~.store.JobStore` (``serve`` without ``--ephemeral``) every accepted job is written
to disk before it is answered, and so is each change of its status; on start the manager takes back
the stored jobs: finished ones are served until their TTL, queued and interrupted ones run again
(``restarts`` counts the restarts a job went through; a ``resumed`` event says it came back). Event
ids keep growing across restarts (a job's ids start at ``restarts * RESTART_SEQ`` after a restart),
so a client that reconnects with ``Last-Event-ID`` misses nothing.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import math
import os
import secrets
import threading
import time
import traceback
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from ...edit import EditSettings
from ...errors import TerditError
from ...settings import GenerationSettings

log = logging.getLogger("terdit_edge.server")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINAL = frozenset((SUCCEEDED, FAILED, CANCELLED))
RESTART_SEQ = 1_000_000_000  # event ids of a job after its r-th restart start above r * RESTART_SEQ


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("queue full")
        self.retry_after = retry_after


class NotReady(Exception):
    """The model is still loading or failed to load."""


class AlreadyFinished(Exception):
    pass


class StoreFailed(Exception):
    """The job could not be written to the store (disk full, I/O error): it is not accepted."""


@dataclass(frozen=True)
class EditInput:
    """The input of an edit job: the picture as PNG bytes, already converted and fitted to the
    model's size (:func:`terdit_edge.edit.fitted_image`: the same values as the upload gives), the
    mask likewise (mode L; None: image-to-image), and the edit settings resolved for the mask."""

    image: bytes
    mask: bytes | None
    settings: EditSettings

    @property
    def has_mask(self) -> bool:
        return self.mask is not None

    @property
    def mode(self) -> str:
        return "inpainting" if self.has_mask else "image-to-image"

    def batch_key(self) -> tuple:
        """Edits with equal keys (and equal generation settings) are sampled together; the
        pictures themselves may differ (each row has its own)."""
        s = self.settings
        return ("edit", self.mode, s.strength) + ((s.mask_blur, s.resample_jumps, s.jump_length)
                                                  if self.has_mask else ())

    def public(self) -> dict:
        """What a job's JSON says about its edit (the pictures are not echoed)."""
        s = self.settings
        d = {"mode": self.mode, "strength": s.strength, "fit": s.fit}
        if self.has_mask:
            d.update(mask_blur=s.mask_blur, resample_jumps=s.resample_jumps, jump_length=s.jump_length)
        return d


@dataclass(frozen=True)
class JobParams:
    """A validated request: standard class ids and seeds, one per image, and the settings (without
    seeds: ``seeds`` holds them resolved); ``edit``: the input of an edit job (None: generation)."""

    classes: tuple
    seeds: tuple
    settings: GenerationSettings = GenerationSettings()
    edit: EditInput | None = None

    @property
    def n(self) -> int:
        return len(self.classes)

    @property
    def n_steps(self) -> int:
        """Denoising steps per image (an edit runs the last ones of the schedule, RePaint repeats)."""
        if self.edit is None:
            return self.settings.n_steps
        return self.edit.settings.model_steps(self.settings.n_steps, self.edit.has_mask)

    def batch_key(self) -> tuple:
        key = self.settings.batch_key()
        return key if self.edit is None else key + (self.edit.batch_key(),)


@dataclass
class Limits:
    max_queue: int = 32
    max_batch: int = 8
    max_n: int = 16
    max_steps: int = 1000
    max_body_bytes: int = 16 * 1024
    max_upload_bytes: int = 16 * 1024 * 1024  # the body of an edit request (JSON with base64 pictures, or multipart)
    max_image_pixels: int = 4096 * 4096  # pixels of an uploaded picture or mask
    keep_seconds: float = 600.0
    keep_jobs: int = 256
    batch_wait: float = 0.02  # seconds the worker waits for more jobs to fill a batch that is not full
    step_event_interval: float = 0.1  # a job's plain step events are at least this many seconds apart
    preview_interval: float = 0.25  # a job's step events carry a preview at least this many seconds apart


@dataclass
class Job:
    id: str
    owner: object
    params: JobParams
    created: float
    status: str = QUEUED
    step: int = 0
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    images: list = field(default_factory=list)  # PNG bytes, one per image, once succeeded
    events: list = field(default_factory=list)  # (seq, name, data)
    seq: int = 0
    cancel_requested: bool = False
    cancel_requested_at_step: int | None = None  # the step the job had reached when the cancel arrived
    batch_images: int | None = None  # images sampled together with this job's (its batch), once running
    total_steps: int = 0  # sampler steps the job's images take: steps x sub-batches for a job over max_batch
    stopped_at_step: int | None = None
    durable: bool = False  # kept in the store (POST /v1/jobs with a store; not synchronous requests)
    restarts: int = 0  # server restarts this job went through before it finished
    server_id: str = ""  # the model identity it was accepted under (see JobManager.server_id)

    @property
    def final(self) -> bool:
        return self.status in FINAL


def _preview_png(x: np.ndarray, latent: bool) -> str:
    """A data: URL of a small PNG of one image's current state x (C, H, W): the pixels for pixel
    models; a min-max normalised view of the first (up to 3) channels for latent models."""
    from PIL import Image

    if latent:
        v = x[:3]
        lo, hi = float(v.min()), float(v.max())
        v = (v - lo) / (hi - lo + 1e-6)
    else:
        v = np.clip((x + 1) / 2, 0, 1)
    arr = (v.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr if arr.shape[2] == 3 else arr[:, :, 0])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _BatchCancelled(Exception):
    pass


class JobManager:
    """Owns the queue, the retained jobs and the worker thread.

    ``loader()`` returns the Pipeline; it runs on the worker thread, so the web server answers
    (``/health`` says 503 loading) while the model loads.
    """

    def __init__(self, loader, limits: Limits | None = None, model_name: str = "model",
                 settings: GenerationSettings | None = None, store=None):
        self._loader = loader
        self.store = store  # a JobStore, or None: jobs live in memory only (--ephemeral)
        self.server_id = ""  # hash of the model file's digest and the model settings, once loaded
        self._interrupt = False  # a clean stop with a store: the batch stops, its jobs stay queued on disk
        self.limits = limits or Limits()
        self.model_name = model_name
        self.settings = settings or GenerationSettings()  # the model settings; requests set the others
        self.pipe = None
        self.state = "loading"  # loading | ready | failed
        self.load_error: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: list[Job] = []
        self._waiters: dict[str, set] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        # metrics
        self.counts = {s: 0 for s in (SUCCEEDED, FAILED, CANCELLED)}
        self.images_total = 0
        self.jobs_total = 0
        self.batches_total = 0
        self.step_seconds_sum = 0.0
        self.step_seconds_count = 0
        self.seconds_per_step: float | None = None  # moving average over recent batch steps
        self._batch_remaining_steps = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self.store is not None:
            with self._lock:
                self._restore()
        self._thread = threading.Thread(target=self._main, name="terdit-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            if self.store is None:
                for job in list(self._queue) + self._running:
                    job.cancel_requested = True
            else:  # they are on disk: the next start runs them (the running batch starts over then)
                self._interrupt = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.store is not None:
            with self._lock:
                self.store.close()
                self.store = None

    def _restore(self) -> None:
        """Take back the stored jobs (at start, before the model loads: their ids answer at once)."""
        now = time.time()
        expired = []
        for r in self.store.load():
            if r["status"] in FINAL and (r["finished"] or 0) + self.limits.keep_seconds < now:
                expired.append(r["id"])
                continue
            settings = GenerationSettings.from_json(r["settings"])
            edit = None
            if r["edit"] is not None:
                edit = EditInput(r["edit_image"], r["edit_mask"], EditSettings.from_json(r["edit"]))
            job = Job(id=r["id"], owner=r["owner"], created=r["created"], status=r["status"],
                      params=JobParams(tuple(r["classes"]), tuple(r["seeds"]), settings, edit),
                      total_steps=r["total_steps"], durable=True, restarts=r["restarts"], server_id=r["server_id"],
                      started=r["started"], finished=r["finished"], error=r["error"], step=r["step"],
                      stopped_at_step=r["stopped_at_step"], cancel_requested_at_step=r["cancel_requested_at_step"])
            job.cancel_requested = r["cancel_requested_at_step"] is not None
            self._jobs[job.id] = job
            if job.final:
                job.images = r["images"]
                job.seq = job.restarts * RESTART_SEQ
                self._emit(job, {SUCCEEDED: "done", CANCELLED: "cancelled"}.get(job.status, "error"),
                           {"status": job.status, **({"images": len(job.images)} if job.status == SUCCEEDED
                                                     else {"error": job.error} if job.status == FAILED else
                                                     {"step": job.step})})
                continue
            was = job.status
            job.restarts += 1
            job.seq = job.restarts * RESTART_SEQ
            job.status, job.started, job.step = QUEUED, None, 0
            if job.cancel_requested:  # acknowledged before the restart: it stays cancelled
                self._finish(job, CANCELLED)
                continue
            self._queue.append(job)
            self.store.requeued(job)
            self._emit(job, "resumed", {"restarts": job.restarts, "was": was,
                                        "queue_position": len(self._queue) - 1})
        self.store.delete(expired)
        if self._queue:
            log.info("resumed %d stored job(s) after a restart", len(self._queue))

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def _main(self) -> None:
        try:
            pipe = self._loader()
        except Exception as e:  # noqa: BLE001 - any load failure is reported by /health, not raised
            log.error("loading the model failed: %s", e)
            with self._lock:
                self.state, self.load_error = "failed", f"{type(e).__name__}: {e}"
            self._ready.set()
            return
        with self._lock:
            self.pipe, self.state = pipe, "ready"
            self.server_id = _server_id(pipe, self.settings)
            for job in list(self._queue):
                if job.server_id and job.server_id != self.server_id:  # its images would be another model's
                    self._queue.remove(job)
                    self._finish(job, FAILED, error="the server was restarted with another model file or model "
                                 "settings than this job was accepted for; submit it again")
        self._ready.set()
        while True:
            with self._lock:
                while not self._queue and not self._stop:
                    self._wake.wait()
                if self._stop:
                    if self.store is None:
                        for job in list(self._queue):
                            self._finish(job, CANCELLED, error="the server is shutting down")
                    self._queue.clear()
                    return
                self._gather()
                if self._stop or not self._queue:
                    continue
                batch = self._take_batch()
            self._run_batch(batch)

    # -- submitting, looking up, cancelling (web threads) --------------------------------------------

    def submit(self, params: JobParams, owner=None, durable: bool = True) -> Job:
        """Queue a job. ``durable``: keep it in the store (when there is one) before returning."""
        with self._lock:
            if self.state != "ready":
                raise NotReady(self.state)
            self._purge()
            if len(self._queue) >= self.limits.max_queue:
                raise QueueFull(self._retry_after())
            job = Job(id=secrets.token_urlsafe(12), owner=owner, params=params, created=time.time(),
                      total_steps=params.n_steps * math.ceil(params.n / self.limits.max_batch),
                      durable=durable and self.store is not None, server_id=self.server_id)
            if job.durable:
                try:
                    self.store.add(job, self.server_id)
                except Exception as e:  # noqa: BLE001 - sqlite3 / OS errors: the job is refused, not lost later
                    log.error("cannot store job: %s", e)
                    raise StoreFailed(str(e)) from None
            self._jobs[job.id] = job
            self._queue.append(job)
            self.jobs_total += 1
            self._emit(job, "queued", {"queue_position": len(self._queue) - 1})
            self._wake.notify_all()
            return job

    def get(self, job_id: str, owner=None, check_owner: bool = False) -> Job | None:
        with self._lock:
            self._purge()
            job = self._jobs.get(job_id)
            if job is None or (check_owner and job.owner != owner):
                return None
            return job

    def cancel(self, job: Job) -> None:
        """Ask a job to stop: a queued job is cancelled now, a running one at the end of its step."""
        with self._lock:
            if job.final:
                raise AlreadyFinished(job.status)
            job.cancel_requested = True
            job.cancel_requested_at_step = job.step
            self._store("cancel_requested", job)
            if job.status == QUEUED:
                self._queue.remove(job)
                self._finish(job, CANCELLED)

    def snapshot(self, job: Job) -> dict:
        """The job's public state (GET /v1/jobs/{id})."""
        with self._lock:
            p = job.params
            settings = {k: v for k, v in p.settings.to_json().items()
                        if k in GenerationSettings.json_fields(("sampling",)) and k != "steps"}
            d = {"id": job.id, "status": job.status, "step": job.step, "steps": job.total_steps,
                 "queue_position": self._position(job), "eta_seconds": self._eta(job), "error": job.error,
                 "n": p.n, "classes": list(p.classes), "seeds": list(p.seeds), **settings,
                 "steps_spec": p.settings.step_spec, "created": job.created, "started": job.started,
                 "finished": job.finished,
                 "batch_images": job.batch_images, "cancel_requested": job.cancel_requested,
                 "restarts": job.restarts, "durable": job.durable}
            if job.stopped_at_step is not None:
                d["stopped_at_step"] = job.stopped_at_step
            if job.cancel_requested_at_step is not None:
                d["cancel_requested_at_step"] = job.cancel_requested_at_step
            if p.edit is not None:
                d["edit"] = p.edit.public()
            return d

    def events_after(self, job: Job, seq: int) -> tuple[list, bool]:
        """Events with a sequence number above ``seq`` and whether the job is final."""
        with self._lock:
            return [e for e in job.events if e[0] > seq], job.final

    async def wait_for_change(self, job: Job, seen_seq: int, timeout: float) -> None:
        """Return when the job has an event after ``seen_seq`` (or is final), or after ``timeout`` s."""
        loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        entry = (loop, ev)
        with self._lock:
            if job.seq > seen_seq or job.final:
                return
            self._waiters.setdefault(job.id, set()).add(entry)
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                ws = self._waiters.get(job.id)
                if ws is not None:
                    ws.discard(entry)
                    if not ws:
                        del self._waiters[job.id]

    def stats(self) -> dict:
        with self._lock:
            by_state = {s: 0 for s in STATES}
            for job in self._jobs.values():
                by_state[job.status] += 1
            return {"queue_depth": len(self._queue), "running_jobs": len(self._running), "jobs_by_state": by_state,
                    "jobs_total": self.jobs_total, "finished_total": dict(self.counts),
                    "images_total": self.images_total, "batches_total": self.batches_total,
                    "step_seconds_sum": self.step_seconds_sum, "step_seconds_count": self.step_seconds_count,
                    "seconds_per_step": self.seconds_per_step, "retained_jobs": len(self._jobs)}

    # -- internals (called with the lock held unless said otherwise) -----------------------------------

    def _position(self, job: Job) -> int | None:
        if job.status != QUEUED:
            return None
        for i, j in enumerate(self._queue):
            if j is job:
                return i
        return None

    def _eta(self, job: Job) -> float | None:
        sps = self.seconds_per_step
        if sps is None or job.final:
            return 0.0 if job.final else None
        if job.status == RUNNING:
            return round(self._batch_remaining_steps * sps, 3)
        pos = self._position(job) or 0
        ahead = self._batch_remaining_steps + sum(j.total_steps for j in list(self._queue)[:pos])
        return round((ahead + job.total_steps) * sps, 3)

    def _retry_after(self) -> int:
        sps = self.seconds_per_step or 0.05
        steps = self._batch_remaining_steps + (self._queue[0].total_steps if self._queue else 0)
        return max(1, math.ceil(steps * sps))

    def _store(self, what: str, *args) -> None:
        """A store write for durable jobs (lock held). A failure is logged: the job goes on in memory."""
        if self.store is None:
            return
        jobs = args[0] if isinstance(args[0], list) else [args[0]]
        if not any(j.durable for j in jobs):
            return
        try:
            if what == "started":
                self.store.started([j for j in jobs if j.durable])
            else:
                getattr(self.store, what)(*args)
        except Exception as e:  # noqa: BLE001 - the store is a copy of the state; serving goes on
            log.error("job store write (%s) failed: %s", what, e)

    def _purge(self) -> None:
        now = time.time()
        finished = sorted((j for j in self._jobs.values() if j.final), key=lambda j: j.finished or 0)
        excess = len(finished) - self.limits.keep_jobs
        dropped = []
        for j in finished:
            if excess > 0 or now - j.finished > self.limits.keep_seconds:
                del self._jobs[j.id]
                excess -= 1
                if j.durable:
                    dropped.append(j.id)
        if dropped and self.store is not None:
            try:
                self.store.delete(dropped)
            except Exception as e:  # noqa: BLE001 - retried at the next purge or start
                log.error("job store delete failed: %s", e)

    def _emit(self, job: Job, name: str, data: dict) -> None:
        job.seq += 1
        if name == "step" and "preview" not in data and job.events and job.events[-1][1] == "step" \
                and "preview" not in job.events[-1][2]:
            job.events[-1] = (job.seq, name, data)  # keep one plain step event: memory stays bounded
        else:
            job.events.append((job.seq, name, data))
        for loop, ev in self._waiters.get(job.id, ()):
            loop.call_soon_threadsafe(ev.set)

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.status, job.error, job.finished = status, error, time.time()
        previews = [k for k, e in enumerate(job.events) if "preview" in e[2]]
        for k in previews[:-1]:  # a retained job keeps its last preview only
            seq, name, data = job.events[k]
            job.events[k] = (seq, name, {key: v for key, v in data.items() if key != "preview"})
        self.counts[status] += 1
        if status == CANCELLED:
            job.stopped_at_step = job.step
        self._store("finished", job)
        if status == SUCCEEDED:
            self.images_total += len(job.images)
            self._emit(job, "done", {"status": status, "images": len(job.images)})
        elif status == CANCELLED:
            self._emit(job, "cancelled", {"status": status, "step": job.step})
        else:
            self._emit(job, "error", {"status": status, "error": error})

    def _compatible_images(self) -> int:
        key = self._queue[0].params.batch_key()
        return sum(j.params.n for j in self._queue if j.params.batch_key() == key)

    def _gather(self) -> None:
        """Wait up to ``batch_wait`` s for more jobs like the oldest one while its batch is not full:
        clients whose jobs finished together submit their next ones a few ms apart."""
        deadline = time.monotonic() + self.limits.batch_wait
        while self._queue and not self._stop and self._compatible_images() < self.limits.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)

    def _take_batch(self) -> list[Job]:
        head = self._queue[0]
        key, total = head.params.batch_key(), 0
        batch = []
        for job in list(self._queue):
            if job.params.batch_key() != key:
                continue
            if batch and total + job.params.n > self.limits.max_batch:
                continue
            batch.append(job)
            total += job.params.n
            if total >= self.limits.max_batch:
                break
        for job in batch:
            self._queue.remove(job)
            job.status, job.started, job.batch_images = RUNNING, time.time(), total
            self._emit(job, "started", {"batch_images": total})
        self._store("started", batch)
        self._running = batch
        self.batches_total += 1
        self._batch_remaining_steps = head.total_steps
        return batch

    # -- the worker's batch (runs without the lock, takes it for each update) -----------------------------

    def _run_batch(self, batch: list[Job]) -> None:
        pipe = self.pipe
        p = batch[0].params
        classes = [c for job in batch for c in job.params.classes]
        seeds = [s for job in batch for s in job.params.seeds]
        offsets, o = [], 0
        for job in batch:
            offsets.append(o)
            o += job.params.n
        one_batch = len(classes) <= self.limits.max_batch
        latent = bool(pipe.config.latent)
        t_last = [time.perf_counter()]
        t_event = [0.0]
        t_preview = [time.perf_counter()]

        def on_step(i: int, total: int, x: np.ndarray) -> None:
            now = time.perf_counter()
            dt, t_last[0] = now - t_last[0], now
            with self._lock:
                self.step_seconds_sum += dt
                self.step_seconds_count += 1
                self.seconds_per_step = dt if self.seconds_per_step is None else 0.8 * self.seconds_per_step + 0.2 * dt
                self._batch_remaining_steps = max(0, total - (i + 1))
                if self._interrupt:  # a clean stop with a store: the jobs run again at the next start
                    raise _BatchCancelled()
                live = []
                for job in batch:
                    if job.final:
                        continue
                    if job.cancel_requested:
                        job.step = i + 1
                        self._finish(job, CANCELLED)
                    else:
                        live.append(job)
                if not live:
                    raise _BatchCancelled()
                previews = i + 1 == total or now - t_preview[0] >= self.limits.preview_interval
                if previews:
                    t_preview[0] = now
                for job in live:
                    job.step = i + 1
                if not previews and now - t_event[0] < self.limits.step_event_interval:
                    return  # the step is in the job's state; its event is skipped (they are throttled)
                t_event[0] = now
            for job, off in zip(batch, offsets):
                if job not in live:
                    continue
                data = {"step": i + 1, "steps": total}
                if previews:
                    row = off if one_batch else 0
                    try:
                        data["preview"] = _preview_png(x[row], latent)
                    except Exception:  # noqa: BLE001 - a preview is never worth failing a job
                        log.exception("preview failed")
                with self._lock:
                    data["eta_seconds"] = round(self._batch_remaining_steps * (self.seconds_per_step or 0), 3)
                    self._emit(job, "step", data)

        try:
            if p.edit is None:
                lat = pipe.latents(classes, p.settings.replace(seeds=seeds), callback=on_step,
                                   batch_size=min(len(classes), self.limits.max_batch))
                # one image at a time, as Pipeline.__call__ decodes (same shapes, same bytes)
                self._deliver(batch, offsets, lambda i: pipe.decode(lat[i:i + 1])[0])
            else:
                out = _run_edit_batch(pipe, batch, classes, seeds, on_step, self.limits.max_batch)
                self._deliver(batch, offsets, lambda i: out[i])
        except _BatchCancelled:
            pass
        except TerditError as e:
            self._fail(batch, str(e))
        except Exception as e:  # noqa: BLE001 - an internal error fails the batch's jobs, never the server
            log.error("batch of %d job(s) failed:\n%s", len(batch), traceback.format_exc())
            self._fail(batch, f"internal error ({type(e).__name__}: {e})")
        finally:
            with self._lock:
                self._running = []
                self._batch_remaining_steps = 0

    def _deliver(self, batch: list[Job], offsets: list[int], image_at) -> None:
        """PNGs of every live job of the batch; ``image_at(i)``: row i's image, float (H, W, C) in [0, 1]."""
        from ...images import to_pil
        from ...pngmeta import generation_metadata, png_bytes

        pipe = self.pipe
        model_name = os.path.basename(pipe.path) if pipe.path else self.model_name
        for job, off in zip(batch, offsets):
            if job.final:
                continue
            p = job.params
            meta = generation_metadata(model_name, p.classes, p.seeds, p.settings)
            if p.edit is not None:
                meta.update(p.edit.settings.png_items(p.edit.has_mask))
            pngs = [png_bytes(to_pil(image_at(off + k)), meta, k) for k in range(p.n)]
            with self._lock:
                if job.final:
                    continue
                if job.cancel_requested:
                    self._finish(job, CANCELLED)
                    continue
                if self._interrupt:
                    continue
                job.images = pngs
                job.step = job.total_steps
                self._finish(job, SUCCEEDED)

    def _fail(self, batch: list[Job], message: str) -> None:
        with self._lock:
            for job in batch:
                if not job.final:
                    self._finish(job, FAILED, error=message)


def _run_edit_batch(pipe, batch: list[Job], classes: list, seeds: list, on_step, max_batch: int) -> np.ndarray:
    """The edited images (B, H, W, C) of a batch of compatible edit jobs: one Pipeline.edit /
    inpaint call with one picture (and mask) per image, as the Python API would be called."""
    from ...edit import run_edit

    p = batch[0].params
    images = [job.params.edit.image for job in batch for _ in range(job.params.n)]
    masks = [job.params.edit.mask for job in batch for _ in range(job.params.n)] if p.edit.has_mask else None
    return run_edit(pipe, images, classes, mask=masks, seeds=seeds, callback=on_step, output="np",
                    batch_size=min(len(classes), max_batch), **p.settings.sample_kwargs(),
                    **p.edit.settings.edit_kwargs(p.edit.has_mask))


def _server_id(pipe, settings: GenerationSettings) -> str:
    """What a stored job must have been accepted under to run again here: the model file's content
    and the model settings (its images would be another model's otherwise)."""
    h = hashlib.sha256()
    if pipe.path and os.path.exists(pipe.path):
        with open(pipe.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(b"no-file")
    h.update(json.dumps(settings.model_kwargs(), sort_keys=True, default=str).encode())
    return h.hexdigest()
