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
