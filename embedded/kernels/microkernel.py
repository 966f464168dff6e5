"""A 6 x 32 register-blocked GEMM microkernel, written as LLVM vector IR.

:data:`mk` adds ``sum_k A[i, k] B[k, j]`` to a 6 x 32 tile of ``c``: B from a panel (32 floats
a k, ``b[b0 + k*32 + j]``), A read where it lies through strides (a row-major matrix, or a conv
weight whose taps of one output channel follow those of the previous one). Twelve
``<16 x float>`` accumulators are carried in phi nodes across the k loop (six broadcasts of A
times two vectors of B, ``llvm.fma``), the same technique as :mod:`embedded.kernels.layout`'s
transposes. Numba's own loops do not keep a 6 x 32 block in registers; written this way one
thread reaches 234-240 GFLOP/s on this machine's AVX-512 cores with its operands in L1
(OpenBLAS's AVX2 kernels, which the machine pins: ~110). Measured 6 x 32 against 4, 8, 10, 12
and 14 rows: 203, 182, 120, 100, 92 GFLOP/s.

The IR is portable (LLVM splits ``<16 x float>`` into the target's vectors), but twelve
512-bit accumulators only fit the registers of a CPU with 512-bit vectors: on 128-bit NEON they
would be 48 registers and spill. :data:`WIDE_VECTORS` says whether this CPU has them; the
callers use the microkernel only then and keep the BLAS path elsewhere (ARM boards).

No bounds checks (raw pointers): the callers size the panels and the tile.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import config, types
from numba.core import cgutils
from numba.extending import intrinsic

from .layout import _ints
from .vecblock import splat

#: rows and columns of the register tile
MR, NR = 6, 32
_NV = NR // 16
_V = ir.VectorType(ir.FloatType(), 16)
_I64 = ir.IntType(64)


def _has_wide_vectors() -> bool:
    if config.CPU_NAME not in (None, "host"):  # Numba told to compile for another CPU
        return False
    try:
        feats = llvm.get_host_cpu_features()
    except RuntimeError:  # llvmlite cannot read this host's features
        return False
    return bool(feats.get("avx512f", False))


#: True on CPUs with 512-bit float vectors (AVX-512), where the microkernel's 12 accumulators
#: stay in registers
WIDE_VECTORS = _has_wide_vectors()


def _vptr(builder, base, off):
    return builder.bitcast(builder.gep(base, [off]), _V.as_pointer())


def _make(accumulate: bool):
    """The microkernel intrinsic: the ``c`` tile ``+=`` (``accumulate``) or ``=`` A times B."""
    def f(typingctx, a, a0, lda, aout, nin, nk, b, b0, c, c0, ldc):
        sig = types.void(a, a0, lda, aout, nin, nk, b, b0, c, c0, ldc)

        def codegen(context, builder, signature, args):
            a0v, ldav, aoutv, ninv, nkv, b0v, c0v, ldcv = _ints(
                context, builder, signature, args, (1, 2, 3, 4, 5, 7, 9, 10))
            ap = context.make_array(signature.args[0])(context, builder, args[0]).data
            bp = context.make_array(signature.args[6])(context, builder, args[6]).data
            cp = context.make_array(signature.args[8])(context, builder, args[8]).data
            fma = cgutils.get_or_insert_function(builder.module,
                                                 ir.FunctionType(_V, [_V] * 3),
                                                 "llvm.fma.v16f32")
            zero = ir.Constant(_V, [0.0] * 16)
            c64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
            # A's row offsets, and the jump at the end of an inner run
            rows = [builder.add(a0v, builder.mul(c64(i), ldav)) for i in range(MR)]
            jump = builder.sub(aoutv, ninv)
            pre = builder.block
            loop = builder.function.append_basic_block("mk.loop")
            done = builder.function.append_basic_block("mk.done")
            builder.cbranch(builder.icmp_signed(">", nkv, c64(0)), loop, done)
            builder.position_at_end(loop)
            k = builder.phi(_I64)
            q = builder.phi(_I64)
            ao = builder.phi(_I64)
            bo = builder.phi(_I64)
            k.add_incoming(c64(0), pre)
            q.add_incoming(c64(0), pre)
            ao.add_incoming(c64(0), pre)
            bo.add_incoming(b0v, pre)
            acc = []
            for _ in range(MR * _NV):
                p = builder.phi(_V)
                p.add_incoming(zero, pre)
                acc.append(p)
            bv = [builder.load(_vptr(builder, bp, builder.add(bo, c64(16 * v))), align=4)
                  for v in range(_NV)]
            new = []
            for i in range(MR):
                av = splat(builder, builder.load(builder.gep(ap, [builder.add(rows[i], ao)])), _V)
                for v in range(_NV):
                    new.append(builder.call(fma, [av, bv[v], acc[i * _NV + v]]))
            k1 = builder.add(k, c64(1))
            q1 = builder.add(q, c64(1))
            wrap = builder.icmp_signed("==", q1, ninv)
            q2 = builder.select(wrap, c64(0), q1)
            ao2 = builder.add(builder.add(ao, c64(1)), builder.select(wrap, jump, c64(0)))
            bo2 = builder.add(bo, c64(NR))
            end = builder.block
            k.add_incoming(k1, end)
            q.add_incoming(q2, end)
            ao.add_incoming(ao2, end)
            bo.add_incoming(bo2, end)
            for p, nv in zip(acc, new, strict=True):
                p.add_incoming(nv, end)
            builder.cbranch(builder.icmp_signed("<", k1, nkv), loop, done)
            builder.position_at_end(done)
            sums = []
            for nv in new:  # every phi first: they head the block
                p = builder.phi(_V)
                p.add_incoming(zero, pre)
                p.add_incoming(nv, end)
                sums.append(p)
            for i in range(MR):
                row = builder.add(c0v, builder.mul(c64(i), ldcv))
                for v in range(_NV):
                    ptr = _vptr(builder, cp, builder.add(row, c64(16 * v)))
                    x = sums[i * _NV + v]
                    if accumulate:
                        x = builder.fadd(builder.load(ptr, align=4), x)
                    builder.store(x, ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen
    return intrinsic(f)


#: ``mk(a, a0, lda, aout, nin, nk, b, b0, c, c0, ldc)``: for i < MR, j < NR,
#: ``c[c0 + i*ldc + j] += sum_{k<nk} A[i, k] * b[b0 + k*NR + j]`` with A read in place:
#: ``A[i, k] = a[a0 + i*lda + (k // nin)*aout + k % nin]`` (a row-major matrix: lda its row
#: stride, nin >= nk; runs of ``nin`` apart by ``aout``: a conv weight's taps of one output
#: channel after another)
mk = _make(True)
#: the same, storing the sum (``=``, not ``+=``)
mk_set = _make(False)


@intrinsic
def copy_row(typingctx, src, s0, dst, d0):
    """``dst[d0:d0 + NR] = src[s0:s0 + NR]`` (float32) as two unaligned vector moves: one
    row of a B panel (a Numba loop of 32 copies does not compile to that)."""
    sig = types.void(src, s0, dst, d0)

    def codegen(context, builder, signature, args):
        sp = context.make_array(signature.args[0])(context, builder, args[0]).data
        dp = context.make_array(signature.args[2])(context, builder, args[2]).data
        s, d = _ints(context, builder, signature, args, (1, 3))
        for v in range(_NV):
            off = ir.Constant(_I64, 16 * v)
            x = builder.load(_vptr(builder, sp, builder.add(s, off)), align=4)
            builder.store(x, _vptr(builder, dp, builder.add(d, off)), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _transpose16(builder, v):
    """out[u][q] = v[q][u] for sixteen <16 x float> values: four rounds, each swapping the
    off-diagonal h x h blocks of every 2h x 2h block (h = 8, 4, 2, 1)."""
    v = list(v)
    for h in (8, 4, 2, 1):
        lo = ir.Constant(ir.VectorType(ir.IntType(32), 16),
                         [j if j & h == 0 else 16 + j - h for j in range(16)])
        hi = ir.Constant(ir.VectorType(ir.IntType(32), 16),
                         [j + h if j & h == 0 else 16 + j for j in range(16)])
        for i in range(16):
            if i & h == 0:
                a, b = v[i], v[i + h]
                v[i] = builder.shuffle_vector(a, b, lo)
                v[i + h] = builder.shuffle_vector(a, b, hi)
    return v


@intrinsic
def gather_t16(typingctx, src, codes, r0, n, base, dst, d0, ds):
    """A 16 x 16 block gathered transposed: ``dst[d0 + u*ds + q] = src[codes[r0 + q]*n + base
    + u]`` for q, u < 16 (sixteen rows of 16 floats, transposed in registers)."""
    sig = types.void(src, codes, r0, n, base, dst, d0, ds)

    def codegen(context, builder, signature, args):
        sp = context.make_array(signature.args[0])(context, builder, args[0]).data
        cp = context.make_array(signature.args[1])(context, builder, args[1]).data
        dp = context.make_array(signature.args[5])(context, builder, args[5]).data
        r0v, nv, bv, d0v, dsv = _ints(context, builder, signature, args, (2, 3, 4, 6, 7))
        rows = []
        for q in range(16):
            code = builder.load(builder.gep(cp, [builder.add(r0v, ir.Constant(_I64, q))]))
            off = builder.add(builder.mul(builder.sext(code, _I64) if code.type != _I64
                                          else code, nv), bv)
            rows.append(builder.load(_vptr(builder, sp, off), align=4))
        for u, x in enumerate(_transpose16(builder, rows)):
            off = builder.add(d0v, builder.mul(ir.Constant(_I64, u), dsv))
            builder.store(x, _vptr(builder, dp, off), align=4)
        return context.get_dummy_value()

    return sig, codegen
