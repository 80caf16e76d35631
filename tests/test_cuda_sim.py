"""The CUDA backend checked without a GPU: every kernel and a whole forward under Numba's CUDA simulator,
and every kernel compiled to PTX for sm_80 when NVVM is installed.

The simulator must be switched on (NUMBA_ENABLE_CUDASIM=1) before numba.cuda is first imported, and
pytest may already have imported it without, so the checks run in a child process: this file run as a
script. The child runs every check of CHECKS, writes one result per check as JSON, and each test below
asserts one result. The simulator runs each CUDA thread as a Python thread, so shapes are tiny.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

CHILD_TIMEOUT_S = 900

# --- the checks (run in the child, with the simulator on) ----------------------------------------------


def _rng(seed=0):
    return np.random.default_rng(seed)


def _weight(rng, n, k, bias=True, alpha=0.0625):
    from terdit_edge.kernels.base import TernaryWeight
    from terdit_edge.packing import pack_ternary_2bit

    q = rng.integers(-1, 2, size=(n, k))
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    return TernaryWeight(pack_ternary_2bit(q), n, k, alpha, b, name=f"w{n}x{k}")


def _assert_ternary_close(y, x, w, mode):
    """fp32: rounding-level agreement relative to alpha * sum|x| of the row; int8: the same integers."""
    from terdit_edge.kernels.reference import ternary_matmul_reference

    ref = ternary_matmul_reference(x, w, mode)
    assert y.shape == ref.shape and y.dtype == np.float32, (y.shape, y.dtype)
    if mode == "int8":
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-30)
        return
    row_scale = np.abs(x).astype(np.float64).sum(axis=1, keepdims=True) * w.alpha
    if w.bias is not None:
        row_scale = row_scale + np.abs(w.bias)[None, :]
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err <= 1e-5 * row_scale + 1e-30), float((err / (row_scale + 1e-30)).max())


# M = 1, odd N, K not a multiple of 128 (below, across and beyond one block), no bias
TERNARY_SHAPES = [(1, 5, 200, True), (3, 17, 130, False), (9, 11, 37, True)]


def check_ternary_matmul_fp32():
    from terdit_edge.kernels import get_backend

    be, rng = get_backend("cuda", activations="fp32"), _rng(1)
    for m, n, k, bias in TERNARY_SHAPES:
        w, x = _weight(rng, n, k, bias), rng.standard_normal((m, k)).astype(np.float32)
        _assert_ternary_close(be.ternary_matmul(x, w), x, w, "fp32")


def check_ternary_matmul_int8():
    from terdit_edge.kernels import get_backend

    be, rng = get_backend("cuda", activations="int8"), _rng(2)
    for m, n, k, bias in TERNARY_SHAPES:
        w, x = _weight(rng, n, k, bias), rng.standard_normal((m, k)).astype(np.float32)
        x[0, :3] = 0.0
        if m > 1:
            x[1] = 0.0  # an all-zero row: scale 0
        _assert_ternary_close(be.ternary_matmul(x, w), x, w, "int8")


def check_ternary_matmul_gpu_tiling():
    """The 16 x 16 threads x (4 x 4 outputs) tiling the GPU uses, run in the simulator."""
    from terdit_edge.cuda import kernels as K
    from terdit_edge.kernels import get_backend

    saved = K.THREADS_X, K.THREADS_Y, K.ROWS_PER_THREAD, K.COLS_PER_THREAD
    K.THREADS_X, K.THREADS_Y, K.ROWS_PER_THREAD, K.COLS_PER_THREAD = 16, 16, 4, 4
    try:
        rng = _rng(3)
        w = _weight(rng, 21, 130)
        x = rng.standard_normal((3, 130)).astype(np.float32)
        for mode in ("fp32", "int8"):
            _assert_ternary_close(get_backend("cuda", activations=mode).ternary_matmul(x, w), x, w, mode)
    finally:
        K.THREADS_X, K.THREADS_Y, K.ROWS_PER_THREAD, K.COLS_PER_THREAD = saved


def check_quantize_rows_matches_reference_exactly():
    from numba import cuda

    from terdit_edge.cuda import kernels as K
    from terdit_edge.kernels.reference import quantize_rows_int8
    from terdit_edge.packing import padded_k

    rng = _rng(4)
    k = 133
    x = rng.standard_normal((3, k)).astype(np.float32)
    x[1] = 0.0
    # absmax 127 makes the scale 1: exact halves test round-half-to-even in both directions
    x[2, :8] = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]
    xw = cuda.device_array((3, padded_k(k) // 4), np.uint32)
    xsum, xscale = cuda.device_array(3, np.int32), cuda.device_array(3, np.float32)
    K.quantize_rows(cuda.to_device(x), xw, xsum, xscale)
    xq = xw.copy_to_host().view(np.int8)
    ref_q, ref_scale = quantize_rows_int8(x)
    np.testing.assert_array_equal(xq[:, :k], ref_q)
    assert not xq[:, k:].any(), "padding activations must be zero"
    np.testing.assert_array_equal(xscale.copy_to_host(), ref_scale)
    np.testing.assert_array_equal(xsum.copy_to_host(), ref_q.astype(np.int64).sum(axis=1))


def check_dense():
    from terdit_edge.kernels import get_backend

    be, rng = get_backend("cuda"), _rng(5)
    for m, n, k, bias in [(1, 5, 3, True), (17, 19, 20, False)]:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32) if bias else None
        ref = x @ w.T + (b if bias else 0)
        np.testing.assert_allclose(be.dense(x, w, b), ref, rtol=1e-5, atol=1e-5)


def check_rmsnorm_and_modulate():
    from terdit_edge.kernels import get_backend
    from terdit_edge.kernels.reference import NumpyBackend

    be, ref, rng = get_backend("cuda"), NumpyBackend(), _rng(6)
    x = rng.standard_normal((2, 3, 37)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(37)).astype(np.float32)
    shift, scale = (rng.standard_normal((2, 37)).astype(np.float32) for _ in range(2))
    np.testing.assert_allclose(be.rmsnorm(x, w, 1e-5), ref.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    out = np.empty_like(x)
    got = be.rmsnorm_modulate(x, w, shift, scale, 1e-5, out=out)
    assert got is out
    np.testing.assert_allclose(out, ref.rmsnorm_modulate(x, w, shift, scale, 1e-5), rtol=1e-5, atol=1e-6)


def check_layernorm():
    from terdit_edge.kernels import get_backend
    from terdit_edge.kernels.reference import NumpyBackend

    be, ref, rng = get_backend("cuda"), NumpyBackend(), _rng(7)
    x = (3 + rng.standard_normal((5, 37))).astype(np.float32)  # a mean far from 0
    w, b = rng.standard_normal(37).astype(np.float32), rng.standard_normal(37).astype(np.float32)
    np.testing.assert_allclose(be.layernorm(x, w, b, 1e-5), ref.layernorm(x, w, b, 1e-5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(be.layernorm(x, None, None, 1e-6), ref.layernorm(x, None, None, 1e-6),
                               rtol=1e-5, atol=1e-5)


def check_rope():
    from terdit_edge.kernels import get_backend
    from terdit_edge.kernels.reference import NumpyBackend
    from terdit_edge.model import rope_tables

    be, ref, rng = get_backend("cuda"), NumpyBackend(), _rng(8)
    x = rng.standard_normal((2, 3, 2, 8)).astype(np.float32)
    cos, sin = rope_tables(3, 8, 10000.0)
    want = ref.rope(x.copy(), cos, sin)
    got = be.rope(x, cos, sin)
    assert got is x  # in place, as the contract says
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6)


def check_attention_mha_and_gqa():
    from terdit_edge.kernels import get_backend
    from terdit_edge.kernels.reference import NumpyBackend

    be, ref, rng = get_backend("cuda"), NumpyBackend(), _rng(9)
    for n_kv in (4, 2, 1):
        q = rng.standard_normal((2, 5, 4, 6)).astype(np.float32)
        k, v = (rng.standard_normal((2, 5, n_kv, 6)).astype(np.float32) for _ in range(2))
        np.testing.assert_allclose(be.attention(q, k, v), ref.attention(q, k, v), rtol=1e-5, atol=1e-6)


def check_swiglu_and_add_gated():
    from terdit_edge.kernels import get_backend
    from terdit_edge.kernels.reference import NumpyBackend

    be, ref, rng = get_backend("cuda"), NumpyBackend(), _rng(10)
    a, g = (rng.standard_normal((3, 37)).astype(np.float32) for _ in range(2))
    np.testing.assert_allclose(be.swiglu(a, g), ref.swiglu(a, g), rtol=1e-5, atol=1e-6)
    h = rng.standard_normal((2, 3, 37)).astype(np.float32)
    gate, y = rng.standard_normal((2, 37)).astype(np.float32), rng.standard_normal((2, 3, 37)).astype(np.float32)
    want = ref.add_gated(h.copy(), gate, y)
    assert be.add_gated(h, gate, y) is h
    np.testing.assert_allclose(h, want, rtol=1e-6, atol=1e-6)


def check_backend_reports_simulator():
    from terdit_edge.kernels import available_backends, get_backend
    from terdit_edge.kernels.cuda_backend import CudaBackend

    assert CudaBackend.unavailable_reason() is None
    assert available_backends()["cuda"] == "ok"
    assert "simulator" in get_backend("cuda").describe()


# Tiny but complete: GQA (2 heads, 1 kv head), qk_norm, FFN and conditioning widths below one packing
# block, 4 tokens per image, a batch of 2 with the null label.
FORWARD_CONFIG = dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, cond_dim=16, input_size=4)


def _forward_check(activations, **overrides):
    """The model's one forward on the cuda backend against the same forward on the NumPy reference,
    at the tolerance every fast backend is held to (tests/test_parity.py)."""
    # the child runs this file as a script: tests/ is sys.path[0], so conftest imports as a module
    from conftest import FORWARD_TOL, INTEGER_FORWARD_L2_TOL, build_model_file

    import terdit_edge
    from terdit_edge.kernels.cuda_backend import DeviceTernaryWeight

    with tempfile.TemporaryDirectory() as d:
        path = build_model_file(d, **{**FORWARD_CONFIG, **overrides})
        reference = terdit_edge.load_model(path, backend="numpy", activations=activations)
        model = terdit_edge.load_model(path, backend="cuda", activations=activations)
        assert type(model) is type(reference)  # one forward class for every backend
        assert all(isinstance(w, DeviceTernaryWeight) for w in model.ternary.values())
        assert all(hasattr(a, "copy_to_host") for a in model.params.values())  # parameters live on the device
        rng = _rng(11)
        x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
        t, y = np.array([3, 871]), np.array([7, model.null_label])
        want = reference(x, t, y)
        got = model(x, t, y)
        assert got.shape == want.shape == (2, 8, 4, 4) and got.dtype == np.float32
        if activations == "fp32":
            err = float(np.abs(got.astype(np.float64) - want).max() / want.std())
            assert err <= FORWARD_TOL, err
        else:
            fp32 = terdit_edge.load_model(path, backend="numpy")(x, t, y)
            l2 = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            l2_fp32 = float(np.linalg.norm(fp32 - want) / np.linalg.norm(want))
            assert l2 <= INTEGER_FORWARD_L2_TOL and l2 < 0.25 * l2_fp32, (l2, l2_fp32)
        assert model.num_classes == reference.num_classes and model.null_label == reference.null_label
        np.testing.assert_array_equal(model.map_labels([0, 9]), reference.map_labels([0, 9]))


def check_forward_fp32_qk_norm_gqa():
    _forward_check("fp32", qk_norm=True)


def check_forward_int8():
    # the adaLN layers stay fp32 in int8 mode on every backend (one row per image: nothing to gain)
    _forward_check("int8")


def check_quantize_once_is_reused_by_the_layers_that_share_an_input():
    from terdit_edge.kernels import get_backend

    be, rng = get_backend("cuda", activations="int8"), _rng(12)
    x = rng.standard_normal((3, 130)).astype(np.float32)
    w1, w2 = _weight(rng, 5, 130), _weight(rng, 7, 130)
    xq = be.quantize(be.asarray(x))
    for w in (w1, w2):
        _assert_ternary_close(be.to_host(be.ternary_matmul(xq, w)), x, w, "int8")
    _assert_ternary_close(be.to_host(be.ternary_matmul(xq[1:3], w1)), x[1:3], w1, "int8")


CHECKS = {name[len("check_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("check_")}


def _run_checks(out_path: str) -> None:
    """Child entry point: run every check, write {name: {"ok": bool, "detail": str, "seconds": float}}."""
    # The simulator's threads meet at every syncthreads; a short GIL switch interval lets them
    # get there several times faster than the default 5 ms.
    sys.setswitchinterval(5e-4)
    results = {}
    try:
        from numba.core import config

        if not config.ENABLE_CUDASIM:
            raise RuntimeError("NUMBA_ENABLE_CUDASIM is not set in the child")
        from numba import cuda  # noqa: F401
    except Exception as e:  # noqa: BLE001 - numba or its CUDA target missing: every check is skipped
        results = {name: {"ok": None, "detail": f"simulator unavailable: {e}", "seconds": 0.0} for name in CHECKS}
    else:
        for name, fn in CHECKS.items():
            t0 = time.perf_counter()
            try:
                fn()
                results[name] = {"ok": True, "detail": "", "seconds": time.perf_counter() - t0}
            except Exception:  # noqa: BLE001 - reported to the parent, which fails that test
                results[name] = {"ok": False, "detail": traceback.format_exc(), "seconds": time.perf_counter() - t0}
    Path(out_path).write_text(json.dumps(results))


def _child_env(simulator: bool) -> dict:
    """The installed package (no source tree on PYTHONPATH), with or without the simulator."""
    from tests.conftest import child_env

    env = child_env()
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return env


# --- the tests (run by pytest in the parent) ----------------------------------------------------------------

_PTX_CHILD = """
import sys
try:
    from terdit_edge.cuda import kernels as K
    from numba.cuda.cudadrv import nvvm
    nvvm.NVVM().get_version()
except Exception as e:
    print('UNAVAILABLE:', type(e).__name__, (str(e).strip().splitlines() or [''])[0]); sys.exit(0)
kernels = {n for n in vars(K) if n.endswith('_kernel')}
assert kernels == set(K.KERNEL_SIGNATURES), kernels ^ set(K.KERNEL_SIGNATURES)
ptx = K.compile_all_ptx((8, 0))
assert 'dp4a.s32.u32' in ptx['ternary_gemm_i8_kernel'], 'the int8 GEMM lost its dp4a'
print('COMPILED', len(ptx), sorted(ptx) == sorted(kernels))
"""


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """Start the simulator child and the PTX child together: each keeps about one core busy."""
    pytest.importorskip("numba")
    out = tmp_path_factory.mktemp("cuda_sim") / "results.json"
    cwd = tmp_path_factory.mktemp("cuda_sim_cwd")  # outside the repository: the installed package is used
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(cwd))
    sim = subprocess.Popen([sys.executable, __file__, "--run-checks", str(out)], env=_child_env(True), **pipes)
    ptx = subprocess.Popen([sys.executable, "-c", _PTX_CHILD], env=_child_env(False), **pipes)
    yield {"sim": sim, "results": out, "ptx": ptx}
    for proc in (sim, ptx):
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def simulator_results(children):
    proc = children["sim"]
    stdout, stderr = proc.communicate(timeout=CHILD_TIMEOUT_S)
    out = children["results"]
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"simulator child failed (exit {proc.returncode}):\n{stdout[-4000:]}\n{stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_cuda_kernels_match_numpy_reference_in_simulator(simulator_results, check):
    result = simulator_results[check]
    if result["ok"] is None:
        pytest.skip(result["detail"])
    assert result["ok"], result["detail"]


def test_cuda_kernels_compile_to_ptx_for_sm80(children):
    """Every kernel, with the argument types its launcher passes, compiles with NVVM for sm_80 (no GPU)."""
    proc = children["ptx"]
    stdout, stderr = proc.communicate(timeout=CHILD_TIMEOUT_S)
    last = (stdout.strip().splitlines() or [""])[-1]
    if proc.returncode == 0 and last.startswith("UNAVAILABLE:"):
        pytest.skip(f"NVVM / Numba's CUDA target not installed ({last}); pip install 'numba-cuda[cu12]'")
    assert proc.returncode == 0, stderr[-4000:]
    assert last.startswith("COMPILED") and last.endswith("True"), stdout


def _backend_status_in_child(prelude: str) -> str:
    code = prelude + ("\nfrom terdit_edge.kernels.cuda_backend import CudaBackend\n"
                      "print(repr(CudaBackend.unavailable_reason()))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_child_env(False), cwd=tempfile.gettempdir(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_cuda_backend_without_numba_cuda_says_what_to_install():
    pytest.importorskip("numba")
    reason = _backend_status_in_child("import sys; sys.modules['numba.cuda'] = None")
    assert "CUDA target is not installed" in reason and "terdit-edge[cuda]" in reason, reason


def test_cuda_backend_refuses_clearly_without_a_gpu():
    pytest.importorskip("numba")
    reason = _backend_status_in_child("")
    if reason == "None":
        pytest.skip("a usable CUDA GPU is present")
    assert "driver" in reason or "GPU" in reason, reason
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return  # this pytest process itself runs the simulator, where the backend is available
    from terdit_edge.errors import BackendError
    from terdit_edge.kernels import get_backend

    with pytest.raises(BackendError, match="not available"):
        get_backend("cuda")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--run-checks":
        _run_checks(sys.argv[2])
    else:
        sys.exit("usage: test_cuda_sim.py --run-checks OUT.json")


def test_cuda_backend_refuses_int10():
    """The CUDA GEMM is int8 dp4a or fp32; the 10-bit mode is a clear error, not a silent fp32 run."""
    pytest.importorskip("numba")
    from terdit_edge.errors import BackendError
    from terdit_edge.kernels.cuda_backend import CudaBackend

    with pytest.raises(BackendError, match="int10"):
        CudaBackend(activations="int10")
