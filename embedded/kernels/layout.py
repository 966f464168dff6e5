"""The transposes between NCHW activations and the conv kernels' batch-last and
channels-last layouts (see conv_kernels), 8 x 8 blocks at a time in registers.

A map in such a layout holds, at each position p = (row, column) of a W-wide map, R values
side by side (R samples: batch-last; R channels: channels-last); rows may carry padding
(row stride ``rs``). Written element by element, a transpose costs a scalar load and a scalar
store per float: 5x a copy of the same bytes (measured). :func:`to_grid` / :func:`from_grid`
move 8 rows x 8 positions per block as eight vector loads, three rounds of shuffles and eight
vector stores, written as portable LLVM IR (``shufflevector`` on ``<8 x float>``): LLVM
lowers it to AVX shuffles on x86 and to NEON zip/unzip on ARM boards, nothing x86-specific.
A block may cross map rows (any W, e.g. the 7x7 and 4x4 maps). Measured on 2 threads,
16 x 64 x 1024 floats NCHW -> batch-last: 0.25 ms element by element, 0.07 ms in blocks
(a plain copy of the bytes: 0.05 ms).

The block intrinsics do no bounds checks (raw pointers): :func:`to_grid` and
:func:`from_grid` only call them on blocks that lie inside both arrays.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

_I64 = ir.IntType(64)
_V8 = ir.VectorType(ir.FloatType(), 8)


def _mask(m):
    return ir.Constant(ir.VectorType(ir.IntType(32), 8), m)


def _vec_ptr(builder, base, off):
    return builder.bitcast(builder.gep(base, [off]), _V8.as_pointer())


def _line(builder, base, stride):
    """Offsets ``base + k*stride`` for k < 8."""
    return [builder.add(base, builder.mul(stride, ir.Constant(_I64, k))) for k in range(8)]


def _load_row(builder, ptr, off, mode):
    """Eight floats of a source row at ``off``: contiguous (mode 0), or every other float
    from ``off`` (mode 1: 16 floats loaded, lanes 0, 2, ..) or ``off - 1`` (mode 2: lanes 1,
    3, ..; the pair of loads then starts one float early and still ends inside the row)."""
    if mode == 0:
        return builder.load(_vec_ptr(builder, ptr, off), align=4)
    if mode == 2:
        off = builder.sub(off, ir.Constant(_I64, 1))
    a = builder.load(_vec_ptr(builder, ptr, off), align=4)
    b = builder.load(_vec_ptr(builder, ptr, builder.add(off, ir.Constant(_I64, 8))), align=4)
    first = 0 if mode == 1 else 1
    return builder.shuffle_vector(a, b, _mask(list(range(first, 16, 2))))


def _transpose_regs(builder, v):
    """out[k][i] = v[i][k] for eight <8 x float> values: three butterfly rounds."""
    u = [None] * 8
    for p in range(4):
        a, b = v[2 * p], v[2 * p + 1]
        u[2 * p] = builder.shuffle_vector(a, b, _mask([0, 8, 2, 10, 4, 12, 6, 14]))
        u[2 * p + 1] = builder.shuffle_vector(a, b, _mask([1, 9, 3, 11, 5, 13, 7, 15]))
    w = [[None] * 4 for _ in range(2)]
    for g in range(2):
        for e in range(2):
            a, b = u[4 * g + e], u[4 * g + 2 + e]
            w[g][e] = builder.shuffle_vector(a, b, _mask([0, 1, 8, 9, 4, 5, 12, 13]))
            w[g][e + 2] = builder.shuffle_vector(a, b, _mask([2, 3, 10, 11, 6, 7, 14, 15]))
    out = [None] * 8
    for c in range(4):
        out[c] = builder.shuffle_vector(w[0][c], w[1][c], _mask([0, 1, 2, 3, 8, 9, 10, 11]))
        out[c + 4] = builder.shuffle_vector(w[0][c], w[1][c], _mask([4, 5, 6, 7, 12, 13, 14, 15]))
    return out


def _grid_offsets(builder, d0, rs, cs, W, r0, c0, cols=None):
    """Offsets ``d0 + r*rs + c*cs`` of 8 consecutive grid positions from (r0, c0), c wrapping
    to 0 (and r + 1) at W: a position p of a (rows, W) map kept with row stride rs. With
    ``cols`` (a pointer to W int64s), column c is at ``cols[c]*cs`` instead."""
    out = []
    r, c = r0, c0
    one = ir.Constant(_I64, 1)
    zero = ir.Constant(_I64, 0)
    for k in range(8):
        if k:
            c = builder.add(c, one)
            wrap = builder.icmp_signed("==", c, W)
            c = builder.select(wrap, zero, c)
            r = builder.add(r, builder.zext(wrap, _I64))
        col = c if cols is None else builder.load(builder.gep(cols, [c]))
        out.append(builder.add(d0, builder.add(builder.mul(r, rs), builder.mul(col, cs))))
    return out


def _ints(context, builder, sig, args, idx):
    return [context.cast(builder, args[i], sig.args[i], types.int64) for i in idx]


def _make_to_grid(mode: int, lanes: tuple[int, ...] = tuple(range(8))):
    """Intrinsic ``f(src, s0, ss, dst, d0, rs, cs, W, r0, c0)``: eight source rows i (at
    ``s0 + i*ss``, 8 positions each: contiguous, or every other float for modes 1/2, see
    :func:`_load_row`) transposed; position k's 8 values (rows 0..7, from lane ``lanes[k]``
    of the rows) stored contiguously at the grid offset of position k (:func:`_grid_offsets`).
    Fewer lanes store fewer positions: (0, 2, 4, 6) is a stride-2 row of 4 columns (an
    8-wide map's phase) from 8 contiguous floats."""

    def f(typingctx, src, s0, ss, dst, d0, rs, cs, W, r0, c0):
        if not (isinstance(src, types.Array) and isinstance(dst, types.Array)):
            return None
        sig = types.void(src, s0, ss, dst, d0, rs, cs, W, r0, c0)

        def codegen(context, builder, signature, args):
            s0v, ssv, d0v, rsv, csv, wv, r0v, c0v = _ints(context, builder, signature, args,
                                                          (1, 2, 4, 5, 6, 7, 8, 9))
            sp = context.make_array(signature.args[0])(context, builder, args[0]).data
            dp = context.make_array(signature.args[3])(context, builder, args[3]).data
            rows = [_load_row(builder, sp, off, mode) for off in _line(builder, s0v, ssv)]
            out = _transpose_regs(builder, rows)
            offs = _grid_offsets(builder, d0v, rsv, csv, wv, r0v, c0v)
            for k, lane in enumerate(lanes):
                builder.store(out[lane], _vec_ptr(builder, dp, offs[k]), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(f)


def _f_from_grid(typingctx, src, s0, rs, cs, cols, W, r0, c0, dst, d0, ds, b):
    """Intrinsic: the inverse block: 8 values (rows 0..7) of each of 8 grid positions loaded
    from their grid offsets (``cols``: an int64 array of column numbers, or an integer for
    none, see :func:`_grid_offsets`), transposed, row i stored as 8 contiguous floats at
    ``d0 + i*ds``, plus ``b``."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array)):
        return None
    table = isinstance(cols, types.Array)
    if table and (cols.dtype != types.int64 or cols.layout != "C"):
        return None  # read through its data pointer: contiguous int64 only
    sig = types.void(src, s0, rs, cs, cols, W, r0, c0, dst, d0, ds, b)

    def codegen(context, builder, signature, args):
        s0v, rsv, csv, wv, r0v, c0v, d0v, dsv = _ints(context, builder, signature, args,
                                                      (1, 2, 3, 5, 6, 7, 9, 10))
        sp = context.make_array(signature.args[0])(context, builder, args[0]).data
        dp = context.make_array(signature.args[8])(context, builder, args[8]).data
        cp = (context.make_array(signature.args[4])(context, builder, args[4]).data
              if table else None)
        vecs = [builder.load(_vec_ptr(builder, sp, off), align=4)
                for off in _grid_offsets(builder, s0v, rsv, csv, wv, r0v, c0v, cp)]
        out = _transpose_regs(builder, vecs)
        bv = context.cast(builder, args[11], signature.args[11], types.float32)
        splat = builder.insert_element(ir.Constant(_V8, ir.Undefined), bv,
                                       ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(splat, splat, _mask([0] * 8))
        for i, off in enumerate(_line(builder, d0v, dsv)):
            builder.store(builder.fadd(out[i], splat), _vec_ptr(builder, dp, off), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _make_from_pair(npos: int):
    """Intrinsic ``f(src, a0, b0, cs, dst, d0, ds)``: two phase runs of a stride-2 row,
    ``npos`` (8 or 4) positions each (position k of run A at ``a0 + k*cs``, of run B at
    ``b0 + k*cs``, 8 samples side by side), transposed and interleaved: sample i's 2*npos
    columns A0 B0 A1 B1 .. stored contiguously at ``d0 + i*ds``."""

    def f(typingctx, src, a0, b0, cs, dst, d0, ds):
        if not (isinstance(src, types.Array) and isinstance(dst, types.Array)):
            return None
        sig = types.void(src, a0, b0, cs, dst, d0, ds)

        def codegen(context, builder, signature, args):
            a0v, b0v, csv, d0v, dsv = _ints(context, builder, signature, args, (1, 2, 3, 5, 6))
            sp = context.make_array(signature.args[0])(context, builder, args[0]).data
            dp = context.make_array(signature.args[4])(context, builder, args[4]).data
            rows = [_line(builder, base, csv)[:npos] for base in (a0v, b0v)]
            if npos == 4:  # one transpose of A0 B0 .. A3 B3: each sample's row, 8 floats
                vecs = [builder.load(_vec_ptr(builder, sp, rows[k % 2][k // 2]), align=4)
                        for k in range(8)]
                out = _transpose_regs(builder, vecs)
                for i, off in enumerate(_line(builder, d0v, dsv)):
                    builder.store(out[i], _vec_ptr(builder, dp, off), align=4)
                return context.get_dummy_value()
            ta, tb = (_transpose_regs(builder, [builder.load(_vec_ptr(builder, sp, off), align=4)
                                                for off in r]) for r in rows)
            for i, off in enumerate(_line(builder, d0v, dsv)):
                lo = builder.shuffle_vector(ta[i], tb[i], _mask([0, 8, 1, 9, 2, 10, 3, 11]))
                hi = builder.shuffle_vector(ta[i], tb[i], _mask([4, 12, 5, 13, 6, 14, 7, 15]))
                builder.store(lo, _vec_ptr(builder, dp, off), align=4)
                off8 = builder.add(off, ir.Constant(_I64, 8))
                builder.store(hi, _vec_ptr(builder, dp, off8), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(f)


block_to_grid = _make_to_grid(0)
block_to_grid_even2 = _make_to_grid(1)
block_to_grid_odd2 = _make_to_grid(2)
block_to_grid4_1 = _make_to_grid(0, (0, 1, 2, 3))
block_to_grid4_2 = _make_to_grid(0, (0, 2, 4, 6))
block_from_grid = intrinsic(_f_from_grid)
block_from_pair = _make_from_pair(8)
block_from_pair4 = _make_from_pair(4)


@njit(cache=True, nogil=True, inline="always")
def _advance(r, c, k, W):
    """Grid position (r, c) moved on by k positions (rows of W)."""
    c += k
    while c >= W:
        c -= W
        r += 1
    return r, c


@njit(cache=True, nogil=True, inline="always")
def to_grid(src, s, ss, R, P, step, dst, d0, rs, cs, W):
    """``dst[d0 + (p//W)*rs + (p%W)*cs + i] = src[s + i*ss + p*step]`` for rows i < R and
    positions p < P: R source rows (NCHW samples, or channels) into a map of W-wide rows whose
    positions hold the R values side by side (batch-last or channels-last). 8 x 8 register
    blocks where they fit (step 1, or 2 while the 16-float loads stay inside ``src``; the
    lanes read past a row's end are dropped), then one 8 x 4 block (8 floats a row) where 4
    or more positions are left, element by element for the rest."""
    i = 0
    while i + 8 <= R:
        p = 0
        r = 0
        c = 0
        while p + 8 <= P:
            a = s + p * step
            if step == 1:
                block_to_grid(src, a, ss, dst, d0 + i, rs, cs, W, r, c)
            elif step == 2 and a + 7 * ss + 16 <= src.size:  # 16 floats a row, in bounds
                block_to_grid_even2(src, a, ss, dst, d0 + i, rs, cs, W, r, c)
            elif step == 2 and a >= 1 and a + 7 * ss + 15 <= src.size:  # from a - 1
                block_to_grid_odd2(src, a, ss, dst, d0 + i, rs, cs, W, r, c)
            else:
                break
            p += 8
            r, c = _advance(r, c, 8, W)
        a = s + p * step
        if step <= 2 and p + 4 <= P and a + 7 * ss + 8 <= src.size:  # 8 floats a row
            if step == 1:
                block_to_grid4_1(src, a, ss, dst, d0 + i, rs, cs, W, r, c)
            else:
                block_to_grid4_2(src, a, ss, dst, d0 + i, rs, cs, W, r, c)
            p += 4
            r, c = _advance(r, c, 4, W)
        if p < P:
            for k in range(8):
                row = src[s + k * ss:s + k * ss + P * step]
                rr, cc = r, c
                for q in range(p, P):
                    dst[d0 + rr * rs + cc * cs + i + k] = row[q * step]
                    rr, cc = _advance(rr, cc, 1, W)
        i += 8
        s += 8 * ss
    while i < R:
        row = src[s:s + P * step]
        r = 0
        c = 0
        for q in range(P):
            dst[d0 + r * rs + c * cs + i] = row[q * step]
            r, c = _advance(r, c, 1, W)
        i += 1
        s += ss


def _col(cols, c):
    """Column c's number: ``cols[c]`` for a table, c itself otherwise (see from_grid)."""


@overload(_col, inline="always")
def _col_impl(cols, c):
    if isinstance(cols, types.Array):
        return lambda cols, c: cols[c]
    return lambda cols, c: c


@njit(cache=True, nogil=True, inline="always")
def from_grid(src, s0, rs, cs, W, R, P, dst, d, ds, b, cols=0):
    """``dst[d + i*ds + p] = src[s0 + (p//W)*rs + col(p%W)*cs + i] + b`` for i < R, p < P:
    the inverse of :func:`to_grid` (step 1), plus a constant (the bias). ``col(c)`` is c, or
    ``cols[c]`` when ``cols`` is an int64 table of W column numbers (a permuted row)."""
    i = 0
    while i + 8 <= R:
        p = 0
        r = 0
        c = 0
        while p + 8 <= P:
            block_from_grid(src, s0 + i, rs, cs, cols, W, r, c, dst, d + p, ds, b)
            p += 8
            r, c = _advance(r, c, 8, W)
        if p < P:
            for k in range(8):
                row = dst[d + k * ds:d + k * ds + P]
                rr, cc = r, c
                for q in range(p, P):
                    row[q] = src[s0 + rr * rs + _col(cols, cc) * cs + i + k] + b
                    rr, cc = _advance(rr, cc, 1, W)
        i += 8
        d += 8 * ds
    while i < R:
        row = dst[d:d + P]
        r = 0
        c = 0
        for q in range(P):
            row[q] = src[s0 + r * rs + _col(cols, c) * cs + i] + b
            r, c = _advance(r, c, 1, W)
        i += 1
        d += ds


@njit(cache=True, nogil=True, inline="always")
def from_pair(src, a0, b0, N, cnt, dst, d, ds):
    """``dst[d + i*ds + 2q] = src[a0 + q*N + i]`` and ``dst[d + i*ds + 2q + 1] =
    src[b0 + q*N + i]`` for q < cnt, i < N: a stride-2 row put back together from its two
    batch-last phase runs (both ``cnt`` long), 8 samples x 8 column pairs per block, then
    8 samples x 4 pairs (an 8-wide row in one block)."""
    i = 0
    while i + 8 <= N:
        q = 0
        while q + 8 <= cnt:
            block_from_pair(src, a0 + q * N + i, b0 + q * N + i, N, dst, d + 2 * q, ds)
            q += 8
        if q + 4 <= cnt:
            block_from_pair4(src, a0 + q * N + i, b0 + q * N + i, N, dst, d + 2 * q, ds)
            q += 4
        if q < cnt:
            for k in range(8):
                row = dst[d + k * ds:d + k * ds + 2 * cnt]
                for qq in range(q, cnt):
                    row[2 * qq] = src[a0 + qq * N + i + k]
                    row[2 * qq + 1] = src[b0 + qq * N + i + k]
        i += 8
        d += 8 * ds
    while i < N:
        row = dst[d:d + 2 * cnt]
        for q in range(cnt):
            row[2 * q] = src[a0 + q * N + i]
            row[2 * q + 1] = src[b0 + q * N + i]
        i += 1
        d += ds
