"""FID without torch (issue 13): the Fréchet distance, streaming statistics, the onnxruntime plumbing
with a random ONNX network, precision/recall, the bundled digits feature network and its CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("scipy", reason="FID needs scipy (pip install '.[fid]')")
ort = pytest.importorskip("onnxruntime", reason="FID needs onnxruntime (pip install '.[fid]')")

from terdit_edge.fid import (  # noqa: E402
    FIDError,
    OnnxFeatures,
    RunningStats,
    compute_fid,
    frechet_distance,
    precision_recall,
    save_stats,
    statistics,
)
from terdit_edge.frontends.cli import main  # noqa: E402
from terdit_edge.scale.npzio import NpzWriter  # noqa: E402


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16), random_spd(rng, 16)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_closed_form_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    v1, v2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expect = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()  # diagonal covariances
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expect, rel=1e-9)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # a rotation of both covariances changes nothing
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    rot = frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert rot == pytest.approx(expect, rel=1e-7)


def test_symmetric_and_non_negative():
    rng = np.random.default_rng(2)
    for _ in range(5):
        a = (rng.standard_normal(12), random_spd(rng, 12))
        b = (rng.standard_normal(12), random_spd(rng, 12))
        ab, ba = frechet_distance(*a, *b), frechet_distance(*b, *a)
        assert ab == pytest.approx(ba, rel=1e-7) and ab > 0
    with pytest.raises(FIDError, match="different sizes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_running_statistics_match_numpy_cov():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 7)) * 3 + 10
    s = RunningStats()
    for a in range(0, 500, 64):
        s.add(x[a:a + 64])
    mu, sigma = s.result()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_precision_recall():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((200, 5))
    assert precision_recall(a, a) == (1.0, 1.0)
    p, r = precision_recall(a + 100.0, a)
    assert (p, r) == (0.0, 0.0)


# ----------------------------------------------------------------------------------------------
# onnxruntime plumbing with a random network


def random_onnx(path, hw=8, dim=6, uint8=True, seed=0):
    """images -> Cast -> (Transpose to NHWC) -> Reshape (N, hw*hw*3) -> MatMul W -> features."""
    pytest.importorskip("onnx", reason="building test ONNX files needs the onnx package (test extra)")
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((hw * hw * 3, dim)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT)]
    src = "x"
    if not uint8:  # float NCHW input in [0, 1]
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 3, 1]))
        src = "xt"
    nodes += [helper.make_node("Reshape", [src, "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["f"])]
    in_shape = ["N", hw, hw, 3] if uint8 else ["N", 3, hw, hw]
    graph = helper.make_graph(
        nodes, "random_features",
        [helper.make_tensor_value_info("images", TensorProto.UINT8 if uint8 else TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("f", TensorProto.FLOAT, ["N", dim])],
        [numpy_helper.from_array(np.array([-1, hw * hw * 3], np.int64), "shape"), numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 9)
    path.write_bytes(model.SerializeToString())
    return w


def write_images_npz(path, images):
    with NpzWriter(str(path)) as wr:
        wr.write_array("arr_0", images)


def test_onnx_features_uint8_and_float_inputs(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    w = random_onnx(tmp_path / "u8.onnx")
    net = OnnxFeatures(tmp_path / "u8.onnx")
    np.testing.assert_allclose(net.features(images), images.reshape(10, -1).astype(np.float32) @ w, rtol=1e-4)
    w = random_onnx(tmp_path / "f32.onnx", uint8=False)
    net = OnnxFeatures(tmp_path / "f32.onnx")
    assert net.nchw and net.kind == "float"
    np.testing.assert_allclose(net.features(images), (images.reshape(10, -1) / 255.0) @ w, rtol=1e-4, atol=1e-5)
    with pytest.raises(FIDError, match="takes 8x8 images, got 16x16"):
        net.features(np.zeros((2, 16, 16, 3), np.uint8))


def test_fid_command_with_a_random_network(tmp_path, capsys):
    random_onnx(tmp_path / "net.onnx", dim=4)
    rng = np.random.default_rng(6)
    a = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + 40, 0, 255).astype(np.uint8)
    write_images_npz(tmp_path / "a.npz", a)
    write_images_npz(tmp_path / "b.npz", b)
    assert main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--features", str(tmp_path / "net.onnx"),
                 "--json", "--no-progress", "--batch-size", "64", "--save-stats", str(tmp_path / "a_stats.npz")]) == 0
    same = json.loads(capsys.readouterr().out)
    assert abs(same["fid"]) < 1e-6 and same["kind"] == "FID" and same["n_samples"] == 300
    res = compute_fid(tmp_path / "a.npz", tmp_path / "b.npz", features=tmp_path / "net.onnx", progress=False)
    # statistics files in place of images give the same number
    res_stats = compute_fid(tmp_path / "b.npz", tmp_path / "a_stats.npz", features=tmp_path / "net.onnx",
                            progress=False)
    assert res["fid"] > 1 and res_stats["fid"] == pytest.approx(res["fid"], rel=1e-6)
    # statistics of another network are refused
    random_onnx(tmp_path / "other.onnx", dim=4, seed=1)
    with pytest.raises(FIDError, match="another feature network"):
        compute_fid(tmp_path / "b.npz", tmp_path / "a_stats.npz", features=tmp_path / "other.onnx", progress=False)
    # pickles are never loaded
    np.savez(tmp_path / "obj.npz", arr_0=np.array([object()] * 3, dtype=object))
    assert main(["fid", str(tmp_path / "obj.npz"), str(tmp_path / "a.npz"), "--features",
                 str(tmp_path / "net.onnx"), "--no-progress"]) == 1
    assert "refused" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# digits FID


@pytest.fixture(scope="module")
def real_digits():
    pytest.importorskip("sklearn", reason="the real digits come from scikit-learn (test extra)")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_digits_features.py"
    spec = importlib.util.spec_from_file_location("train_digits_features", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.real_digits_uint8()[0]


def test_digits_fid_real_vs_real_and_bundled_model(tmp_path, real_digits, capsys):
    write_images_npz(tmp_path / "real.npz", real_digits)
    assert main(["fid", str(tmp_path / "real.npz"), "digits", "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kind"] == "digits FID" and abs(res["fid"]) < 1e-6  # the shipped stats are these digits'
    write_images_npz(tmp_path / "half.npz", real_digits[::2])
    half = compute_fid(tmp_path / "half.npz", "digits", progress=False)["fid"]

    from terdit_edge import Pipeline
    from terdit_edge.scale.job import to_rgb_uint8
    pipe = Pipeline.load()
    labels = [k % 10 for k in range(200)]
    samples = to_rgb_uint8(pipe(labels, steps=10, sampler="dpm++2m", seed=0, output="np", progress=False))
    write_images_npz(tmp_path / "model.npz", samples)
    model = compute_fid(tmp_path / "model.npz", "digits", progress=False)["fid"]
    noise = np.random.default_rng(0).integers(0, 256, (200, 16, 16, 3), dtype=np.uint8)
    write_images_npz(tmp_path / "noise.npz", noise)
    noise_fid = compute_fid(tmp_path / "noise.npz", "digits", progress=False)["fid"]
    print(f"digits FID: real half vs all real {half:.3f}; bundled model (200 samples, dpm++2m 10 steps) "
          f"{model:.3f}; uniform noise {noise_fid:.1f}")
    assert 0 < half < model < noise_fid / 5
    assert main(["fid", str(tmp_path / "model.npz"), "digits", "--no-progress"]) == 0
    assert "not an ImageNet FID" in capsys.readouterr().out


def test_digits_network_refuses_other_sizes(tmp_path):
    write_images_npz(tmp_path / "big.npz", np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(FIDError, match="takes only the digits model's 16x16 images"):
        compute_fid(tmp_path / "big.npz", "digits", progress=False)


def test_save_and_reload_stats_roundtrip(tmp_path):
    rng = np.random.default_rng(7)
    mu, sigma = statistics(rng.standard_normal((50, 3)))
    save_stats(tmp_path / "s.npz", mu, sigma, 50, "abc")
    from terdit_edge.fid import load_stats
    st = load_stats(tmp_path / "s.npz")
    np.testing.assert_array_equal(st["mu"], mu)
    assert st["features_sha256"] == "abc" and st["n"] == 50
