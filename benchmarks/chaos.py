"""Chaos check (issue 25): kill a random worker, the sampling driver or the server at a random moment,
restart or resume, and compare every accepted job's output with an undisturbed run.

Each round picks one target at random:

* ``worker``: a `terdit-edge sample` job (local engine, 2 worker processes) loses one worker process
  (SIGKILL) at a random moment; the engine must re-run its units and finish by itself;
* ``driver``: the `terdit-edge sample` process itself is killed (SIGKILL, its workers with it) at a
  random moment, then the same command is run again (it resumes);
* ``server``: `terdit-edge serve --state-dir DIR` is killed (SIGKILL) at a random moment after it
  accepted a set of jobs (some running, some queued), then started again on the same state dir.

Then every accepted job's output is compared with an undisturbed run of the same work (the sampling
job's merged .npz; each server job's PNG files): **lost** (a job or sample that never comes back),
**wrong** (bytes differ) and **duplicated** (a sample index or image delivered twice). The check
exits 1 unless all three are 0.

    python benchmarks/chaos.py --rounds 60 --seed 1          # the figure in docs/reliability.md
    python benchmarks/chaos.py --rounds 6 --seed 0           # the short CI run (.ci/run)

Needs the server extras (pip install ".[server-test]").
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

SAMPLE = ["-n", "32", "--steps", "25", "--sampler", "ddim", "--shard-size", "4", "--batch-size", "2", "--threads", "1",
          "--no-progress"]
SERVER_JOBS = [{"class": c % 10, "n": 1 + c % 3, "steps": 50 + 25 * (c % 4), "sampler": ("ddim", "dpm++2m")[c % 2],
                "seed": 1000 + c} for c in range(8)]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "terdit_edge.frontends.cli", *args]


def child_env() -> dict:
    # the children run the terdit_edge this process imported (see bench_server.py)
    import terdit_edge

    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(terdit_edge.__file__)))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def kill_session(proc):
    """SIGKILL the process and everything in its session (the round's leftovers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


# -- sampling jobs ---------------------------------------------------------------------------------------------


def run_sample(out: str, workers: int = 2) -> subprocess.Popen:
    return subprocess.Popen(cli("sample", "--out", out, "--workers", str(workers), *SAMPLE), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def merged(out: str, tmp: str) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    path = os.path.join(tmp, "merged.npz")
    r = subprocess.run(cli("merge", out, "-o", path, "--no-progress"), capture_output=True, text=True,
                       env=child_env())
    if r.returncode != 0:
        return None, None, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
    with np.load(path) as z:
        return z["arr_0"], z["indices"], ""


def sample_round(kind: str, rng: random.Random, ref, duration: float, tmp: str) -> dict:
    out = os.path.join(tmp, "job")
    proc = run_sample(out)
    time.sleep(rng.uniform(0.0, duration))
    note = ""
    if kind == "worker":
        workers = [p for p in children(proc.pid) if _is_spawned_worker(p)]
        if workers and proc.poll() is None:
            os.kill(rng.choice(workers), signal.SIGKILL)
            note = "killed a worker"
        else:
            note = "the job had ended before the kill"
        try:
            _, err = proc.communicate(timeout=600)
        finally:
            kill_session(proc)
        if proc.returncode != 0:
            return {"lost": len(ref[0]), "wrong": 0, "duplicated": 0, "note": f"job failed: {err[-300:]}"}
    else:
        note = "killed the driver" if proc.poll() is None else "the job had ended before the kill"
        kill_session(proc)  # the driver and its workers
        again = run_sample(out)
        _, err = again.communicate(timeout=600)
        kill_session(again)
        if again.returncode != 0:
            return {"lost": len(ref[0]), "wrong": 0, "duplicated": 0, "note": f"resume failed: {err[-300:]}"}
    images, indices, why = merged(out, tmp)
    if images is None:
        return {"lost": len(ref[0]), "wrong": 0, "duplicated": 0, "note": f"merge failed: {why}"}
    uniq, counts = np.unique(indices, return_counts=True)
    lost = len(set(range(len(ref[0]))) - set(uniq.tolist()))
    duplicated = int((counts - 1).sum())
    wrong = 0
    if len(images) == len(ref[0]) and np.array_equal(indices, ref[1]):
        wrong = int(sum(not np.array_equal(a, b) for a, b in zip(images, ref[0])))
    else:
        wrong = len(ref[0]) - lost
    return {"lost": lost, "wrong": wrong, "duplicated": duplicated, "note": note}


def _is_spawned_worker(pid: int) -> bool:
    """A process-pool worker (not the resource tracker, also a spawned child)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"spawn_main" in cmd and b"resource_tracker" not in cmd


# -- the server --------------------------------------------------------------------------------------------------


class Server:
    def __init__(self, *args):
        self.proc = subprocess.Popen(cli("serve", "--port", "0", "--log-level", "warning", "--max-batch", "4", *args),
                                     env=child_env(), stderr=subprocess.PIPE, text=True, start_new_session=True,
                                     cwd=tempfile.gettempdir())
        line = self.proc.stderr.readline()
        if "listening on " not in line:
            raise SystemExit(f"the server did not start: {line}{self.proc.stderr.read()}")
        self.url = line.split("listening on ")[1].split(" ")[0]
        self.client = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("the server did not get ready")
            time.sleep(0.05)

    def kill(self):
        self.client.close()
        kill_session(self.proc)

    def results(self, ids) -> dict:
        """job id -> list of PNG bytes, or a string saying why there are none."""
        out = {}
        for job_id in ids:
            while True:
                r = self.client.get(f"/v1/jobs/{job_id}")
                if r.status_code != 200:
                    out[job_id] = f"HTTP {r.status_code}"
                    break
                d = r.json()
                if d["status"] in ("succeeded", "failed", "cancelled"):
                    out[job_id] = [self.client.get(u).content for u in d["images"]] if d["status"] == "succeeded" \
                        else d["status"]
                    break
                time.sleep(0.05)
        return out


def server_reference() -> tuple[list[list[bytes]], float]:
    """Each job's PNGs from an undisturbed (--ephemeral) server, and the seconds the jobs took."""
    s = Server("--ephemeral")
    try:
        t = time.time()
        ids = [s.client.post("/v1/jobs", json=b).json()["id"] for b in SERVER_JOBS]
        res = s.results(ids)
        return [res[i] for i in ids], time.time() - t
    finally:
        s.kill()


def server_round(rng: random.Random, ref, duration: float, tmp: str) -> dict:
    state = os.path.join(tmp, "state")
    s = Server("--state-dir", state)
    accepted = {}
    for k, body in enumerate(SERVER_JOBS):
        r = s.client.post("/v1/jobs", json=body)
        if r.status_code == 202:
            accepted[r.json()["id"]] = k
    time.sleep(rng.uniform(0.0, duration))
    running = s.client.get("/metrics").text if s.proc.poll() is None else ""
    s.kill()
    s2 = Server("--state-dir", state)
    try:
        res = s2.results(list(accepted))
    finally:
        s2.kill()
    lost = wrong = duplicated = 0
    for job_id, k in accepted.items():
        got = res[job_id]
        if isinstance(got, str):
            lost += 1
        elif len(got) > len(ref[k]):
            duplicated += len(got) - len(ref[k])
        elif got != ref[k]:
            wrong += 1
    queued = next((ln.split()[-1] for ln in running.splitlines() if ln.startswith("terdit_queue_depth")), "?")
    return {"lost": lost, "wrong": wrong, "duplicated": duplicated, "jobs": len(accepted),
            "note": f"killed with {queued} job(s) queued"}


# -- main ------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default="worker,driver,server", help="comma-separated subset")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the per-round results here")
    args = ap.parse_args(argv)
    targets = args.targets.split(",")
    rng = random.Random(args.seed)
    tmp_root = tempfile.mkdtemp(prefix="terdit-chaos-")
    t0 = time.time()
    try:
        ref_dir = os.path.join(tmp_root, "reference")
        os.makedirs(ref_dir)
        t = time.time()
        proc = run_sample(os.path.join(ref_dir, "job"))
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"the undisturbed sampling job failed: {err}")
        sample_seconds = time.time() - t
        images, indices, why = merged(os.path.join(ref_dir, "job"), ref_dir)
        sample_ref = (images, indices)
        srv_ref, server_seconds = server_reference()
        print(f"undisturbed runs: sampling job {sample_seconds:.1f} s ({len(images)} samples), server "
              f"{server_seconds:.1f} s ({len(SERVER_JOBS)} jobs)", flush=True)
        rounds, totals = [], {"lost": 0, "wrong": 0, "duplicated": 0}
        for i in range(args.rounds):
            kind = rng.choice(targets)
            tmp = os.path.join(tmp_root, f"round-{i}")
            os.makedirs(tmp)
            if kind == "server":
                r = server_round(rng, srv_ref, server_seconds, tmp)
            else:
                r = sample_round(kind, rng, sample_ref, sample_seconds, tmp)
            r["target"] = kind
            rounds.append(r)
            for key in totals:
                totals[key] += r[key]
            print(f"round {i + 1:3d}/{args.rounds} {kind:6s}: lost {r['lost']} wrong {r['wrong']} duplicated "
                  f"{r['duplicated']} ({r['note']})", flush=True)
            shutil.rmtree(tmp, ignore_errors=True)
        by = {k: sum(1 for r in rounds if r["target"] == k) for k in targets}
        jobs = sum(r.get("jobs", 0) for r in rounds)
        print(f"chaos: {args.rounds} rounds ({', '.join(f'{v} {k}' for k, v in by.items())}; {jobs} server jobs "
              f"accepted, {by.get('worker', 0) + by.get('driver', 0)} sampling jobs of {len(sample_ref[0])} samples) "
              f"in {time.time() - t0:.0f} s: lost {totals['lost']}, wrong {totals['wrong']}, duplicated "
              f"{totals['duplicated']}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rounds": rounds, "totals": totals, "seed": args.seed}, f, indent=1)
        return 0 if not any(totals.values()) else 1
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
