"""The transcendental functions of the sampling path, the same bits on every CPU.

NumPy's ``exp``, ``log``, ``sin``, ``cos`` and ``power`` run loops chosen by the CPU (AVX2, AVX-512
or NEON builds of different algorithms) that may differ in the last bit; glibc's scalar functions
have per-CPU variants too. The functions here are built only from IEEE 754 basic operations (+, -, *,
/ and exact operations: ``rint``, ``ldexp``, ``frexp``, comparisons), which every CPU rounds the same
way, so the timestep embedding, the RoPE tables, SiLU and the samplers' coefficients are a function of
their inputs alone (docs/reproducibility.md). They are accurate to a few float64 ulp, far below the
float32 the model computes in; the float32 versions evaluate in float64 and round once.
"""
from __future__ import annotations

import math

import numpy as np

_LN2_HI = 6.93147180369123816490e-01  # ln 2 with 32 trailing zero bits: n * _LN2_HI is exact for |n| < 2^20
_LN2_LO = 1.90821492927058770002e-10
_LOG2E = 1.4426950408889634
# 1/k! for k = 0..13: e^r for |r| <= ln2/2 to < 1e-17 relative
_EXP_COEFS = [1.0 / math.factorial(k) for k in range(14)]

# pi/2 in three parts of 33 bits (fdlibm's pio2_1, pio2_2, pio2_3): k * part is exact for |k| < 2^20
_PIO2_1 = 1.57079632673412561417e+00
_PIO2_2 = 6.07710050630396597660e-11
_PIO2_3 = 2.02226624871116645580e-21
_TWO_OVER_PI = 6.36619772367581382433e-01
_SIN_COEFS = [(-1) ** k / math.factorial(2 * k + 1) for k in range(11)]
_COS_COEFS = [(-1) ** k / math.factorial(2 * k) for k in range(11)]
_TRIG_MAX = 1.0e5  # |x| up to here: the three-part reduction keeps about 1e-16 absolute error


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _horner(coefs, r: np.ndarray) -> np.ndarray:
    p = np.full_like(r, coefs[-1])
    for c in reversed(coefs[:-1]):
        p = p * r + c
    return p


def exp64(x) -> np.ndarray:
    """e^x in float64 (array in, array out); overflows to inf above 709.78, 0 below -745."""
    x = _f64(x)
    big = x > 709.78
    xc = np.clip(np.where(np.isnan(x), 0.0, x), -746.0, 709.78)
    n = np.rint(xc * _LOG2E)
    r = (xc - n * _LN2_HI) - n * _LN2_LO  # |r| <= ln2/2 (+ rounding)
    y = np.ldexp(_horner(_EXP_COEFS, r), n.astype(np.int64))
    y = np.where(big, np.inf, y)
    return np.where(np.isnan(x), np.nan, y)


def expm1_64(x) -> np.ndarray:
    """e^x - 1 in float64, accurate near 0 (Taylor series for |x| < 0.5)."""
    x = _f64(x)
    small = np.abs(x) < 0.5
    xs = np.where(small, x, 0.0)
    # sum_{k>=1} x^k / k!, k up to 20: < 1e-19 relative for |x| < 0.5
    p = np.full_like(xs, 1 / math.factorial(20))
    for k in range(19, 0, -1):
        p = p * xs + 1 / math.factorial(k)
    return np.where(small, p * xs, exp64(x) - 1.0)


def phi64(k: int, x) -> np.ndarray:
    """The exponential integrator's phi_k(x) = sum_{n>=0} x^n / (n + k)! in float64, k >= 1
    (phi_1(x) = (e^x - 1) / x, phi_{k+1}(x) = (phi_k(x) - 1/k!) / x, phi_k(0) = 1/k!): a Taylor
    series for |x| < 1 (no cancellation near 0), the recursion from :func:`expm1_64` beyond."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"phi64 takes an integer order k >= 1, got {k!r}")
    x = _f64(x)
    small = np.abs(x) < 1.0
    xs = np.where(small, x, 0.0)
    # terms n = 0..24: the first left out, x^25 / (25 + k)!, is < 1e-26 for |x| < 1
    p = np.full_like(xs, 1 / math.factorial(24 + k))
    for n in range(23, -1, -1):
        p = p * xs + 1 / math.factorial(n + k)
    xl = np.where(small, 1.0, x)
    q = expm1_64(xl) / xl
    for i in range(1, k):
        q = (q - 1 / math.factorial(i)) / xl
    return np.where(small, p, q)


def log64(x) -> np.ndarray:
    """Natural log in float64; log(0) = -inf, log(x < 0) = nan."""
    x = _f64(x)
    pos = x > 0
    xs = np.where(pos & np.isfinite(x), x, 1.0)
    m, e = np.frexp(xs)  # xs = m 2^e, m in [0.5, 1)
    low = m < 0.7071067811865476
    m = np.where(low, m * 2.0, m)  # m in [sqrt(1/2), sqrt(2))
    e = np.where(low, e - 1, e).astype(np.float64)
    f = m - 1.0
    s = f / (2.0 + f)  # log m = 2 atanh(s), |s| <= 0.1716
    z = s * s
    # 2 atanh(s) = 2 s (1 + z/3 + z^2/5 + ...), z^12 < 1e-18
    p = np.full_like(z, 1.0 / 25.0)
    for k in range(11, -1, -1):
        p = p * z + 1.0 / (2 * k + 1)
    y = (e * _LN2_HI) + (2.0 * s * p + e * _LN2_LO)
    y = np.where(pos, y, np.where(x == 0, -np.inf, np.nan))
    y = np.where(np.isinf(x) & pos, np.inf, y)
    return np.where(np.isnan(x), np.nan, y)


def _reduce_half_pi(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if np.any(np.abs(x) > _TRIG_MAX):
        raise ValueError(f"detmath sin/cos take |x| <= {_TRIG_MAX:g}")
    k = np.rint(x * _TWO_OVER_PI)
    r = ((x - k * _PIO2_1) - k * _PIO2_2) - k * _PIO2_3  # |r| <= pi/4 (+ rounding)
    return r, k.astype(np.int64) & 3


def _sin_cos_reduced(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = r * r
    return r * _horner(_SIN_COEFS, z), _horner(_COS_COEFS, z)


def sin64(x) -> np.ndarray:
    """sin x in float64 for |x| <= 1e5."""
    r, q = _reduce_half_pi(_f64(x))
    s, c = _sin_cos_reduced(r)
    return np.select([q == 0, q == 1, q == 2], [s, c, -s], -c)


def cos64(x) -> np.ndarray:
    """cos x in float64 for |x| <= 1e5."""
    r, q = _reduce_half_pi(_f64(x))
    s, c = _sin_cos_reduced(r)
    return np.select([q == 0, q == 1, q == 2], [c, -s, -c], s)


def exp32(x) -> np.ndarray:
    """e^x for float32 input, float32 out (computed in float64, rounded once)."""
    return exp64(np.asarray(x, dtype=np.float32)).astype(np.float32)


def silu32(x) -> np.ndarray:
    """x * sigmoid(x) = x / (1 + e^-x) in float32, as the model's float32 arithmetic: float32 x,
    e^-x rounded to float32, then float32 add and divide."""
    x = np.asarray(x, dtype=np.float32)
    return x / (np.float32(1) + exp32(-x))
