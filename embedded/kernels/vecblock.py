"""Runs of 16-float blocks of a sparse kernel's multi-entry axpy, as explicit LLVM vector IR.

``block_axpy[m](dst, nrows, rs, nb, src, offs, vals, p, scale, base)`` adds, for the m
entries ``p .. p+m-1`` and every block start ``t = r*rs + 16*b`` (``r < nrows``,
``b < nb``), ``vals[i] * src[base + offs[i]*scale + t : +16]`` to ``dst[t : t+16]``, with the
same expression tree as :func:`~embedded.kernels.sparse.gather_axpy`'s loops (bit for bit).
The m source addresses and broadcast values are worked out once, before the loop over the
blocks (rows of a batch-last plane: a conv run skips the padding columns between them).

Why: Numba's loops over slices are vectorised by LLVM with run-time alias checks between the
destination and every source slice, a wide unrolled main loop and an epilogue; on a short run
(the weight-gradient scan's 48 floats for 16 output channels, a linear layer's 16 samples)
that set-up dominates. Measured on this machine, one pass of 8 entries over 48 floats: 138 ps
a multiply-add through the loop, 38 ps through one block per call (1 entry: 966 vs 80 ps).
The addresses are hoisted out of the block loop because LLVM cannot (a block's store may
alias ``offs`` and ``vals`` for all it knows, so one block per call reloaded them every
block): 8 entries over 48-1024 floats, src in L1, 12-31 ps a multiply-add against 22-37 ps
one block per call and 14-47 ps through the loops (same run, noisy host).

Portable: ``<16 x float>`` is generic LLVM IR (two 256-bit or one 512-bit register on x86,
four NEON registers on ARM); no target intrinsics. No bounds checks (raw pointers): callers
pass runs that lie inside both arrays, as for the loop form.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .layout import _ints

W = 16  #: floats per block
_I64 = ir.IntType(64)
_V = ir.VectorType(ir.FloatType(), W)


def splat(builder, v, vtype):
    """The scalar ``v`` in every lane of a ``vtype`` vector (insert, then a zero shuffle)."""
    n = vtype.count
    t = builder.insert_element(ir.Constant(vtype, ir.Undefined), v, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(t, t, ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))


def _sum_tree(builder, t):
    """gather_axpy's association: 8 entries pairwise, fewer left to right."""
    if len(t) == 8:
        a = builder.fadd(builder.fadd(t[0], t[1]), builder.fadd(t[2], t[3]))
        b = builder.fadd(builder.fadd(t[4], t[5]), builder.fadd(t[6], t[7]))
        return builder.fadd(a, b)
    s = t[0]
    for x in t[1:]:
        s = builder.fadd(s, x)
    return s


def _make(m: int):
    def f(typingctx, dst, nrows, rs, nb, src, offs, vals, p, scale, base):
        if not all(isinstance(a, types.Array) for a in (dst, src, offs, vals)):
            return None
        if not (dst.dtype == src.dtype == vals.dtype == types.float32
                and isinstance(offs.dtype, types.Integer)):
            return None
        sig = types.void(dst, nrows, rs, nb, src, offs, vals, p, scale, base)

        def codegen(context, builder, signature, args):
            def data(i):
                return context.make_array(signature.args[i])(context, builder, args[i]).data

            dp, sp, op, vp = data(0), data(4), data(5), data(6)
            nr, rsv, nbv, pv, sc, bv = _ints(context, builder, signature, args,
                                             (1, 2, 3, 7, 8, 9))
            otype = signature.args[5].dtype
            srcs, splats = [], []
            for k in range(m):  # the entries' source runs and values, once
                idx = builder.add(pv, ir.Constant(_I64, k))
                o = context.cast(builder, builder.load(builder.gep(op, [idx])), otype,
                                 types.int64)
                srcs.append(builder.gep(sp, [builder.add(bv, builder.mul(o, sc))]))
                splats.append(splat(builder, builder.load(builder.gep(vp, [idx])), _V))
            with cgutils.for_range(builder, nr) as row:
                r0 = builder.mul(row.index, rsv)
                with cgutils.for_range(builder, nbv) as blk:
                    t = builder.add(r0, builder.mul(blk.index, ir.Constant(_I64, W)))
                    terms = [builder.fmul(v, builder.load(
                        builder.bitcast(builder.gep(s, [t]), _V.as_pointer()), align=4))
                        for s, v in zip(srcs, splats, strict=True)]
                    dptr = builder.bitcast(builder.gep(dp, [t]), _V.as_pointer())
                    out = builder.fadd(builder.load(dptr, align=4), _sum_tree(builder, terms))
                    builder.store(out, dptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(f)


block_axpy8 = _make(8)
block_axpy4 = _make(4)
block_axpy3 = _make(3)
block_axpy2 = _make(2)
block_axpy1 = _make(1)
