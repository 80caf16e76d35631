"""Sampling jobs (issue 13): derivation of labels and seeds, determinism across engines, workers and
static shards, resume after a killed worker or a killed job, corrupt shards, job mismatch, merge."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from terdit_edge import Pipeline
from terdit_edge.frontends.cli import main
from terdit_edge.scale import JobError, JobSpec, LocalEngine, merge, run_job, sample_labels, sample_seed
from terdit_edge.scale.job import open_job_dir, record_shard, shard_name, to_rgb_uint8, write_shard
from terdit_edge.scale.npzio import NpzArrayReader
from terdit_edge.settings import SCOPES, GenerationSettings

# a few dozen samples, a few steps; shards of 4 with batches of 3 (a unit never spans two shards)
JOB = dict(n=24, steps=40, sampler="ddim", cfg_scale=4.0, shard_size=4, batch_size=3)


def make_spec(**overrides) -> JobSpec:
    """A prepared JobSpec of JOB with overrides; setting names go into its GenerationSettings."""
    kw = {**JOB, **overrides}
    settings = GenerationSettings(**{k: kw.pop(k) for k in list(kw) if k in GenerationSettings.json_fields(SCOPES)})
    return JobSpec(model_path=None, settings=settings, **kw).prepare()


def read_adm_style(path, key="arr_0", batch=7) -> np.ndarray:
    """Read an array the way the ADM evaluator does: zipfile, npy magic + header, raw batches."""
    with zipfile.ZipFile(path, "r") as z:
        with z.open(f"{key}.npy", "r") as f:
            version = np.lib.format.read_magic(f)
            header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, fortran, dtype = header[version](f)
            assert not fortran
            row = int(np.prod(shape[1:])) * dtype.itemsize
            parts, left = [], shape[0]
            while left:
                n = min(batch, left)
                parts.append(np.frombuffer(f.read(n * row), dtype=dtype).reshape((n,) + tuple(shape[1:])))
                left -= n
            return np.concatenate(parts)


def plain_pipeline_samples():
    """The job's samples made by plain Pipeline calls: (images uint8 (N,H,W,3), labels, seeds)."""
    spec = make_spec()
    idx = range(spec.n)
    labels, seeds = spec.labels_of(idx), spec.seeds_of(idx)
    pipe = Pipeline.load(threads=1)
    images = pipe([int(v) for v in labels], steps=JOB["steps"], sampler=JOB["sampler"], cfg_scale=JOB["cfg_scale"],
                  seeds=[int(s) for s in seeds], output="np", progress=False, batch_size=8)
    return to_rgb_uint8(images), labels, seeds


@pytest.fixture(scope="module")
def reference():
    return plain_pipeline_samples()


def merged(dirs, tmp_path, name="merged.npz") -> tuple[bytes, np.ndarray]:
    out = tmp_path / name
    merge(dirs, str(out), progress=False, quiet=True)
    return out.read_bytes(), read_adm_style(out)


# ----------------------------------------------------------------------------------------------
# derivation


def test_seed_and_label_derivation_is_the_documented_hash():
    def h(text):
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")

    assert sample_seed(7, 12345) == h("terdit-edge/sample/v1/seed/7/12345") & (2 ** 63 - 1)
    assert sample_seed(0, 0) != sample_seed(1, 0) and sample_seed(0, 0) != sample_seed(0, 1)
    lab = sample_labels("uniform", 3, range(2000), 10)
    assert lab[5] == h("terdit-edge/sample/v1/label/3/5") % 10
    assert set(np.unique(lab)) == set(range(10))             # every class drawn
    assert np.abs(np.bincount(lab) - 200).max() < 60          # and roughly uniformly
    assert list(sample_labels("balanced", 0, range(12), 10)) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_labels_file(tmp_path):
    good = tmp_path / "labels.npy"
    np.save(good, np.arange(24) % 3)
    spec = make_spec(labels=str(good))
    assert list(spec.labels_of(range(6))) == [0, 1, 2, 0, 1, 2]
    assert spec.identity()["labels"] == {"rule": "file", "sha256": hashlib.sha256(good.read_bytes()).hexdigest()}
    np.save(tmp_path / "short.npy", np.arange(5))
    with pytest.raises(Exception, match="has 5 labels"):
        make_spec(labels=str(tmp_path / "short.npy"))
    np.save(tmp_path / "range.npy", np.full(24, 10))
    with pytest.raises(Exception, match=r"labels must be in 0\.\.9"):
        make_spec(labels=str(tmp_path / "range.npy"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 24, dtype=object), allow_pickle=True)
    with pytest.raises(Exception, match="without pickles"):
        make_spec(labels=str(tmp_path / "obj.npy"))


# ----------------------------------------------------------------------------------------------
# determinism


def test_local_one_and_two_workers_and_static_shards_give_the_same_bytes(tmp_path, reference):
    images, labels, seeds = reference
    r1 = run_job(make_spec(), tmp_path / "w1", LocalEngine(workers=1, threads=1), progress=False, quiet=True)
    assert r1.complete and r1.shards_written == 6 and r1.samples_computed == 24
    b1, a1 = merged([tmp_path / "w1"], tmp_path, "w1.npz")
    np.testing.assert_array_equal(a1, images)  # == plain Pipeline calls, byte for byte
    z = np.load(tmp_path / "w1.npz", allow_pickle=False)
    np.testing.assert_array_equal(z["labels"], labels)
    np.testing.assert_array_equal(z["seeds"], seeds)
    np.testing.assert_array_equal(z["indices"], np.arange(24))

    run_job(make_spec(), tmp_path / "w2", LocalEngine(workers=2, threads=1), progress=False, quiet=True)
    b2, _ = merged([tmp_path / "w2"], tmp_path, "w2.npz")
    assert b2 == b1

    # --shard 0/2 and 1/2 run separately in one directory ...
    r0 = run_job(make_spec(), tmp_path / "s", LocalEngine(workers=1, threads=1), shard=(0, 2), progress=False,
                 quiet=True)
    assert r0.shards_selected == [0, 2, 4] and not r0.complete
    with pytest.raises(JobError, match="3 of 6 shard"):
        merge([tmp_path / "s"], str(tmp_path / "x.npz"), progress=False, quiet=True)
    r1 = run_job(make_spec(), tmp_path / "s", LocalEngine(workers=1, threads=1), shard=(1, 2), progress=False,
                 quiet=True)
    assert r1.complete
    assert merged([tmp_path / "s"], tmp_path, "s.npz")[0] == b1
    # ... and in two directories (machines without a shared file system), merged together
    run_job(make_spec(), tmp_path / "d0", LocalEngine(workers=1, threads=1), shard=(0, 2), progress=False, quiet=True)
    run_job(make_spec(), tmp_path / "d1", LocalEngine(workers=1, threads=1), shard=(1, 2), progress=False, quiet=True)
    assert merged([tmp_path / "d0", tmp_path / "d1"], tmp_path, "d.npz")[0] == b1


def test_killed_worker_is_replaced_and_the_bytes_do_not_change(tmp_path, reference):
    engine = LocalEngine(workers=2, threads=1, retries=3)
    killed = []

    def kill_one(unit, info):
        if not killed:
            os.kill(info["pid"], signal.SIGKILL)
            killed.append(info["pid"])

    res = run_job(make_spec(), tmp_path / "job", engine, progress=False, quiet=True, on_unit=kill_one)
    assert killed and engine.retries >= 1 and res.complete
    np.testing.assert_array_equal(merged([tmp_path / "job"], tmp_path)[1], reference[0])


def test_worker_that_always_dies_gives_a_clear_error(tmp_path):
    engine = LocalEngine(workers=1, threads=1, retries=1)

    def kill_every_time(unit, info):
        os.kill(info["pid"], signal.SIGKILL)

    with pytest.raises(JobError, match="worker process died 2 times"):
        run_job(make_spec(), tmp_path / "job", engine, progress=False, quiet=True, on_unit=kill_every_time)


def _cli_args(out):
    return ["sample", "-n", str(JOB["n"]), "--out", str(out), "--steps", str(JOB["steps"]), "--sampler", JOB["sampler"],
            "--shard-size", str(JOB["shard_size"]), "--batch-size", str(JOB["batch_size"]), "--threads", "1",
            "--no-progress"]


def test_whole_job_killed_then_resumed_gives_the_same_bytes(tmp_path, reference):
    out = tmp_path / "job"
    # the child imports the terdit_edge this test imported (an installed copy in CI, the checkout here)
    import terdit_edge
    pkg_parent = str(Path(terdit_edge.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": pkg_parent + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "terdit_edge.frontends.cli", *_cli_args(out)], env=env, cwd=tmp_path,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (out / shard_name(0)).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, mid-job
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    done = [k for k in range(6) if (out / shard_name(k)).exists()]
    assert 0 in done and len(done) < 6, f"the job was not interrupted mid-way (shards {done})"
    # leave a partial temporary file like a writer killed mid-write
    (out / (shard_name(5) + f".{os.uname().nodename}.999999.tmp")).write_bytes(b"PK\x03\x04 partial")
    assert main(_cli_args(out)) == 0
    assert not list(out.glob("*.tmp"))
    np.testing.assert_array_equal(merged([out], tmp_path)[1], reference[0])


def test_corrupt_and_unrecorded_shards_are_handled_on_resume(tmp_path, reference):
    out = tmp_path / "job"
    run_job(make_spec(), out, LocalEngine(workers=1, threads=1), progress=False, quiet=True)
    good = merged([out], tmp_path, "good.npz")[0]
    # flip one image byte of shard 1: the manifest hash no longer matches -> redone
    p1 = out / shard_name(1)
    data = bytearray(p1.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p1.write_bytes(bytes(data))
    # shard 2 written but never recorded (a run killed between rename and manifest update) -> checked, kept
    m = json.loads((out / "manifest.json").read_text())
    del m["shards"]["2"]
    (out / "manifest.json").write_text(json.dumps(m))
    # shard 3 truncated and unrecorded -> redone
    del m["shards"]["3"]
    (out / "manifest.json").write_text(json.dumps(m))
    p3 = out / shard_name(3)
    p3.write_bytes(p3.read_bytes()[:300])
    res = run_job(make_spec(), out, LocalEngine(workers=1, threads=1), progress=False, quiet=True)
    assert (res.shards_redone, res.shards_written, res.shards_skipped) == (2, 2, 4)
    assert "2" in json.loads((out / "manifest.json").read_text())["shards"]
    assert merged([out], tmp_path, "again.npz")[0] == good


def test_a_different_job_in_the_same_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "job"
    run_job(make_spec(n=4, shard_size=4), out, LocalEngine(workers=1, threads=1), progress=False, quiet=True)
    with pytest.raises(JobError, match=r"different sampling job \(global_seed: 0 in the directory, 1 now"):
        run_job(make_spec(n=4, shard_size=4, global_seed=1), out, LocalEngine(workers=1, threads=1),
                progress=False, quiet=True)
    args = _cli_args(out)
    args[args.index("-n") + 1] = "4"
    assert main(args) == 0  # the same job: resumed, nothing to do
    assert main(args + ["--global-seed", "2"]) == 1
    assert "holds a different sampling job" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# merge


def _synthetic_job(out, n_shards, shard_size, hw):
    """A job directory with random images (the merge does not care how images were made)."""
    spec = make_spec(n=n_shards * shard_size, shard_size=shard_size)
    open_job_dir(str(out), spec)
    rng = np.random.default_rng(0)
    for k in range(n_shards):
        idx = spec.shard_indices(k)
        img = rng.integers(0, 256, size=(len(idx), hw, hw, 3), dtype=np.uint8)
        record_shard(str(out), k, write_shard(str(out), k, img, spec.labels_of(idx), np.arange(idx.start, idx.stop),
                                              spec.seeds_of(idx), spec.record()))
    return spec


def test_merge_streams_with_bounded_memory(tmp_path):
    out = tmp_path / "job"
    _synthetic_job(out, n_shards=4, shard_size=64, hw=128)   # 4 shards of 3 MiB, 12 MiB of images
    total = 4 * 64 * 128 * 128 * 3
    tracemalloc.start()
    try:
        merge([out], str(tmp_path / "m.npz"), chunk=1 << 20, progress=False, quiet=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < total / 3, f"merge held {peak} bytes for {total} bytes of images"
    arr = read_adm_style(tmp_path / "m.npz")
    expect = np.concatenate([np.load(out / shard_name(k))["arr_0"] for k in range(4)])
    np.testing.assert_array_equal(arr, expect)
    with NpzArrayReader(tmp_path / "m.npz", "arr_0") as r:
        assert r.shape == (256, 128, 128, 3) and r.dtype == np.uint8
    z = np.load(tmp_path / "m.npz", allow_pickle=False)   # numpy reads it too
    assert z["arr_0"].flags.c_contiguous and list(z.files) == ["arr_0", "labels", "indices", "seeds"]


def test_merge_refuses_corrupt_shards_and_mixed_jobs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _synthetic_job(a, 2, 4, 8)
    p = a / shard_name(1)
    data = bytearray(p.read_bytes())
    data[200] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(JobError, match="SHA-256 does not match"):
        merge([a], str(tmp_path / "m.npz"), progress=False, quiet=True)
    spec = make_spec(n=8, shard_size=4, global_seed=5)
    open_job_dir(str(b), spec)
    with pytest.raises(JobError, match="different job"):
        merge([a, b], str(tmp_path / "m.npz"), progress=False, quiet=True)
    assert not (tmp_path / "m.npz").exists()


def test_cli_sample_merge_and_png(tmp_path, reference):
    out = tmp_path / "job"
    args = _cli_args(out)
    args[args.index("-n") + 1] = "8"
    assert main(args + ["--png", "--workers", "2"]) == 0
    assert main(["merge", str(out), "-o", str(tmp_path / "s.npz"), "--no-progress"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["arr_0"], reference[0][:8])
    from PIL import Image
    im = Image.open(out / "png" / "000003.png")
    assert im.text["seed"] == str(reference[2][3]) and im.text["class"] == str(reference[1][3])
    np.testing.assert_array_equal(np.asarray(im), reference[0][3][:, :, 0])
    assert main(["merge", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.npz")]) == 1


def test_model_bytes_shipped_to_a_node_without_the_file(tmp_path, monkeypatch):
    """What a Ray actor does on a node where the driver's model path does not exist."""
    import tempfile

    from terdit_edge.pipeline import default_model_path
    from terdit_edge.scale.engines import _model_file_for
    from terdit_edge.scale.job import file_sha256

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = Path(default_model_path()).read_bytes()
    cfg = {"model_path": str(tmp_path / "elsewhere" / "digits.tdit"), "model_sha256": hashlib.sha256(data).hexdigest()}
    path = _model_file_for(cfg, data)
    assert Path(path).parent == tmp_path / "terdit-edge-models" and file_sha256(path) == cfg["model_sha256"]
    assert _model_file_for(cfg, None) == cfg["model_path"]  # nothing shipped: the path as given
    with pytest.raises(JobError, match="do not match the job's model hash"):
        _model_file_for(cfg, data[:-1])


def test_ray_engine_without_ray_says_how_to_install(tmp_path, capsys):
    try:
        import ray  # noqa: F401
        pytest.skip("ray is installed here; tests/test_scale_ray.py covers the engine")
    except ImportError:
        pass
    args = _cli_args(tmp_path / "job") + ["--engine", "ray"]
    assert main(args) == 1
    assert "pip install 'terdit-edge[ray]'" in capsys.readouterr().err


def test_guidance_interval_is_part_of_the_job(tmp_path):
    spec = make_spec(n=4, shard_size=4, guidance_interval=(0, 500))
    assert spec.identity()["guidance_interval"] == [0, 500] and "guidance_interval" not in make_spec().identity()
    run_job(spec, tmp_path / "job", LocalEngine(workers=1, threads=1), progress=False, quiet=True)
    idx = range(4)
    pipe = Pipeline.load(threads=1)
    want = to_rgb_uint8(pipe([int(v) for v in spec.labels_of(idx)], steps=JOB["steps"], sampler=JOB["sampler"],
                             seeds=[int(s) for s in spec.seeds_of(idx)], output="np", progress=False,
                             guidance_interval=(0, 500)))
    np.testing.assert_array_equal(np.load(tmp_path / "job" / shard_name(0))["arr_0"], want)
    with pytest.raises(JobError, match="guidance_interval"):
        run_job(make_spec(n=4, shard_size=4), tmp_path / "job", LocalEngine(workers=1, threads=1), progress=False,
                quiet=True)
