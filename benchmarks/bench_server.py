"""Load test of `terdit-edge serve` on loopback: many concurrent clients, random classes and seeds, some jobs
cancelled, some requests invalid. Checks that every accepted job ends in a final state (none lost or
duplicated), that every image equals its solo result from the Python API byte for byte, that valid
requests never get a 5xx, and that the server's RSS stays flat after the first batch; measures throughput,
latency and cancel latency. With --compare it runs the same plan against --max-batch 1 (one job at a time)
and against the batched server and prints the throughput ratio.

    python benchmarks/bench_server.py                            # 200 jobs, 16 clients, --max-batch 8
    python benchmarks/bench_server.py --compare                  # + the same load one job at a time
    python benchmarks/bench_server.py --jobs 40 --clients 8 --steps 20 --cancel-probe 3   # the CI smoke run

Needs the server extras (pip install ".[server-test]"). Exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from terdit_edge.pipeline import Pipeline
from terdit_edge.pngmeta import generation_metadata, png_bytes
from terdit_edge.settings import GenerationSettings

BAD_BODIES = [b"{broken", b"[]", json.dumps({"class": 99}).encode(), json.dumps({"class": "x", "steps": 5}).encode(),
              json.dumps({"class": 1, "steps": 0}).encode(), json.dumps({"class": 1, "sampler": "nope"}).encode(),
              json.dumps({"class": 1, "n": 1000}).encode(), json.dumps({"class": 1, "extra": True}).encode()]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(max_batch: int, max_queue: int, threads: int | None):
    cmd = [sys.executable, "-m", "terdit_edge.frontends.cli", "serve", "--port", "0", "--max-batch", str(max_batch),
           "--max-queue", str(max_queue), "--log-level", "warning", "--keep-jobs", "100000", "--keep-seconds", "3600",
           "--state-dir", tempfile.mkdtemp(prefix="terdit-bench-state-")]  # a fresh queue: no earlier run's jobs
    if threads:
        cmd += ["--threads", str(threads)]
    # the server runs the terdit_edge this process imported (`python -m` from a source checkout would
    # otherwise pick up the checkout, which may lack the compiled kernels of the installed package)
    import terdit_edge

    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(terdit_edge.__file__)))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=tempfile.gettempdir())
    line = proc.stderr.readline()
    if "listening on " not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    url = line.split("listening on ")[1].split(" ")[0]
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # drain its log
    with httpx.Client(base_url=url, timeout=30) as c:
        deadline = time.monotonic() + 120
        while True:
            try:
                if c.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become healthy")
            time.sleep(0.05)
    return proc, url


def make_plan(args):
    rng = random.Random(args.seed)
    settings = [{"steps": args.steps, "sampler": args.sampler, "cfg_scale": 4.0},
                {"steps": max(1, args.steps * 3 // 5), "sampler": "dpm++2m", "cfg_scale": 3.0}]
    plan = []
    for i in range(args.jobs):
        r = rng.random()
        kind = "invalid" if r < args.invalid else "cancel" if r < args.invalid + args.cancel else "normal"
        which = 0 if args.one_setting or rng.random() < 0.8 else 1
        body = {"class": rng.randrange(10), "seed": rng.randrange(2**31), "n": 1 if rng.random() < 0.75 else 2,
                **settings[which]}
        plan.append({"i": i, "kind": kind, "body": body, "bad": BAD_BODIES[i % len(BAD_BODIES)],
                     "cancel_after": rng.uniform(0.0, 0.05)})
    return plan


def run_load(url: str, plan, clients: int):
    todo: queue.Queue = queue.Queue()
    for p in plan:
        todo.put(p)
    results, lock = [], threading.Lock()

    def client():
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                try:
                    p = todo.get_nowait()
                except queue.Empty:
                    return
                res = {"i": p["i"], "kind": p["kind"]}
                t0 = time.perf_counter()
                if p["kind"] == "invalid":
                    r = c.post("/v1/jobs", content=p["bad"], headers={"content-type": "application/json"})
                    res.update(status=r.status_code, json_error="error" in r.json())
                    with lock:
                        results.append(res)
                    continue
                while True:
                    r = c.post("/v1/jobs", json=p["body"])
                    if r.status_code != 429:
                        break
                    res["throttled"] = res.get("throttled", 0) + 1
                    time.sleep(min(float(r.headers.get("retry-after", 1)), 0.5))
                res["submit_status"] = r.status_code
                if r.status_code != 202:
                    res["text"] = r.text[:300]
                    with lock:
                        results.append(res)
                    continue
                job = r.json()
                res["id"] = job["id"]
                if p["kind"] == "cancel":
                    time.sleep(p["cancel_after"])
                    tc = time.perf_counter()
                    rc = c.post(f"/v1/jobs/{job['id']}/cancel")
                    res.update(cancel_status=rc.status_code, cancel_seconds=time.perf_counter() - tc)
                    if rc.status_code == 200:
                        res["cancel_state"] = rc.json()
                else:  # follow the events to the end, as an app would
                    with c.stream("GET", f"/v1/jobs/{job['id']}/events") as ev:
                        res["events_status"] = ev.status_code
                        res["event_names"] = [ln[7:] for ln in ev.iter_lines() if ln.startswith("event: ")]
                st = c.get(f"/v1/jobs/{job['id']}")
                res["final"] = st.json()
                res["t_final"] = time.perf_counter()
                res["latency"] = res["t_final"] - t0
                if res["final"]["status"] == "succeeded":
                    res["pngs"] = [c.get(u).content for u in res["final"]["images"]]
                with lock:
                    results.append(res)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def cancel_probe(url: str, repeats: int, steps: int = 1000) -> dict:
    """Cancel a running long job ``repeats`` times: seconds until the cancel is answered (the job is then
    final) and steps run after the request arrived, with the server's seconds per step for scale."""
    answers, extra_steps = [], []
    rng = random.Random(1)
    with httpx.Client(base_url=url, timeout=120) as c:
        for _ in range(repeats):
            job = c.post("/v1/jobs", json={"class": rng.randrange(10), "steps": steps, "sampler": "ddpm"}).json()
            target = rng.randrange(5, 100)
            with c.stream("GET", f"/v1/jobs/{job['id']}/events") as ev:
                for line in ev.iter_lines():
                    if line.startswith("data: ") and json.loads(line[6:]).get("step", 0) >= target:
                        break
            t0 = time.perf_counter()
            r = c.post(f"/v1/jobs/{job['id']}/cancel")
            answers.append(time.perf_counter() - t0)
            st = r.json()
            assert st["status"] == "cancelled", st
            extra_steps.append(st["stopped_at_step"] - st["cancel_requested_at_step"])
            nxt = c.post("/v1/jobs", json={"class": 1, "steps": 2, "sampler": "ddim"}).json()  # the worker is free
            while c.get(f"/v1/jobs/{nxt['id']}").json()["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.005)
    sps = metrics(url).get("terdit_seconds_per_step", float("nan"))
    return {"cancel_probe_n": repeats, "cancel_probe_answer_median_ms": 1000 * statistics.median(answers),
            "cancel_probe_answer_min_ms": 1000 * min(answers), "cancel_probe_answer_max_ms": 1000 * max(answers),
            "cancel_probe_steps_after_request_max": max(extra_steps), "cancel_probe_seconds_per_step": sps}


def metrics(url: str) -> dict:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


def one_run(args, max_batch: int, plan, pipe, solo_cache) -> dict:
    proc, url = start_server(max_batch, args.max_queue, args.threads)
    rss, stop = [], threading.Event()

    def sample_rss():
        while not stop.is_set():
            rss.append((time.perf_counter(), rss_mb(proc.pid)))
            time.sleep(0.1)

    sampler_thread = threading.Thread(target=sample_rss, daemon=True)
    try:
        rss_idle = rss_mb(proc.pid)
        cpu0 = cpu_seconds(proc.pid)
        sampler_thread.start()
        t_start = time.perf_counter()
        results, wall = run_load(url, plan, args.clients)
        stop.set()
        sampler_thread.join()
        cpu = cpu_seconds(proc.pid) - cpu0
        m = metrics(url)
        probe = cancel_probe(url, args.cancel_probe) if args.cancel_probe else {}
    finally:
        stop.set()
        proc.terminate()
        proc.wait(30)

    accepted = [r for r in results if r.get("submit_status") == 202]
    ids = [r["id"] for r in accepted]
    lost = [r for r in accepted if r["final"]["status"] not in ("succeeded", "cancelled", "failed")]
    failed = [r for r in accepted if r["final"]["status"] == "failed"]
    server_errors = sum(1 for r in results if r.get("submit_status", r.get("status", 0)) >= 500
                        or r.get("cancel_status", 0) >= 500 or r.get("events_status", 0) >= 500)
    invalid = [r for r in results if r["kind"] == "invalid"]
    invalid_bad = [r for r in invalid if not (400 <= r["status"] < 500 and r["json_error"])]
    rejected_valid = [r for r in results if r["kind"] != "invalid" and r.get("submit_status") != 202]
    wrong, images = 0, 0
    for r in accepted:
        if r["final"]["status"] != "succeeded":
            continue
        f = r["final"]
        for k, got in enumerate(r["pngs"]):
            key = (f["classes"][k], f["seeds"][k], f["steps_spec"], f["sampler"], f["cfg_scale"])
            if key not in solo_cache:  # the solo result: this one image alone through the Python API
                im = pipe([key[0]], seeds=[key[1]], steps=key[2], sampler=key[3], cfg_scale=key[4], progress=False)[0]
                settings = GenerationSettings(steps=key[2], sampler=key[3], cfg_scale=key[4])
                meta = generation_metadata("digits.tdit", [key[0]], [key[1]], settings)
                solo_cache[key] = png_bytes(im, meta, 0)
            expected = png_bytes_reindexed(solo_cache[key], k)
            wrong += got != expected
            images += 1
    cancels = [r for r in accepted if r["kind"] == "cancel"]
    cancelled_running = [r for r in cancels if r.get("cancel_state", {}).get("started")
                         and r["cancel_state"]["status"] == "cancelled"]
    first_done = min((r["t_final"] for r in accepted), default=t_start)
    after_first = [v for t, v in rss if t >= first_done] or [v for _, v in rss]
    rss_series = [(round(t - t_start, 2), round(v, 1)) for t, v in rss]
    marks = [rss_series[min(len(rss_series) - 1, int(f * (len(rss_series) - 1)))][1] for f in (0, .25, .5, .75, 1)] \
        if rss_series else []
    succeeded = [r for r in accepted if r["final"]["status"] == "succeeded"]
    lat = [r["latency"] for r in succeeded]
    return {
        "max_batch": max_batch, "requests": len(results), "accepted": len(accepted), "unique_ids": len(set(ids)),
        "succeeded": len(succeeded), "cancelled": sum(r["final"]["status"] == "cancelled" for r in accepted),
        "failed": len(failed), "lost": len(lost), "duplicated": len(ids) - len(set(ids)),
        "server_submitted_total": m.get("terdit_jobs_submitted_total"),
        "server_finished_total": sum(v for k, v in m.items() if k.startswith("terdit_jobs_finished_total")),
        "invalid_requests": len(invalid), "invalid_not_4xx_json": len(invalid_bad),
        "valid_rejected": len(rejected_valid), "throttled_429": sum(r.get("throttled", 0) for r in results),
        "server_5xx": server_errors, "images": images, "wrong_images": wrong,
        "wall_s": wall, "images_per_s": images / wall, "server_cpu_s": cpu,
        "server_cpu_ms_per_image": 1000 * cpu / max(images, 1), "jobs_per_s": len(succeeded) / wall,
        "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95), "latency_max_s": max(lat, default=0),
        "cancel_requests": len(cancels), "cancelled_while_running": len(cancelled_running),
        "cancel_response_p50_s": pct([r["cancel_seconds"] for r in cancelled_running], 0.5),
        "cancel_response_max_s": max((r["cancel_seconds"] for r in cancelled_running), default=float("nan")),
        "cancel_steps_after_request_max": max((r["cancel_state"]["stopped_at_step"]
                                               - r["cancel_state"]["cancel_requested_at_step"]
                                               for r in cancelled_running), default=0),
        "batches": m.get("terdit_batches_total"), **probe,
        "rss_idle_mb": rss_idle, "rss_after_first_batch_mb": after_first[0] if after_first else float("nan"),
        "rss_end_mb": rss[-1][1] if rss else float("nan"), "rss_at_0_25_50_75_100pct_mb": marks,
        "rss_max_mb": max(v for _, v in rss) if rss else float("nan"),
    }


def png_bytes_reindexed(solo_png: bytes, k: int) -> bytes:
    """The solo PNG carries index 0; image k of a job carries index k (same pixels, same other keys)."""
    if k == 0:
        return solo_png
    import io

    from PIL import Image

    from terdit_edge.pngmeta import png_info

    im = Image.open(io.BytesIO(solo_png))
    text = dict(im.text)
    meta = {key: ([value] if key in ("class", "seed", "index") else value) for key, value in text.items()}
    meta["index"] = [k]
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=png_info(meta, 0))
    return buf.getvalue()


def check(r: dict, rss_tolerance_mb: float) -> list[str]:
    problems = []
    if r.get("cancel_probe_steps_after_request_max", 0) > 1:
        problems.append(f"a probed cancel ran {r['cancel_probe_steps_after_request_max']} steps after its request")
    for key in ("lost", "duplicated", "wrong_images", "server_5xx", "invalid_not_4xx_json", "valid_rejected", "failed"):
        if r[key]:
            problems.append(f"{key} = {r[key]}")
    if r["server_submitted_total"] != r["accepted"] or r["server_finished_total"] != r["accepted"]:
        problems.append(f"server counted {r['server_submitted_total']} submitted / {r['server_finished_total']} "
                        f"finished, clients {r['accepted']} accepted")
    if r["cancel_steps_after_request_max"] > 1:
        problems.append(f"a cancelled job ran {r['cancel_steps_after_request_max']} steps after its cancel")
    growth = r["rss_end_mb"] - r["rss_after_first_batch_mb"]
    if growth > rss_tolerance_mb:
        problems.append(f"server RSS grew {growth:.1f} MB after the first batch (tolerance {rss_tolerance_mb} MB)")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cancel", type=float, default=0.1, help="fraction of jobs cancelled (default 0.1)")
    ap.add_argument("--invalid", type=float, default=0.1, help="fraction of invalid requests (default 0.1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", action="store_true", help="also run the plan with --max-batch 1")
    ap.add_argument("--one-setting", action="store_true",
                    help="every job with the same sampler settings (default: 20%% use a second set)")
    ap.add_argument("--cancel-probe", type=int, default=0, metavar="N",
                    help="after the load, cancel N running 1000-step jobs and time the answers")
    ap.add_argument("--rss-tolerance-mb", type=float, default=24.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    plan = make_plan(args)
    pipe = Pipeline.load(threads=args.threads)
    solo = {}
    runs = []
    for mb in ([1, args.max_batch] if args.compare else [args.max_batch]):
        r = one_run(args, mb, plan, pipe, solo)
        runs.append(r)
        print(f"--max-batch {mb}: {r['succeeded']} jobs / {r['images']} images in {r['wall_s']:.2f} s = "
              f"{r['images_per_s']:.1f} images/s, server CPU {r['server_cpu_ms_per_image']:.1f} ms/image; "
              f"latency p50 {r['latency_p50_s']:.3f} s, p95 {r['latency_p95_s']:.3f} s; "
              f"{r['batches']:.0f} batches; cancelled {r['cancelled']} ({r['cancelled_while_running']} while running, "
              f"answer p50 {r['cancel_response_p50_s'] * 1000:.1f} ms, max {r['cancel_response_max_s'] * 1000:.1f} ms, "
              f"<= {r['cancel_steps_after_request_max']} step after the request); lost {r['lost']}, duplicated "
              f"{r['duplicated']}, wrong images {r['wrong_images']}, 5xx {r['server_5xx']}, invalid answered 4xx JSON "
              f"{r['invalid_requests'] - r['invalid_not_4xx_json']}/{r['invalid_requests']}, "
              f"429s {r['throttled_429']}; "
              f"RSS idle {r['rss_idle_mb']:.1f} MB, after first batch {r['rss_after_first_batch_mb']:.1f}, end "
              f"{r['rss_end_mb']:.1f}, max {r['rss_max_mb']:.1f} (at 0/25/50/75/100% of the run: "
              f"{', '.join(f'{v:.1f}' for v in r['rss_at_0_25_50_75_100pct_mb'])})", flush=True)
        if args.cancel_probe:
            print(f"  cancel probe: {r['cancel_probe_n']} running jobs cancelled, answered in median "
                  f"{r['cancel_probe_answer_median_ms']:.1f} ms (range {r['cancel_probe_answer_min_ms']:.1f}-"
                  f"{r['cancel_probe_answer_max_ms']:.1f}), at most {r['cancel_probe_steps_after_request_max']} step "
                  f"after the request; {1000 * r['cancel_probe_seconds_per_step']:.1f} ms per step", flush=True)
    if args.compare:
        print(f"batched (--max-batch {args.max_batch}) / one at a time: "
              f"{runs[1]['images_per_s'] / runs[0]['images_per_s']:.2f}x images/s, "
              f"{runs[0]['server_cpu_ms_per_image'] / runs[1]['server_cpu_ms_per_image']:.2f}x "
              "less server CPU per image")
    if args.json:
        print(json.dumps(runs, indent=1))
    problems = [f"--max-batch {r['max_batch']}: {p}" for r in runs for p in check(r, args.rss_tolerance_mb)]
    for p in problems:
        print("FAIL:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
