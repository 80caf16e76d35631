"""The fast ternary backends against the NumPy reference, on random and awkward shapes.

fp32 mode must agree with the reference to float rounding (relative to sum |x| of the row);
the integer modes (int8, int10) must produce the reference's integer sums exactly, hence the same
float32 outputs.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from terdit_edge.errors import InputError
from terdit_edge.kernels import backend_names, get_backend
from terdit_edge.kernels.base import TernaryWeight
from terdit_edge.kernels.reference import NumpyBackend, quantize_rows, quantize_rows_int8, ternary_matmul_reference
from terdit_edge.packing import pack_ternary_2bit, padded_k
from tests.conftest import skip_unavailable_backend

# every registered CPU backend but the reference (a new one is tested without editing this file; the
# CUDA backend's kernels are checked by tests/test_cuda_sim.py, in the simulator)
FAST = tuple(n for n in backend_names("cpu") if n != "numpy")
MODES = ("fp32", "int8", "int10")


def _supported_isas() -> list[str]:
    """Every instruction-set path of the C extension that this CPU and build can run (scalar, avx2,
    avx512, neon, neon-dotprod): the ISA tests below run each one. Without the extension the list
    is ["scalar"] and those tests skip in _ext() with the reason."""
    try:
        from terdit_edge import _ternary
    except ImportError:
        return ["scalar"]
    return _ternary.supported_isas()


ISAS = _supported_isas()
SIMD_ISAS = [i for i in ISAS if i != "scalar"]


@pytest.fixture(autouse=True, scope="module")
def _split_small_problems_too():
    """The C kernels keep tiny problems on one thread; make threads=2 really split them here."""
    try:
        from terdit_edge import _ternary
    except ImportError:
        yield
        return
    _ternary.set_force_parallel(True)
    yield
    _ternary.set_force_parallel(False)


def _backend_or_skip(name: str, threads: int = 1, activations: str = "fp32"):
    from terdit_edge.kernels import _factory
    try:
        cls = _factory(name)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        skip_unavailable_backend(name, e)
    reason = cls.unavailable_reason()
    if reason:
        skip_unavailable_backend(name, reason)
    return get_backend(name, threads=threads, activations=activations)


def make_weight(rng, n: int, k: int, kind: str = "random", bias: bool = True, alpha: float = 0.0625):
    if kind == "random":
        q = rng.integers(-1, 2, size=(n, k))
    else:
        q = np.full((n, k), {"zero": 0, "plus": 1, "minus": -1}[kind])
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    return TernaryWeight(pack_ternary_2bit(q), n, k, alpha, b, name=f"w{n}x{k}"), q


def assert_matches(y, x, w, mode):
    ref = ternary_matmul_reference(x, w, mode)
    assert y.shape == ref.shape and y.dtype == np.float32
    if mode != "fp32":
        # same integers, same two float32 roundings: equal up to the last bit
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-30)
    else:
        row_scale = np.abs(x).astype(np.float64).sum(axis=1, keepdims=True) * w.alpha
        if w.bias is not None:
            row_scale = row_scale + np.abs(w.bias)[None, :]
        err = np.abs(y.astype(np.float64) - ref)
        assert np.all(err <= 1e-5 * row_scale + 1e-30), float((err / (row_scale + 1e-30)).max())


SHAPES = [(1, 1, 1), (1, 33, 7), (2, 127, 31), (3, 129, 1), (17, 300, 31), (4, 1000, 7),
          (9, 260, 70), (40, 384, 33), (2, 4500, 5), (1, 700, 45)]


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_random_shapes_match_reference(name, mode, m, k, n):
    b = _backend_or_skip(name, threads=2, activations=mode)
    rng = np.random.default_rng(m * 1000 + k + n)
    w, _ = make_weight(rng, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    assert_matches(b.ternary_matmul(x, w), x, w, mode)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("mode", MODES)
def test_large_batch_matches_reference(name, mode):
    b = _backend_or_skip(name, threads=2, activations=mode)
    rng = np.random.default_rng(7)
    w, _ = make_weight(rng, 70, 520)
    x = rng.standard_normal((512, 520)).astype(np.float32)
    assert_matches(b.ternary_matmul(x, w), x, w, mode)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["zero", "plus", "minus"])
def test_constant_weights(name, mode, kind):
    b = _backend_or_skip(name, activations=mode)
    rng = np.random.default_rng(3)
    w, _ = make_weight(rng, 31, 4200, kind)  # long rows: int16 partial sums at their worst case
    x = np.abs(rng.standard_normal((33, 4200))).astype(np.float32) + 1.0
    x[0] = 2.0  # every int8 activation of row 0 is 127
    assert_matches(b.ternary_matmul(x, w), x, w, mode)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("mode", MODES)
def test_large_activations_and_zero_rows(name, mode):
    b = _backend_or_skip(name, activations=mode)
    rng = np.random.default_rng(4)
    w, _ = make_weight(rng, 7, 129)
    x = (rng.standard_normal((17, 129)) * 1e4).astype(np.float32)
    x[3] = 0.0
    x[16] = 0.0
    y = b.ternary_matmul(x, w)
    assert_matches(y, x, w, mode)
    np.testing.assert_array_equal(y[3], w.bias)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("threads", [1, 2])
def test_without_bias_into_out(name, mode, threads):
    b = _backend_or_skip(name, threads=threads, activations=mode)
    rng = np.random.default_rng(5)
    w, _ = make_weight(rng, 31, 300, bias=False)
    x = rng.standard_normal((17, 300)).astype(np.float32)
    out = np.full((17, 31), np.nan, dtype=np.float32)
    y = b.ternary_matmul(x, w, out=out)
    assert y is out
    assert_matches(out, x, w, mode)


@pytest.mark.parametrize("name", FAST)
def test_non_contiguous_and_float64_inputs_are_converted(name):
    b = _backend_or_skip(name)
    rng = np.random.default_rng(6)
    w, _ = make_weight(rng, 7, 33)
    x64 = rng.standard_normal((33, 5)).T  # float64, Fortran order
    y = b.ternary_matmul(x64, w)
    assert_matches(y, x64.astype(np.float32), w, "fp32")


@pytest.mark.parametrize("name", FAST)
def test_empty_batch(name):
    b = _backend_or_skip(name)
    w, _ = make_weight(np.random.default_rng(0), 7, 33)
    y = b.ternary_matmul(np.zeros((0, 33), np.float32), w)
    assert y.shape == (0, 7)


@pytest.mark.parametrize("name", FAST)
def test_bad_shapes_raise_input_error(name):
    b = _backend_or_skip(name)
    w, _ = make_weight(np.random.default_rng(0), 7, 33)
    with pytest.raises(InputError, match="33"):
        b.ternary_matmul(np.zeros((2, 32), np.float32), w)
    with pytest.raises(InputError):
        b.ternary_matmul(np.zeros((2, 3, 33), np.float32), w)
    with pytest.raises(InputError):
        b.ternary_matmul(np.zeros((2, 33), np.float32), w, out=np.zeros((2, 8), np.float32))
    with pytest.raises(InputError):
        b.ternary_matmul(np.zeros((2, 33), np.float32), w, out=np.zeros((2, 7), np.float64))


# --- the compiled extension's own paths ------------------------------------------------------

def _ext():
    _backend_or_skip("cython")
    from terdit_edge import _ternary
    return _ternary


def test_quantizer_is_bit_exact_with_reference():
    t = _ext()
    rng = np.random.default_rng(8)
    x = rng.standard_normal((9, 301)).astype(np.float32) * 3
    x[1] = 0.0
    # exact ties: absmax 127 makes 127/absmax = 1, so k + 0.5 must round half to even
    x[2, :255] = np.arange(-127, 128, dtype=np.float32) * 0.5
    x[2, 0] = -127.0
    for isa in ISAS:
        t.set_isa(isa)
        try:
            xq, scale = t.quantize_rows_int8(x)
        finally:
            t.set_isa("best")
        rq, rs = quantize_rows_int8(x)
        np.testing.assert_array_equal(xq, rq)
        np.testing.assert_array_equal(scale, rs)


def test_int10_quantizer_is_bit_exact_with_reference():
    t = _ext()
    rng = np.random.default_rng(12)
    x = rng.standard_normal((7, 517)).astype(np.float32) * 5
    x[1] = 0.0
    x[3, 0] = np.float32(1e30)  # one huge value: every other activation rounds to 0
    # exact ties: absmax 511 makes 511/absmax = 1, so k + 0.5 must round half to even
    x[2, :300] = np.arange(-150, 150, dtype=np.float32) + 0.5
    x[2, 300] = -511.0
    for isa in ISAS:
        t.set_isa(isa)
        try:
            xq, scale = t.quantize_rows(x, 10)
        finally:
            t.set_isa("best")
        rq, rs = quantize_rows(x, 10)
        assert rq.dtype == np.int16 and np.abs(rq).max() <= 511
        np.testing.assert_array_equal(xq, rq)
        np.testing.assert_array_equal(scale, rs)
    with pytest.raises(InputError):
        t.quantize_rows(x, 11)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 2, 5, 9])
def test_int10_past_float_exact_range(m, isa):
    """K * 511 >= 2^24: where int10 borrows the float kernel (no SIMD integer path) it must sum in
    integers instead; the AVX2 GEMV and tables widen before int16 overflows."""
    t = _ext()
    b = _backend_or_skip("cython", threads=2, activations="int10")
    rng = np.random.default_rng(13)
    w, _ = make_weight(rng, 3, 33000)
    x = rng.standard_normal((m, 33000)).astype(np.float32)
    x[:, 0] = 40.0  # one large value: most activations small, as in real rows
    t.set_isa(isa)
    try:
        y = b.ternary_matmul(x, w)
        w1, _ = make_weight(rng, 2, 4000, kind="plus")
        xc = np.ones((m, 4000), np.float32)  # every activation 511 on all +1 weights: the int16 worst case
        y1 = b.ternary_matmul(xc, w1)
    finally:
        t.set_isa("best")
    assert_matches(y, x, w, "int10")
    assert_matches(y1, xc, w1, "int10")


@pytest.mark.parametrize("name", ("numpy",) + FAST)
def test_integer_modes_error_bound(name):
    """|int - fp32| <= alpha * sum_k |Q| * scale / 2 per output (each activation is off by at most
    half a step); int10's steps are 4x finer than int8's and so is its error on Gaussian inputs."""
    rng = np.random.default_rng(14)
    w, q = make_weight(rng, 64, 1000, bias=False)
    x = rng.standard_normal((20, 1000)).astype(np.float32)
    y32 = ternary_matmul_reference(x, w, "fp32")
    errs = {}
    for mode, lim in (("int8", 127), ("int10", 511)):
        y = _backend_or_skip(name, threads=2, activations=mode).ternary_matmul(x, w)
        step = np.abs(x).max(axis=1, keepdims=True) / lim
        bound = w.alpha * np.abs(q).sum(axis=1)[None, :] * step / 2 * (1 + 1e-5) + 1e-6
        assert np.all(np.abs(y - y32) <= bound)
        errs[mode] = np.linalg.norm(y - y32) / np.linalg.norm(y32)
    assert errs["int10"] < errs["int8"] / 2.5, errs


def test_int8_sums_are_exact_integers():
    t = _ext()
    rng = np.random.default_rng(9)
    for m, k, n in [(1, 1, 1), (3, 300, 17), (20, 4200, 9), (40, 129, 33)]:
        q = rng.integers(-1, 2, size=(n, k))
        xq = np.zeros((m, padded_k(k)), np.int8)
        xq[:, :k] = rng.integers(-127, 128, size=(m, k))
        got = t.int8_sums(xq, pack_ternary_2bit(q), k, 2)
        np.testing.assert_array_equal(got, xq[:, :k].astype(np.int64) @ q.T.astype(np.int64))


@pytest.mark.parametrize("isa", SIMD_ISAS or ["(none)"])
@pytest.mark.parametrize("mode", MODES)
def test_scalar_path_equals_simd_path(mode, isa):
    t = _ext()
    if not SIMD_ISAS:
        pytest.skip("this CPU has no SIMD path to compare with")
    b = get_backend("cython", threads=2, activations=mode)
    rng = np.random.default_rng(10)
    for m, k, n in [(1, 129, 7), (3, 300, 31), (33, 1000, 17)]:
        w, _ = make_weight(rng, n, k)
        x = rng.standard_normal((m, k)).astype(np.float32)
        t.set_isa(isa)
        try:
            simd = b.ternary_matmul(x, w)
            t.set_isa("scalar")
            scalar = b.ternary_matmul(x, w)
        finally:
            t.set_isa("best")
        if mode != "fp32":
            np.testing.assert_array_equal(scalar, simd)
        else:
            assert_matches(scalar, x, w, mode)
            assert_matches(simd, x, w, mode)


# every M from 1 to 17 (GEMV / table switches at 2 and 8, 16- and 32-token tiles, 12-row panels),
# K and N tails, and a few sizes past one token block
AWKWARD = [(m, k, n) for m, (k, n) in zip(range(1, 18), [(1, 1), (33, 7), (127, 31), (129, 5), (300, 17),
                                                          (200, 13), (256, 9), (131, 25), (1000, 33), (250, 11),
                                                          (383, 12), (140, 23), (257, 15), (100, 7), (385, 25),
                                                          (260, 70), (513, 31)])] + [(31, 300, 9), (33, 129, 24),
                                                                                      (47, 520, 19), (65, 700, 41)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", MODES)
def test_every_isa_on_awkward_shapes(isa, mode):
    """Each ISA path alone against the NumPy reference: integer modes bit for bit, fp32 within the
    bound; NaN-prefilled outputs (every element written), one and two threads (split forced)."""
    t = _ext()
    rng = np.random.default_rng(30)
    for threads in (1, 2):
        b = get_backend("cython", threads=threads, activations=mode)
        for m, k, n in AWKWARD:
            w, _ = make_weight(rng, n, k)
            x = (rng.standard_normal((m, k)) * rng.choice([0.01, 1.0, 50.0], size=(m, 1))).astype(np.float32)
            out = np.full((m, n), np.nan, np.float32)
            t.set_isa(isa)
            try:
                y = b.ternary_matmul(x, w, out=out)
            finally:
                t.set_isa("best")
            assert y is out and not np.isnan(y).any(), (m, k, n)
            assert_matches(y, x, w, mode)
            if mode != "fp32":
                np.testing.assert_array_equal(y, ternary_matmul_reference(x, w, mode))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", MODES)
def test_every_isa_is_batch_invariant_from_min_rows(isa, mode):
    """The cython backend promises per-row results for calls of >= invariant_min_rows tokens: a
    token's output must not depend on M, its position among the tokens or the thread split, on
    every ISA path (what the model's image-by-image batching relies on)."""
    t = _ext()
    rng = np.random.default_rng(31)
    w, _ = make_weight(rng, 70, 777)
    x = rng.standard_normal((45, 777)).astype(np.float32)
    lo = get_backend("cython", threads=1, activations=mode).invariant_min_rows
    t.set_isa(isa)
    try:
        ref = get_backend("cython", threads=1, activations=mode).ternary_matmul(x[:lo], w)
        for threads in (1, 2):
            b = get_backend("cython", threads=threads, activations=mode)
            for m0, m in [(0, 45), (0, 17), (3, lo), (0, 33), (5, 40)]:
                xs = np.ascontiguousarray(np.roll(x, -m0, axis=0)[:m])
                got = b.ternary_matmul(xs, w)
                for i in range(m):  # token m0 + i of x sits at row i here
                    j = (m0 + i) % 45
                    if j < lo:
                        np.testing.assert_array_equal(got[i], ref[j], err_msg=f"{isa} {mode} M={m} row {i}")
    finally:
        t.set_isa("best")


@pytest.mark.parametrize("m,k,n", [(2, 300, 17), (15, 129, 33), (16, 1000, 31), (17, 385, 70), (33, 260, 45),
                                   (65, 131, 20)])
def test_avx512_fp32_is_avx2_bits(m, k, n):
    """The AVX-512 fp32 tables keep the AVX2 arithmetic per lane: the same bits, so fp32 results do
    not change between AVX2 and AVX-512 machines (and stay batch-invariant as the AVX2 tables)."""
    t = _ext()
    if not {"avx2", "avx512"} <= set(ISAS):
        pytest.skip(f"needs both the avx2 and the avx512 paths (this CPU: {ISAS})")
    rng = np.random.default_rng(32)
    w, _ = make_weight(rng, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    b = get_backend("cython", threads=2, activations="fp32")
    ys = {}
    try:
        for isa in ("avx2", "avx512"):
            t.set_isa(isa)
            ys[isa] = b.ternary_matmul(x, w)
    finally:
        t.set_isa("best")
    np.testing.assert_array_equal(ys["avx512"], ys["avx2"])


def test_unknown_isa_is_refused():
    t = _ext()
    with pytest.raises(InputError):
        t.set_isa("sse9")
    other = "neon" if t.cpu_features()["avx2"] else "avx2"
    with pytest.raises(InputError):
        t.set_isa(other)


def test_every_supported_isa_is_selectable_and_best_is_the_default():
    t = _ext()
    isas = t.supported_isas()
    assert isas[0] == "scalar" and t.cpu_features()["best_isa"] in isas
    if not os.environ.get("TERDIT_ISA"):
        assert t.get_isa() == t.cpu_features()["best_isa"]  # the tests run with the default path
    try:
        for name in isas:
            t.set_isa(name)
            assert t.get_isa() == name
    finally:
        t.set_isa("best")
    feats = t.cpu_features()
    if feats["avx512"]:
        assert "avx512" in isas and feats["best_isa"] == "avx512"
    else:
        assert "avx512" not in isas
        with pytest.raises(InputError):
            t.set_isa("avx512")


def test_cpu_features_reports_detection():
    from terdit_edge.kernels.cpu import cpu_features
    info = cpu_features()
    for key in ("avx2", "fma", "neon", "dotprod", "openmp", "threads", "isa", "extension"):
        assert key in info
    assert info["threads"] >= 1


# --- fused per-token ops ---------------------------------------------------------------------

@pytest.fixture
def fused():
    return _backend_or_skip("cython", threads=2)


def test_rmsnorm_modulate_matches_reference(fused):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 37, 96)).astype(np.float32) * 3
    wt, sh, sc = (rng.standard_normal(s).astype(np.float32) for s in [(96,), (2, 96), (2, 96)])
    ref = NumpyBackend().rmsnorm_modulate(x, wt, sh, sc, 1e-5)
    out = np.empty_like(x)
    got = fused.rmsnorm_modulate(x, wt, sh, sc, 1e-5, out=out)
    assert got is out
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_matches_reference(fused, affine):
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((3, 5, 64)) + 4).astype(np.float32)
    wt = rng.standard_normal(64).astype(np.float32) if affine else None
    bs = rng.standard_normal(64).astype(np.float32) if affine else None
    np.testing.assert_allclose(fused.layernorm(x, wt, bs, 1e-6), NumpyBackend().layernorm(x, wt, bs, 1e-6),
                               rtol=1e-5, atol=1e-5)


def test_swiglu_matches_reference(fused):
    rng = np.random.default_rng(13)
    a = (rng.standard_normal((4, 7, 50)) * 5).astype(np.float32)
    b = rng.standard_normal((4, 7, 50)).astype(np.float32)
    np.testing.assert_allclose(fused.swiglu(a, b), NumpyBackend().swiglu(a, b), rtol=1e-6, atol=1e-6)


def test_add_gated_in_place(fused):
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 9, 40)).astype(np.float32)
    g = rng.standard_normal((2, 40)).astype(np.float32)
    y = rng.standard_normal((2, 9, 40)).astype(np.float32)
    ref = NumpyBackend().add_gated(x.copy(), g, y)
    got = fused.add_gated(x, g, y)
    assert got is x
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6)


def test_rope_in_place(fused):
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 11, 4, 16)).astype(np.float32)
    ang = rng.standard_normal((11, 8))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    ref = NumpyBackend().rope(x.copy(), cos, sin)
    assert fused.rope(x, cos, sin) is x
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6)
    # a strided view cannot be rotated by the C loop: the reference path handles it in place
    big = rng.standard_normal((2, 11, 8, 16)).astype(np.float32)
    view = big[:, :, ::2]
    ref = NumpyBackend().rope(view.copy(), cos, sin)
    fused.rope(view, cos, sin)
    np.testing.assert_allclose(big[:, :, ::2], ref, rtol=1e-6, atol=1e-6)


def test_fused_ops_reject_bad_shapes(fused):
    x = np.zeros((2, 3, 8), np.float32)
    with pytest.raises(InputError):
        fused.rmsnorm_modulate(x, np.ones(7, np.float32), np.zeros((2, 8), np.float32),
                               np.zeros((2, 8), np.float32), 1e-5)
    with pytest.raises(InputError):
        fused.rope(np.zeros((1, 3, 2, 8), np.float32), np.ones((3, 3), np.float32), np.ones((3, 3), np.float32))


# --- attention -------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("b,t,h,hkv,hd", [(1, 1, 2, 2, 16), (2, 7, 4, 2, 48), (1, 256, 4, 4, 64),
                                          (2, 256, 3, 1, 48), (1, 19, 6, 3, 20), (1, 24, 2, 1, 37),
                                          (2, 40, 2, 2, 96), (1, 33, 4, 2, 128)])
def test_attention_matches_reference(isa, threads, b, t, h, hkv, hd):
    from terdit_edge import _ternary
    be = _backend_or_skip("cython", threads=threads)
    rng = np.random.default_rng(16 + t + hd)
    q = (rng.standard_normal((b, t, h, hd)) * 2).astype(np.float32)
    k = (rng.standard_normal((b, t, hkv, hd)) * 2).astype(np.float32)
    v = rng.standard_normal((b, t, hkv, hd)).astype(np.float32)
    ref = NumpyBackend().attention(q, k, v)
    _ternary.set_isa(isa)
    try:
        out = np.full_like(q, np.nan)  # every element must be written
        got = be.attention(q, k, v, out=out)
    finally:
        _ternary.set_isa("best")
    assert got is out
    # within 1e-5 of the largest output (both sides are float32 sums over t keys and hd components)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("b,t,h,hkv,hd", [(1, 1, 2, 2, 16), (2, 7, 4, 2, 48), (1, 23, 3, 3, 20), (1, 40, 2, 1, 33),
                                          (2, 256, 3, 1, 48)])
def test_avx512_attention_is_avx2_bits(b, t, h, hkv, hd):
    """The AVX-512 attention rows keep the AVX2 arithmetic per lane (FMA chains, exp polynomial,
    softmax sum order): the same bits, so images do not change between AVX2 and AVX-512 machines."""
    from terdit_edge import _ternary
    be = _backend_or_skip("cython", threads=2)
    if not {"avx2", "avx512"} <= set(ISAS):
        pytest.skip(f"needs both the avx2 and the avx512 paths (this CPU: {ISAS})")
    rng = np.random.default_rng(33 + t)
    q = (rng.standard_normal((b, t, h, hd)) * 2).astype(np.float32)
    k = (rng.standard_normal((b, t, hkv, hd)) * 2).astype(np.float32)
    v = rng.standard_normal((b, t, hkv, hd)).astype(np.float32)
    outs = {}
    try:
        for isa in ("avx2", "avx512"):
            _ternary.set_isa(isa)
            outs[isa] = be.attention(q, k, v)
    finally:
        _ternary.set_isa("best")
    np.testing.assert_array_equal(outs["avx512"], outs["avx2"])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("b,t,h,hkv,hd", [(1, 1, 2, 2, 16), (2, 7, 4, 2, 48), (1, 19, 6, 3, 20),
                                          (1, 24, 2, 1, 37), (2, 40, 2, 2, 96), (1, 100, 2, 1, 72),
                                          (1, 33, 4, 2, 128), (1, 20, 1, 1, 300)])
def test_int8_attention_is_close_and_the_same_bits_on_every_path(isa, threads, b, t, h, hkv, hd):
    from terdit_edge import _ternary
    _backend_or_skip("cython", threads=threads)
    rng = np.random.default_rng(7 + t + hd)
    q = rng.standard_normal((b, t, h, hd), dtype=np.float32)
    k = rng.standard_normal((b, t, hkv, hd), dtype=np.float32) + 3.0  # an offset: centring removes it
    v = rng.standard_normal((b, t, hkv, hd), dtype=np.float32)
    ref = NumpyBackend().attention(q, k, v)
    prev = _ternary.get_isa()
    try:
        _ternary.set_isa("scalar")
        first = _ternary.attention(q, k, v, np.empty_like(q), 1, mode="int8")
        _ternary.set_isa(isa)
        out = _ternary.attention(q, k, v, np.full_like(q, np.nan), threads, mode="int8")
    finally:
        _ternary.set_isa(prev)
    assert np.array_equal(out, first)  # exact integer sums, one float order: the scalar path's bits
    assert np.linalg.norm(out - ref) <= 0.015 * np.linalg.norm(ref)


def test_int8_attention_within_one_percent_on_the_model_shapes():
    be = _backend_or_skip("cython", threads=2)
    rng = np.random.default_rng(3)
    for shape in ((2, 256, 32, 48), (1, 1024, 8, 96)):
        q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
        f = be.attention(q, k, v)
        be8 = type(be)(threads=2, attention="int8")
        o = be8.attention(q, k, v)
        assert np.linalg.norm(o - f) < 0.01 * np.linalg.norm(f)


def test_int8_attention_needs_the_c_kernels():
    with pytest.raises(InputError, match="int8 attention"):
        NumpyBackend(attention="int8")
    with pytest.raises(InputError, match="mode"):
        from terdit_edge import _ternary
        q = np.zeros((1, 2, 1, 4), np.float32)
        _ternary.attention(q, q, q, np.empty_like(q), 1, mode="int4")


def test_attention_large_scores_are_stable():
    """Scores of several hundred: without the max subtraction exp would overflow to inf/NaN."""
    be = _backend_or_skip("cython")
    rng = np.random.default_rng(17)
    q = (rng.standard_normal((1, 9, 2, 16)) * 40).astype(np.float32)
    k = (rng.standard_normal((1, 9, 2, 16)) * 40).astype(np.float32)
    v = rng.standard_normal((1, 9, 2, 16)).astype(np.float32)
    got = be.attention(q, k, v)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, NumpyBackend().attention(q, k, v), rtol=1e-4, atol=1e-5)


def test_attention_converts_views_and_handles_overlapping_out():
    be = _backend_or_skip("cython")
    rng = np.random.default_rng(18)
    qkv = rng.standard_normal((2, 5, 3, 4, 8)).astype(np.float64)  # non-contiguous float64 views
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    ref = NumpyBackend().attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    np.testing.assert_allclose(be.attention(q, k, v), ref, rtol=1e-5, atol=1e-6)
    q32 = np.ascontiguousarray(q, dtype=np.float32)
    k32, v32 = np.ascontiguousarray(k, dtype=np.float32), np.ascontiguousarray(v, dtype=np.float32)
    got = be.attention(q32, k32, v32, out=q32)  # out is q: goes through a copy
    assert got is q32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_attention_rejects_bad_shapes():
    be = _backend_or_skip("cython")
    q = np.zeros((1, 4, 6, 8), np.float32)
    with pytest.raises(InputError):
        be.attention(q, np.zeros((1, 4, 4, 8), np.float32), np.zeros((1, 4, 4, 8), np.float32))  # 6 % 4
    with pytest.raises(InputError):
        be.attention(q, np.zeros((1, 5, 3, 8), np.float32), np.zeros((1, 5, 3, 8), np.float32))  # T
    with pytest.raises(InputError):
        be.attention(q, np.zeros((1, 4, 3, 8), np.float32), np.zeros((1, 4, 3, 8), np.float32),
                     out=np.zeros((1, 4, 6, 4), np.float32))
    with pytest.raises(InputError):
        be.attention(q[0], q[0], q[0])


# --- FMA peak loop (benchmarks/bench_attention.py) --------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
def test_fma_peak_counts_its_operations(isa):
    """fma_peak returns the operations it did: proportional to iters and threads, the ISA's chains
    x lanes x 2 per round (scalar 32 x 2, avx2 12 x 8 x 2, avx512 12 x 16 x 2, neon 16 x 4 x 2)."""
    _backend_or_skip("cython")
    from terdit_edge import _ternary
    per_round = {"scalar": 64, "avx2": 192, "avx512": 384, "neon": 128, "neon-dotprod": 128, "neon-i8mm": 128}
    _ternary.set_isa(isa)
    try:
        assert _ternary.fma_peak(1000, 1) == 1000 * per_round[isa]
        # two threads run the loop twice where the build has OpenMP (else one thread runs it once)
        ran = 2 if _ternary.cpu_features()["openmp"] else 1
        assert _ternary.fma_peak(1000, 2) == ran * 1000 * per_round[isa]
        assert _ternary.fma_peak(0, 1) == 0
        with pytest.raises(InputError):
            _ternary.fma_peak(-1, 1)
        with pytest.raises(InputError):
            _ternary.fma_peak(10, 0)
    finally:
        _ternary.set_isa("best")


@pytest.mark.parametrize("count", [1, 7, 8, 15, 16, 17, 33, 1000])
def test_swiglu_same_bits_on_every_simd_path(count):
    """AVX-512 SwiGLU (16 lanes, masked tail) does the AVX2 kernel's operations per element: the same
    bits on both paths, for every element whatever its position (batch invariance)."""
    be = _backend_or_skip("cython")
    from terdit_edge import _ternary
    simd = [isa for isa in ISAS if isa in ("avx2", "avx512")]
    if len(simd) < 2:
        pytest.skip(f"needs the avx2 and avx512 paths; this CPU/build supports {', '.join(ISAS)}")
    rng = np.random.default_rng(count)
    a = (rng.standard_normal(count) * 6).astype(np.float32)
    b = rng.standard_normal(count).astype(np.float32)
    outs = {}
    try:
        for isa in simd:
            _ternary.set_isa(isa)
            outs[isa] = be.swiglu(a, b)
            # an element's value does not depend on where it sits
            shifted = be.swiglu(np.concatenate([a[1:], a[:1]]), np.concatenate([b[1:], b[:1]]))
            np.testing.assert_array_equal(shifted, np.concatenate([outs[isa][1:], outs[isa][:1]]))
    finally:
        _ternary.set_isa("best")
    np.testing.assert_array_equal(outs["avx2"], outs["avx512"])
    np.testing.assert_allclose(outs["avx512"], NumpyBackend().swiglu(a, b), rtol=1e-6, atol=1e-6)
