"""The Ray engine (issue 13): same bytes as the local engine, and a killed actor costs nothing but time.

Needs the ray extra (pip install ".[ray]"); .ci/run installs it and runs these tests (pytest -m ray).
Ray is started once for the module with ray.init(num_cpus=2).
"""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]'); CI runs these")

from terdit_edge.scale import RayEngine, run_job  # noqa: E402
from tests.test_scale_jobs import make_spec, merged, plain_pipeline_samples  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def reference():
    return plain_pipeline_samples()


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")  # loopback only
    yield
    ray.shutdown()


def test_ray_two_actors_give_the_local_bytes(tmp_path, reference):
    engine = RayEngine(workers=2, threads=1)
    res = run_job(make_spec(), tmp_path / "job", engine, progress=False, quiet=True)
    assert res.complete and res.samples_computed == 24 and len(engine.pids) == 2
    np.testing.assert_array_equal(merged([tmp_path / "job"], tmp_path)[1], reference[0])


def test_ray_actor_killed_mid_shard_is_restarted_and_its_work_redone(tmp_path, reference):
    engine = RayEngine(workers=2, threads=1, retries=3)
    killed = []

    def kill_actor(unit, info):
        if not killed:  # the actor has more units of this job queued or running
            os.kill(info["pid"], signal.SIGKILL)
            killed.append(info["pid"])

    res = run_job(make_spec(), tmp_path / "job", engine, progress=False, quiet=True, on_unit=kill_actor)
    assert res.complete
    # the restarted actor (a new process) did part of the job after the kill
    assert killed and len(engine.pids - set(killed)) >= 2 and len(engine.pids) >= 3
    np.testing.assert_array_equal(merged([tmp_path / "job"], tmp_path)[1], reference[0])


def test_ray_resumes_a_job_started_by_the_local_engine(tmp_path, reference):
    from terdit_edge.scale import LocalEngine

    out = tmp_path / "job"
    run_job(make_spec(), out, LocalEngine(workers=1, threads=1), shard=(0, 3), progress=False, quiet=True)
    res = run_job(make_spec(), out, RayEngine(workers=2, threads=1), progress=False, quiet=True)
    assert res.shards_skipped == 2 and res.shards_written == 4 and res.complete
    np.testing.assert_array_equal(merged([out], tmp_path)[1], reference[0])


def test_kill_9_of_a_driver_leaves_no_ray_process_behind(tmp_path):
    """Issue 25: after `kill -9` of a driver that started its own Ray instance, ray::DashboardAgent and
    ray::RuntimeEnvAgent were left running (parent 1). The driver's reaper kills the instance."""
    import subprocess
    import sys
    import time

    from tests.conftest import child_env

    out = tmp_path / "job"
    # its own Ray instance (a child process: this module's ray.init is in another process)
    proc = subprocess.Popen([sys.executable, "-m", "terdit_edge.frontends.cli", "sample", "-n", "64", "--out", str(out),
                             "--steps", "200", "--sampler", "ddpm", "--shard-size", "8", "--engine", "ray", "--workers",
                             "1", "--no-progress"], stderr=subprocess.PIPE, text=True, env=child_env(),
                            start_new_session=True)

    def tree(root):
        found, grown = {root}, True
        while grown:
            grown = False
            for d in os.listdir("/proc"):
                if d.isdigit() and int(d) not in found:
                    try:
                        with open(f"/proc/{d}/stat") as f:
                            if int(f.read().rsplit(")", 1)[1].split()[1]) in found:
                                found.add(int(d))
                                grown = True
                    except (OSError, ValueError, IndexError):
                        pass
        return found - {root}

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    seen = set()
    while not list(out.glob("shard-*.npz")):  # the actor is sampling: the whole instance is up
        assert proc.poll() is None, proc.stderr.read()
        seen |= tree(proc.pid)
        time.sleep(0.2)
    seen |= tree(proc.pid)
    names = {}
    for p in seen:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                names[p] = f.read().replace(b"\0", b" ").decode(errors="replace")[:80]
        except OSError:
            pass
    assert any("raylet" in n for n in names.values()), names
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reaper = [p for p, n in names.items() if "select.select" in n or "import os, select" in n]
    assert len(reaper) == 1, names
    # Ray's own processes may take a minute to notice a dead driver (the agents did not notice at all
    # in the report): the check is that once the reaper has exited, nothing is left
    deadline = time.monotonic() + 120  # a bound on waiting, not a speed check
    while alive(reaper[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {p for p in seen if alive(p)}
    assert not left, {p: names.get(p) for p in left}
