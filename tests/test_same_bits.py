"""The pieces that make an image the same bits on every CPU (docs/reproducibility.md, issue 22):
detmath's transcendentals, the C dense layer, and the fp32 GEMM's one order at every token count.
The whole chain is checked by the golden hashes (tests/test_golden.py) on each CPU kind in CI."""
from __future__ import annotations

import numpy as np
import pytest

from terdit_edge import detmath
from terdit_edge.kernels import TernaryWeight, available_backends, get_backend
from terdit_edge.packing import pack_ternary_2bit

RNG = np.random.default_rng(22)


def ulps(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.spacing(np.abs(b))))


def test_exp64_and_log64_are_within_a_few_ulp_of_numpy():
    x = np.concatenate([RNG.uniform(-700, 700, 20000), RNG.uniform(-1, 1, 20000), [0.0, 1e-300, 709.7, -700.0]])
    assert ulps(detmath.exp64(x), np.exp(x)) <= 2
    y = np.concatenate([np.exp(RNG.uniform(-700, 700, 20000)), RNG.uniform(0.5, 2.0, 20000), [1.0, 2.0, 1e-300]])
    assert ulps(detmath.log64(y), np.log(y)) <= 4
    z = RNG.uniform(-3, 3, 20000)
    assert ulps(detmath.expm1_64(z), np.expm1(z)) <= 4
    assert detmath.expm1_64(np.array([1e-20]))[0] == 1e-20  # no cancellation near 0


def test_phi_functions_match_their_series_in_high_precision():
    """phi_k(x) = sum_n x^n / (n + k)! (UniPC's coefficients) to a few 1e-15, either side of the
    switch from the series (|x| < 1) to the recursion from expm1."""
    from decimal import Decimal, getcontext
    from math import factorial

    getcontext().prec = 50

    def exact(k, x):
        total, power = Decimal(0), Decimal(1)
        for n in range(120):
            total += power / factorial(n + k)
            power *= Decimal(x)
        return float(total)

    xs = [-9.0, -4.5, -2.0, -1.0, -0.9999999, -0.5, -1e-3, -1e-12, 0.0, 1e-9, 0.25, 0.99, 1.0, 3.0]
    for k in (1, 2, 3):
        got = detmath.phi64(k, np.array(xs))
        want = np.array([exact(k, x) for x in xs])
        assert np.max(np.abs(got - want) / want) < 5e-15, k
    with pytest.raises(ValueError, match="order"):
        detmath.phi64(0, 1.0)


def test_sin_and_cos_are_within_1e_15_absolute_up_to_1e5():
    x = np.concatenate([RNG.uniform(-1e5, 1e5, 20000), RNG.uniform(-4, 4, 20000), np.arange(1000.0)])
    assert np.max(np.abs(detmath.sin64(x) - np.sin(x))) < 1e-15 * 4
    assert np.max(np.abs(detmath.cos64(x) - np.cos(x))) < 1e-15 * 4
    with pytest.raises(ValueError, match="100000"):
        detmath.sin64(np.array([2e5]))


def test_special_values():
    assert detmath.exp64(np.array([800.0]))[0] == np.inf
    assert detmath.exp64(np.array([-800.0, -np.inf]))[0] == 0.0
    assert np.isnan(detmath.exp64(np.array([np.nan]))[0])
    logs = detmath.log64(np.array([0.0, -1.0, np.inf, np.nan]))
    assert logs[0] == -np.inf and np.isnan(logs[1]) and logs[2] == np.inf and np.isnan(logs[3])


def test_float32_versions_round_the_float64_result_once():
    x = (RNG.standard_normal(50000) * 10).astype(np.float32)
    e = detmath.exp32(x)
    assert e.dtype == np.float32
    # exp64 is within 1 float64 ulp, far inside float32 rounding: the same as rounding numpy's float64 exp
    # except where a value lies within 1e-16 of a float32 rounding edge (none in 50,000 draws)
    assert np.array_equal(e, np.exp(x.astype(np.float64)).astype(np.float32))
    s = detmath.silu32(x)
    assert s.dtype == np.float32 and np.allclose(s, x / (1 + np.exp(-x.astype(np.float64))), rtol=1e-6, atol=1e-30)


@pytest.fixture
def cython_backend():
    status = available_backends()["cython"]
    if status != "ok":
        from tests.conftest import skip_unavailable_backend
        skip_unavailable_backend("cython", status)
    return get_backend("cython", threads=2, activations="fp32")


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 37, 21), (3, 8, 4), (5, 300, 130), (17, 1000, 9), (64, 16, 1152)])
def test_dense_matches_float64_within_float32_rounding_and_is_row_invariant(cython_backend, m, k, n):
    x = RNG.standard_normal((m, k)).astype(np.float32)
    w = RNG.standard_normal((n, k)).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32)
    y = cython_backend.dense(x, w, b)
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + b
    bound = 4 * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w.T).astype(np.float64) + np.abs(b))
    assert y.dtype == np.float32 and np.all(np.abs(y - exact) <= bound + 1e-30)
    for r in range(m):  # each row alone: the same bits
        assert np.array_equal(cython_backend.dense(x[r:r + 1], w, b)[0], y[r])
    assert np.array_equal(cython_backend.dense(x, w) + b, y)  # the bias is one rounding after the sum
    assert np.array_equal(get_backend("cython", threads=1).dense(x, w, b), y)  # thread count


def test_dense_rejects_mismatched_shapes(cython_backend):
    from terdit_edge.errors import InputError

    with pytest.raises(InputError, match="features"):
        cython_backend.dense(np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32))


def test_fp32_ternary_gemm_gives_one_set_of_bits_on_every_path_and_row_count(cython_backend):
    from terdit_edge import _ternary

    k, n = 300, 70
    q = RNG.integers(-1, 2, (n, k)).astype(np.int8)
    w = TernaryWeight(packed=pack_ternary_2bit(q), n=n, k=k, alpha=0.37, bias=RNG.standard_normal(n).astype(np.float32))
    x = RNG.standard_normal((19, k)).astype(np.float32)
    before = _ternary.get_isa()
    outs = {}
    try:
        for isa in _ternary.supported_isas():
            _ternary.set_isa(isa)
            full = cython_backend.ternary_matmul(x, w)
            for m in (1, 2, 3, 7, 8, 9):  # every kernel's small-M range: rows alone or in small groups
                assert np.array_equal(cython_backend.ternary_matmul(x[-m:], w), full[-m:]), (isa, m)
            outs[isa] = full
    finally:
        _ternary.set_isa(before)
    first = next(iter(outs.values()))
    assert all(np.array_equal(o, first) for o in outs.values()), list(outs)
