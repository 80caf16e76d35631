"""Numba backend: the packed tdit2-k128 weights multiplied through tables of signed sums.

Used when the C extension is not built. No activation is ever multiplied by a weight: every output
is a sum of table entries, and every table entry a sum of activations with signs chosen by select
and negate.

Tables
------
Byte ``j`` of 128-weight block ``b`` of a row holds the 2-bit codes ``f_q`` of the four weights at
``k = 128 b + j + 32 q`` (q = 0..3, bits 2q+1..2q). For one byte position and one token, a table
holds the signed sums ``sum_q s(f_q) x[k_q]`` (``s(0) = -1``, ``s(1) = 0``, ``s(2) = +1``; the
invalid code 3, refused when a file is loaded, counts 0 here, so every index stays in bounds) for
every byte the row may hold. Padding weights (k >= K) get activation 0: x is never read past
column K. Once the tables are built, a packed byte costs one look-up and one add per token instead
of four weights' worth of work. Two kernels use them:

* ``M >= _SMALL_M`` (token batches): the tables hold the 3^4 = 81 distinct sums, entry
  ``c0 + 3 c1 + 9 c2 + 27 c3`` (code 3 read as 1), built in base-3 order: entries 0..2 are
  ``-x0, 0, +x0`` and each further weight triples the table into ``entry - x_q, entry,
  entry + x_q``; ``_base3_by_k_tile`` maps the packed bytes to entries once per call. Tokens go in
  tiles of ``_TILE_F32`` = 16 (fp32) or ``_TILE_INT`` = 32 (integer modes, int16 tables), token
  index innermost, so an entry is one 64-byte line of partial sums and a look-up-add two 256-bit
  vector adds. K goes in tiles of ``_POS`` = 8 byte positions, whose 8 x 81 entries (41 KiB) stay
  in L1/L2 while every row of the work item passes: the row's 8 entry indices (8 contiguous bytes)
  select 8 entries, summed in a register accumulator and then added to the row's running sums.
  Each 128-column block of the item's tokens is transposed once so that tables are built from
  contiguous vectors. Work items, (token tile, block of rows) pairs, run under ``prange``; each
  builds its own tables.
* ``M < _SMALL_M`` (the conditioning GEMVs, M = 1..3): per token, a scalar table of all 256 byte
  values for every byte position of K (the sum of two 16-entry half tables), built once per call;
  rows, in parallel blocks of ``_ROWS_SMALL``, read their bytes four at a time (uint32) and take K
  in tiles of ``_SMALL_KTILE`` = 32 positions, whose tables (34 KiB per token in fp32, at a padded
  stride of ``_SMALL_STRIDE`` = 272 entries so that rows of equal bytes do not pile onto a few
  cache sets) stay in L1, with four independent running sums.

Numba gives Python code no SIMD vector type and runs LLVM without its SLP vectorizer, so whether a
16-lane loop becomes vector code, or its accumulator stays in registers, would hang on LLVM's
unrolling heuristics. The tiled kernels' inner loops therefore use small intrinsics that emit
fixed-width LLVM vector code: ``_vadd``, ``_vsub`` and ``_vcopy`` (elementwise over a constant
number of lanes: IEEE float32 adds/subtracts, no fast-math; integer lanes sign-extended to the
destination and added with wrap-around, which never happens at these magnitudes) and
``_stack_array``, a fixed-size stack array LLVM keeps in registers.

Precision
---------
fp32 mode adds float32 values in float32: table entries sum up to four activations, each K tile's
entries are summed, then the tiles; the order differs from the reference's, within float rounding.
The integer modes quantize exactly as :func:`~terdit_edge.kernels.reference.quantize_rows`
(``_quantize_rows``: the same float32 steps, row-parallel, checked bit for bit against it; rows with
NaN or infinity are handed to the NumPy function). Table entries (|e| <= 4 * 511) and K-tile sums
(<= 8 * 2044 < 2**15) are exact int16, running sums exact int32 (int64 in the small-batch kernel),
and outputs get the reference's two float32 roundings, ``float32(acc) * (scale * alpha)`` then
``+ bias``.

``threads`` bounds Numba's thread count. Every kernel is compiled with ``cache=True``: the first
call in a fresh environment compiles the ones its mode and batch size need (about 3-5 s per mode
and kernel family), later processes load them from Numba's cache in well under a second.
"""
from __future__ import annotations

import numpy as np

from .base import TernaryWeight, activation_bits, check_matmul_args
from .reference import NumpyBackend, quantize_rows

try:
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - numba is a declared dependency
    numba = None
    _IMPORT_ERROR = str(e)


_SMALL_M = 4           # below this many tokens: the per-token scalar-table kernel
_TILE_F32 = 16         # tokens per tile in fp32 mode: a table entry is 16 float32 = 64 bytes
_TILE_INT = 32         # tokens per tile in the integer modes: 32 int16 = 64 bytes
_POS = 8               # byte positions per K tile; divides 32. int16 tile sums: 8 * 4 * 511 < 2**15
_ENTRIES = 81          # table entries per byte position: 3^4 signed sums
_ROWS_SMALL = 128      # rows per parallel work item in the small-batch kernel
_SMALL_KTILE = 32      # byte positions per K tile in the small-batch kernel; divides 32
_SMALL_STRIDE = 272    # elements per byte position's table in the small-batch kernel: 256 + 16
                       # (17 cache lines in fp32, so that one byte value's entries spread over sets)
_MIN_SPLIT_ROWS = 256  # rows below which the tiled kernel does not split a token tile further


def _base3_map() -> np.ndarray:
    """uint8 (256,): packed byte -> its table entry c0 + 3 c1 + 9 c2 + 27 c3 (code 3 read as 1)."""
    b = np.arange(256)
    codes = [(b >> (2 * q)) & 3 for q in range(4)]
    codes = [np.where(c == 3, 1, c) for c in codes]
    return (codes[0] + 3 * codes[1] + 9 * codes[2] + 27 * codes[3]).astype(np.uint8)


_BASE3 = _base3_map()

if numba is not None:
    # --- vector intrinsics ------------------------------------------------------------------

    @intrinsic
    def _stack_array(typingctx, size, dtype):
        """A 1-D C array of `size` (a compile-time constant) elements of `dtype` on the stack.

        Read and written only through the whole-array vector intrinsics below, LLVM keeps it in
        registers (a heap array could alias the tables and would be stored at every look-up)."""
        if not isinstance(size, types.IntegerLiteral):
            return None
        if isinstance(dtype, types.NumberClass):
            dt = dtype.instance_type
        elif isinstance(dtype, types.DTypeSpec):
            dt = dtype.dtype
        else:
            return None
        n = size.literal_value
        arrty = types.Array(dt, 1, "C")

        def codegen(context, builder, sig, args):
            llty = context.get_value_type(dt)
            ptr = builder.bitcast(cgutils.alloca_once(builder, ir.ArrayType(llty, n)), llty.as_pointer())
            ary = context.make_array(arrty)(context, builder)
            itemsize = context.get_constant(types.intp, context.get_abi_sizeof(llty))
            context.populate_array(ary, data=ptr,
                                   shape=cgutils.pack_array(builder, [context.get_constant(types.intp, n)]),
                                   strides=cgutils.pack_array(builder, [itemsize]),
                                   itemsize=itemsize, meminfo=None)
            return ary._getvalue()

        return arrty(size, dtype), codegen

    def _elem_align(ptr):
        """Alignment of one element of the vector `ptr` points to (all that arrays promise)."""
        elem = ptr.type.pointee.element
        return max(1, elem.width // 8) if isinstance(elem, ir.IntType) else 4

    def _lanes_ptr(context, builder, arrty, arr, offty, off, lanes):
        """Pointer to `lanes` consecutive elements of 1-D array `arr` from index `off`, as a vector."""
        data = context.make_array(arrty)(context, builder, arr).data
        ptr = builder.gep(data, [context.cast(builder, off, offty, types.intp)], inbounds=True)
        return builder.bitcast(ptr, ir.VectorType(ptr.type.pointee, lanes).as_pointer())

    def _load_as(builder, ptr, vty):
        """Load a vector and sign-extend its integer lanes to vty."""
        v = builder.load(ptr, align=_elem_align(ptr))
        if v.type != vty:
            v = builder.sext(v, vty)
        return v

    def _lanes_ok(n, dst, *srcs):
        """The intrinsics take a constant lane count and 1-D C arrays, all float32 or all signed
        integers no wider than dst's."""
        arrays = (dst,) + srcs
        if not isinstance(n, types.IntegerLiteral) or not all(
                isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in arrays):
            return False
        if dst.dtype == types.float32:
            return all(a.dtype == types.float32 for a in srcs)
        return all(isinstance(a.dtype, types.Integer) and a.dtype.signed
                   and a.dtype.bitwidth <= dst.dtype.bitwidth for a in arrays)

    def _binary_typer(op, dst, doff, a, aoff, b, boff, n):
        """Signature and codegen of dst[doff:doff+n] = a[aoff:aoff+n] (op) b[boff:boff+n]."""
        if not _lanes_ok(n, dst, a, b):
            return None
        lanes = n.literal_value
        floats = dst.dtype == types.float32

        def codegen(context, builder, sig, args):
            dty, doty, aty, aoty, bty, boty, _ = sig.args
            d, do, x, xo, y, yo, _ = args
            pd = _lanes_ptr(context, builder, dty, d, doty, do, lanes)
            vty = pd.type.pointee
            vx = _load_as(builder, _lanes_ptr(context, builder, aty, x, aoty, xo, lanes), vty)
            vy = _load_as(builder, _lanes_ptr(context, builder, bty, y, boty, yo, lanes), vty)
            if floats:
                r = builder.fadd(vx, vy) if op == "add" else builder.fsub(vx, vy)
            else:
                r = builder.add(vx, vy) if op == "add" else builder.sub(vx, vy)
            builder.store(r, pd, align=_elem_align(pd))
            return context.get_dummy_value()

        return types.none(dst, doff, a, aoff, b, boff, n), codegen

    @intrinsic
    def _vadd(typingctx, dst, doff, a, aoff, b, boff, n):
        """dst[doff:doff+n] = a[aoff:aoff+n] + b[boff:boff+n] for a constant n: float32 lanes
        IEEE adds; integer lanes sign-extended to dst's width, wrapping adds."""
        return _binary_typer("add", dst, doff, a, aoff, b, boff, n)

    @intrinsic
    def _vsub(typingctx, dst, doff, a, aoff, b, boff, n):
        """dst[doff:doff+n] = a[aoff:aoff+n] - b[boff:boff+n] (as _vadd)."""
        return _binary_typer("sub", dst, doff, a, aoff, b, boff, n)

    @intrinsic
    def _vcopy(typingctx, dst, doff, src, soff, n):
        """dst[doff:doff+n] = src[soff:soff+n] for a constant n (integer lanes sign-extended)."""
        if not _lanes_ok(n, dst, src):
            return None
        lanes = n.literal_value

        def codegen(context, builder, sig, args):
            dty, doty, sty, soty, _ = sig.args
            d, do, s, so, _ = args
            pd = _lanes_ptr(context, builder, dty, d, doty, do, lanes)
            v = _load_as(builder, _lanes_ptr(context, builder, sty, s, soty, so, lanes), pd.type.pointee)
            builder.store(v, pd, align=_elem_align(pd))
            return context.get_dummy_value()

        return types.none(dst, doff, src, soff, n), codegen

    # --- quantization ------------------------------------------------------------------------

    @njit(parallel=True, cache=True)
    def _quantize_rows(x, lim, xq, scale, finite):
        """quantize_rows(x, bits) into xq and scale, row-parallel, with the same float32 steps:
        absmax, inv = lim / absmax (1 for an all-zero row), xq = clip(rint(x * inv), -lim, lim),
        scale = absmax / lim (0 for an all-zero row). finite[row] = 0 where the row holds a NaN
        or an infinity: those rows are left to the NumPy function."""
        m, k = x.shape
        for t in prange(m):
            amax = np.float32(0)
            ok = True
            for kk in range(k):
                a = abs(x[t, kk])
                ok = ok and a < np.inf
                amax = max(amax, a)
            finite[t] = ok
            if not ok:
                continue
            inv = lim / (amax if amax > 0 else np.float32(1))
            for kk in range(k):
                v = np.rint(x[t, kk] * inv)
                xq[t, kk] = min(max(v, -lim), lim)
            scale[t] = amax / lim if amax > 0 else np.float32(0)

    # --- tiled kernels: M >= _SMALL_M -------------------------------------------------------

    @njit(parallel=True, cache=True)
    def _base3_by_k_tile(packed, cmap, wt):
        """wt[kt, r, p] = cmap[packed[r, kt * _POS + p]]: each row's table entries for one K tile
        in 8 contiguous bytes. packed uint8 (N, K_pad / 4); wt uint8 (K_pad / 4 / _POS, N, _POS)."""
        n, kb = packed.shape
        for r in prange(n):
            for kt in range(kb // _POS):
                for p in range(_POS):
                    wt[kt, r, p] = cmap[packed[r, kt * _POS + p]]

    @njit(inline="always")
    def _transpose_block(x, t0, tn, blk, xb, tile):
        """xb[kk * tile + t] = x[t0 + t, 128 blk + kk] for kk < 128, t < tile (0 past K, past tn)."""
        k = x.shape[1]
        k0 = blk * 128
        kn = min(128, k - k0)
        xb[:] = 0
        for t in range(tn):
            for kk in range(kn):
                xb[kk * tile + t] = x[t0 + t, k0 + kk]

    @njit(inline="always")
    def _build_tables(tab, xb, zeros, j0, tile):
        """Tables of the K tile at byte positions j0 .. j0 + _POS - 1 of the block in xb:
        tab[(p * 81 + e) * tile + t] = signed sum of entry e (base-3 codes) for token t."""
        for p in range(_POS):
            j = j0 + p
            base = p * _ENTRIES * tile
            _vsub(tab, base, zeros, 0, xb, j * tile, tile)        # code 0: -x0
            _vcopy(tab, base + tile, zeros, 0, tile)              # code 1: 0
            _vcopy(tab, base + 2 * tile, xb, j * tile, tile)      # code 2: +x0
            s = 3
            for q in range(1, 4):  # triple the table: entry - x_q, entry, entry + x_q
                xo = (j + 32 * q) * tile
                for lo in range(s):
                    d = base + lo * tile
                    _vcopy(tab, d + s * tile, tab, d, tile)
                    _vadd(tab, d + 2 * s * tile, tab, d, xb, xo, tile)
                    _vsub(tab, d, tab, d, xb, xo, tile)
                s *= 3

    @njit(cache=True)
    def _tile_sums_f32(x, wflat, n, t0, tn, r0, r1, sums):
        """sums[(r - r0) * 16 + t] = sum over k of Q[r, k] x[t0 + t, k] for tokens t < tn and rows
        r0 <= r < r1 (fp32). wflat is _base3_by_k_tile's output, flattened."""
        tile = _TILE_F32
        tab = np.empty(_POS * _ENTRIES * tile, np.float32)
        xb = np.empty(128 * tile, np.float32)
        zeros = np.zeros(tile, np.float32)
        for kt in range(wflat.shape[0] // (n * _POS)):
            j0 = (kt * _POS) & 31
            if j0 == 0:
                _transpose_block(x, t0, tn, (kt * _POS) >> 5, xb, tile)
            _build_tables(tab, xb, zeros, j0, tile)
            wrow = kt * n * _POS
            for r in range(r0, r1):
                # the K tile's 8 entries summed apart, then added: blocked summation, closer to
                # the exact sum than one running sum over all K / 4 entries
                acc = _stack_array(_TILE_F32, np.float32)
                _vcopy(acc, 0, zeros, 0, tile)
                w0 = wrow + r * _POS
                for p in range(_POS):
                    _vadd(acc, 0, acc, 0, tab, (p * _ENTRIES + wflat[w0 + p]) * tile, tile)
                s0 = (r - r0) * tile
                _vadd(sums, s0, sums, s0, acc, 0, tile)

    @njit(cache=True)
    def _tile_sums_int(xq, wflat, n, t0, tn, r0, r1, sums):
        """_tile_sums_f32 for the integer modes: tile of 32 tokens, int16 tables and sums over one
        K tile (exact: |sum| <= 8 * 4 * 511), added to the int32 running sums."""
        tile = _TILE_INT
        tab = np.empty(_POS * _ENTRIES * tile, np.int16)
        xb = np.empty(128 * tile, np.int16)
        zeros = np.zeros(tile, np.int16)
        for kt in range(wflat.shape[0] // (n * _POS)):
            j0 = (kt * _POS) & 31
            if j0 == 0:
                _transpose_block(xq, t0, tn, (kt * _POS) >> 5, xb, tile)
            _build_tables(tab, xb, zeros, j0, tile)
            wrow = kt * n * _POS
            for r in range(r0, r1):
                acc = _stack_array(_TILE_INT, np.int16)
                _vcopy(acc, 0, zeros, 0, tile)
                w0 = wrow + r * _POS
                for p in range(_POS):
                    _vadd(acc, 0, acc, 0, tab, (p * _ENTRIES + wflat[w0 + p]) * tile, tile)
                s0 = (r - r0) * tile
                _vadd(sums, s0, sums, s0, acc, 0, tile)

    @njit(parallel=True, cache=True)
    def _tiled_f32(x, wt, alpha, bias, nsplit, out):
        """out (M, N) = alpha * x Q^T (+ bias when bias.size) in fp32, for M >= _SMALL_M.

        x float32 (M, K); wt from _base3_by_k_tile; work items are (token tile, one of nsplit
        blocks of rows)."""
        tile = _TILE_F32
        m = x.shape[0]
        n = wt.shape[1]
        wflat = wt.reshape(-1)
        has_bias = bias.shape[0] > 0
        for item in prange(((m + tile - 1) // tile) * nsplit):
            t0 = (item // nsplit) * tile
            tn = min(tile, m - t0)
            sp = item % nsplit
            r0 = (n * sp) // nsplit
            r1 = (n * (sp + 1)) // nsplit
            sums = np.zeros((r1 - r0) * tile, np.float32)
            _tile_sums_f32(x, wflat, n, t0, tn, r0, r1, sums)
            for r in range(r0, r1):
                for t in range(tn):
                    y = sums[(r - r0) * tile + t] * alpha
                    out[t0 + t, r] = y + bias[r] if has_bias else y

    @njit(parallel=True, cache=True)
    def _tiled_int(xq, scale, wt, alpha, bias, nsplit, out):
        """Integer modes of _tiled_f32: xq int16 (M, K) and scale float32 (M,) from
        quantize_rows; exact integer sums, then float32(acc) * (scale * alpha) (+ bias)."""
        tile = _TILE_INT
        m = xq.shape[0]
        n = wt.shape[1]
        wflat = wt.reshape(-1)
        has_bias = bias.shape[0] > 0
        for item in prange(((m + tile - 1) // tile) * nsplit):
            t0 = (item // nsplit) * tile
            tn = min(tile, m - t0)
            sp = item % nsplit
            r0 = (n * sp) // nsplit
            r1 = (n * (sp + 1)) // nsplit
            sums = np.zeros((r1 - r0) * tile, np.int32)
            _tile_sums_int(xq, wflat, n, t0, tn, r0, r1, sums)
            sa = np.empty(tile, np.float32)
            for t in range(tn):
                sa[t] = scale[t0 + t] * alpha
            for r in range(r0, r1):
                for t in range(tn):
                    y = np.float32(sums[(r - r0) * tile + t]) * sa[t]
                    out[t0 + t, r] = y + bias[r] if has_bias else y

    # --- small-batch kernels: M < _SMALL_M ----------------------------------------------------

    @njit(inline="always")
    def _signed(v, code, zero):
        """The contribution of activation v under 2-bit code `code`: -v, 0, +v (code 3: 0)."""
        if code == 2:
            return v
        if code == 0:
            return zero - v
        return zero

    @njit(cache=True)
    def _token_tables(x, kb, tab, zero):
        """tab[(t * kb + pos) * _SMALL_STRIDE + byte] = signed sum of the four activations of token
        t at byte position pos under the codes of `byte` (all 256 byte values; code 3 counts 0),
        for kb byte positions (K_pad / 4); zero is 0 of tab's dtype. Each table is the sum of two
        16-entry half tables (weights 0, 1 and weights 2, 3 of the byte). Serial: a few
        microseconds for the M < _SMALL_M tokens it serves."""
        m, k = x.shape
        half_lo = np.empty(16, tab.dtype)
        half_hi = np.empty(16, tab.dtype)
        for t in range(m):
            for pos in range(kb):
                kk = (pos >> 5) * 128 + (pos & 31)
                v0 = x[t, kk] if kk < k else zero
                v1 = x[t, kk + 32] if kk + 32 < k else zero
                v2 = x[t, kk + 64] if kk + 64 < k else zero
                v3 = x[t, kk + 96] if kk + 96 < k else zero
                for c1 in range(4):
                    for c0 in range(4):
                        half_lo[c1 * 4 + c0] = _signed(v0, c0, zero) + _signed(v1, c1, zero)
                        half_hi[c1 * 4 + c0] = _signed(v2, c0, zero) + _signed(v3, c1, zero)
                base = (t * kb + pos) * _SMALL_STRIDE
                for hi in range(16):
                    for lo in range(16):
                        tab[base + hi * 16 + lo] = half_lo[lo] + half_hi[hi]

    @njit(cache=True)
    def _small_sums(tab, packed4, m, r0, r1, acc, zero):
        """acc[t, r - r0] = sum over byte positions p of tab[(t * kb + p) * _SMALL_STRIDE + byte p
        of row r], rows r0 <= r < r1. packed4 is the packed matrix viewed as uint32 (four bytes per
        load, little-endian: byte p is bits 8 (p % 4) .. of word p // 4). K goes in tiles of
        _SMALL_KTILE positions (a token's 32 tables, 34 KiB in fp32, stay in L1 while the rows go
        through them; the padded table stride spreads same-byte look-ups over all cache sets), four
        running sums per tile. Indices are uint64 so that Numba emits no negative-index wraparound
        code in the loop."""
        kb = packed4.shape[1] * 4
        for t in range(m):
            for r in range(r1 - r0):
                acc[t, r] = zero
        stride = np.uint64(_SMALL_STRIDE)
        mask = np.uint64(255)
        for kt in range(kb // _SMALL_KTILE):
            for r in range(r0, r1):
                prow = packed4[r]
                for t in range(m):
                    s0 = zero
                    s1 = zero
                    s2 = zero
                    s3 = zero
                    e = np.uint64((t * kb + kt * _SMALL_KTILE) * _SMALL_STRIDE)
                    i = np.uint64(kt * (_SMALL_KTILE // 4))
                    end = i + np.uint64(_SMALL_KTILE // 4)
                    while i < end:
                        w = np.uint64(prow[i])
                        s0 += tab[e + (w & mask)]
                        s1 += tab[e + stride + ((w >> np.uint64(8)) & mask)]
                        s2 += tab[e + np.uint64(2 * _SMALL_STRIDE) + ((w >> np.uint64(16)) & mask)]
                        s3 += tab[e + np.uint64(3 * _SMALL_STRIDE) + (w >> np.uint64(24))]
                        i += np.uint64(1)
                        e += np.uint64(4 * _SMALL_STRIDE)
                    acc[t, r - r0] += (s0 + s1) + (s2 + s3)

    @njit(parallel=True, cache=True)
    def _small_f32(tab, packed4, m, alpha, bias, out):
        """out (m, N) = alpha * x Q^T (+ bias when bias.size) in fp32 from x's token tables;
        packed4 the packed weights viewed as uint32 (N, K_pad / 16)."""
        n = packed4.shape[0]
        has_bias = bias.shape[0] > 0
        for c in prange((n + _ROWS_SMALL - 1) // _ROWS_SMALL):
            r0 = c * _ROWS_SMALL
            r1 = min(n, r0 + _ROWS_SMALL)
            acc = np.empty((m, r1 - r0), np.float32)
            _small_sums(tab, packed4, m, r0, r1, acc, np.float32(0))
            for t in range(m):
                for r in range(r0, r1):
                    y = acc[t, r - r0] * alpha
                    out[t, r] = y + bias[r] if has_bias else y

    @njit(parallel=True, cache=True)
    def _small_int(tab, packed4, scale, alpha, bias, out):
        """Integer modes of _small_f32: int16 token tables of the quantized activations, exact
        int64 sums, then float32(acc) * (scale * alpha) (+ bias)."""
        n = packed4.shape[0]
        m = scale.shape[0]
        has_bias = bias.shape[0] > 0
        sa = np.empty(m, np.float32)
        for t in range(m):
            sa[t] = scale[t] * alpha
        for c in prange((n + _ROWS_SMALL - 1) // _ROWS_SMALL):
            r0 = c * _ROWS_SMALL
            r1 = min(n, r0 + _ROWS_SMALL)
            acc = np.empty((m, r1 - r0), np.int64)
            _small_sums(tab, packed4, m, r0, r1, acc, np.int64(0))
            for t in range(m):
                for r in range(r0, r1):
                    y = np.float32(acc[t, r - r0]) * sa[t]
                    out[t, r] = y + bias[r] if has_bias else y


def _quantize(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~terdit_edge.kernels.reference.quantize_rows`, computed in parallel by Numba with
    the same float32 operations (bit-exact); rows holding NaN or infinity go through NumPy's.

    xq is int16 for every width (the same values as the reference's int8 for bits <= 8), so that
    int8 and int10 share one compiled specialization of each integer kernel."""
    m, k = x.shape
    xq = np.empty((m, k), np.int16)
    scale = np.empty(m, np.float32)
    finite = np.empty(m, np.bool_)
    _quantize_rows(x, np.float32((1 << (bits - 1)) - 1), xq, scale, finite)
    if not finite.all():
        bad = ~finite
        xq[bad], scale[bad] = quantize_rows(x[bad], bits)
    return xq, scale


def _as_words(packed: np.ndarray) -> np.ndarray:
    """The packed matrix (rows of a multiple of 32 bytes) viewed as uint32, copied if unaligned."""
    words = packed.view(np.uint32)
    return words if words.flags.aligned else packed.copy().view(np.uint32)


def _row_blocks(m: int, n: int, tile: int) -> int:
    """Row blocks per token tile in the tiled kernels: enough work items for every thread while
    each block keeps at least _MIN_SPLIT_ROWS rows (each block builds its own tables)."""
    ntiles = -(-m // tile)
    threads = numba.get_num_threads()
    if ntiles >= threads:
        return 1
    return max(1, min(-(-threads // ntiles), n // _MIN_SPLIT_ROWS))


class NumbaBackend(NumpyBackend):
    """Ternary matmul compiled by Numba (fp32, int8 and int10 modes); other ops from the reference."""

    name = "numba"
    invariant_min_rows = _SMALL_M  # the tiled kernels from _SMALL_M tokens; the per-token tables below

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if numba is None:
            return f"numba is not installed ({_IMPORT_ERROR})"
        return None

    def _set_threads(self) -> None:
        numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))

    def ternary_matmul(self, x: np.ndarray, w: TernaryWeight, out: np.ndarray | None = None) -> np.ndarray:
        """x float32 (M, K) -> float32 (M, N) = alpha * x Q^T + bias; into `out` when given."""
        x = check_matmul_args(x, w, out)
        m = x.shape[0]
        if out is None:
            out = np.empty((m, w.n), dtype=np.float32)
        if m == 0 or w.n == 0:
            return out
        self._set_threads()
        alpha = np.float32(w.alpha)
        bias = (np.ascontiguousarray(w.bias, dtype=np.float32) if w.bias is not None
                else np.zeros(0, np.float32))
        packed = np.ascontiguousarray(w.packed, dtype=np.uint8)
        kb = packed.shape[1]
        # the kernels write C-contiguous rows, and may write before every read of x is done
        direct = out.flags.c_contiguous and not np.may_share_memory(out, x)
        dst = out if direct else np.empty((m, w.n), np.float32)
        bits = activation_bits(self.activations)
        if bits:
            xq, scale = _quantize(x, bits)
        if m < _SMALL_M:
            if bits:
                tab = np.empty(m * kb * _SMALL_STRIDE, np.int16)
                _token_tables(xq, kb, tab, np.int16(0))
                _small_int(tab, _as_words(packed), scale, alpha, bias, dst)
            else:
                tab = np.empty(m * kb * _SMALL_STRIDE, np.float32)
                _token_tables(x, kb, tab, np.float32(0))
                _small_f32(tab, _as_words(packed), m, alpha, bias, dst)
        else:
            wt = np.empty((kb // _POS, w.n, _POS), np.uint8)
            _base3_by_k_tile(packed, _BASE3, wt)
            if bits:
                _tiled_int(xq, scale, wt, alpha, bias, _row_blocks(m, w.n, _TILE_INT), dst)
            else:
                _tiled_f32(x, wt, alpha, bias, _row_blocks(m, w.n, _TILE_F32), dst)
        if dst is not out:
            out[...] = dst
        return out
