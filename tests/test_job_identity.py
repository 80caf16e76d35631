"""Job identity in every shard (issue 25): resume and merge never use a shard of another job, with or
without the manifest; `terdit-edge recover` rebuilds a lost manifest from the shards; bad shards and
names, messages and exit codes of `sample` / `merge`."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from terdit_edge.frontends.cli import main
from terdit_edge.scale import JobError, LocalEngine, merge, run_job
from terdit_edge.scale.job import MANIFEST, _Reporter, shard_job_id, shard_name
from terdit_edge.scale.recover import recover_manifest
from tests.test_scale_jobs import make_spec

SMALL = dict(n=12, steps=6, sampler="ddim", shard_size=4, batch_size=4)


def spec(**kw):
    return make_spec(**{**SMALL, **kw})


def run(s, out, **kw):
    return run_job(s, out, LocalEngine(workers=1, threads=1), progress=False, quiet=True, **kw)


def merged_bytes(d, tmp_path, name):
    out = tmp_path / name
    merge([str(d)], str(out), progress=False, quiet=True)
    return out.read_bytes()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Two finished jobs that differ only in their step count, and the merged bytes of each."""
    root = tmp_path_factory.mktemp("jobs")
    run(spec(steps=6), root / "a")
    run(spec(steps=4), root / "b")
    return {name: (root / name, merged_bytes(root / name, root, f"{name}.npz")) for name in ("a", "b")}


def test_identity_covers_every_byte_changing_parameter():
    base = spec()
    ident = base.identity()
    for key in ("model_sha256", "backend", "activations", "terdit_edge_version", "rng_contract", "derivation",
                "steps", "sampler", "cfg_scale", "n", "global_seed", "labels", "shard_size"):
        assert key in ident, key
    assert ident["backend"] != "auto"  # the backend that runs, not the request
    ids = {base.job_id(), spec(steps=5).job_id(), spec(activations="int8").job_id(),
           spec(backend="numpy").job_id(), spec(global_seed=1).job_id()}
    assert len(ids) == 5
    other_model = spec()
    other_model.model_sha256 = "0" * 64
    assert other_model.job_id() != base.job_id()


def test_shards_carry_the_job_id(jobs):
    d, _ = jobs["a"]
    m = json.loads((d / MANIFEST).read_text())
    assert m["job_id"] == spec(steps=6).job_id()
    assert all(shard_job_id(str(d / shard_name(k))) == m["job_id"] for k in range(3))


def test_foreign_shards_are_never_adopted_without_a_manifest(jobs, tmp_path, capsys):
    x = tmp_path / "x"
    shutil.copytree(jobs["a"][0], x)
    os.remove(x / MANIFEST)  # the reproduction: another job's folder, manifest removed
    res = run_job(spec(steps=4), x, LocalEngine(workers=1, threads=1), progress=False)
    err = capsys.readouterr().err
    assert res.shards_skipped == 0 and res.shards_written == 3
    assert "belongs to another job" in err and "moved to shard-000000.npz.rejected-" in err
    assert "resuming" not in err
    assert merged_bytes(x, tmp_path, "x.npz") == jobs["b"][1]
    assert len(list(x.glob("shard-*.npz.rejected-*"))) == 3  # nothing deleted


def test_half_done_folder_and_copied_in_shard_give_the_job_bytes(jobs, tmp_path):
    x = tmp_path / "x"
    run(spec(steps=4), x, shard=(0, 3))          # shard 0 of job b, manifest intact
    shutil.copy(jobs["a"][0] / shard_name(1), x / shard_name(1))  # a shard of job a, copied in
    res = run(spec(steps=4), x)
    assert res.shards_skipped == 1 and res.shards_redone == 1 and res.shards_written == 2
    assert merged_bytes(x, tmp_path, "x.npz") == jobs["b"][1]


def test_another_backend_is_another_job(tmp_path, capsys):
    out = tmp_path / "job"
    run(spec(backend="numpy"), out, shard=(0, 3))
    args = ["sample", "-n", "12", "--out", str(out), "--steps", "6", "--sampler", "ddim", "--shard-size", "4",
            "--batch-size", "4", "--threads", "1", "--no-progress"]
    assert main(args + ["--backend", "numpy"]) == 0
    capsys.readouterr()
    other = "cython" if spec(backend="auto").backend != "numpy" else "numba"
    assert main(args + ["--backend", other]) == 1
    err = capsys.readouterr().err
    assert "holds a different sampling job" in err and "backend: 'numpy' in the directory" in err


def test_merge_refuses_a_foreign_shard_even_with_a_matching_manifest_record(jobs, tmp_path):
    x = tmp_path / "x"
    shutil.copytree(jobs["a"][0], x)
    shutil.copy(jobs["b"][0] / shard_name(1), x / shard_name(1))
    m = json.loads((x / MANIFEST).read_text())
    from terdit_edge.scale.job import file_sha256
    m["shards"]["1"]["sha256"] = file_sha256(str(x / shard_name(1)))  # a manifest edited to match
    (x / MANIFEST).write_text(json.dumps(m))
    for verify in (True, False):
        with pytest.raises(JobError, match="belongs to another job"):
            merge([str(x)], str(tmp_path / "m.npz"), verify=verify, progress=False, quiet=True)
    assert not (tmp_path / "m.npz").exists()


def test_merge_no_verify_on_a_damaged_shard_is_an_error_not_a_traceback(jobs, tmp_path, capsys):
    x = tmp_path / "x"
    shutil.copytree(jobs["a"][0], x)
    p = x / shard_name(2)
    data = bytearray(p.read_bytes())
    data[200] ^= 0xFF  # inside arr_0's data: found by the CRC as the bytes are copied
    p.write_bytes(bytes(data))
    assert main(["merge", str(x), "-o", str(tmp_path / "m.npz"), "--no-verify", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "shard-000002.npz is damaged" in err and "Traceback" not in err
    assert not list(tmp_path.glob("m.npz*"))


def test_a_directory_named_like_a_shard_stops_the_job_before_any_work(tmp_path):
    out = tmp_path / "job"
    run(spec(), out, shard=(0, 3))
    (out / shard_name(1)).mkdir()
    done = []
    with pytest.raises(JobError, match="shard-000001.npz is a directory"):
        run(spec(), out, on_unit=lambda u, i: done.append(u))
    assert not done and not list(out.glob("*.tmp"))


def test_a_failed_shard_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import terdit_edge.scale.job as job

    real_replace = os.replace

    def refuse(src, dst):
        if os.path.basename(dst).startswith("shard-"):
            raise IsADirectoryError(21, "Is a directory", dst)
        return real_replace(src, dst)

    monkeypatch.setattr(job.os, "replace", refuse)
    with pytest.raises(JobError, match="cannot write"):
        run(spec(), tmp_path / "job", shard=(0, 3))
    monkeypatch.undo()
    assert not list((tmp_path / "job").glob("*.tmp"))


def test_recover_rebuilds_a_lost_manifest_from_the_job_shards(jobs, tmp_path, capsys):
    x = tmp_path / "x"
    shutil.copytree(jobs["a"][0], x)
    os.remove(x / MANIFEST)
    assert main(["recover", str(x)]) == 0
    assert "3 of 3 shard(s) recorded" in capsys.readouterr().err
    res = run(spec(steps=6), x)
    assert res.shards_skipped == 3 and res.samples_computed == 0
    assert merged_bytes(x, tmp_path, "x.npz") == jobs["a"][1]
    assert main(["recover", str(x)]) == 1  # a readable manifest is left alone
    assert "nothing to recover" in capsys.readouterr().err


def test_recover_with_shards_of_two_jobs_needs_a_choice_and_keeps_only_that_job(jobs, tmp_path, capsys):
    x = tmp_path / "x"
    shutil.copytree(jobs["a"][0], x)
    shutil.copy(jobs["b"][0] / shard_name(2), x / shard_name(2))
    (x / MANIFEST).write_text("{ broken")
    assert main(["sample", "-n", "12", "--out", str(x), "--steps", "6", "--sampler", "ddim", "--shard-size", "4",
                 "--no-progress"]) == 1
    assert "terdit-edge recover" in capsys.readouterr().err  # the message points at recovery, not "move it away"
    assert main(["recover", str(x)]) == 1
    assert "shards of 2 jobs" in capsys.readouterr().err
    a_id = spec(steps=6).job_id()
    summary = recover_manifest(str(x), job_id=a_id[:10], log=lambda m: None)
    assert summary["recorded"] == [0, 1] and list(summary["other_jobs"].values()) == [[2]]
    assert list(x.glob("manifest.json.broken-*"))
    res = run(spec(steps=6), x)
    assert res.shards_skipped == 2 and res.shards_written == 1
    assert merged_bytes(x, tmp_path, "x.npz") == jobs["a"][1]


def test_messages_and_exit_codes_of_sample(tmp_path, capsys):
    out = tmp_path / "job"
    args = ["sample", "-n", "4", "--out", str(out), "--steps", "4", "--shard-size", "4", "--no-progress"]
    with pytest.raises(SystemExit) as e:  # README: 2 for bad arguments
        main(args + ["--shard", "2/2"])
    assert e.value.code == 2
    assert "--shard must be K/N with 0 <= K < N" in capsys.readouterr().err
    assert main(args + ["--shard", "1/2"]) == 0
    err = capsys.readouterr().err
    assert "selects no shard" in err and "the job has 1 shard(s)" in err
    assert main(args) == 0
    capsys.readouterr()
    p = out / shard_name(0)
    data = bytearray(p.read_bytes())
    data[200] ^= 0xFF
    p.write_bytes(bytes(data))
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "shard 0 (shard-000000.npz): its SHA-256 does not match the manifest; redoing it" in err
    assert " is its " not in err


def test_messages_go_above_the_progress_bar():
    lines = []

    class Bar:
        def write(self, text, file=None):
            lines.append(text)

    log = _Reporter(quiet=False)
    log.bar = Bar()
    log("a worker process died")
    assert lines == ["terdit-edge sample: a worker process died"]


def test_the_local_engine_reports_a_dead_worker(tmp_path, capsys):
    import signal

    engine = LocalEngine(workers=1, threads=1, retries=2)
    killed = []

    def kill_once(unit, info):
        if not killed:
            os.kill(info["pid"], signal.SIGKILL)
            killed.append(1)

    res = run_job(spec(), tmp_path / "job", engine, progress=False, on_unit=kill_once)
    assert res.complete and engine.retries >= 1
    err = capsys.readouterr().err
    assert "a worker process died; re-running its" in err and "on a new pool (retry 1 of 2)" in err


def test_no_tracebacks_for_bad_shard_selector_values(capsys):
    for bad in ("x", "1/0", "3/2", "-1/2"):
        with pytest.raises(SystemExit) as e:
            main(["sample", "-n", "4", "--out", "/nonexistent-dir/j", "--shard", bad])
        assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_identity_survives_json(jobs):
    d, _ = jobs["a"]
    rec = json.loads(np.load(d / shard_name(0))["job"].tobytes())
    assert rec["job_id"] == spec(steps=6).job_id() and rec["n_shards"] == 3


# -- the CLI's other edges (issue 25, items 9 and 10) ----------------------------------------------------------


def test_generate_checks_out_before_loading_the_model(monkeypatch, capsys):
    from terdit_edge import pipeline

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(pipeline.Pipeline, "load", classmethod(no_load))
    assert main(["generate", "--out", "/nonexistent_dir/x.png", "--no-progress"]) == 1
    assert "output directory '/nonexistent_dir' does not exist" in capsys.readouterr().err
    assert main(["generate", "--out", "x.jpg", "--no-progress"]) == 1
    assert "must name a .png file" in capsys.readouterr().err


def test_info_shows_no_directory_of_the_converting_machine(capsys):
    assert main(["info", os.path.join(os.path.dirname(__import__("terdit_edge").__file__), "data", "digits.tdit"),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    src = info["model"]["source"]
    assert src is None or "/" not in str(src.get("path", ""))


def test_a_pool_found_broken_at_submit_is_replaced(jobs, tmp_path):
    """benchmarks/chaos.py found it: a worker killed between two waits makes the next submit() raise
    BrokenProcessPool (not a future's result); the engine must replace the pool, not stop the job."""
    from concurrent.futures.process import BrokenProcessPool

    class FlakyPool:
        raised = False

        def __init__(self, pool):
            self._pool, self.calls = pool, 0

        def submit(self, *a):
            self.calls += 1
            if self.calls == 2 and not FlakyPool.raised:
                FlakyPool.raised = True
                raise BrokenProcessPool("simulated: a worker died")
            return self._pool.submit(*a)

        def __getattr__(self, name):
            return getattr(self._pool, name)

    class Engine(LocalEngine):
        def _pool(self, cfg):
            return FlakyPool(super()._pool(cfg))

    res = run_job(spec(steps=6), tmp_path / "job", Engine(workers=1, threads=1), progress=False, quiet=True)
    assert FlakyPool.raised and res.complete
    assert merged_bytes(tmp_path / "job", tmp_path, "m.npz") == jobs["a"][1]
