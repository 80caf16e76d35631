"""The Numba backend's table-lookup GEMM on the shapes its two kernels split on.

tests/test_kernels.py compares every fast backend with the reference; these cases aim at what is
particular to the Numba kernels: the small-batch kernel (M < 4) against the token-tiled one, token
tiles of 16 (fp32) and 32 (integer modes) cut anywhere, K tiles of 8 byte positions and 128-column
blocks cut anywhere, row blocks split between threads, the int16 partial sums at their largest,
invalid code 3, unaligned or strided buffers.
"""
from __future__ import annotations

import numpy as np
import pytest

from terdit_edge.kernels.base import TernaryWeight
from terdit_edge.kernels.reference import ternary_matmul_reference
from terdit_edge.packing import pack_ternary_2bit
from tests.conftest import skip_unavailable_backend

try:
    from terdit_edge.kernels import numba_backend
except ImportError as e:  # pragma: no cover
    skip_unavailable_backend("numba", e, allow_module_level=True)
if numba_backend.numba is None:  # pragma: no cover
    skip_unavailable_backend("numba", "numba is not installed", allow_module_level=True)

MODES = ("fp32", "int8", "int10")


def _backend(mode, threads=2):
    return numba_backend.NumbaBackend(threads=threads, activations=mode)


def _weight(rng, n, k, kind="random", bias=True):
    if kind == "random":
        q = rng.integers(-1, 2, size=(n, k))
    else:
        q = np.full((n, k), {"zero": 0, "plus": 1, "minus": -1}[kind])
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    return TernaryWeight(pack_ternary_2bit(q), n, k, 0.0625, b, name="t")


def _check(y, x, w, mode):
    ref = ternary_matmul_reference(x, w, mode)
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.isfinite(y).all()
    if mode != "fp32":
        np.testing.assert_array_equal(y, ref)
    else:
        scale = np.abs(x).astype(np.float64).sum(axis=1, keepdims=True) * w.alpha
        if w.bias is not None:
            scale = scale + np.abs(w.bias)[None, :]
        assert np.all(np.abs(y.astype(np.float64) - ref) <= 1e-5 * scale + 1e-30)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 15, 16, 17, 31, 32, 33, 47, 65])
def test_token_counts_around_kernel_and_tile_edges(mode, m):
    rng = np.random.default_rng(100 + m)
    w = _weight(rng, 37, 389)  # K: 3 full blocks + 5 columns; 37 rows split between threads
    x = rng.standard_normal((m, 389)).astype(np.float32)
    _check(_backend(mode).ternary_matmul(x, w), x, w, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 31, 32, 33, 96, 127, 128, 129, 255, 257, 640])
@pytest.mark.parametrize("m", [2, 20])
def test_k_around_tile_and_block_edges(mode, k, m):
    rng = np.random.default_rng(k * 7 + m)
    w = _weight(rng, 9, k)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    _check(_backend(mode).ternary_matmul(x, w), x, w, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [1, 40])
def test_many_rows_split_between_threads(mode, threads, m):
    rng = np.random.default_rng(11)
    w = _weight(rng, 1031, 200)  # 1031 rows: uneven row blocks, several small-kernel chunks
    x = rng.standard_normal((m, 200)).astype(np.float32)
    _check(_backend(mode, threads).ternary_matmul(x, w), x, w, mode)


@pytest.mark.parametrize("mode", ("int8", "int10"))
@pytest.mark.parametrize("kind", ["plus", "minus"])
@pytest.mark.parametrize("m", [1, 2, 40])
def test_integer_sums_at_their_largest(mode, kind, m):
    """Every activation at the quantization limit and every weight equal: each table entry,
    each K tile's int16 sum and the running sums reach their largest magnitude."""
    rng = np.random.default_rng(12)
    k = 5000
    w = _weight(rng, 5, k, kind)
    x = np.full((m, k), 3.0, np.float32)
    x[:, ::2] = -3.0 if kind == "minus" else 3.0
    x[0] = 3.0
    y = _backend(mode).ternary_matmul(x, w)
    _check(y, x, w, mode)
    sign = 1 if kind == "plus" else -1
    np.testing.assert_allclose(y[0], sign * k * 3.0 * w.alpha + w.bias, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", [1, 2, 20])
def test_invalid_code_3_reads_as_zero(mode, m):
    """Files with code 3 are refused on load; given one anyway the kernels read it as weight 0."""
    rng = np.random.default_rng(13)
    w = _weight(rng, 11, 300)
    x = rng.standard_normal((m, 300)).astype(np.float32)
    codes = np.unpackbits(w.packed[..., None], axis=-1, bitorder="little").reshape(*w.packed.shape, 4, 2)
    zero = (codes[..., 0] == 1) & (codes[..., 1] == 0)  # code 1 (weight 0) -> code 3
    bad = w.packed | np.packbits(np.repeat(zero, 2, axis=-1).reshape(*w.packed.shape, 8), axis=-1,
                                 bitorder="little")[..., 0]
    w3 = TernaryWeight(np.ascontiguousarray(bad), w.n, w.k, w.alpha, w.bias, name="code3")
    assert (bad != w.packed).any()
    b = _backend(mode)
    np.testing.assert_array_equal(b.ternary_matmul(x, w3), b.ternary_matmul(x, w))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", [1, 20])
def test_unaligned_weights_and_strided_out(mode, m):
    rng = np.random.default_rng(14)
    w = _weight(rng, 13, 260)
    buf = np.zeros(w.packed.size + 1, np.uint8)
    unaligned = buf[1:].reshape(w.packed.shape)
    unaligned[...] = w.packed
    w_u = TernaryWeight(unaligned, w.n, w.k, w.alpha, w.bias, name="unaligned")
    x = rng.standard_normal((m, 260)).astype(np.float32)
    big = np.full((m, 2 * w.n), np.nan, np.float32)
    out = big[:, ::2]
    y = _backend(mode).ternary_matmul(x, w_u, out=out)
    assert y is out
    _check(np.ascontiguousarray(out), x, w, mode)
    assert np.isnan(big[:, 1::2]).all()


def test_token_tables_write_every_entry():
    """The small-batch kernel's tables: entry [t, pos, byte] = signed sum of token t's four
    activations at byte position pos under the byte's codes (code 3 counts 0), every entry written."""
    rng = np.random.default_rng(15)
    stride = numba_backend._SMALL_STRIDE
    for x, tab_dtype in [(rng.standard_normal((2, 300)).astype(np.float32), np.float32),
                         (rng.integers(-511, 512, size=(2, 300)).astype(np.int16), np.int16)]:
        kb = 96
        tab = np.full(2 * kb * stride, -12345, tab_dtype)
        numba_backend._token_tables(x, kb, tab, tab_dtype(0))
        tab = tab.reshape(2, kb, stride)[:, :, :256].astype(np.float64)
        xp = np.zeros((2, 4 * kb))
        xp[:, :300] = x
        v = xp.reshape(2, kb // 32, 4, 32).transpose(0, 1, 3, 2).reshape(2, kb, 4)
        byte = np.arange(256)
        signs = np.stack([np.array([-1, 0, 1, 0])[(byte >> (2 * q)) & 3] for q in range(4)], axis=1)
        np.testing.assert_allclose(tab, np.einsum("tpq,eq->tpe", v, signs), rtol=1e-6, atol=1e-5)


def test_base3_map():
    m = numba_backend._BASE3
    for byte in (0x00, 0x55, 0xAA, 0xFF, 0x1B, 0xE4):
        codes = [(byte >> (2 * q)) & 3 for q in range(4)]
        codes = [1 if c == 3 else c for c in codes]
        assert m[byte] == codes[0] + 3 * codes[1] + 9 * codes[2] + 27 * codes[3]
    assert m.max() == 80


@pytest.mark.parametrize("bits", [8, 10])
def test_parallel_quantizer_is_bit_exact_with_reference(bits):
    from terdit_edge.kernels.reference import quantize_rows
    rng = np.random.default_rng(16 + bits)
    lim = (1 << (bits - 1)) - 1
    cases = [(rng.standard_normal((int(rng.integers(1, 9)), int(rng.integers(1, 700))))
              * 10.0 ** int(rng.integers(-30, 30))).astype(np.float32) for _ in range(40)]
    ties = np.zeros((4, 2 * lim + 2), np.float32)
    ties[0, :2 * lim + 1] = np.arange(-lim, lim + 1) + 0.5  # absmax lim + 0.5: products near k + 0.5
    ties[1, :2 * lim + 1] = np.arange(-lim, lim + 1) * 0.5  # absmax lim / 2: exact ties, half to even
    ties[1, -1] = lim
    ties[2] = np.float32(1e-42)  # subnormal row
    ties[3, 0] = np.float32(3e38)
    ties[3, 1:] = rng.standard_normal(2 * lim + 1)
    odd = rng.standard_normal((5, 70)).astype(np.float32)
    odd[1, 5] = np.nan
    odd[2, 7] = np.inf
    odd[3, 0] = -np.inf
    odd[4] = 0.0
    for x in cases + [ties, odd]:
        with np.errstate(all="ignore"):  # the subnormal row overflows 127 / absmax, as in NumPy
            want = quantize_rows(x, bits)
            got = numba_backend._quantize(x, bits)
        assert got[0].dtype == np.int16  # int8's values too: one kernel specialization for both
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", [1, 2, 40])
def test_empty_k_gives_bias(mode, m):
    w = TernaryWeight(np.zeros((5, 0), np.uint8), 5, 0, 0.5, np.arange(5, dtype=np.float32))
    y = _backend(mode).ternary_matmul(np.zeros((m, 0), np.float32), w)
    np.testing.assert_array_equal(y, np.broadcast_to(w.bias, (m, 5)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", [2, 40])
def test_out_may_be_x_itself(mode, m):
    """Square layer written in place over its input (row blocks of one token tile on two threads
    would otherwise overwrite activations another block still reads)."""
    rng = np.random.default_rng(17)
    w = _weight(rng, 600, 600, bias=False)
    x = rng.standard_normal((m, 600)).astype(np.float32)
    want = _backend(mode).ternary_matmul(x.copy(), w)
    y = _backend(mode).ternary_matmul(x, w, out=x)
    assert y is x
    np.testing.assert_array_equal(x, want)
