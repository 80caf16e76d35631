"""The server's job queue and worker without the web layer (no extras needed): batching rule, limits, expiry."""
from __future__ import annotations

import time

import pytest

from terdit_edge.frontends.server.jobs import CANCELLED, SUCCEEDED, JobManager, JobParams, Limits, QueueFull
from terdit_edge.pipeline import Pipeline
from terdit_edge.settings import GenerationSettings


def params(cls=0, n=1, seed=0, steps=10, sampler="ddim", cfg=4.0):
    return JobParams(classes=(cls,) * n, seeds=tuple(seed + k for k in range(n)),
                     settings=GenerationSettings(steps=steps, sampler=sampler, cfg_scale=cfg))


def idle_manager(**limits) -> JobManager:
    """A manager whose worker is not started: batches are taken by hand."""
    m = JobManager(lambda: None, Limits(**limits))
    m.state = "ready"
    return m


def test_a_batch_takes_later_jobs_with_the_same_settings_up_to_max_batch():
    m = idle_manager(max_batch=4)
    a = m.submit(params(1, n=2))
    b = m.submit(params(2, steps=20))           # other settings: not in a's batch
    c = m.submit(params(3, n=2))
    d = m.submit(params(4))                      # would exceed 4 images
    e = m.submit(params(5, cfg=1.0))             # other cfg
    with m._lock:
        batch = m._take_batch()
    assert batch == [a, c] and all(j.batch_images == 4 and j.status == "running" for j in batch)
    assert [j for j in m._queue] == [b, d, e]
    assert m.snapshot(b)["queue_position"] == 0 and m.snapshot(d)["queue_position"] == 1
    with m._lock:
        assert m._take_batch() == [b]
        assert m._take_batch() == [d]


def test_a_job_larger_than_max_batch_runs_alone():
    m = idle_manager(max_batch=2)
    big = m.submit(params(1, n=5))
    small = m.submit(params(2))
    with m._lock:
        assert m._take_batch() == [big]
        assert m._take_batch() == [small]


def test_queue_limit_and_cancel_of_a_queued_job():
    m = idle_manager(max_queue=2)
    a, b = m.submit(params()), m.submit(params())
    with pytest.raises(QueueFull) as e:
        m.submit(params())
    assert e.value.retry_after >= 1
    m.cancel(a)
    assert a.status == CANCELLED and a.stopped_at_step == 0 and [n for _, n, _ in a.events] == ["queued", "cancelled"]
    assert m.submit(params()) is not None and b.status == "queued"


def test_finished_jobs_expire_after_keep_seconds():
    m = JobManager(lambda: Pipeline.load(), Limits(keep_seconds=0.0, max_batch=4))
    m.start()
    try:
        assert m.wait_ready(60)
        job = m.submit(params(3, n=2, steps=4))
        deadline = time.monotonic() + 60  # a bounded wait, not a timing assertion
        while not job.final and time.monotonic() < deadline:
            time.sleep(0.01)
        assert job.status == SUCCEEDED and len(job.images) == 2
        assert m.get(job.id) is None  # kept 0 s: gone
    finally:
        m.stop()


def test_a_job_over_max_batch_counts_the_steps_of_all_its_sub_batches():
    m = JobManager(lambda: Pipeline.load(), Limits(max_batch=2))
    m.start()
    try:
        assert m.wait_ready(60)
        job = m.submit(params(4, n=3, steps=5))
        assert m.snapshot(job)["steps"] == 10  # two sub-batches (2 + 1 images) of 5 steps
        deadline = time.monotonic() + 60  # a bounded wait, not a timing assertion
        while not job.final and time.monotonic() < deadline:
            time.sleep(0.01)
        state = m.snapshot(job)
        assert state["status"] == SUCCEEDED and state["step"] == state["steps"] == 10 and len(job.images) == 3
        assert job.batch_images == 3
    finally:
        m.stop()
