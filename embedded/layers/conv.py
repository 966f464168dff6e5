"""Conv2d with real sparse kernels (dense, swat, masked), forward and backward side by side.

Internal layout: the input is packed once per forward into batch-last, zero-padded,
stride-phase planes (see :mod:`embedded.kernels.conv_kernels`); the output is computed batch
last and unpacked to NCHW.

* ``dense``: im2col over the packed input + BLAS GEMM (groups == 1); grouped/depthwise convs
  use the direct kernels with every tap kept.
* ``swat``: forward and backward-input with the compressed top-K weights (CSR by output
  channel, CSC by input channel, only kept taps are touched); the input's top-K magnitudes are
  kept (channel-grouped sparse activations) and the dense weight gradient is a scatter over
  those kept activations only. The weight threshold is the exact K-th magnitude every
  ``topk_period`` training steps (radix select, :mod:`embedded.kernels.topk`), reused between.
* ``masked``: forward/backward-input with the compressed W⊙M (index structure cached until the
  mask changes, values gathered each step); weight gradient only at the mask's entries (a
  sampled dot product per kept weight) unless ``want_dense_grad``.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np

from ..kernels import conv_kernels as K
from ..kernels import sparse as S
from ..kernels import topk as T
from .base import Layer

_MODES = ("dense", "swat", "masked")
_WS = threading.local()


def workspace(name: str, size: int) -> np.ndarray:
    """A flat float32 scratch shared by the layers of this thread (grown on demand)."""
    d = getattr(_WS, "bufs", None)
    if d is None:
        d = _WS.bufs = {}
    buf = d.get(name)
    if buf is None or buf.size < size:
        buf = d[name] = np.empty(size, dtype=np.float32)
    return buf[:size]


def workspace_bytes() -> int:
    """Bytes held by this thread's shared conv/linear scratch."""
    d = getattr(_WS, "bufs", {})
    return sum(b.nbytes for b in d.values())


class _Timer:
    def __init__(self, layer: Layer, phase: str):
        self.layer, self.phase = layer, phase

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.layer.timing:
            self.layer.phase_times[self.phase] = time.perf_counter() - self.t0


class Conv2d(Layer):
    """2-D convolution (torch semantics: weight (C_out, C_in/groups, kh, kw), optional bias)."""

    def __init__(self, node, in_shapes, out_shape):
        in_shape = tuple(in_shapes[0])
        super().__init__(node.name, in_shape, out_shape)
        if len(in_shape) != 3:
            raise ValueError(f"conv {node.name!r}: expected a (C, H, W) input shape, got {in_shape}")
        a = node.attrs
        self.cin, self.h, self.w = in_shape
        self.cout = a["out_channels"]
        self.kh, self.kw = a["kernel"]
        self.sh, self.sw = a["stride"]
        self.ph, self.pw = a["padding"]
        self.groups = a["groups"]
        self.has_bias = bool(a["bias"])
        self.cig = self.cin // self.groups
        self.cog = self.cout // self.groups
        self.oh = (self.h + 2 * self.ph - self.kh) // self.sh + 1
        self.ow = (self.w + 2 * self.pw - self.kw) // self.sw + 1
        if tuple(out_shape) != (self.cout, self.oh, self.ow):
            raise ValueError(f"conv {node.name!r}: out_shape {out_shape} does not match "
                             f"{(self.cout, self.oh, self.ow)}")
        hp, wp = self.h + 2 * self.ph, self.w + 2 * self.pw
        self.hq = -(-hp // self.sh)
        self.wq = -(-wp // self.sw)
        self.kk = self.kh * self.kw
        wshape = (self.cout, self.cig, self.kh, self.kw)
        self.params = {"weight": np.zeros(wshape, np.float32)}
        self.grads = {"weight": np.zeros(wshape, np.float32)}
        if self.has_bias:
            self.params["bias"] = np.zeros(self.cout, np.float32)
            self.grads["bias"] = np.zeros(self.cout, np.float32)
        self._nobias = np.zeros(1, np.float32)
        self.mode = "dense"
        self.ls = None
        self.mask: np.ndarray | None = None
        self.want_dense_grad = False
        self.dense_grad: np.ndarray | None = None
        self.measured_density = 1.0
        self.measured_act_density = 1.0
        self.timing = True
        self.phase_times: dict[str, float] = {}
        self._steps = 0
        self._thr = -1.0
        self._hist = T.new_hist()
        self._mask_dirty = True
        self._full_ready = False
        self._n = 0
        # dense tap codes (row r = (ci, kh, kw) for groups == 1): used by im2col/col2im
        ci, kh, kw = np.meshgrid(np.arange(self.cin), np.arange(self.kh), np.arange(self.kw),
                                 indexing="ij")
        cq = (ci * self.sh + kh % self.sh) * self.sw + kw % self.sw
        self._codes = (((cq * self.hq) + kh // self.sh) * self.wq + kw // self.sw).reshape(-1)
        self._codes = self._codes.astype(np.int32)
        self._alloc_sparse(1)

    # ------------------------------------------------------------------ setup
    def init_params(self, rng: np.random.Generator) -> None:
        """torch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
        bound = 1.0 / math.sqrt(self.cig * self.kk)
        w = self.params["weight"]
        w[...] = rng.uniform(-bound, bound, size=w.shape).astype(np.float32)
        if self.has_bias:
            self.params["bias"][...] = rng.uniform(-bound, bound, self.cout).astype(np.float32)
        if self.mask is not None:
            w *= self.mask

    def _alloc_sparse(self, cap: int) -> None:
        cap = max(cap, 1)
        if getattr(self, "_rowptr", None) is None:
            self._rowptr = np.zeros(self.cout + 1, np.int64)
            self._counts = np.zeros(max(self.cout, self.cin) + 1, np.int64)
        self._widx = np.zeros(cap, np.int32)
        self._val = np.zeros(cap, np.float32)
        self._code = np.zeros(cap, np.int32)
        self._col = np.zeros(cap, np.int32)
        self._rowco = np.zeros(cap, np.int32)
        self._colptr = np.zeros(self.cin + 1, np.int64)
        self._perm = np.zeros(cap, np.int32)
        self._c_code = np.zeros(cap, np.int32)
        self._c_co = np.zeros(cap, np.int32)
        self._c_widx = np.zeros(cap, np.int32)
        self._c_val = np.zeros(cap, np.float32)
        self._nnz = 0

    def setup(self, max_batch: int) -> None:
        """Allocate the packed input/output/gradient buffers for batches up to ``max_batch``."""
        super().setup(max_batch)
        n = max_batch
        cq = self.cin * self.sh * self.sw
        self._xq = np.zeros(cq * self.hq * self.wq * n, np.float32)
        self._gxq = np.zeros_like(self._xq)
        self._yb = np.zeros(self.cout * self.oh * self.ow * n, np.float32)
        self._gyb = np.zeros_like(self._yb)
        self._y = np.zeros((n, self.cout, self.oh, self.ow), np.float32)
        self._gx = np.zeros((n, self.cin, self.h, self.w), np.float32)
        if self.mode == "swat":
            self._setup_swat()

    def _setup_swat(self) -> None:
        n = max(self.max_batch, 1)
        if getattr(self, "_gyT", None) is None or self._gyT.size < self._yb.size:
            self._gyT = np.zeros(self._yb.size, np.float32)
            self._gWt = np.zeros(self.params["weight"].size, np.float32)
            self._aptr = np.zeros(self.cin + 1, np.int64)
            cap = T.count_for_density(self.ls.act_density, n * self.cin * self.h * self.w)
            self._apos = np.zeros(int(cap * 1.25) + 64, np.int32)
            self._aval = np.zeros(int(cap * 1.25) + 64, np.float32)

    # ------------------------------------------------------------------ sparsity API
    def set_sparsity(self, mode: str, ls=None) -> None:
        """Select ``dense`` | ``swat`` | ``masked``; ``ls`` (LayerSparsity) None means dense."""
        if mode not in _MODES:
            raise ValueError(f"conv {self.name!r}: mode must be one of {_MODES}, got {mode!r}")
        if ls is None and mode != "masked":
            mode = "dense"
        self.mode = mode
        self.ls = ls
        self._steps = 0
        self._thr = -1.0
        self._mask_dirty = True
        self.measured_density = 1.0
        self.measured_act_density = 1.0
        if mode == "swat" and self.max_batch:
            self._setup_swat()

    def set_mask(self, mask: np.ndarray | None) -> None:
        """Store the mask (weight-shaped, bool/uint8) and zero the weights outside it."""
        if mask is None:
            self.mask = None
        else:
            m = np.asarray(mask)
            if m.shape != self.params["weight"].shape:
                raise ValueError(f"conv {self.name!r}: mask shape {m.shape} != weight shape "
                                 f"{self.params['weight'].shape}")
            self.mask = (m != 0).astype(np.uint8)
            self.params["weight"][self.mask == 0] = 0.0
        self._mask_dirty = True

    def _want_dense_buf(self) -> np.ndarray:
        if self.dense_grad is None or self.dense_grad.shape != self.params["weight"].shape:
            self.dense_grad = np.zeros_like(self.params["weight"])
        return self.dense_grad

    # ------------------------------------------------------------------ compression
    def _ensure_cap(self, nnz: int) -> None:
        if self._widx.size < nnz:
            self._alloc_sparse(int(nnz * 1.5) + 16)

    def _finish_structure(self, nnz: int) -> None:
        """Codes, CSC permutation and CSC copies of the kept entries (values included)."""
        self._nnz = nnz
        K.weight_codes(self._widx, nnz, self.cog, self.cig, self.kh, self.kw, self.sh,
                       self.sw, self.hq, self.wq, self._code, self._col, self._rowco)
        S.csc_from_keys(self._col, nnz, self.cin, self._colptr, self._perm, self._counts)
        K.permute_csc(self._perm, nnz, self._code, self._rowco, self._widx, self._val,
                      self._c_code, self._c_co, self._c_widx, self._c_val)

    def _compress_thr(self, thr: float) -> None:
        w2 = self.params["weight"].reshape(self.cout, -1)
        S.count_rows_thr(w2, np.float32(thr), self._counts)
        nnz = S.prefix(self._counts[:self.cout], self._rowptr)
        self._ensure_cap(nnz)
        S.fill_rows_thr(w2, np.float32(thr), self._rowptr, self._widx, self._val)
        self._finish_structure(nnz)

    def _compress_mask(self, mask: np.ndarray | None) -> None:
        """Cached structure of the mask (all taps if None); values refreshed every call."""
        if self._mask_dirty:
            m2 = (np.ones(self.params["weight"].shape, np.uint8) if mask is None
                  else mask).reshape(self.cout, -1)
            S.count_rows_mask(m2, self._counts)
            nnz = S.prefix(self._counts[:self.cout], self._rowptr)
            self._ensure_cap(nnz)
            S.fill_rows_mask(m2, self._rowptr, self._widx)
            self._nnz = nnz
            S.gather(self.params["weight"].reshape(-1), self._widx, self._val, nnz)
            self._finish_structure(nnz)
            self._mask_dirty = False
        else:
            nnz = self._nnz
            wf = self.params["weight"].reshape(-1)
            S.gather(wf, self._widx, self._val, nnz)
            S.gather(wf, self._c_widx, self._c_val, nnz)

    # ------------------------------------------------------------------ forward
    def _check_x(self, x: np.ndarray) -> int:
        if (x.ndim != 4 or tuple(x.shape[1:]) != (self.cin, self.h, self.w)
                or x.dtype != np.float32):
            raise ValueError(f"conv {self.name!r}: expected float32 input (N, {self.cin}, "
                             f"{self.h}, {self.w}), got {x.dtype} {x.shape}")
        n = x.shape[0]
        if n > self.max_batch:
            raise ValueError(f"conv {self.name!r}: batch {n} > max_batch {self.max_batch} "
                             "given to setup()")
        return n

    def _geom(self, n: int):
        L = self.ow * n
        rs = self.wq * n
        plane = self.hq * self.wq * n
        return L, rs, plane

    def _sparse_path(self) -> bool:
        return self.mode in ("swat", "masked") or self.groups != 1

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """NCHW float32 -> NCHW float32 (a view of a preallocated buffer)."""
        n = self._check_x(x)
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        self._n = n
        L, rs, plane = self._geom(n)
        w = self.params["weight"]
        bias = self.params["bias"] if self.has_bias else self._nobias
        xq = self._xq[: self.cin * self.sh * self.sw * plane]
        yb = self._yb[: self.cout * self.oh * L]
        y = self._y[:n]
        with _Timer(self, "forward"):
            K.pack_input(x, xq, self.sh, self.sw, self.ph, self.pw, self.hq, self.wq)
            if self.mode == "swat":
                ls = self.ls
                if training:
                    if self._steps % ls.topk_period == 0 or self._thr < 0:
                        kw_ = T.count_for_density(ls.weight_density, w.size)
                        self._thr = T.kth_largest_abs(w, kw_, self._hist)
                    self._steps += 1
                elif self._thr < 0:
                    self._thr = T.kth_largest_abs(
                        w, T.count_for_density(ls.weight_density, w.size), self._hist)
                self._compress_thr(self._thr)
                self.measured_density = self._nnz / w.size
                if training:
                    self._save_sparse_act(x, n)
            elif self.mode == "masked" or self.groups != 1:
                self._compress_mask(self.mask if self.mode == "masked" else None)
                self.measured_density = self._nnz / w.size
            if self._sparse_path():
                K.fwd_csr(self._rowptr, self._code, self._val, xq, yb, self.cout, self.oh,
                          L, rs, n)
            else:
                col = workspace("col", self.cin * self.kk * self.oh * L).reshape(
                    self.cin * self.kk, self.oh * L)
                K.im2col(xq, self._codes, col, self.oh, L, rs, n)
                np.dot(w.reshape(self.cout, -1), col, out=yb.reshape(self.cout, -1))
            K.unpack_output(yb, y, bias, self.has_bias)
        return y

    def _save_sparse_act(self, x: np.ndarray, n: int) -> None:
        ls = self.ls
        size = x.size
        kx = T.count_for_density(ls.act_density, size)
        thr = T.kth_largest_abs(x, kx, self._hist)
        x3 = x.reshape(n, self.cin, self.h * self.w)
        S.act_count(x3, np.float32(thr), self._counts)
        nnz = S.prefix(self._counts[:self.cin], self._aptr)
        if self._apos.size < nnz:
            self._apos = S.grow(self._apos, nnz)
            self._aval = S.grow(self._aval, nnz)
        S.act_fill(x3, np.float32(thr), self._aptr, self._apos, self._aval)
        self.measured_act_density = nnz / size

    # ------------------------------------------------------------------ backward
    def backward(self, gy: np.ndarray, need_input_grad: bool = True) -> np.ndarray | None:
        """Weight/bias gradients into ``self.grads``; returns the NCHW input gradient."""
        n = self._n
        if gy.shape != (n, self.cout, self.oh, self.ow) or gy.dtype != np.float32:
            raise ValueError(f"conv {self.name!r}: expected float32 grad "
                             f"{(n, self.cout, self.oh, self.ow)}, got {gy.dtype} {gy.shape}")
        if not gy.flags.c_contiguous:
            gy = np.ascontiguousarray(gy)
        L, rs, plane = self._geom(n)
        xq = self._xq[: self.cin * self.sh * self.sw * plane]
        gxq = self._gxq[: xq.size]
        gyb = self._gyb[: self.cout * self.oh * L]
        w = self.params["weight"]
        gw = self.grads["weight"]
        gb = self.grads["bias"] if self.has_bias else self._nobias
        with _Timer(self, "backward_weight"):
            K.pack_grad_out(gy, gyb, gb, self.has_bias)
            if self.mode == "swat":
                gyT = self._gyT[: gyb.size]
                K.pack_grad_out_T(gy, gyT)
                K.bwd_weight_sparse_act(self._aptr, self._apos, self._aval, gyT, self._gWt,
                                        self.h, self.w, self.kh, self.kw, self.sh, self.sw,
                                        self.ph, self.pw, self.oh, self.ow, n, self.cout,
                                        self.cig, self.cog)
                K.gwt_to_weight(self._gWt, gw, self.cig, self.cog, self.kh, self.kw)
            elif self.mode == "masked" and self.mask is not None:
                if self.want_dense_grad:
                    dg = self._want_dense_buf()
                    self._dense_wgrad(xq, gyb, dg, n)
                    np.multiply(dg, self.mask, out=gw)
                else:
                    gw[...] = 0.0
                    K.bwd_weight_sddmm(self._rowptr, self._code, self._widx, gyb, xq,
                                       gw.reshape(-1), self.cout, self.oh, L, rs, n)
            else:
                self._dense_wgrad(xq, gyb, gw, n)
                if self.want_dense_grad:
                    self._want_dense_buf()[...] = gw
        if not need_input_grad:
            self.phase_times.pop("backward_input", None)
            return None
        gx = self._gx[:n]
        with _Timer(self, "backward_input"):
            if self._sparse_path():
                K.bwd_input_csc(self._colptr, self._c_code, self._c_co, self._c_val, gyb, gxq,
                                self.cin, self.sh * self.sw, plane, self.oh, L, rs, n)
            else:
                gcol = workspace("col", self.cin * self.kk * self.oh * L).reshape(
                    self.cin * self.kk, self.oh * L)
                np.dot(w.reshape(self.cout, -1).T, gyb.reshape(self.cout, -1), out=gcol)
                K.col2im(gcol, self._codes, gxq, self.cin, self.kk, self.sh * self.sw, plane,
                         self.oh, L, rs, n)
            K.unpack_grad_input(gxq, gx, self.sh, self.sw, self.ph, self.pw, self.hq, self.wq)
        return gx

    def _dense_wgrad(self, xq, gyb, out, n) -> None:
        L, rs, plane = self._geom(n)
        if self.groups == 1:
            col = workspace("col", self.cin * self.kk * self.oh * L).reshape(
                self.cin * self.kk, self.oh * L)
            K.im2col(xq, self._codes, col, self.oh, L, rs, n)
            np.dot(gyb.reshape(self.cout, -1), col.T, out=out.reshape(self.cout, -1))
        else:
            if self._mask_dirty or self.mode == "masked":
                # full-tap structure (the masked structure may be cached: rebuild it after)
                saved = self._mask_dirty
                self._mask_dirty = True
                self._compress_mask(None)
                out[...] = 0.0
                K.bwd_weight_sddmm(self._rowptr, self._code, self._widx, gyb, xq,
                                   out.reshape(-1), self.cout, self.oh, L, rs, n)
                if self.mode == "masked":
                    self._mask_dirty = True
                    self._compress_mask(self.mask)
                else:
                    self._mask_dirty = saved
                return
            out[...] = 0.0
            K.bwd_weight_sddmm(self._rowptr, self._code, self._widx, gyb, xq,
                               out.reshape(-1), self.cout, self.oh, L, rs, n)

    def param_bytes(self) -> int:
        """Bytes of this layer's own step buffers (packed input/output, gradients, sparse)."""
        tot = 0
        for v in self.__dict__.values():
            if isinstance(v, np.ndarray):
                tot += v.nbytes
        return tot
