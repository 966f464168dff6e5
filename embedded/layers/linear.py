"""Linear layer with real sparse kernels (dense, swat, masked), forward and backward.

* ``dense``: BLAS GEMM (``np.dot`` into preallocated buffers).
* ``swat``: forward/backward-input with the compressed top-K weights (CSR by output, CSC by
  input feature) on batch-last copies; weight gradient dense, computed from the top-K input
  activations only (kept entries grouped by sample).
* ``masked``: compressed W⊙M (structure cached until the mask changes), weight gradient only
  at the kept entries (one dot product over the batch each) unless ``want_dense_grad``.
"""

from __future__ import annotations

import math

import numpy as np

from ..kernels import linear_kernels as K
from ..kernels import sparse as S
from ..kernels import topk as T
from .base import Layer
from .conv import _MODES, _Timer


class Linear(Layer):
    """y = x @ W.T + b with W of shape (out_features, in_features) (torch layout)."""

    def __init__(self, node, in_shapes, out_shape):
        in_shape = tuple(in_shapes[0])
        super().__init__(node.name, in_shape, out_shape)
        if len(in_shape) != 1:
            raise ValueError(f"linear {node.name!r}: expected a flat (F,) input, got {in_shape}")
        self.fin = in_shape[0]
        self.fout = node.attrs["out_features"]
        if tuple(out_shape) != (self.fout,):
            raise ValueError(f"linear {node.name!r}: out_shape {out_shape} != ({self.fout},)")
        self.has_bias = bool(node.attrs["bias"])
        self.params = {"weight": np.zeros((self.fout, self.fin), np.float32)}
        self.grads = {"weight": np.zeros((self.fout, self.fin), np.float32)}
        if self.has_bias:
            self.params["bias"] = np.zeros(self.fout, np.float32)
            self.grads["bias"] = np.zeros(self.fout, np.float32)
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
        self._n = 0
        self._rowptr = np.zeros(self.fout + 1, np.int64)
        self._colptr = np.zeros(self.fin + 1, np.int64)
        self._counts = np.zeros(max(self.fout, self.fin) + 1, np.int64)
        self._alloc_sparse(1)

    def init_params(self, rng: np.random.Generator) -> None:
        """torch's default init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
        bound = 1.0 / math.sqrt(self.fin)
        w = self.params["weight"]
        w[...] = rng.uniform(-bound, bound, size=w.shape).astype(np.float32)
        if self.has_bias:
            self.params["bias"][...] = rng.uniform(-bound, bound, self.fout).astype(np.float32)
        if self.mask is not None:
            w *= self.mask

    def _alloc_sparse(self, cap: int) -> None:
        cap = max(cap, 1)
        self._widx = np.zeros(cap, np.int32)
        self._val = np.zeros(cap, np.float32)
        self._col = np.zeros(cap, np.int32)
        self._rowo = np.zeros(cap, np.int32)
        self._perm = np.zeros(cap, np.int32)
        self._c_row = np.zeros(cap, np.int32)
        self._c_widx = np.zeros(cap, np.int32)
        self._c_val = np.zeros(cap, np.float32)
        self._nnz = 0

    def setup(self, max_batch: int) -> None:
        super().setup(max_batch)
        n = max_batch
        self._x = np.zeros((n, self.fin), np.float32)
        self._y = np.zeros((n, self.fout), np.float32)
        self._gx = np.zeros((n, self.fin), np.float32)
        self._xT = np.zeros(self.fin * n, np.float32)
        self._yT = np.zeros(self.fout * n, np.float32)
        self._gxT = np.zeros(self.fin * n, np.float32)
        self._aptr = np.zeros(n + 1, np.int64)
        self._apos = np.zeros(1, np.int32)
        self._aval = np.zeros(1, np.float32)

    # ------------------------------------------------------------------ sparsity API
    def set_sparsity(self, mode: str, ls=None) -> None:
        """Select ``dense`` | ``swat`` | ``masked``; ``ls`` (LayerSparsity) None means dense."""
        if mode not in _MODES:
            raise ValueError(f"linear {self.name!r}: mode must be one of {_MODES}, got {mode!r}")
        if ls is None and mode != "masked":
            mode = "dense"
        self.mode = mode
        self.ls = ls
        self._steps = 0
        self._thr = -1.0
        self._mask_dirty = True
        self.measured_density = 1.0
        self.measured_act_density = 1.0

    def set_mask(self, mask: np.ndarray | None) -> None:
        """Store the mask (weight-shaped, bool/uint8) and zero the weights outside it."""
        if mask is None:
            self.mask = None
        else:
            m = np.asarray(mask)
            if m.shape != self.params["weight"].shape:
                raise ValueError(f"linear {self.name!r}: mask shape {m.shape} != weight shape "
                                 f"{self.params['weight'].shape}")
            self.mask = (m != 0).astype(np.uint8)
            self.params["weight"][self.mask == 0] = 0.0
        self._mask_dirty = True

    def _sparse(self) -> bool:
        return self.mode == "swat" or (self.mode == "masked" and self.mask is not None)

    # ------------------------------------------------------------------ compression
    def _ensure_cap(self, nnz: int) -> None:
        if self._widx.size < nnz:
            self._alloc_sparse(int(nnz * 1.5) + 16)

    def _finish_structure(self, nnz: int) -> None:
        self._nnz = nnz
        K.linear_codes(self._widx, nnz, self.fin, self._col, self._rowo)
        S.csc_from_keys(self._col, nnz, self.fin, self._colptr, self._perm, self._counts)
        K.permute_csc(self._perm, nnz, self._rowo, self._widx, self._val, self._c_row,
                      self._c_widx, self._c_val)

    def _compress_thr(self, thr: float) -> None:
        w = self.params["weight"]
        S.count_rows_thr(w, np.float32(thr), self._counts)
        nnz = S.prefix(self._counts[:self.fout], self._rowptr)
        self._ensure_cap(nnz)
        S.fill_rows_thr(w, np.float32(thr), self._rowptr, self._widx, self._val)
        self._finish_structure(nnz)

    def _compress_mask(self) -> None:
        wf = self.params["weight"].reshape(-1)
        if self._mask_dirty:
            S.count_rows_mask(self.mask, self._counts)
            nnz = S.prefix(self._counts[:self.fout], self._rowptr)
            self._ensure_cap(nnz)
            S.fill_rows_mask(self.mask, self._rowptr, self._widx)
            S.gather(wf, self._widx, self._val, nnz)
            self._finish_structure(nnz)
            self._mask_dirty = False
        else:
            S.gather(wf, self._widx, self._val, self._nnz)
            S.gather(wf, self._c_widx, self._c_val, self._nnz)

    # ------------------------------------------------------------------ forward
    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """(N, F) float32 -> (N, out) float32 (a view of a preallocated buffer)."""
        if x.ndim != 2 or x.shape[1] != self.fin or x.dtype != np.float32:
            raise ValueError(f"linear {self.name!r}: expected float32 input (N, {self.fin}), "
                             f"got {x.dtype} {x.shape}")
        n = x.shape[0]
        if n > self.max_batch:
            raise ValueError(f"linear {self.name!r}: batch {n} > max_batch {self.max_batch}")
        self._n = n
        w = self.params["weight"]
        y = self._y[:n]
        with _Timer(self, "forward"):
            if not self._sparse():
                xs = self._x[:n]
                xs[...] = x
                np.dot(xs, w.T, out=y)
                if self.has_bias:
                    y += self.params["bias"]
                return y
            xT = self._xT[: self.fin * n].reshape(self.fin, n)
            K.transpose(x, xT)
            if self.mode == "swat":
                ls = self.ls
                if training:
                    if self._steps % ls.topk_period == 0 or self._thr < 0:
                        self._thr = T.kth_largest_abs(
                            w, T.count_for_density(ls.weight_density, w.size), self._hist)
                    self._steps += 1
                elif self._thr < 0:
                    self._thr = T.kth_largest_abs(
                        w, T.count_for_density(ls.weight_density, w.size), self._hist)
                self._compress_thr(self._thr)
                if training:
                    self._save_sparse_act(x, n)
            else:
                self._compress_mask()
            self.measured_density = self._nnz / w.size
            yT = self._yT[: self.fout * n].reshape(self.fout, n)
            K.fwd_csr(self._rowptr, self._col, self._val, xT, yT)
            bias = self.params["bias"] if self.has_bias else self._nobias
            K.unpack_out(yT, y, bias, self.has_bias)
        return y

    def _save_sparse_act(self, x: np.ndarray, n: int) -> None:
        kx = T.count_for_density(self.ls.act_density, x.size)
        thr = np.float32(T.kth_largest_abs(x, kx, self._hist))
        x3 = x.reshape(1, n, self.fin)
        S.act_count(x3, thr, self._counts)
        nnz = S.prefix(self._counts[:n], self._aptr[: n + 1])
        if self._apos.size < nnz:
            self._apos = S.grow(self._apos, nnz)
            self._aval = S.grow(self._aval, nnz)
        S.act_fill(x3, thr, self._aptr[: n + 1], self._apos, self._aval)
        self.measured_act_density = nnz / x.size

    # ------------------------------------------------------------------ backward
    def backward(self, gy: np.ndarray, need_input_grad: bool = True) -> np.ndarray | None:
        """Weight/bias gradients into ``self.grads``; returns the input gradient (N, F)."""
        n = self._n
        if gy.shape != (n, self.fout) or gy.dtype != np.float32:
            raise ValueError(f"linear {self.name!r}: expected float32 grad {(n, self.fout)}, "
                             f"got {gy.dtype} {gy.shape}")
        if not gy.flags.c_contiguous:
            gy = np.ascontiguousarray(gy)
        w = self.params["weight"]
        gw = self.grads["weight"]
        sparse = self._sparse()
        with _Timer(self, "backward_weight"):
            if self.has_bias:
                np.sum(gy, axis=0, out=self.grads["bias"])
            if sparse:
                gyT = self._yT[: self.fout * n].reshape(self.fout, n)
                K.transpose(gy, gyT)
            if self.mode == "swat":
                K.bwd_weight_sparse_act(self._aptr[: n + 1], self._apos, self._aval, gy, gw)
            elif sparse and not self.want_dense_grad:
                gw[...] = 0.0
                xT = self._xT[: self.fin * n].reshape(self.fin, n)
                K.bwd_weight_sddmm(self._rowptr, self._col, self._widx, gyT, xT, gw.reshape(-1))
            else:
                if sparse:
                    xs = self._x[:n]
                    K.transpose(self._xT[: self.fin * n].reshape(self.fin, n), xs)
                else:
                    xs = self._x[:n]
                if self.want_dense_grad:
                    if self.dense_grad is None or self.dense_grad.shape != w.shape:
                        self.dense_grad = np.zeros_like(w)
                    np.dot(gy.T, xs, out=self.dense_grad)
                    if self.mode == "masked" and self.mask is not None:
                        np.multiply(self.dense_grad, self.mask, out=gw)
                    else:
                        gw[...] = self.dense_grad
                else:
                    np.dot(gy.T, xs, out=gw)
        if not need_input_grad:
            self.phase_times.pop("backward_input", None)
            return None
        gx = self._gx[:n]
        with _Timer(self, "backward_input"):
            if sparse:
                gxT = self._gxT[: self.fin * n].reshape(self.fin, n)
                K.bwd_input_csc(self._colptr, self._c_row, self._c_val, gyT, gxT)
                K.transpose(gxT, gx)
            else:
                np.dot(gy, w, out=gx)
        return gx
