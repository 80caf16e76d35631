"""The durable job queue of `terdit-edge serve` (issue 25): SIGKILL with running and queued jobs,
restart, every accepted job's images with the same bytes; graceful restarts, TTL, the lock on the
state directory; and the server's other edges (nested JSON, --port range, /favicon.ico)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

REASON = "the server tests need the server extras: pip install '.[server-test]'"
pytest.importorskip("starlette", reason=REASON)
pytest.importorskip("uvicorn", reason=REASON)
httpx = pytest.importorskip("httpx", reason=REASON)

from terdit_edge.frontends.server.jobs import RESTART_SEQ, JobManager, JobParams, Limits  # noqa: E402
from terdit_edge.frontends.server.store import JobStore  # noqa: E402
from terdit_edge.settings import GenerationSettings  # noqa: E402
from tests.conftest import child_env  # noqa: E402

# the first job runs long enough to be killed while running (600 ddpm steps for 16 images); the others
# differ in settings, so each is a batch of its own and waits in the queue
RUNNING = {"class": 3, "n": 16, "steps": 600, "sampler": "ddpm", "seed": 11}
QUEUED = [{"class": c, "n": 2, "steps": 6 + c, "sampler": "ddim", "seed": 100 + c} for c in range(5)]


class Serve:
    """`terdit-edge serve` in a child process on a free port."""

    def __init__(self, tmp_path, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "terdit_edge.frontends.cli", "serve", "--port", "0",
                                      "--log-level", "warning", *args],
                                     stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=child_env())
        line = self.proc.stderr.readline()
        assert "listening on http://127.0.0.1:" in line, line + self.proc.stderr.read()
        self.url = line.split("listening on ")[1].split(" ")[0]
        self.client = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.monotonic() + 120
        while self.client.get("/health").status_code != 200:
            assert time.monotonic() < deadline and self.proc.poll() is None, "the server did not get ready"
            time.sleep(0.05)

    def kill(self, sig=signal.SIGKILL) -> int:
        self.client.close()
        self.proc.send_signal(sig)
        return self.proc.wait(60)


def wait_final(client, job_id) -> dict:
    while True:
        d = client.get(f"/v1/jobs/{job_id}").json()
        if d["status"] in ("succeeded", "failed", "cancelled"):
            return d
        time.sleep(0.05)


def images(client, d) -> list[bytes]:
    return [client.get(u).content for u in d["images"]]


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    """Every job's PNGs from a server nobody disturbs (an --ephemeral one)."""
    s = Serve(tmp_path_factory.mktemp("plain"), "--ephemeral", "--max-batch", "16")
    try:
        out = []
        for body in [RUNNING, *QUEUED]:
            r = s.client.post("/v1/jobs", json=body)
            assert r.status_code == 202
            d = wait_final(s.client, r.json()["id"])
            assert d["status"] == "succeeded"
            out.append(images(s.client, d))
        return out
    finally:
        s.kill(signal.SIGINT)


def test_sigkill_with_running_and_queued_jobs_loses_nothing(tmp_path, undisturbed):
    state = str(tmp_path / "state")
    s = Serve(tmp_path, "--state-dir", state, "--max-batch", "16")
    ids = []
    for body in [RUNNING, *QUEUED]:
        r = s.client.post("/v1/jobs", json=body)
        assert r.status_code == 202
        ids.append(r.json()["id"])
    while s.client.get(f"/v1/jobs/{ids[0]}").json()["step"] < 2:  # running, not near its end
        time.sleep(0.01)
    before = [s.client.get(f"/v1/jobs/{i}").json()["status"] for i in ids]
    assert before[0] == "running" and "queued" in before[1:]
    assert s.kill() == -signal.SIGKILL

    s2 = Serve(tmp_path, "--state-dir", state, "--max-batch", "16")
    try:
        first = s2.client.get(f"/v1/jobs/{ids[0]}").json()
        assert first["restarts"] == 1 and first["durable"]
        with s2.client.stream("GET", f"/v1/jobs/{ids[-1]}/events") as r:  # the client sees the job resume
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("event: done"):
                    break
        assert "event: resumed" in lines
        assert all(int(x[4:]) > RESTART_SEQ for x in lines if x.startswith("id: "))
        for job_id, expected in zip(ids, undisturbed):
            d = wait_final(s2.client, job_id)
            assert d["status"] == "succeeded", d
            assert images(s2.client, d) == expected  # the same bytes as the undisturbed run
    finally:
        assert s2.kill(signal.SIGINT) == 0

    # finished images stay retrievable after another (clean) restart, until their TTL
    s3 = Serve(tmp_path, "--state-dir", state)
    try:
        d = s3.client.get(f"/v1/jobs/{ids[1]}").json()
        assert d["status"] == "succeeded" and images(s3.client, d) == undisturbed[1]
    finally:
        s3.kill(signal.SIGINT)
    s4 = Serve(tmp_path, "--state-dir", state, "--keep-seconds", "0")
    try:
        r = s4.client.get(f"/v1/jobs/{ids[1]}")
        assert r.status_code == 404 and "--ephemeral" not in r.json()["error"]["message"]
    finally:
        s4.kill(signal.SIGINT)


def test_a_state_directory_serves_one_server_and_bad_serve_arguments(tmp_path):
    state = str(tmp_path / "state")
    s = Serve(tmp_path, "--state-dir", state)
    try:
        r = subprocess.run([sys.executable, "-m", "terdit_edge.frontends.cli", "serve", "--port", "0", "--state-dir",
                            state], capture_output=True, text=True, timeout=120, env=child_env())
        assert r.returncode == 1 and "in use by another `terdit-edge serve`" in r.stderr
    finally:
        s.kill(signal.SIGINT)
    run = lambda *a: subprocess.run([sys.executable, "-m", "terdit_edge.frontends.cli", "serve", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120, env=child_env())
    r = run("--port", "99999")
    assert r.returncode == 2 and "65535" in r.stderr
    r = run("--ephemeral", "--state-dir", state)
    assert r.returncode == 1 and "--ephemeral" in r.stderr and "Traceback" not in r.stderr


def _manager(store, load=None):
    from terdit_edge.pipeline import Pipeline

    return JobManager(load or (lambda: Pipeline.load()), Limits(), model_name="digits.tdit", store=store)


def test_a_clean_stop_keeps_its_jobs_and_a_changed_model_fails_them_clearly(tmp_path):
    m = _manager(JobStore(tmp_path / "s"))
    m.start()
    assert m.wait_ready(60)
    params = JobParams(classes=(1,), seeds=(5,), settings=GenerationSettings(steps=4, sampler="ddim"))
    with m._lock:
        m._interrupt = True  # as stop() does: the batch stops at its first step, its job is not finished
    job = m.submit(params)
    m.stop()
    assert not job.final  # a store keeps it for the next start (without a store it would be cancelled)
    m2 = _manager(JobStore(tmp_path / "s"))
    m2.start()
    assert m2.wait_ready(60)
    j2 = m2.get(job.id)
    deadline = time.monotonic() + 60
    while not j2.final and time.monotonic() < deadline:
        time.sleep(0.02)
    assert j2.status == "succeeded" and j2.restarts == 1
    assert any(name == "resumed" for _, name, _ in j2.events)
    m2.stop()

    # a job stored under another model identity is failed, not run with this model
    store = JobStore(tmp_path / "s")
    other = JobParams(classes=(2,), seeds=(6,), settings=GenerationSettings(steps=4, sampler="ddim"))
    from terdit_edge.frontends.server.jobs import Job
    foreign = Job(id="foreign-job", owner=None, params=other, created=time.time(), total_steps=4, durable=True)
    store.add(foreign, "0" * 64)
    m3 = _manager(store)
    m3.start()
    assert m3.wait_ready(60)
    j3 = m3.get("foreign-job")
    assert j3.status == "failed" and "another model file" in j3.error
    m3.stop()


def test_nested_json_is_a_400_and_favicon_exists(tmp_path):
    s = Serve(tmp_path, "--ephemeral")
    try:
        deep = "[" * 5000 + "]" * 5000
        for path in ("/v1/jobs", "/v1/images/generations"):
            r = s.client.post(path, content=deep, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
        r = s.client.get("/favicon.ico")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    finally:
        s.kill(signal.SIGINT)
        log = s.proc.stderr.read()
    assert "RecursionError" not in log and "Traceback" not in log


def test_edit_jobs_survive_sigkill_with_their_pictures_and_give_the_same_bytes(tmp_path):
    """Edit jobs are stored with their picture and mask: after a kill -9 the running inpainting and the
    queued image-to-image run again and give the Python API's bytes."""
    pytest.importorskip("multipart", reason=REASON)
    from terdit_edge.pipeline import Pipeline
    from tests.test_edit import a_three
    from tests.test_server_edit import b64, expected_edit, left_mask, png_of

    state = str(tmp_path / "state")
    running = {"class": 0, "n": 4, "seed": 21, "steps": 300, "sampler": "ddpm", "image": b64(png_of(a_three())),
               "mask": b64(png_of(left_mask())), "mask_blur": 0.5}
    queued = {"class": 8, "n": 2, "seed": 3, "steps": 10, "sampler": "ddim", "image": b64(png_of(a_three())),
              "strength": 0.7}
    s = Serve(tmp_path, "--state-dir", state)
    ids = []
    for body in (running, queued):
        r = s.client.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    while s.client.get(f"/v1/jobs/{ids[0]}").json()["step"] < 2:
        time.sleep(0.01)
    assert [s.client.get(f"/v1/jobs/{i}").json()["status"] for i in ids] == ["running", "queued"]
    assert s.kill() == -signal.SIGKILL

    s2 = Serve(tmp_path, "--state-dir", state)
    try:
        finals = [wait_final(s2.client, i) for i in ids]
        assert [d["status"] for d in finals] == ["succeeded", "succeeded"] and finals[0]["restarts"] == 1
        assert finals[0]["edit"]["mode"] == "inpainting" and finals[1]["edit"]["mode"] == "image-to-image"
        got = [images(s2.client, d) for d in finals]
    finally:
        assert s2.kill(signal.SIGINT) == 0
    pipe = Pipeline.load()
    assert got[0] == expected_edit(pipe, a_three(), 0, [21, 22, 23, 24], mask=left_mask(), steps=300,
                                   sampler="ddpm", mask_blur=0.5)
    assert got[1] == expected_edit(pipe, a_three(), 8, [3, 4], steps=10, sampler="ddim", strength=0.7)


def test_a_version_1_store_is_upgraded_and_keeps_its_jobs(tmp_path):
    import sqlite3

    from terdit_edge.frontends.server import store as store_module

    d = tmp_path / "s"
    d.mkdir()
    old_schema = store_module._SCHEMA.replace(",\n    edit TEXT,\n    edit_image BLOB,\n    edit_mask BLOB", "")
    assert "edit" not in old_schema
    db = sqlite3.connect(d / "jobs.sqlite3")
    db.executescript(old_schema)
    db.execute("INSERT INTO meta VALUES ('schema', '1')")
    db.execute("INSERT INTO jobs (id, owner, classes, seeds, settings, server_id, created, status, total_steps) "
               "VALUES ('old-job', NULL, '[4]', '[9]', ?, '', 1.0, 'queued', 5)",
               (json.dumps(GenerationSettings(steps=5, sampler="ddim").to_json()),))
    db.commit()
    db.close()
    m = _manager(JobStore(d))
    m.start()
    assert m.wait_ready(60)
    job = m.get("old-job")
    deadline = time.monotonic() + 60
    while not job.final and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.status == "succeeded" and job.params.edit is None and job.restarts == 1
    m.stop()
    db = sqlite3.connect(d / "jobs.sqlite3")
    assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == str(store_module.SCHEMA_VERSION)
    db.close()
