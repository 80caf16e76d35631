"""`terdit-edge serve` end to end: a real uvicorn on 127.0.0.1 (port 0) with the bundled model, driven by httpx
and the official OpenAI client. Images are compared byte for byte with the Python API's."""
from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

REASON = "the server tests need the server extras: pip install '.[server-test]'"
pytest.importorskip("starlette", reason=REASON)
pytest.importorskip("uvicorn", reason=REASON)
httpx = pytest.importorskip("httpx", reason=REASON)

from PIL import Image  # noqa: E402

from terdit_edge.edit import EditSettings  # noqa: E402
from terdit_edge.frontends.server.jobs import JobManager, Limits  # noqa: E402
from terdit_edge.pipeline import Pipeline, to_uint8  # noqa: E402
from terdit_edge.pngmeta import generation_metadata, png_bytes  # noqa: E402
from terdit_edge.settings import GenerationSettings  # noqa: E402
from tests.conftest import child_env, model_metadata, random_model_tensors, small_config  # noqa: E402
from tests.server_util import LiveServer, bundled_manager  # noqa: E402

LONG = {"steps": 1000, "sampler": "ddpm"}  # >= 2 s of work (2 ms per model call): seen running, then cancelled
KEY1, KEY2 = "k1-0123456789abcdef", "k2-0123456789abcdef"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load()


@pytest.fixture(scope="module")
def server():
    s = LiveServer(bundled_manager(step_delay=0.002, max_queue=8, max_batch=8)).start()
    yield s
    s.stop()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def expected_pngs(pipe, cls, seeds, steps, sampler="ddpm", cfg=4.0, eta=0.0, interval=None) -> list[bytes]:
    """The PNGs the Python API gives for these parameters, with the CLI's metadata."""
    images = pipe([cls] * len(seeds), steps=steps, sampler=sampler, cfg_scale=cfg, eta=eta, seeds=seeds,
                  progress=False, guidance_interval=interval)
    meta = generation_metadata("digits.tdit", [cls] * len(seeds), seeds,
                               GenerationSettings(steps=steps, sampler=sampler, cfg_scale=cfg, eta=eta,
                                                  guidance_interval=interval))
    return [png_bytes(im, meta, k) for k, im in enumerate(images)]


def wait_final(client, job_id, headers=None) -> dict:
    """Follow the job's event stream to its end, then return its state."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200
        for _ in r.iter_lines():
            pass
    return client.get(f"/v1/jobs/{job_id}", headers=headers).json()


def events_of(client, job_id, until_step=None):
    """(name, data) of the job's SSE events, in order; stops at ``until_step`` if given."""
    out, name = [], None
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
                if until_step is not None and name == "step" and out[-1][1]["step"] >= until_step:
                    break
    return out


def submit(client, **body) -> dict:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def assert_json_error(r, status, *fragments):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert err["code"] and err["message"] and err["type"] in ("invalid_request_error", "server_error")
    for f in fragments:
        assert f.lower() in err["message"].lower(), (f, err["message"])


# -- service endpoints -------------------------------------------------------------------------------------


def test_service_endpoints(client, server):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    caps = client.get("/v1/capabilities").json()
    assert [c["name"] for c in caps["classes"]] == [str(i) for i in range(10)]
    assert caps["samplers"] == ["ddpm", "ddim", "dpm++2m", "unipc"] and caps["limits"]["max_batch"] == 8
    assert caps["image"] == {"width": 16, "height": 16, "channels": 1} and caps["backend"] and caps["auth"] is False
    assert caps["schedules"]["dpm++2m-5"] == 5 and set(caps["speed_presets"]) == {"exact", "balanced", "fast"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "digits" and models["data"][0]["object"] == "model"
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    names = {line.split("{")[0].split(" ")[0] for line in metrics.text.splitlines()
             if line and not line.startswith("#")}
    assert {"terdit_queue_depth", "terdit_jobs", "terdit_images_total", "terdit_step_seconds_sum",
            "terdit_seconds_per_step", "terdit_jobs_finished_total"} <= names


def test_openapi_file_ships_and_lists_every_route(client, server):
    spec = client.get("/v1/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    routes = {(r.path.replace("{k:int}", "{k}"), m.lower()) for r in server.app.routes for m in r.methods
              if m != "HEAD"}
    documented = {(p, m) for p, ops in spec["paths"].items() for m in ops}
    assert routes == documented
    # answers carry the fields the document marks required
    schemas = spec["components"]["schemas"]
    created = client.post("/v1/jobs", json={"class": 1, "steps": 2}).json()
    assert set(schemas["JobCreated"]["required"]) <= set(created)
    job = wait_final(client, created["id"])
    assert set(schemas["Job"]["required"]) <= set(job) and set(job) <= set(schemas["Job"]["properties"])
    # the request settings come from settings.py: a new one needs only its entry in openapi.json
    request_settings = set(GenerationSettings.json_fields(("sampling", "seed")))
    edit_settings = set(EditSettings.json_fields())  # an edit job's: terdit_edge.edit.EditSettings
    assert set(schemas["JobRequest"]["properties"]) == {"class", "n", "image", "mask"} | request_settings | edit_settings
    assert request_settings <= set(schemas["ImagesRequest"]["properties"])
    assert {"image", "mask", "prompt"} | request_settings | edit_settings <= set(schemas["ImagesEditRequest"]["properties"])
    err = client.get("/v1/jobs/none").json()
    assert set(schemas["Error"]["properties"]["error"]["required"]) <= set(err["error"])


def test_health_is_503_while_the_model_loads_and_jobs_wait_for_it():
    gate = threading.Event()

    def slow_loader():
        gate.wait(60)
        return Pipeline.load()

    s = LiveServer(JobManager(slow_loader, Limits(), model_name="digits.tdit")).start(wait_model=False)
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            assert_json_error(c.post("/v1/jobs", json={"class": 1}), 503, "loading")
            gate.set()
            assert s.manager.wait_ready(60)
            assert c.get("/health").status_code == 200
    finally:
        gate.set()
        s.stop()


# -- jobs ------------------------------------------------------------------------------------------------------


def test_job_events_in_order_and_images_identical_to_the_python_api(client, pipe):
    job = submit(client, **{"class": 7, "n": 2, "seed": 11, "steps": 24, "sampler": "ddim", "cfg_scale": 3.0})
    assert job["queue_position"] is not None and job["status_url"] == f"/v1/jobs/{job['id']}"
    events = events_of(client, job["id"])
    names = [n for n, _ in events]
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "done"
    assert set(names[2:-1]) == {"step"}
    steps = [d["step"] for n, d in events if n == "step"]
    assert steps == sorted(steps) and steps[-1] == 24
    previews = [d["preview"] for n, d in events if n == "step" and "preview" in d]
    assert len(previews) >= 1  # a finished job keeps its last preview (a live stream sees them all)
    im = Image.open(io.BytesIO(base64.b64decode(previews[-1].split(",", 1)[1])))
    assert im.size == (16, 16)
    state = client.get(job["status_url"]).json()
    assert state["status"] == "succeeded" and state["step"] == 24 and state["steps"] == 24
    assert state["error"] is None and state["eta_seconds"] == 0.0 and len(state["images"]) == 2
    want = expected_pngs(pipe, 7, [11, 12], 24, "ddim", 3.0)
    for k in range(2):
        r = client.get(f"/v1/jobs/{job['id']}/images/{k}.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == want[k]
        got = Image.open(io.BytesIO(r.content))
        assert got.text["class"] == "7" and got.text["seed"] == str(11 + k) and got.text["index"] == str(k)
        assert got.text["model"] == "digits.tdit" and got.text["sampler"] == "ddim" and got.text["steps"] == "24"
        ref = to_uint8(pipe([7], seeds=[11 + k], steps=24, sampler="ddim", cfg_scale=3.0, output="np", progress=False))
        assert np.array_equal(np.asarray(got), ref[0, :, :, 0])


def test_queued_jobs_with_the_same_settings_run_as_one_batch_and_match_solo_results(client, pipe):
    blocker = submit(client, **{"class": 0, **LONG})
    events_of(client, blocker["id"], until_step=1)  # the blocker runs; the next jobs queue behind it
    same = {"steps": 16, "sampler": "dpm++2m", "cfg_scale": 4.0, "guidance_interval": [100, 800]}
    jobs = [submit(client, **{"class": c, "n": n, "seed": s, **same}) for c, n, s in ((3, 1, 5), (8, 2, 40), (1, 3, 7))]
    odd = submit(client, **{"class": 2, "seed": 1, "steps": 16, "sampler": "dpm++2m"})  # no interval: own batch
    assert [j["queue_position"] for j in jobs] == [0, 1, 2]
    assert client.post(f"/v1/jobs/{blocker['id']}/cancel").json()["status"] == "cancelled"
    states = [wait_final(client, j["id"]) for j in jobs]
    assert all(s["status"] == "succeeded" and s["batch_images"] == 6 for s in states)
    assert wait_final(client, odd["id"])["batch_images"] == 1
    for (c, n, seed), job in zip(((3, 1, 5), (8, 2, 40), (1, 3, 7)), jobs):
        want = expected_pngs(pipe, c, [seed + k for k in range(n)], 16, "dpm++2m", interval=(100, 800))
        got = [client.get(f"/v1/jobs/{job['id']}/images/{k}.png").content for k in range(n)]
        assert got == want


def test_a_job_with_a_speed_preset_and_a_step_cache_gives_the_library_images(client, pipe):
    """Issue 24: the speed preset, guidance reuse and an adaptive step cache reach the sampler through a
    request; the snapshot says what ran; the images are the Python API's with the same settings."""
    job = submit(client, **{"class": 6, "n": 2, "seed": 3, "speed": "fast", "cache": "adaptive:0.2"})
    state = wait_final(client, job["id"])
    assert state["status"] == "succeeded" and state["speed"] == "fast" and state["schedule"] == "dpm++2m-5"
    assert state["cache"].startswith("adaptive:0.2,") and state["guidance_reuse"].startswith("fixed:3,")
    images = pipe([6, 6], seeds=[3, 4], speed="fast", cache="adaptive:0.2", output="np", progress=False)
    for k in range(2):
        got = Image.open(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/images/{k}.png").content))
        assert got.text["speed"] == "fast" and got.text["steps"] == "5"
        assert np.array_equal(np.asarray(got), to_uint8(images)[k, :, :, 0])


def test_cancel_stops_a_running_job_within_one_step_and_the_worker_moves_on(client):
    job = submit(client, **{"class": 4, **LONG})
    nxt = submit(client, **{"class": 5, "steps": 8, "sampler": "ddim", "seed": 2})
    seen = events_of(client, job["id"], until_step=3)
    assert seen[-1][0] == "step"
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200
    state = r.json()
    assert state["status"] == "cancelled" and state["stopped_at_step"] < 1000
    assert state["stopped_at_step"] - state["cancel_requested_at_step"] <= 1
    tail = events_of(client, job["id"])
    assert tail[-1][0] == "cancelled" and all(d["step"] <= state["stopped_at_step"] for n, d in tail if n == "step")
    assert_json_error(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "already finished")
    # docs/server.md: 409 unless the job succeeded (it was a 404 for a cancelled job before issue 25)
    assert_json_error(client.get(f"/v1/jobs/{job['id']}/images/0.png"), 409, "cancelled")
    assert wait_final(client, nxt["id"])["status"] == "succeeded"
    assert client.get("/health").json()["status"] == "ok"


def test_cancel_a_queued_job(client):
    blocker = submit(client, **{"class": 0, **LONG})
    events_of(client, blocker["id"], until_step=1)
    queued = submit(client, **{"class": 6, "steps": 5})
    assert client.get(queued["status_url"]).json()["status"] == "queued"
    state = client.post(f"/v1/jobs/{queued['id']}/cancel").json()
    assert state["status"] == "cancelled" and state["stopped_at_step"] == 0
    assert [n for n, _ in events_of(client, queued["id"])] == ["queued", "cancelled"]
    assert client.post(f"/v1/jobs/{blocker['id']}/cancel").json()["status"] == "cancelled"


def test_an_internal_error_fails_the_job_not_the_server(client, server, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(server.manager.pipe, "decode", broken)
    job = submit(client, **{"class": 1, "steps": 3})
    state = wait_final(client, job["id"])
    assert state["status"] == "failed" and "decoder exploded" in state["error"]
    assert [n for n, _ in events_of(client, job["id"])][-1] == "error"
    monkeypatch.undo()
    assert client.get("/health").status_code == 200
    assert wait_final(client, submit(client, **{"class": 1, "steps": 3})["id"])["status"] == "succeeded"


# -- bad requests ---------------------------------------------------------------------------------------------

BAD_JOBS = [
    ({"n": 1}, "missing field 'class'"),
    ({"class": 12}, "out of range"),
    ({"class": "seven"}, "unknown class name"),
    ({"class": [1]}, "class must be"),
    ({"class": 1, "colour": "red"}, "unknown field"),
    ({"class": 1, "n": 0}, "n must be in"),
    ({"class": 1, "n": 17}, "n must be in"),
    ({"class": 1, "n": True}, "n must be an integer"),
    ({"class": 1, "steps": 0}, "at least 1"),
    ({"class": 1, "steps": 1001}, "at most 1000"),
    ({"class": 1, "steps": "fast"}, "steps must be"),
    ({"class": 1, "sampler": "euler"}, "unknown sampler"),
    ({"class": 1, "cfg_scale": -1}, "cfg_scale must be in"),
    ({"class": 1, "cfg_scale": "4"}, "finite number"),
    ({"class": 1, "eta": float("nan")}, "finite number"),
    ({"class": 1, "seed": -1}, "seed must be in"),
    ({"class": 1, "seed": 1, "seeds": [1]}, "not both"),
    ({"class": 1, "n": 2, "seeds": [1]}, "list of 2"),
    ({"class": 1, "seeds": ["a"]}, "every seed"),
    ({"class": 1, "guidance_interval": [5]}, "[lo, hi]"),
    ({"class": 1, "guidance_interval": [500, 100]}, "lo <= hi"),
    ({"class": 1, "sampler": 3}, "unknown sampler"),
]


@pytest.mark.parametrize("body,message", BAD_JOBS, ids=[m for _, m in BAD_JOBS])
def test_bad_job_requests_get_a_4xx_json_error(client, body, message):
    assert_json_error(client.post("/v1/jobs", content=json.dumps(body), headers={"content-type": "application/json"}),
                      400, message)


def test_bad_http_requests_get_4xx_json_errors_and_the_server_keeps_serving(client):
    post = lambda body, ct="application/json": client.post("/v1/jobs", content=body, headers={"content-type": ct})  # noqa: E731
    assert_json_error(post(b"{not json"), 400, "not valid json")
    assert_json_error(post(b"[1, 2]"), 400, "json object")
    assert_json_error(post(b""), 400, "empty")
    assert_json_error(post(b"class=1", "application/x-www-form-urlencoded"), 415, "json")
    assert_json_error(post(b'{"class": "' + b"x" * 20000 + b'"}'), 413, "over")
    assert_json_error(client.get("/v1/nothing"), 404, "no such endpoint")
    assert_json_error(client.get("/../../etc/passwd"), 404)
    assert_json_error(client.get("/ui/../openapi.json"), 404)
    assert_json_error(client.delete("/v1/jobs"), 405, "not allowed")
    assert_json_error(client.get("/v1/jobs/" + "a" * 100), 404, "no job")
    assert_json_error(client.get("/v1/jobs/nope/images/0.png"), 404, "no job")
    job = submit(client, **{"class": 2, "steps": 4})
    assert_json_error(client.get(f"/v1/jobs/{job['id']}/images/x.png"), 404)
    wait_final(client, job["id"])
    assert_json_error(client.get(f"/v1/jobs/{job['id']}/images/1.png"), 404, "images 0..0")
    assert client.get(f"/v1/jobs/{job['id']}/images/0.png").status_code == 200
    assert client.get("/health").json()["status"] == "ok"


def test_an_image_of_an_unfinished_job_is_409(client):
    job = submit(client, **{"class": 0, **LONG})
    assert_json_error(client.get(f"/v1/jobs/{job['id']}/images/0.png"), 409, "only once it has succeeded")
    client.post(f"/v1/jobs/{job['id']}/cancel")


def test_web_page_is_served_from_the_package_without_external_resources(client):
    for path, ctype in (("/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
        assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text
        assert "default-src 'self'" in r.headers["content-security-policy"]
    assert 'id="class-search"' in client.get("/").text


# -- OpenAI-compatible ------------------------------------------------------------------------------------------


def test_openai_client_generates_images_identical_to_the_python_api(server, pipe):
    openai = pytest.importorskip("openai", reason="the official OpenAI client tests need '.[server-test]'")
    oc = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in oc.models.list().data] == ["digits"]
    res = oc.images.generate(model="digits", prompt="class:3", n=2, response_format="b64_json", size="16x16",
                             extra_body={"seed": 21, "steps": 12, "sampler": "ddim"})
    assert isinstance(res, openai.types.ImagesResponse) and isinstance(res.created, int) and len(res.data) == 2
    want = expected_pngs(pipe, 3, [21, 22], 12, "ddim")
    assert [base64.b64decode(d.b64_json) for d in res.data] == want
    assert "seed 21" in res.data[0].revised_prompt
    res = oc.images.generate(prompt="9", response_format="b64_json", extra_body={"steps": 4})
    assert Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).text["class"] == "9"
    with pytest.raises(openai.BadRequestError) as e:
        oc.images.generate(prompt="a cat on a sofa", response_format="b64_json")
    assert "unknown class name" in str(e.value)


def test_openai_endpoint_bad_requests(client):
    gen = lambda **b: client.post("/v1/images/generations", json=b)  # noqa: E731
    assert_json_error(gen(n=1), 400, "prompt must be")
    assert_json_error(gen(prompt="1", response_format="url"), 400, "b64_json")
    assert_json_error(gen(prompt="1", size="1024x1024"), 400, "16x16")
    assert_json_error(gen(prompt="class:99"), 400, "out of range")
    assert_json_error(gen(prompt="1", n=100), 400, "n must be in")
    assert_json_error(gen(prompt="1", foo=1), 400, "unknown field")


def test_openai_request_is_cancelled_when_the_client_disconnects(server):
    m = server.manager
    before = m.stats()["finished_total"]["cancelled"]
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, read=0.5)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/images/generations", json={"prompt": "2", **LONG})
    deadline = time.monotonic() + 60  # a bounded wait for the server to notice, not a timing assertion
    while m.stats()["finished_total"]["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m.stats()["finished_total"]["cancelled"] == before + 1
    mine = [j for j in list(m._jobs.values()) if j.params.classes == (2,) and j.params.n_steps == 1000]
    assert mine[-1].status == "cancelled" and mine[-1].stopped_at_step < 1000


# -- limits and auth --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server():
    s = LiveServer(bundled_manager(step_delay=0.002, max_queue=2, keep_jobs=2, max_n=4)).start()
    yield s
    s.stop()


def test_full_queue_answers_429_with_retry_after(small_server):
    with httpx.Client(base_url=small_server.url, timeout=60) as c:
        blocker = submit(c, **{"class": 0, **LONG})
        events_of(c, blocker["id"], until_step=1)
        queued = [submit(c, **{"class": 1, "steps": 3}) for _ in range(2)]
        r = c.post("/v1/jobs", json={"class": 1, "steps": 3})
        assert_json_error(r, 429, "queue is full")
        assert int(r.headers["retry-after"]) >= 1
        assert_json_error(c.post("/v1/images/generations", json={"prompt": "1"}), 429, "queue is full")
        c.post(f"/v1/jobs/{blocker['id']}/cancel")
        assert all(wait_final(c, j["id"])["status"] == "succeeded" for j in queued)
        again = c.post("/v1/jobs", json={"class": 1, "steps": 3})
        assert again.status_code == 202
        # leave the shared server idle: the next test fills this queue (max 2) itself
        assert wait_final(c, again.json()["id"])["status"] == "succeeded"


def test_finished_jobs_are_kept_for_a_bounded_count_then_404(small_server):
    with httpx.Client(base_url=small_server.url, timeout=60) as c:
        ids = [submit(c, **{"class": 3, "steps": 2})["id"] for _ in range(2)]
        for i in ids:
            wait_final(c, i)
        ids += [submit(c, **{"class": 3, "steps": 2})["id"] for _ in range(2)]
        for i in ids[2:]:
            wait_final(c, i)
        assert_json_error(c.get(f"/v1/jobs/{ids[0]}"), 404, "no job")
        assert c.get(f"/v1/jobs/{ids[3]}").json()["status"] == "succeeded"
        assert small_server.manager.stats()["retained_jobs"] <= 2 + 2


def test_api_keys_guard_every_endpoint_but_health_and_jobs_belong_to_their_key():
    s = LiveServer(bundled_manager(step_delay=0.002), api_keys=[KEY1, KEY2]).start()
    h1, h2 = {"Authorization": f"Bearer {KEY1}"}, {"Authorization": f"Bearer {KEY2}"}
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            assert c.get("/health").status_code == 200
            assert c.get("/").status_code == 200  # the page itself holds no data; it asks for the key
            for method, path in (("GET", "/v1/capabilities"), ("GET", "/v1/models"), ("GET", "/metrics"),
                                 ("GET", "/v1/openapi.json"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x"),
                                 ("GET", "/v1/jobs/x/events"), ("POST", "/v1/jobs/x/cancel"),
                                 ("GET", "/v1/jobs/x/images/0.png"), ("POST", "/v1/images/generations"),
                                 ("POST", "/v1/images/edits")):
                r = c.request(method, path, json={"class": 1} if method == "POST" else None)
                assert_json_error(r, 401, "missing api key")
                assert r.headers["www-authenticate"] == "Bearer"
                assert_json_error(c.request(method, path, headers={"Authorization": "Bearer wrong-key-123456789"}),
                                  401, "invalid api key")
            assert c.get("/v1/capabilities", headers=h2).json()["auth"] is True
            r = c.post("/v1/jobs", json={"class": 1, **LONG}, headers=h1)
            assert r.status_code == 202
            jid = r.json()["id"]
            assert c.get(f"/v1/jobs/{jid}", headers=h1).status_code == 200
            assert_json_error(c.get(f"/v1/jobs/{jid}", headers=h2), 404, "another key")
            assert_json_error(c.get(f"/v1/jobs/{jid}/events", headers=h2), 404)
            assert_json_error(c.post(f"/v1/jobs/{jid}/cancel", headers=h2), 404)
            assert c.get(f"/v1/jobs/{jid}", headers=h1).json()["status"] in ("queued", "running")
            assert c.post(f"/v1/jobs/{jid}/cancel", headers=h1).json()["status"] == "cancelled"
            r = c.post("/v1/jobs", json={"class": 2, "steps": 3}, headers=h2)
            assert wait_final(c, r.json()["id"], headers=h2)["status"] == "succeeded"
            assert c.get(f"/v1/jobs/{r.json()['id']}/images/0.png", headers=h2).status_code == 200
    finally:
        s.stop()


def test_unknown_class_names_list_close_names(tmp_path):
    """A model whose file stores class names: a misspelt name gets suggestions, a name resolves."""
    from terdit_edge.format import write_tdit

    names = ["tabby cat", "tiger cat", "golden retriever", "goldfish", "tiger", "zebra", "lion", "sofa", "teapot",
             "violin"]
    cfg = small_config(latent=False, in_channels=1, guided_channels=1)
    path = tmp_path / "named.tdit"
    write_tdit(path, random_model_tensors(cfg), {**model_metadata(cfg), "class_names": json.dumps(names)})
    s = LiveServer(JobManager(lambda: Pipeline.load(path), Limits(), model_name="named.tdit")).start()
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            assert_json_error(c.post("/v1/jobs", json={"class": "tigr cat"}), 400, "did you mean", "tiger cat")
            r = c.post("/v1/images/generations", json={"prompt": "golden retriever", "steps": 2, "seed": 0})
            assert r.status_code == 200
            assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).text["class"] == "2"
    finally:
        s.stop()


# -- the command ------------------------------------------------------------------------------------------------


def test_serve_command_starts_answers_and_stops_on_sigint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "terdit_edge.frontends.cli", "serve", "--port", "0", "--log-level",
                             "warning", "--state-dir", str(tmp_path / "state")],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=child_env())
    try:
        line = proc.stderr.readline()
        assert "listening on http://127.0.0.1:" in line, line
        url = line.split("listening on ")[1].split(" ")[0]
        with httpx.Client(base_url=url, timeout=60) as c:
            deadline = time.monotonic() + 60
            while c.get("/health").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            r = c.post("/v1/images/generations", json={"prompt": "4", "steps": 5, "seed": 3})
            assert r.status_code == 200 and len(r.json()["data"]) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_serve_command_errors_are_clear(tmp_path):
    from terdit_edge.frontends.cli import main

    empty = tmp_path / "keys.txt"
    empty.write_text("# no keys\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "terdit_edge.frontends.cli", "serve", *a], capture_output=True,  # noqa: E731
                                    text=True, cwd=tmp_path, timeout=120, env=child_env())
    r = run("--api-key-file", str(empty))
    assert r.returncode == 1 and "holds no key" in r.stderr
    r = run("--api-key-file", str(tmp_path / "missing.txt"))
    assert r.returncode == 1 and "cannot read the API key file" in r.stderr
    r = run(str(tmp_path / "none.tdit"))
    assert r.returncode == 1 and "does not exist" in r.stderr
    with pytest.raises(SystemExit) as e:
        main(["serve", "--max-batch", "0"])
    assert e.value.code == 2


def test_non_loopback_host_without_a_key_warns(monkeypatch, capsys):
    import argparse

    import uvicorn

    from terdit_edge.frontends.server import main as server_main

    assert server_main._is_loopback("127.0.0.1") and server_main._is_loopback("::1")
    assert server_main._is_loopback("localhost") and not server_main._is_loopback("0.0.0.0")
    bound = []
    monkeypatch.setattr(server_main, "bind_socket", lambda host, port: bound.append(host) or
                        server_main.socket.create_server(("127.0.0.1", 0)))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    args = argparse.Namespace(model=None, host="0.0.0.0", port=0, api_key_file=None, max_queue=4, max_batch=2,
                              max_n=2, max_steps=10, keep_seconds=1.0, keep_jobs=1, batch_wait_ms=0.0, threads=None,
                              backend="auto", activations="fp32", log_level="warning", access_log=False,
                              ephemeral=True, state_dir=None)
    assert server_main.serve_command(args) == 0
    assert bound == ["0.0.0.0"]
    assert "WARNING: listening on 0.0.0.0" in capsys.readouterr().err


def test_the_server_modules_never_import_torch(tmp_path):
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('torch is blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import terdit_edge.frontends.server.app, terdit_edge.frontends.server.main, terdit_edge.frontends.server.jobs\n"
            "from terdit_edge.frontends.server.main import build\n"
            "m, app = build()\n"
            "m.start(); assert m.wait_ready(60) and m.state == 'ready', m.load_error; m.stop()\n"
            "assert not [k for k in sys.modules if k == 'torch' or k.startswith('torch.')]\n")
    # outside the repository, without it on PYTHONPATH: the installed package (tests/conftest.py)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=child_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
