"""Engines that run the units of a sampling job: a local process pool, and Ray Core actors.

An engine has ``name``, ``retries`` (units re-run after a worker died) and
``imap(spec, units) -> iterator of (unit, uint8 images (n, H, W, 3), info)`` in completion order.
Every worker holds one loaded model (:class:`SampleWorker`) and samples units with it; since an
image depends only on (model, label, seed, sampler settings), which worker ran a unit never changes
a byte. A worker that dies (killed, out of memory) costs only its units in flight: they are
re-run on a fresh worker, at most ``retries`` times each, then the job stops with an error naming
the samples. An exception raised by the sampling code itself is not retried (it would fail again).
"""
from __future__ import annotations

import collections
import os
import sys
import time

from ..errors import TerditError
from .job import JobError, Unit


def _print_log(msg: str):
    print(f"terdit-edge sample: {msg}", file=sys.stderr, flush=True)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class SampleWorker:
    """One loaded model; ``run(labels, seeds)`` -> uint8 (n, H, W, 3) images."""

    def __init__(self, cfg: dict, model_bytes=None):
        from ..pipeline import Pipeline
        from ..settings import GenerationSettings

        self.cfg = cfg
        self.settings = GenerationSettings.from_json(cfg["settings"])
        threads = cfg.get("threads")
        if threads:
            from threadpoolctl import threadpool_limits
            self._limits = threadpool_limits(limits=int(threads))  # BLAS of this process (decoder, norms)
        path = _model_file_for(cfg, model_bytes)
        self.pipe = Pipeline.load(path, backend=cfg["backend"], threads=threads, verify=cfg["verify"],
                                  settings=self.settings)

    def run(self, labels, seeds):
        from .job import to_rgb_uint8

        images = self.pipe(list(labels), self.settings.replace(seeds=list(seeds)), output="np", progress=False,
                           batch_size=self.cfg["batch_size"])
        return to_rgb_uint8(images), os.getpid()


def _model_file_for(cfg: dict, model_bytes) -> str:
    """The model path when it exists here (with the job's hash when bytes were shipped), else a copy
    of the shipped bytes in a per-hash cache file (a Ray node without the driver's file system)."""
    path = cfg["model_path"]
    if model_bytes is None:
        return path
    from .job import file_sha256

    if os.path.exists(path) and file_sha256(path) == cfg["model_sha256"]:
        return path
    import hashlib
    import tempfile

    if hashlib.sha256(model_bytes).hexdigest() != cfg["model_sha256"]:
        raise JobError("the model bytes shipped to this worker do not match the job's model hash")
    cache = os.path.join(tempfile.gettempdir(), "terdit-edge-models")
    os.makedirs(cache, exist_ok=True)
    dst = os.path.join(cache, cfg["model_sha256"] + ".tdit")
    if not os.path.exists(dst):
        tmp = f"{dst}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(model_bytes)
        os.replace(tmp, dst)
    return dst


# ----------------------------------------------------------------------------------------------
# Local process pool
# ----------------------------------------------------------------------------------------------

_WORKER = None


def _local_init(cfg):
    global _WORKER
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it stops the pool
    _WORKER = SampleWorker(cfg)


def _local_run(labels, seeds):
    return _WORKER.run(labels, seeds)


class LocalEngine:
    """A pool of ``workers`` processes on this machine, ``threads`` threads each (default: the cores
    this process may use divided among the workers). Each process maps the model file once (the page
    cache holds one copy for all of them)."""

    name = "local"

    def __init__(self, workers: int = 1, threads: int | None = None, retries: int = 3, start_method: str = "spawn"):
        if workers < 1:
            raise JobError(f"--workers must be at least 1, got {workers}")
        self.workers = int(workers)
        self.threads = int(threads) if threads else max(1, available_cores() // self.workers)
        self.max_retries = int(retries)
        self.start_method = start_method
        self.retries = 0
        self.pids: set[int] = set()
        self.log = _print_log  # run_job replaces it (messages above the progress bar)

    def describe(self) -> str:
        return f"local: {self.workers} worker process(es) x {self.threads} thread(s)"

    def _pool(self, cfg):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context(self.start_method),
                                   initializer=_local_init, initargs=(cfg,))

    @staticmethod
    def _stop(pool, kill: bool):
        if pool is None:
            return
        procs = list((getattr(pool, "_processes", None) or {}).values()) if kill else []
        pool.shutdown(wait=not kill, cancel_futures=True)
        for p in procs:  # an interrupted job: do not wait for units nobody will collect
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)

    def imap(self, spec, units: list[Unit]):
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        cfg = spec.worker_config(self.threads)
        queue = collections.deque(units)
        attempts = collections.Counter()
        inflight = {}
        pool = self._pool(cfg)
        clean = False
        try:
            while queue or inflight:
                pool_broken = False
                while queue and len(inflight) < 2 * self.workers:
                    u = queue.popleft()
                    try:
                        fut = pool.submit(_local_run, u.labels, u.seeds)
                    except BrokenProcessPool:  # a worker died since the last wait (found by benchmarks/chaos.py)
                        queue.appendleft(u)
                        pool_broken = True
                        break
                    inflight[fut] = u
                if pool_broken:
                    done = {f for f in inflight if f.done()}
                else:
                    done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                broken = []
                for fut in done:
                    u = inflight.pop(fut)
                    try:
                        images, pid = fut.result()
                    except BrokenProcessPool:
                        broken.append(u)
                        continue
                    except TerditError:
                        raise
                    except Exception as e:
                        raise JobError(f"sampling samples of shard {u.shard} failed in a worker: "
                                       f"{type(e).__name__}: {e}") from e
                    self.pids.add(pid)
                    yield u, images, {"pid": pid}
                if broken or pool_broken:
                    broken += list(inflight.values())  # the whole pool is gone: every unit in flight
                    inflight.clear()
                    self._stop(pool, kill=True)
                    pool = None
                    if not broken:  # every unit had finished: only the pool is replaced
                        self.log("a worker process died; continuing on a new pool")
                        pool = self._pool(cfg)
                        continue
                    for u in broken:
                        attempts[u.uid] += 1
                        if attempts[u.uid] > self.max_retries:
                            raise JobError(f"a worker process died {attempts[u.uid]} times while sampling shard "
                                           f"{u.shard} (samples at offset {u.offset}, labels {u.labels[:4]}...); "
                                           "giving up (out of memory? see the system log)")
                    self.retries += len(broken)
                    self.log(f"a worker process died; re-running its {len(broken)} unit(s) in flight on a new "
                             f"pool (retry {max(attempts[u.uid] for u in broken)} of {self.max_retries})")
                    queue.extendleft(sorted(broken, key=lambda x: x.uid, reverse=True))
                    pool = self._pool(cfg)
            clean = True
        finally:
            self._stop(pool, kill=not clean)


# ----------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------

def import_ray():
    try:
        import ray
    except ImportError:
        raise JobError("the ray engine needs Ray: pip install 'terdit-edge[ray]' (or pip install ray)") from None
    return ray


class _RayWorker:
    """The actor: a SampleWorker built in the actor's process (again after a restart)."""

    def __init__(self, cfg, model_bytes=None):
        self.worker = SampleWorker(cfg, model_bytes)

    def run(self, labels, seeds):
        return self.worker.run(labels, seeds)

    def pid(self):
        return os.getpid()


class RayEngine:
    """Ray Core actors, each holding a loaded model and reserving ``num_cpus=threads``.

    ``address``: join a running cluster ("auto", "ray://HOST:PORT", "HOST:PORT"); None starts a local
    Ray instance (or uses the one already started in this process by ``ray.init``). ``workers``:
    actors (default: the cluster's CPUs divided by ``threads``). An actor whose process dies is
    restarted by Ray (``max_restarts``) and its units in flight are retried (``max_task_retries``);
    should that budget run out the driver re-submits them, at most ``retries`` times per unit.
    """

    name = "ray"

    def __init__(self, workers: int | None = None, threads: int | None = None, address: str | None = None,
                 retries: int = 3, ship_model: bool | None = None):
        self.workers = workers
        self.threads = int(threads) if threads else 1
        self.address = address
        self.max_retries = int(retries)
        self.ship_model = (address is not None) if ship_model is None else ship_model
        self.retries = 0
        self.actors = []
        self.pids: set[int] = set()
        self.log = _print_log  # run_job replaces it (messages above the progress bar)

    def describe(self) -> str:
        where = self.address or "a local Ray instance"
        return f"ray: {self.workers or 'auto'} actor(s) x {self.threads} thread(s) on {where}"

    def actor_pids(self) -> list[int]:
        ray = import_ray()
        return ray.get([a.pid.remote() for a in self.actors])

    def imap(self, spec, units: list[Unit]):
        ray = import_ray()
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        started = False
        reaper = None
        if not ray.is_initialized():
            if self.address is None:  # a local instance for this job
                # one machine: Ray's own traffic stays on the loopback interface
                kw = {"include_dashboard": False, "log_to_driver": False, "_node_ip_address": "127.0.0.1"}
                if self.workers:
                    kw["num_cpus"] = int(self.workers) * self.threads
                ray.init(**kw)
                reaper = start_reaper()
            else:
                ray.init(address=self.address)
            started = True
        try:
            cpus = ray.cluster_resources().get("CPU", 1)
            n_actors = int(self.workers) if self.workers else max(1, int(cpus // self.threads))
            cfg = spec.worker_config(self.threads)
            model_ref = None
            if self.ship_model:
                with open(spec.model_path, "rb") as f:
                    model_ref = ray.put(f.read())
            actor_cls = ray.remote(_RayWorker).options(num_cpus=self.threads, max_restarts=self.max_retries,
                                                       max_task_retries=self.max_retries)
            self.actors = [actor_cls.remote(cfg, model_ref) for _ in range(n_actors)]
            queue = collections.deque(units)
            attempts = collections.Counter()
            inflight = {}                       # ref -> (unit, actor index)
            load = collections.Counter()        # actor index -> units in flight
            while queue or inflight:
                for a in range(len(self.actors)):
                    while queue and load[a] < 2:
                        u = queue.popleft()
                        inflight[self.actors[a].run.remote(u.labels, u.seeds)] = (u, a)
                        load[a] += 1
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    u, a = inflight.pop(ref)
                    load[a] -= 1
                    try:
                        images, pid = ray.get(ref)
                    except RayActorError as e:
                        attempts[u.uid] += 1
                        self.retries += 1
                        if attempts[u.uid] > self.max_retries:
                            raise JobError(f"Ray actor died {attempts[u.uid]} times while sampling shard {u.shard} "
                                           f"(offset {u.offset}); giving up: {e}") from None
                        self.log(f"a Ray actor died while sampling shard {u.shard}; re-running its unit "
                                 f"(retry {attempts[u.uid]} of {self.max_retries})")
                        self._replace_if_dead(ray, a, actor_cls, cfg, model_ref)
                        queue.appendleft(u)
                        continue
                    except RayTaskError as e:
                        cause = e.as_instanceof_cause() if hasattr(e, "as_instanceof_cause") else e
                        if isinstance(getattr(e, "cause", None), TerditError):
                            raise e.cause from None
                        raise JobError(f"sampling shard {u.shard} failed in a Ray actor: {cause}") from None
                    except GetTimeoutError:  # pragma: no cover - ray.wait said ready
                        queue.appendleft(u)
                        continue
                    self.pids.add(pid)
                    yield u, images, {"pid": pid, "actor": a}
        finally:
            for actor in self.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:
                    pass
            if started:
                ray.shutdown()
            if reaper is not None:
                stop_reaper(reaper)

    def _replace_if_dead(self, ray, a, actor_cls, cfg, model_ref):
        """Ray restarts a dead actor by itself until max_restarts; past that, start a new one."""
        try:
            ray.get(self.actors[a].pid.remote(), timeout=120)
        except Exception:
            self.actors[a] = actor_cls.remote(cfg, model_ref)
            time.sleep(0)


# ----------------------------------------------------------------------------------------------
# The reaper of a local Ray instance
# ----------------------------------------------------------------------------------------------

# Run in its own session by start_reaper(): reads nothing but waits for end-of-file on stdin, which
# comes when the driver exits in any way (kill -9 included: the kernel closes the pipe's write end,
# which no other process holds). Meanwhile it keeps learning the process tree under the roots it was
# given (the local Ray instance's processes: gcs_server, raylet and what they start, such as
# ray::DashboardAgent and ray::RuntimeEnvAgent, which outlive a killed driver otherwise), each
# process known by (pid, start time) so that a reused pid is never killed. At end-of-file it kills
# every known process still alive. Linux only (/proc); elsewhere it waits and does nothing.
_REAPER_CODE = r"""
import os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
def table():
    t = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            t[int(d)] = (int(rest[1]), rest[19])
    return t
known = {}
roots = [int(p) for p in sys.argv[1:]]
have_proc = os.path.isdir("/proc")
def learn():
    t = table()
    for p in roots:
        if p in t and p not in known:
            known[p] = t[p][1]
    grown = True
    while grown:
        grown = False
        for p, (pp, st) in t.items():
            if p not in known and pp in known and t.get(pp, (0, None))[1] == known[pp]:
                known[p] = st
                grown = True
while True:
    if have_proc:
        learn()
    r, _, _ = select.select([sys.stdin], [], [], 0.5)
    if r and not os.read(sys.stdin.fileno(), 4096):
        break
if have_proc:
    # freeze the tree before killing it: a raylet that is still running may start a new worker (to
    # retry the dead driver's task) between the last look and its own death, and that worker would
    # outlive it. Stopped processes cannot fork, so stop, look again, until no new process appears.
    for _ in range(20):
        before = len(known)
        learn()
        t = table()
        for p, st in known.items():
            if p in t and t[p][1] == st:
                try:
                    os.kill(p, signal.SIGSTOP)
                except OSError:
                    pass
        learn()
        if len(known) == before:
            break
    t = table()
    for p, st in known.items():
        if p in t and t[p][1] == st:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
"""


def start_reaper():
    """Start the reaper of the local Ray instance this process just started (its child processes);
    returns the Popen (None when it cannot start: the job runs, a kill -9 may leave Ray processes)."""
    import subprocess

    roots = [p for p in _child_pids(os.getpid()) if _is_ray_process(p)]  # not a caller's own children
    try:
        return subprocess.Popen([sys.executable, "-c", _REAPER_CODE, *map(str, roots)], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        return None


def stop_reaper(proc):
    """After ray.shutdown(): the reaper kills what is left of the instance and exits."""
    try:
        proc.stdin.close()
        proc.wait(timeout=30)
    except Exception:  # noqa: BLE001 - cleanup of a helper; the job's result is already written
        pass


def _child_pids(pid: int) -> list[int]:
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for d in names:
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _is_ray_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ray" in f.read()
    except OSError:
        return False
