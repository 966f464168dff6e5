"""Linear layer with real sparse kernels (dense, swat, masked), forward and backward.

* ``dense``: BLAS GEMM on Numba's threads (:mod:`embedded.kernels.gemm`, into preallocated
  buffers).
* ``swat``: forward/backward-input with the compressed top-K weights (CSR by output; the
  input gradient scatters rows into per-worker accumulators) on batch-last copies; weight
  gradient dense, computed from the top-K input activations only (kept entries grouped by
  feature: one O-long axpy of gy per kept entry into a 16-feature tile).
* ``masked``: compressed W⊙M (structure cached until the mask changes), weight gradient only
  at the kept entries (one dot product over the batch each) unless ``want_dense_grad``.
"""

from __future__ import annotations

import math
import time

import numba
import numpy as np

from ..kernels import linear_kernels as K
from ..kernels import sparse as S
from ..kernels import topk as T
from ..kernels.gemm import gemm
from .base import Layer, init_weighted_state
from .conv import _MODES, select_and_build, workspace


class Linear(Layer):
    """y = x @ W.T + b with W of shape (out_features, in_features) (torch layout)."""

    keeps_input = False  # (copied, or packed feature-major, for the weight gradient)
    keeps_output = False

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
        init_weighted_state(self, (self.fout, self.fin), self.fout, self.has_bias)
        self._hist = T.new_hist()
        self._hist_ok = False
        self._n = 0
        self._sw = S.SparseWeight(self.fout, self.fin, np.zeros(10, np.int64))
        self._mask_built = None
        self._tile = np.zeros((1, 1, 16), np.float32)

    def init_params(self, rng: np.random.Generator) -> None:
        """torch's default init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
        bound = 1.0 / math.sqrt(self.fin)
        w = self.params["weight"]
        w[...] = rng.uniform(-bound, bound, size=w.shape).astype(np.float32)
        if self.has_bias:
            self.params["bias"][...] = rng.uniform(-bound, bound, self.fout).astype(np.float32)
        if self.mask is not None:
            w *= self.mask

    def setup(self, max_batch: int) -> None:
        super().setup(max_batch)
        n = max_batch
        self._x = np.zeros((n, self.fin), np.float32)
        self._y = np.zeros((n, self.fout), np.float32)
        self._gx = np.zeros((n, self.fin), np.float32)
        self._xT = np.zeros(self.fin * n, np.float32)
        self._aptr = np.zeros(self.fin + 1, np.int64)  # kept activations per feature
        self._apos = np.zeros(1, np.int32)
        self._aval = np.zeros(1, np.float32)
        if self.mode == "swat":
            self._setup_swat()

    def _setup_swat(self) -> None:
        n = self.max_batch
        if self._apos.size < n * self.fin:
            self._apos = np.zeros(n * self.fin, np.int32)
            self._aval = np.zeros(n * self.fin, np.float32)
        nw = max(1, numba.config.NUMBA_NUM_THREADS)
        if self._tile.shape[0] < nw or self._tile.shape[2] != self.fout:
            self._tile = np.zeros((nw, 16, self.fout), np.float32)

    # ------------------------------------------------------------------ sparsity API
    def set_sparsity(self, mode: str, ls=None) -> None:
        """Select ``dense`` | ``swat`` | ``masked``; ``ls`` (LayerSparsity) None means dense."""
        if mode not in _MODES:
            raise ValueError(f"linear {self.name!r}: mode must be one of {_MODES}, got {mode!r}")
        if ls is None and mode == "swat":
            mode = "dense"
        self.mode = mode
        self.ls = ls
        self._steps = 0
        self._thr = -1.0
        self._mask_built = None
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
                raise ValueError(f"linear {self.name!r}: mask shape {m.shape} != weight shape "
                                 f"{self.params['weight'].shape}")
            self.mask = np.ascontiguousarray(m != 0).astype(np.uint8)
            self.params["weight"][self.mask == 0] = 0.0
        self._mask_built = None

    def _masked(self) -> bool:
        return self.mode == "masked" and self.mask is not None

    def _sparse(self) -> bool:
        return self.mode == "swat" or self._masked()

    def _structure(self, training: bool) -> S.SparseWeight:
        w = self.params["weight"]
        if self.mode == "swat":
            ls = self.ls
            if self._thr < 0 or (training and self._steps % ls.topk_period == 0):
                k = T.count_for_density(ls.weight_density, w.size)
                self._thr = select_and_build(self, self._sw, w, k)
            else:
                self._sw.build(w, self._thr)
            if training:
                self._steps += 1
        elif self._mask_built is not self.mask:
            self._sw.build(w, 0.0, self.mask)
            self._mask_built = self.mask
        else:
            self._sw.refresh(w.reshape(-1))
        self.measured_density = self._sw.nnz / w.size
        return self._sw

    # ------------------------------------------------------------------ forward
    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """(N, F) float32 -> (N, out) float32 (a view of a preallocated buffer)."""
        if x.ndim != 2 or x.shape[1] != self.fin or x.dtype != np.float32:
            raise ValueError(f"linear {self.name!r}: expected float32 input (N, {self.fin}), "
                             f"got {x.dtype} {x.shape}")
        n = x.shape[0]
        if n > self.max_batch:
            raise ValueError(f"linear {self.name!r}: batch {n} > max_batch {self.max_batch}")
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        self._n = n
        w = self.params["weight"]
        y = self._y[:n]
        t0 = time.perf_counter()
        if not self._sparse():
            xs = self._x[:n]
            xs[...] = x
            gemm(xs, w, y, tb=True)
            if self.has_bias:
                y += self.params["bias"]
            self.measured_density = 1.0
        else:
            xT = self._xT[: self.fin * n].reshape(self.fin, n)
            want_hist = self.mode == "swat" and training
            S.pick(K.pack_x, x.size)(x, x.view(np.uint32), xT, self._hist, want_hist)
            self._hist_ok = want_hist
            sw = self._structure(training)
            yT = workspace("yT", self.fout * n).reshape(self.fout, n)
            bias = self.params["bias"] if self.has_bias else self._nobias
            S.pick(K.fwd_csr, sw.nnz * n)(sw.rowptr, sw.code, sw.val, xT, yT, y, bias,
                                          self.has_bias)
        if self.timing:
            self.phase_times["forward"] = time.perf_counter() - t0
        return y

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
        sw = self._sw
        xT = self._xT[: self.fin * n].reshape(self.fin, n)
        gyT = workspace("yT", self.fout * n).reshape(self.fout, n)
        t0 = time.perf_counter()
        if not sparse:
            if self.has_bias:
                np.sum(gy, axis=0, out=self.grads["bias"])
            gemm(gy, self._x[:n], gw, ta=True)
            if self.want_dense_grad:
                if self.dense_grad is None or self.dense_grad.shape != w.shape:
                    self.dense_grad = np.zeros_like(w)
                self.dense_grad[...] = gw
        else:
            gb = self.grads["bias"] if self.has_bias else self._nobias
            S.pick(K.pack_gy, gy.size)(gy, gyT, gb, self.has_bias)
            if self.mode == "swat":
                if not self._hist_ok:
                    raise RuntimeError(f"linear {self.name!r}: backward without a "
                                       "training forward")
                k = T.count_for_density(self.ls.act_density, n * self.fin)
                cand = workspace("cand", xT.size).view(np.uint32)
                thr = np.uint32(T.resolve(self._hist, k, xT.reshape(-1).view(np.uint32),
                                          cand)).view(np.float32)
                self._hist_ok = False
                fptr = self._aptr
                nnz = K.sparse_acts_by_feature[0](xT, thr, fptr, self._apos, self._aval)
                self.measured_act_density = nnz / (n * self.fin)
                k2 = S.pick(K.bwd_weight_fblocks, nnz * self.fout)
                tile = self._tile if k2 is K.bwd_weight_fblocks[1] else self._tile[:1]
                k2(fptr, self._apos, self._aval, gy, gw, tile)
            elif not self.want_dense_grad:
                gw[...] = 0.0
                S.pick(K.bwd_weight_sddmm, sw.nnz * n)(sw.rowptr, sw.code, sw.widx, gyT,
                                                       xT, gw.reshape(-1))
            else:
                if self.dense_grad is None or self.dense_grad.shape != w.shape:
                    self.dense_grad = np.zeros_like(w)
                gemm(gyT, xT, self.dense_grad, tb=True)
                np.multiply(self.dense_grad, self.mask, out=gw)
        t1 = time.perf_counter()
        if self.timing:
            self.phase_times["backward_weight"] = t1 - t0
        if not need_input_grad:
            self.phase_times.pop("backward_input", None)
            return None
        gx = self._gx[:n]
        if sparse:
            kern = S.pick(K.bwd_input_rows, sw.nnz * n)
            # as many private accumulators as the process may run threads, whatever this
            # step runs: their fixed-order sum then does not depend on the thread count
            nw = min(self.fout, numba.config.NUMBA_NUM_THREADS)
            priv = workspace("priv", nw * self.fin * n).reshape(nw, self.fin, n)
            kern(sw.rowptr, sw.code, sw.val, gyT, priv, gx)
        else:
            gemm(gy, w, gx)
        if self.timing:
            self.phase_times["backward_input"] = time.perf_counter() - t1
        return gx

    def memory_bytes(self) -> int:
        """Bytes of this layer's own arrays (params, grads, step buffers, compressed weight)."""
        tot = self._sw.nbytes()
        for v in self.__dict__.values():
            if isinstance(v, np.ndarray):
                tot += v.nbytes
        return tot
