"""Conv2d with real sparse kernels (dense, swat, masked), forward and backward side by side.

Internal layout: the input is packed once per forward into batch-last, zero-padded,
stride-phase planes (see :mod:`embedded.kernels.conv_kernels`); the output is computed batch
last and unpacked to NCHW.

* ``dense``: GEMMs over the packed input (groups == 1): on CPUs with 512-bit vectors the
  forward, the weight gradient and a stride-1 input gradient gather im2col's pieces tile by
  tile into the vector microkernel (:mod:`embedded.kernels.conv_gemm`, "igemm"), elsewhere
  im2col + BLAS GEMM ("gemm"); first layers (few input channels) and grouped/depthwise convs
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

import itertools
import math
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..kernels import conv_gemm as CG
from ..kernels import conv_kernels as K
from ..kernels import sparse as S
from ..kernels import topk as T
from ..kernels.gemm import gemm
from ..kernels.microkernel import MR, NR, WIDE_VECTORS
from ..kernels.select_build import refresh_near
from ..runtime import threads
from .base import Layer, init_weighted_state

_MODES = ("dense", "swat", "masked")
_IMPLS = ("direct", "gemm", "igemm")
_WS = threading.local()
_GROWTHS = itertools.count(1)


def workspace(name: str, size: int) -> np.ndarray:
    """A flat float32 scratch shared by the layers of this thread (grown on demand)."""
    d = getattr(_WS, "bufs", None)
    if d is None:
        d = _WS.bufs = {}
    buf = d.get(name)
    if buf is None or buf.size < size:
        buf = d[name] = np.empty(size, dtype=np.float32)
        _WS.gen = next(_GROWTHS)
    return buf[:size]


def workspace_gen() -> int:
    """Changes whenever one of this thread's shared scratch buffers is replaced (unique across
    threads, 0 before the first): views taken under the same number are the shared buffers."""
    return getattr(_WS, "gen", 0)


def shared_hist() -> np.ndarray:
    """This thread's histogram scratch for the weight top-K (used within one call only)."""
    h = getattr(_WS, "hist", None)
    if h is None:
        h = _WS.hist = T.new_hist()
    return h


def weight_scratch(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This thread's scratch for a weight top-K over ``size`` entries: (histogram, uint32
    candidates, per-chunk candidate counts, per-chunk counts above the window)."""
    return (shared_hist(), workspace("cand", size).view(np.uint32), *window_counts())


def weight_threshold(layer: Layer, w: np.ndarray, k: int, scratch: tuple) -> float:
    """The K-th largest |w| of a SWAT layer (exact). After the first refresh the last threshold
    is the guess of a one-pass windowed select (weights move little per step; a miss falls
    back to the histogram select, :func:`~embedded.kernels.topk.kth_largest_abs_near`):
    femnist fc1's 6.4 M weights, 2 threads: 3.1 -> 1.0 ms a refresh. ``scratch``:
    :func:`weight_scratch` of ``w.size``."""
    hist, cand, mc, above = scratch
    if layer._thr <= 0:
        layer._win = T.Window(0.01, 0.001)
        return T.kth_largest_abs(w, k, hist, cand)
    return T.kth_largest_abs_near(w, k, layer._thr, layer._win, hist, cand, mc, above)


def select_and_build(layer: Layer, sw: S.SparseWeight, w2: np.ndarray, k: int,
                     scratch=None) -> float:
    """The K-th largest |w| of a SWAT layer (exact) and ``sw`` rebuilt at it. After the first
    refresh the select and the rebuild share one read of the weight
    (:func:`~embedded.kernels.select_build.refresh_near`); the first refresh, or a staging
    region outgrown, selects (:func:`weight_threshold`) and then builds. ``scratch``:
    :func:`weight_scratch` of ``w2.size`` (looked up when None)."""
    scratch = scratch or weight_scratch(w2.size)
    if layer._thr > 0:
        thr = refresh_near(sw, w2, k, layer._thr, layer._win, *scratch)
        if thr is not None:
            return thr
    thr = weight_threshold(layer, w2, k, scratch)
    sw.build(w2, thr)
    return thr


#: bytes of source rows a tiled sparse pass (forward, stride-1 input gradient) keeps in cache
#: while it walks its channels: a core's L2 on this host (AMD EPYC, 1 MB; a Raspberry Pi 4's
#: shared L2 is 1 MB, a Pi 5 core's 512 KB)
TILE_BYTES = 1 << 20


def rows_per_tile(src_bytes: int, rows: int, halo: int) -> int:
    """Output rows per tile of a sparse pass whose ``rows`` output rows read ``src_bytes`` of
    source (every channel's) plus ``halo`` rows' worth beyond them: all of them when the
    whole source fits in :data:`TILE_BYTES` (no tiling), else as many as fit with the halo
    (at least 1). Measured, SWAT 0.95, 2 threads, batch 16, caches flushed, per kernel:
    resnet18 layer1 (4.7 MB packed input) forward 0.85 -> 0.78 ms at 4 rows, input gradient
    1.19 -> 1.01 ms; layer2 0.84 -> 0.75 and 0.88 -> 0.80 ms; sources that fit (resnet8's
    layer2, femnist conv2) were slower tiled (0.09 -> 0.10 ms). Whole layer, fwd + bwd, A/B in
    one process: resnet18 layer1 1.05x, layer3 1.02-1.04x, layer2 and layer4 1.00x."""
    per_row = max(1, src_bytes // max(1, rows))
    if src_bytes + halo * per_row <= TILE_BYTES:
        return rows
    return max(1, TILE_BYTES // per_row - halo)


def window_counts() -> tuple[np.ndarray, np.ndarray]:
    """This thread's (per-chunk candidates, per-chunk entries above) scratch of a window pass."""
    counts = workspace("win_counts", 4 * T.NCHUNK).view(np.int64)
    return counts[:T.NCHUNK], counts[T.NCHUNK:]


def workspace_bytes() -> int:
    """Bytes held by this thread's shared conv/linear scratch."""
    d = getattr(_WS, "bufs", {})
    return sum(b.nbytes for b in d.values())


@dataclass
class _StepBuffers:
    """What a conv step at one batch size derives from the shapes, the mode and the thread
    count, worked out once (:meth:`Conv2d._bind`) instead of on every call: views of the step
    buffers, the kernels picked and their chunk counts. Measured, SWAT at 0.95, 2 threads, A/B
    in one process: resnet8's convs fwd+bwd 1.02-1.08x (10-30 us of Python a call), its whole
    step 1.02-1.04x."""

    key: tuple
    L: int                       # output row length (OW * N)
    rs: int                      # packed row stride (Wq * N)
    plane: int                   # packed plane (Hq * Wq * N)
    xq: np.ndarray               # the packed input
    y: np.ndarray
    gx: np.ndarray
    pack: object                 # pack_input kernel
    fwd: object = None           # fwd_csr kernel (None: im2col + GEMM)
    fwd_nch: int = 1
    fwd_tr: int = 1              # output rows per tile of the forward (rows_per_tile)
    yb: np.ndarray | None = None
    col: np.ndarray | None = None
    k_act: int = 0               # SWAT: K of the activation top-K, its scratch and kernels
    k_w: int = 0                 # SWAT: K of the weight top-K and its scratch (weight_scratch)
    wscratch: tuple | None = None
    act_window: object = None    # the activation's window pass
    cand: np.ndarray | None = None
    mc: np.ndarray | None = None
    above: np.ndarray | None = None
    compact: object = None
    compact_nch: int = 1
    scan: object = None
    scan_nch: int = 1
    gwt: np.ndarray | None = None
    igemm: object = None         # conv_gemm kernel (forward "igemm"), the weight padded to
    apad: np.ndarray | None = None  # 6 rows (fewer output channels), per-part scratch
    bp: np.ndarray | None = None
    tiles: np.ndarray | None = None
    gemm_w: bool = False         # backward: weight gradient / input gradient by GEMM
    gemm_in: bool = False
    igemm_in: object = None      # the same for a stride-1 input gradient ("igemm")
    apad_in: np.ndarray | None = None
    bp_in: np.ndarray | None = None
    tiles_in: np.ndarray | None = None
    igemm_w: object = None       # the same for the weight gradient ("igemm"), gy padded to
    apad_w: np.ndarray | None = None  # 6 rows (fewer output channels)
    bp_w: np.ndarray | None = None
    tiles_w: np.ndarray | None = None
    gyq: np.ndarray | None = None   # gy zero-padded for the flipped convolution
    rstride: int = 0             # packed gy's row stride (L for GEMM, rs for direct)
    cstride: int = 0             # packed gy's channel stride and the zeros before channel 0
    lead: int = 0
    taps_in: bool = False        # input gradient by bwd_input_taps (stride 1), its scratch
    offs: np.ndarray | None = None
    vals: np.ndarray | None = None
    gyb: np.ndarray | None = None
    gyT: np.ndarray | None = None
    pack_gy: object = None
    bwd_in: object = None
    bwd_in_nch: int = 1
    bwd_in_tr: int = 1           # input rows per tile of bwd_input_taps (rows_per_tile)
    gxq: np.ndarray | None = None


class Conv2d(Layer):
    """2-D convolution (torch semantics: weight (C_out, C_in/groups, kh, kw), optional bias)."""

    #: dense-mode implementation per phase: "direct" (the compressed kernels with every tap
    #: kept), "gemm" (im2col + BLAS) or "igemm" (implicit im2col + the vector microkernel;
    #: for the input gradient stride 1 only); groups > 1 always use "direct". ``None``:
    #: chosen per shape by :meth:`_dense_impls` (an instance may set its own dict).
    dense_impl = None
    #: input channels a worker of the sparse weight-gradient scan walks together per input
    #: row (a cache-blocking factor; results do not depend on it): gy's rows around that row
    #: are read once per block. Measured, 2 threads, 0.95, 8 layers, block 64 vs 4: 2-11 %
    #: faster after a cache eviction, 1-9 % hot (none slower beyond noise)
    scan_block = 64

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
        init_weighted_state(self, (self.cout, self.cig, self.kh, self.kw), self.cout,
                            self.has_bias)
        self._hist = T.new_hist()     # pass 1 of the activation top-K (fused into packing)
        self._hist_ok = False
        self._thr_a = np.float32(0.0)
        self._thr_a_guess = 0.0  # the last activation threshold (the windowed select's guess)
        self._awin = None
        self._n = 0
        geo = np.array([1, self.cog, self.cig, self.kh, self.kw, self.sh, self.sw, self.hq,
                        self.wq, self.cin], np.int64)
        self._sw = S.SparseWeight(self.cout, self.cin * self.kh * self.kw, geo)     # swat / masked structure
        self._full = S.SparseWeight(self.cout, self.cin * self.kh * self.kw, geo)   # every tap (dense direct)
        self._full_built = False
        self._mask_built = None
        self._bufs: _StepBuffers | None = None  # a step's buffer views and kernels (_bind)
        # dense tap codes (row r = (ci, kh, kw) for groups == 1): used by im2col/col2im
        ci, kh, kw = np.meshgrid(np.arange(self.cin), np.arange(self.kh), np.arange(self.kw),
                                 indexing="ij")
        cq = (ci * self.sh + kh % self.sh) * self.sw + kw % self.sw
        codes = (((cq * self.hq) + kh // self.sh) * self.wq + kw // self.sw).reshape(-1)
        self._codes = codes.astype(np.int32)
        self._slots = K.tap_slots(self.kh, self.kw, self.sw)  # weight-gradient scratch layout
        # the scan's gyT columns: ``lpad`` zero columns left of the output's OW and enough on
        # the right that every tap of a kept input column lands inside (on a zero if outside
        # the output)
        self._lpad = (self.kw + self.sw - 1) // self.sw - 1
        self._owp = self._lpad + max(self.ow, (self.w - 1 + self.pw) // self.sw + 1)
        # the input gradient of a stride-1 conv as a convolution of gy zero-padded by
        # kh-1-ph / kw-1-pw with the flipped weight ("igemm"): its padded rows and taps
        self._pt, self._pl = self.kh - 1 - self.ph, self.kw - 1 - self.pw
        self._flip_ok = (self.groups == 1 and self.sh == 1 and self.sw == 1
                         and self._pt >= 0 and self._pl >= 0)
        self._hqt, self._wqt = self.oh + 2 * self._pt, self.ow + 2 * self._pl
        # its column (o, a, c), for the weight read in place w[o, ci, a, c], gathers gy's
        # padded plane o at the flipped tap (kh-1-a, kw-1-c)
        co, a, c = np.meshgrid(np.arange(self.cout), np.arange(self.kh), np.arange(self.kw),
                               indexing="ij")
        self._codes_t = (((co * self._hqt) + self.kh - 1 - a) * self._wqt + self.kw - 1
                         - c).reshape(-1).astype(np.int32)
        if self.dense_impl is None:
            self.dense_impl = self._dense_impls()

    def _dense_impls(self) -> dict:
        """Per phase. On CPUs with 512-bit vectors: "igemm" (the input gradient of a strided
        conv: "gemm") unless A's rows are short (input channels x taps <= 32: first layers,
        "direct"); elsewhere :meth:`_dense_choice`. Measured, 2 threads, batch 16, whole layer
        fwd+bwd, each call after torch's layer: against im2col + SciPy's OpenBLAS (pinned to
        AVX2 here) 1.67-1.84x on resnet18's 3x3 convs, resnet8's layer2/3 and femnist's conv2;
        0.64-0.76x against "direct" on the first layers (3 -> 16, 1 -> 32, 3 -> 64).

        Narrow convs (<= 16 output channels) with a stride-1 input gradient: the forward and
        the weight gradient "direct", the input gradient "igemm". A has at most three 6-row
        panels there, and the weight gradient's 16 rows pay for a transposed gather of every
        im2col entry. resnet8's layer1 convs (16 -> 16, 32 x 32), fwd+bwd, interleaved in one
        process (AMD Zen 4): 1.04-1.15x faster than the better of all-"igemm" and all-"direct"
        at 1 and 2 threads, batch 16 and 32 (2 threads, batch 16: 2.44 ms against 2.53 and
        2.65)."""
        if not WIDE_VECTORS or self.groups != 1 or self.cig * self.kk <= 32:
            impl = self._dense_choice()
            return {"forward": impl, "backward_input": impl, "backward_weight": impl}
        if self.cout <= 16 and self._flip_ok:
            return {"forward": "direct", "backward_weight": "direct", "backward_input": "igemm"}
        return {"forward": "igemm", "backward_input": "igemm" if self._flip_ok else "gemm",
                "backward_weight": "igemm"}

    def _dense_choice(self) -> str:
        """"direct" when a GEMM side is thin (<= 16 output channels, or <= 32 taps x input
        channels: first layers), else "gemm". Static (not timed at run time), so a run's
        numbers never depend on a measurement. Measured, dense fwd+bwd, 2 threads, batch 16:
        resnet8 layer1.0.conv1 (16 -> 16, 32x32) gemm 6.07 / direct 3.74 ms, conv1 (3 -> 16)
        1.36 / 0.97, resnet18 conv1 (3 -> 64) 3.71 / 3.41; but layer2.0.conv1 (16 -> 32, stride
        2) 1.70 / 1.84, layer3.0.conv2 (64 -> 64, 8x8) 2.11 / 3.10, resnet18 layer1.0.conv1
        (64 -> 64) 32.9 / 46.9."""
        return "direct" if self.cog <= 16 or self.cig * self.kk <= 32 else "gemm"

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

    def setup(self, max_batch: int) -> None:
        """Allocate the packed input/output/gradient buffers for batches up to ``max_batch``."""
        super().setup(max_batch)
        n = max_batch
        cq = self.cin * self.sh * self.sw
        self._xq = np.zeros(cq * self.hq * self.wq * n, np.float32)
        self._y = np.zeros((n, self.cout, self.oh, self.ow), np.float32)
        self._gx = np.zeros((n, self.cin, self.h, self.w), np.float32)
        # SWAT's saved activation (compact_acts): each packed row's kept entries
        rows = cq * self.hq
        self._arow = np.zeros(rows, np.int64)
        self._acnt = np.zeros(rows, np.int64)
        self._aoff = np.zeros(1, np.int32)  # sized by the first training forward
        self._aval = np.zeros(1, np.float32)
        self._abounds = np.zeros(1, np.int64)
        self._afull = np.zeros(max(1, self.cin), np.int64)
        self._eo = np.zeros(self.wq * n, np.int32)
        self._bufs = None

    # ------------------------------------------------------------------ sparsity API
    keeps_input = False  # (packed into its own or a shared scratch, kept entries saved)
    keeps_output = False

    def use_out_buffer(self, flat: np.ndarray) -> None:
        super().use_out_buffer(flat)
        self._bufs = None  # (its views hold the old buffer)

    def use_grad_buffer(self, flat: np.ndarray) -> None:
        super().use_grad_buffer(flat)
        self._bufs = None

    def set_sparsity(self, mode: str, ls=None) -> None:
        """Select ``dense`` | ``swat`` | ``masked``; ``ls`` (LayerSparsity) None means dense."""
        if mode not in _MODES:
            raise ValueError(f"conv {self.name!r}: mode must be one of {_MODES}, got {mode!r}")
        if ls is None and mode == "swat":
            mode = "dense"
        self.mode = mode
        self.ls = ls
        self._steps = 0
        self._thr = -1.0
        self._mask_built = None
        self.measured_density = 1.0
        self.measured_act_density = 1.0
        self._thr_a_guess = 0.0
        self._bufs = None

    def set_mask(self, mask: np.ndarray | None) -> None:
        """Store the mask (weight-shaped, bool/uint8) and zero the weights outside it."""
        if mask is None:
            self.mask = None
        else:
            m = np.asarray(mask)
            if m.shape != self.params["weight"].shape:
                raise ValueError(f"conv {self.name!r}: mask shape {m.shape} != weight shape "
                                 f"{self.params['weight'].shape}")
            self.mask = np.ascontiguousarray(m != 0).astype(np.uint8)
            self.params["weight"][self.mask == 0] = 0.0
        self._mask_built = None
        self._bufs = None

    def _dense_grad_buf(self) -> np.ndarray:
        if self.dense_grad is None or self.dense_grad.shape != self.params["weight"].shape:
            self.dense_grad = np.zeros_like(self.params["weight"])
        return self.dense_grad

    def _masked(self) -> bool:
        return self.mode == "masked" and self.mask is not None

    # ------------------------------------------------------------------ compression
    def _structure(self, training: bool, b: _StepBuffers) -> S.SparseWeight:
        """The compressed weight this step's forward and backward-input use (``b``: this
        step's buffers, their weight top-K's K and scratch)."""
        w = self.params["weight"]
        w2 = w.reshape(self.cout, -1)
        if self.mode == "swat":
            if self._thr < 0 or (training and self._steps % self.ls.topk_period == 0):
                self._thr = select_and_build(self, self._sw, w2, b.k_w, b.wscratch)
            else:
                self._sw.build(w2, self._thr)
            if training:
                self._steps += 1
            self.measured_density = self._sw.nnz / w.size
            return self._sw
        if self._masked():
            if self._mask_built is not self.mask:
                self._sw.build(w2, 0.0, self.mask.reshape(self.cout, -1))
                self._mask_built = self.mask
            else:
                self._sw.refresh(w.reshape(-1))
            self.measured_density = self._sw.nnz / w.size
            return self._sw
        if not self._full_built:
            self._full.build(w2, 0.0, np.ones(w2.shape, np.uint8))  # once
            self._full_built = True
        else:
            self._full.refresh(w.reshape(-1))
        self.measured_density = 1.0
        return self._full

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
        return self.ow * n, self.wq * n, self.hq * self.wq * n

    def _direct(self, phase: str) -> bool:
        return (self.mode == "swat" or self._masked() or self.groups != 1
                or self.dense_impl[phase] == "direct")

    def _col(self, n: int) -> np.ndarray:
        L = self.ow * n
        return workspace("col", self.cin * self.kk * self.oh * L).reshape(
            self.cin * self.kk, self.oh * L)

    def _step_key(self, n: int) -> tuple:
        """What :meth:`_bind`'s result depends on besides the layer's own buffers (replaced
        only by :meth:`setup`) and its mask (:meth:`set_mask`)."""
        impl = self.dense_impl
        return (n, self.mode, self.mask is not None, self.ls, threads(), workspace_gen(),
                impl["forward"], impl["backward_input"], impl["backward_weight"])

    def _step_buffers(self, n: int) -> _StepBuffers:
        """This step's :class:`_StepBuffers` (worked out again only when the batch, the mode,
        the dense implementation, the thread count or a shared scratch buffer changed)."""
        b = self._bufs
        if b is None or b.key != self._step_key(n):
            b = self._bufs = self._bind(n)
            b.key = self._step_key(n)  # after binding: it may have grown the shared scratch
        return b

    def _check_impls(self) -> None:
        impl = self.dense_impl
        for phase in ("forward", "backward_input", "backward_weight"):
            if impl.get(phase) not in _IMPLS:
                raise ValueError(f"conv {self.name!r}: dense_impl[{phase!r}] must be one of "
                                 f"{_IMPLS}, got {impl.get(phase)!r}")
        if impl["backward_input"] == "igemm" and not self._flip_ok:
            raise ValueError(f"conv {self.name!r}: dense_impl['backward_input'] 'igemm' needs "
                             "groups 1, stride 1 and padding < kernel size, got groups "
                             f"{self.groups}, stride {(self.sh, self.sw)}, padding "
                             f"{(self.ph, self.pw)}")

    def _igemm_buffers(self, pair, m: int, b_rows: int, slots: int, flops: int,
                       pad_shape: tuple) -> tuple:
        """A conv_gemm kernel (picked from ``pair``) and its scratch for an m-row A: A
        zero-padded to ``pad_shape`` if m < 6 (else None), and in shared workspaces per part
        one B panel (``b_rows`` x 32) and ``slots`` edge tiles."""
        kern = S.pick(pair, flops)
        parts = S.chunks(kern, pair, 1 << 30)
        apad = np.zeros(pad_shape, np.float32) if m < MR else None
        bp = workspace("ig_b", parts * b_rows * NR).reshape(parts, -1)
        tiles = workspace("ig_t", parts * slots * MR * NR).reshape(parts, -1)
        return kern, apad, bp, tiles

    def _bind(self, n: int) -> _StepBuffers:
        """Views of the step buffers at batch ``n`` and the kernels this mode and thread count
        pick (the sparse kernels by the target density: their results do not depend on the
        pick)."""
        if not (self._direct("forward") and self._direct("backward_input")
                and self._direct("backward_weight")):
            self._check_impls()
        L, rs, plane = self._geom(n)
        nq = self.cin * self.sh * self.sw * plane
        swat = self.mode == "swat"
        masked = self._masked()
        dens = (self.ls.weight_density if swat else
                float(self.mask.mean()) if masked else 1.0)
        flops = self.params["weight"].size * self.oh * L
        b = _StepBuffers(key=(), L=L, rs=rs, plane=plane,
                         xq=workspace("xq", nq) if swat else self._xq[:nq],
                         y=self._y[:n], gx=self._gx[:n],
                         pack=S.pick(K.pack_input, nq))
        if swat:
            xsize = n * self.cin * self.h * self.w
            b.k_act = T.count_for_density(self.ls.act_density, xsize)
            b.k_w = T.count_for_density(self.ls.weight_density, self.params["weight"].size)
            b.wscratch = weight_scratch(self.params["weight"].size)
            b.cand = workspace("cand", xsize).view(np.uint32)
            b.mc, b.above = window_counts()
            b.act_window = S.pick(T.window_pass, xsize)
            b.compact = S.pick(K.compact_acts, nq)
            b.compact_nch = S.chunks(b.compact, K.compact_acts, self.cin)
            b.scan = S.pick(K.bwd_weight_scan, int(flops * self.ls.act_density))
            b.scan_nch = S.chunks(b.scan, K.bwd_weight_scan, self.cin)
        if self._direct("forward"):
            b.fwd = S.pick(K.fwd_csr, int(flops * dens))
            b.fwd_nch = S.chunks(b.fwd, K.fwd_csr, self.cout)
            # stride 1 only: resnet18 layer2.0.conv1 (stride 2) measured 0.95-0.99x tiled
            b.fwd_tr = (rows_per_tile(4 * nq, self.oh, self.kh - 1)
                        if self.sh == 1 and self.sw == 1 else self.oh)
            b.yb = workspace("yb", b.fwd_nch * self.oh * rs)  # one output block per worker
        else:
            b.yb = workspace("yb", self.cout * self.oh * L)  # batch-last output
            if self.dense_impl["forward"] == "igemm":
                r = self.cin * self.kk
                b.igemm, b.apad, b.bp, b.tiles = self._igemm_buffers(
                    CG.conv_gemm, self.cout, r, CG.panels(self.cout), flops, (MR, r))
        # direct kernels read gy in the extended row layout (stride rs), GEMM in (stride L)
        b.gemm_w = not swat and not masked and self.groups == 1 and \
            self.dense_impl["backward_weight"] in ("gemm", "igemm")
        b.gemm_in = not self._direct("backward_input")
        b.rstride = L if b.gemm_w else rs
        # stride-1 input gradient with few kept entries per (ci, tap) column (<= 8: a pass per
        # column reads and writes ci's plane for 1-3 of them at 95 % sparsity): all of a
        # channel's taps in one pass, gy's channels with zero rows between them
        # (bwd_input_taps); else a pass per column, channels back to back. Measured, 0.95,
        # 2 threads, whole layer A/B: resnet8's stride-1 convs 1.00-1.06x, femnist conv2
        # 1.04x, resnet18 layer1/2 1.02-1.05x; layer4.0.conv2 (26 a column) 0.96-1.00x
        b.taps_in = (not b.gemm_in and self.sh == 1 and self.sw == 1 and self.kk > 1
                     and dens * self.cog <= 8)
        # the gaps: a tap kh reads kh - ph rows above the output (and as many below), one more
        # row above channel 0 for the reads wrapping left into the row before
        gap = max(0, self.kh - 1 - self.ph)
        b.cstride = (self.oh + gap) * rs if b.taps_in else self.oh * b.rstride
        b.lead = (gap + 1) * rs if b.taps_in else 0
        b.gyb = workspace("gyb", b.lead + self.cout * b.cstride)
        b.gyT = workspace("gyT", self.cout * self.oh * self._owp * n if swat else 1)
        b.pack_gy = S.pick(K.pack_grad_out, b.gyb.size)
        if swat:
            b.gwt = workspace("gWt", self.params["weight"].size)
        if b.gemm_in:
            b.gxq = workspace("gxq", nq)
            if self.dense_impl["backward_input"] == "igemm":
                b.igemm_in, b.apad_in, b.bp_in, b.tiles_in = self._igemm_buffers(
                    CG.conv_gemm, self.cin, self.cout * self.kk, CG.panels(self.cin), flops,
                    (self.cout, MR, self.kk))
                b.gyq = workspace("gyq", self.cout * self._hqt * self._wqt * n)
        elif b.taps_in:
            b.bwd_in = S.pick(K.bwd_input_taps, int(flops * dens))
            b.bwd_in_nch = S.chunks(b.bwd_in, K.bwd_input_taps, self.cin)
            b.bwd_in_tr = rows_per_tile(4 * self.cout * self.oh * b.rs, self.h, self.kh - 1)
            b.gxq = workspace("gxq", b.bwd_in_nch * plane)  # one channel's plane per worker
            per = b.bwd_in_nch * self.cog * self.kk  # room for a channel's entries per worker
            b.offs = workspace("taps_off", per).view(np.int32)
            b.vals = workspace("taps_val", per)
        else:
            b.bwd_in = S.pick(K.bwd_input_csc, int(flops * dens))
            b.bwd_in_nch = S.chunks(b.bwd_in, K.bwd_input_csc, self.cin)
            # per worker: one channel's planes and a zero run (bwd_input_csc)
            b.gxq = workspace("gxq", b.bwd_in_nch * (self.sh * self.sw * plane + rs))
        if b.gemm_w and self.dense_impl["backward_weight"] == "igemm":
            # edge slots: one per row panel and one per column tile (see conv_gemm_wgrad)
            slots = CG.panels(self.cout) + -(-self.cin * self.kk // NR)
            b.igemm_w, b.apad_w, b.bp_w, b.tiles_w = self._igemm_buffers(
                CG.conv_gemm_wgrad, self.cout, CG.KC, slots, flops, (MR, self.oh * L))
        # im2col's matrix, for the phases that run the explicit "gemm" (and _dense_wgrad's
        # im2col + GEMM when the direct kernels' gy rows happen to be L long)
        impl = self.dense_impl
        if ((b.fwd is None and impl["forward"] == "gemm")
                or (b.gemm_w and impl["backward_weight"] == "gemm")
                or (b.gemm_in and impl["backward_input"] == "gemm")
                or (not swat and b.igemm_w is None and b.rstride == L and self.groups == 1)):
            b.col = self._col(n)
        return b

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """NCHW float32 -> NCHW float32 (a view of a preallocated buffer)."""
        n = self._check_x(x)
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        self._n = n
        b = self._step_buffers(n)
        t0 = time.perf_counter()
        xq, y = b.xq, b.y
        xu = x.view(np.uint32)
        want_sel = training and self.mode == "swat"
        # the activation top-K: after the first step, a windowed select around the last
        # threshold (one pass over x); else pass 1 of the histogram select in the packing
        near = want_sel and self._thr_a_guess > 0
        b.pack(x, xu, xq, self.sh, self.sw, self.ph, self.pw, self.hq, self.wq, self.kh,
               self.kw, self._hist, want_sel and not near)
        self._hist_ok = want_sel
        if want_sel:
            self._select_acts(xu.reshape(-1), b, near)
        bias = self.params["bias"] if self.has_bias else self._nobias
        if b.fwd is not None:
            sw = self._structure(training, b)
            b.fwd(sw.rowptr, sw.code, sw.val, xq, b.yb, y, bias, self.has_bias, self.oh, b.rs,
                  b.fwd_nch, b.fwd_tr)
        else:
            yb2 = b.yb.reshape(self.cout, -1)
            w = self.params["weight"]
            if b.igemm is not None:  # the weight read in place, (cout, R) row-major
                r = self.cin * self.kk
                a = w.reshape(self.cout, r)
                if b.apad is not None:
                    b.apad[:self.cout] = a
                    a = b.apad
                b.igemm(a.reshape(-1), r, 0, r, a.shape[0], xq, self._codes, yb2, self.cout, b.L,
                        b.rs, n, CG.KC, b.bp, b.tiles)
            else:
                S.pick(K.im2col, b.col.size)(xq, self._codes, b.col, self.oh, b.L, b.rs, n)
                gemm(w.reshape(self.cout, -1), b.col, yb2)
            S.pick(K.unpack_output, b.yb.size)(b.yb, y, bias, self.has_bias)
        if self.timing:
            self.phase_times["forward"] = time.perf_counter() - t0
        return y

    def _select_acts(self, xb: np.ndarray, b: _StepBuffers, near: bool) -> None:
        """SWAT: the activation top-K finished on x itself (``xb``: its flat bit patterns;
        exact, ties counted), the kept activations saved (:meth:`_save_acts`)."""
        if near:
            tb, kept = T.select_count_near(xb, b.k_act, self._thr_a_guess, self._awin,
                                           self._hist, b.cand, b.mc, b.above, b.act_window)
        else:
            tb, kept = T.resolve_count(self._hist, b.k_act, xb, b.cand)
            self._awin = T.Window(0.1, 0.01)
        self._thr_a = np.uint32(tb).view(np.float32)
        self._thr_a_guess = float(self._thr_a) if tb > 1 else 0.0  # 1: keep-all
        self.measured_act_density = int(kept) / xb.size
        self._save_acts(b, self._n, int(kept))

    def _save_acts(self, b: _StepBuffers, n: int, kept: int) -> None:
        """SWAT: the kept input activations for the weight gradient, compacted per packed row
        while the packed input is in cache (:func:`~embedded.kernels.conv_kernels.compact_acts`).
        The channel chunks share room for twice the kept count plus two rows each, in equal
        regions; the arrays double (rarely: the kept count is fixed by the density) when a
        region could overflow."""
        nch = b.compact_nch
        if self._abounds.size != nch + 1:
            self._size_acts(max(self._aoff.size, 2 * kept + 2 * nch * b.rs), nch)
        while not b.compact(b.xq, self._thr_a, self.cin, self.sh, self.sw, self.kh, self.kw,
                            self.hq, self.wq, n, self.cout, self._lpad, self._owp,
                            self._eo[:b.rs], self._arow, self._acnt, self._aoff, self._aval,
                            self._abounds, self._afull, nch):
            self._size_acts(2 * self._aoff.size, nch)

    def _size_acts(self, cap: int, nch: int) -> None:
        """Room for ``cap`` saved activations in ``nch`` equal regions (arrays grown if
        needed)."""
        self._abounds = (np.arange(nch + 1, dtype=np.int64) * cap) // nch
        if self._aoff.size < cap:
            self._aoff = np.zeros(cap, np.int32)
            self._aval = np.zeros(cap, np.float32)

    # ------------------------------------------------------------------ backward
    def backward(self, gy: np.ndarray, need_input_grad: bool = True) -> np.ndarray | None:
        """Weight/bias gradients into ``self.grads``; returns the NCHW input gradient."""
        n = self._n
        if gy.shape != (n, self.cout, self.oh, self.ow) or gy.dtype != np.float32:
            raise ValueError(f"conv {self.name!r}: expected float32 grad "
                             f"{(n, self.cout, self.oh, self.ow)}, got {gy.dtype} {gy.shape}")
        if not gy.flags.c_contiguous:
            gy = np.ascontiguousarray(gy)
        b = self._bufs  # bound by this step's forward (set_sparsity / set_mask unbind)
        if b is None or b.key[0] != n:
            b = self._step_buffers(n)
        swat = self.mode == "swat"
        masked = not swat and self._masked()
        if (b.gemm_w != b.gemm_in and b.igemm_in is None and need_input_grad
                and not (swat or masked)):
            # "igemm" input gradients pack gy themselves; "gemm" and "direct" share one layout
            raise ValueError(f"conv {self.name!r}: dense_impl['backward_input'] "
                             f"{self.dense_impl['backward_input']!r} cannot follow "
                             f"backward_weight {self.dense_impl['backward_weight']!r}: both "
                             "'gemm'/'igemm' or both 'direct', or backward_input 'igemm'")
        gw = self.grads["weight"]
        gb = self.grads["bias"] if self.has_bias else self._nobias
        t0 = time.perf_counter()
        b.pack_gy(gy, b.gyb, b.gyT, gb, self.has_bias, swat, b.rstride, self._lpad, self._owp,
                  b.cstride, b.lead)
        if swat:
            if not self._hist_ok:
                raise RuntimeError(f"conv {self.name!r}: backward without a training forward")
            self._hist_ok = False
            b.scan(self._arow, self._acnt, self._aoff, self._aval, b.gyT, b.gwt, gw, self.cin,
                   b.scan_nch, self.scan_block, self.sh, self.sw, self.hq, self.wq, n, self.kh,
                   self.kw, self.oh, self.ow, self._slots, self._lpad, self._owp)
        elif masked and not self.want_dense_grad:
            sw = self._sw
            gw[...] = 0.0
            S.pick(K.bwd_weight_sddmm, int(gw.size * self.oh * b.L * self.measured_density))(
                sw.rowptr, sw.code, sw.widx, b.gyb, b.xq, gw.reshape(-1), self.oh, self.ow,
                b.rs, n, b.cstride, b.lead)
        else:
            out = self._dense_grad_buf() if masked else gw
            self._dense_wgrad(b, out, n)
            if masked:
                np.multiply(out, self.mask, out=gw)
            elif self.want_dense_grad:
                self._dense_grad_buf()[...] = gw
        t1 = time.perf_counter()
        if self.timing:
            self.phase_times["backward_weight"] = t1 - t0
        if not need_input_grad:
            self.phase_times.pop("backward_input", None)
            return None
        gx = b.gx
        if not b.gemm_in:
            sw = self._sw if (swat or masked) else self._full
            if sw is self._full and not self._full_built:
                self._structure(False, b)
            if b.taps_in:
                b.bwd_in(sw.colptr, sw.c_row, sw.c_val, b.gyb, b.gxq, gx, self.ph, self.pw,
                         self.hq, self.wq, self.kh, self.kw, b.bwd_in_nch, b.cstride // n,
                         b.lead, b.offs, b.vals, b.bwd_in_tr)
            else:
                b.bwd_in(sw.colptr, sw.col_code, sw.c_row, sw.c_val, b.gyb, b.gxq, gx,
                         self.sh, self.sw, self.ph, self.pw, self.hq, self.wq, self.oh,
                         self.ow, self.kh, self.kw, b.bwd_in_nch)
        elif b.igemm_in is not None:
            # gx = the flipped weight convolved over gy zero-padded (stride 1)
            S.pick(K.pack_input, b.gyq.size)(gy, gy.view(np.uint32), b.gyq, 1, 1, self._pt,
                                             self._pl, self._hqt, self._wqt, self.kh, self.kw,
                                             self._hist, False)
            # A[ci, (o, tap)] = w[o, ci, tap] read in place: rows kk apart, runs of kk taps
            # cin*kk apart
            a = self.params["weight"].reshape(self.cout, self.cin, self.kk)
            if b.apad_in is not None:
                b.apad_in[:, :self.cin] = a
                a = b.apad_in
            ma = a.shape[1]
            gxb = b.gxq[:self.cin * self.h * self.w * n]
            b.igemm_in(a.reshape(-1), self.kk, ma * self.kk, self.kk, ma, b.gyq, self._codes_t,
                       gxb.reshape(self.cin, -1), self.cin, self.w * n, self._wqt * n, n,
                       max(1, CG.KC // self.kk) * self.kk, b.bp_in, b.tiles_in)
            S.pick(K.unpack_output, gxb.size)(gxb, gx, self._nobias, False)
        else:
            gemm(self.params["weight"].reshape(self.cout, -1), b.gyb.reshape(self.cout, -1),
                 b.col, ta=True)
            S.pick(K.col2im, b.col.size)(b.col, self._codes, b.gxq, gx, self.kk, self.sh,
                                         self.sw, self.ph, self.pw, self.hq, self.wq, self.oh,
                                         b.L)
        if self.timing:
            self.phase_times["backward_input"] = time.perf_counter() - t1
        return gx

    def _dense_wgrad(self, b: _StepBuffers, out: np.ndarray, n: int) -> None:
        """The full weight gradient (dense mode, or masked with ``want_dense_grad``); the
        packed gy is in the GEMM layout (row stride L) or the direct kernels' (stride rs)."""
        if b.igemm_w is not None:
            a = b.gyb[:self.cout * self.oh * b.L]
            if b.apad_w is not None:
                b.apad_w[:self.cout] = a.reshape(self.cout, -1)
                a = b.apad_w.reshape(-1)
            b.igemm_w(a, max(self.cout, MR), b.xq, self._codes, out.reshape(self.cout, -1),
                      self.cout, self.oh * b.L, b.L, b.rs, n, b.bp_w, b.tiles_w)
            return
        if b.rstride == b.L and self.groups == 1:
            S.pick(K.im2col, b.col.size)(b.xq, self._codes, b.col, self.oh, b.L, b.rs, n)
            gemm(b.gyb.reshape(self.cout, -1), b.col, out.reshape(self.cout, -1), tb=True)
            return
        if self.groups == 1:
            S.pick(K.bwd_weight_dense, out.size * self.oh * b.L)(
                self._codes, b.gyb, b.xq, out.reshape(-1), self.oh, self.ow, b.rs, n,
                b.cstride, b.lead)
            return
        if not self._full_built:
            w2 = self.params["weight"].reshape(self.cout, -1)
            self._full.build(w2, 0.0, np.ones(w2.shape, np.uint8))
            self._full_built = True
        f = self._full
        S.pick(K.bwd_weight_sddmm, out.size * self.oh * b.L)(
            f.rowptr, f.code, f.widx, b.gyb, b.xq, out.reshape(-1), self.oh, self.ow, b.rs, n,
            b.cstride, b.lead)

    def memory_bytes(self) -> int:
        """Bytes of this layer's own arrays (params, grads, step buffers, compressed weight)."""
        tot = self._sw.nbytes() + self._full.nbytes()
        for v in self.__dict__.values():
            if isinstance(v, np.ndarray):
                tot += v.nbytes
        return tot
