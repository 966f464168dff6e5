"""DeviceProfile: what the cost model knows about one device, every figure with its source.

The data live in ``profiles/<name>.toml`` (shipped inside the wheel); loading and schema
validation are in :mod:`hwmodel.profiles`. This module only defines the records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Dense op classes with their own efficiency factor (fraction of the cluster's FP32 peak).
OP_CLASSES = ("conv", "gemm", "elementwise")

#: Finer kinds of work (optional profile keys; each falls back to its op class, see
#: :func:`hwmodel.estimator.kind_of`): elementwise ops by op, and the optimizer update.
ELEMENTWISE_KINDS = ("pool", "global_avgpool", "norm", "activation", "add", "loss", "update")
#: Phases a conv/gemm efficiency or sparse kernel may be given for.
MAC_PHASES = ("forward", "backward_input", "backward_weight")
#: Optional keys of ``DeviceProfile.efficiency`` beyond OP_CLASSES (fallback order in
#: :mod:`hwmodel.estimator`): conv/gemm per phase, elementwise kinds (also per forward/backward),
#: the sparse book-keeping (``topk`` selection, ``compress`` threshold passes), and the
#: elementwise work inside a conv/gemm row (``conv_bias``, ``gemm_bias``: the bias add).
EFFICIENCY_KEYS = (
    tuple(f"{c}_{p}" for c in ("conv", "gemm") for p in MAC_PHASES)
    + tuple(k for k in ELEMENTWISE_KINDS)
    + tuple(f"{k}_{p}" for k in ELEMENTWISE_KINDS if k != "update" for p in ("forward", "backward"))
    + ("topk", "compress", "conv_bias", "gemm_bias")
)
#: Keys of ``DeviceProfile.sparse_kernels``.
SPARSE_KERNEL_KEYS = tuple(f"{c}_{p}" for c in ("conv", "gemm") for p in MAC_PHASES)
#: Keys of ``DeviceProfile.overheads`` (per-kind fixed time; default ``overhead_s``).
OVERHEAD_KEYS = ("conv", "gemm", "elementwise") + ELEMENTWISE_KINDS


@dataclass(frozen=True)
class Cluster:
    """A group of identical cores (big.LITTLE SoCs have several)."""

    name: str
    cores: int
    freq_ghz: float
    peak_gflops: float  # FP32, whole cluster


@dataclass(frozen=True)
class Radio:
    """Radio energy model: energy per byte up/down plus a fixed cost per transfer session.

    ``energy_j(up, down) = up * up_j_per_byte + down * down_j_per_byte + session_j``
    where ``session_j`` folds in promotion and tail energy (LTE's long tail, WiFi's base power
    over the active time).
    """

    name: str
    up_j_per_byte: float
    down_j_per_byte: float
    session_j: float
    up_mbps: float
    down_mbps: float


@dataclass(frozen=True)
class SparseEfficiency:
    """Efficiency of sparse kernels as a function of weight density.

    ``efficiency[i]`` at ``densities[i]`` is the achieved speed-up divided by the
    FLOP-proportional one (1/density); interpolated linearly in log-density, clamped at the
    ends, and 1.0 at density 1. Sparse time = dense time × density / efficiency(density).
    """

    densities: tuple[float, ...]
    efficiency: tuple[float, ...]


@dataclass(frozen=True)
class SparseKernel:
    """A sparse kernel's time relative to the dense kernel of the same op class and phase.

    ``sparse time = dense time × (density / efficiency + fixed)``: ``efficiency`` is the speed
    per kept MAC relative to the dense kernel (1: as fast per MAC), ``fixed`` the
    density-independent share (scanning outputs, index arithmetic) as a fraction of dense time.
    """

    efficiency: float
    fixed: float


@dataclass
class DeviceProfile:
    """One device (or one calibrated board). Plain floats; ``sources`` says where each came from.

    ``sources`` maps a dotted field path (``"power.busy_w"``, ``"clusters.a72.freq_ghz"``) to a URL,
    a citation, or ``"measured: how"``; ``fitted`` lists the paths a calibration fitted (their
    provenance is ``measured``; estimates from such a profile are ``calibrated-estimate``).
    """

    name: str
    description: str
    clusters: list[Cluster]
    train_cluster: str
    ram_bytes: int
    mem_bandwidth_gbs: float
    efficiency: dict[str, float]  # op class -> fraction of peak (dense kernels)
    sparse_efficiency: SparseEfficiency
    overhead_s: float  # per layer and phase
    idle_w: float
    busy_w: float
    radios: dict[str, Radio] = field(default_factory=dict)
    battery_wh: float | None = None
    sources: dict[str, str] = field(default_factory=dict)
    fitted: tuple[str, ...] = ()
    # --- optional refinements (defaults reproduce the plain roofline above) ---------------
    #: per (op class, phase) sparse kernels; those absent use ``sparse_efficiency``
    sparse_kernels: dict[str, SparseKernel] = field(default_factory=dict)
    #: seconds per non-zero written when building a compressed weight/activation (0: none)
    compress_nnz_s: float = 0.0
    #: per-kind fixed time per layer and phase (absent kinds: ``overhead_s``)
    overheads: dict[str, float] = field(default_factory=dict)
    #: rows moving at most ``cache_bytes`` run at ``cache_bandwidth_gbs`` (0: no cache term)
    cache_bytes: int = 0
    cache_bandwidth_gbs: float | None = None
    #: compute/memory overlap: time = max(c, m) + (1 - overlap) · min(c, m); 1 = roofline max
    overlap: float = 1.0
    path: str = field(default="", compare=False)  # the TOML file it was loaded from (not identity)

    @property
    def cluster(self) -> Cluster:
        """The cluster the trainer runs on."""
        for c in self.clusters:
            if c.name == self.train_cluster:
                return c
        raise KeyError(f"profile {self.name!r}: no cluster named {self.train_cluster!r}")

    @property
    def peak_gflops(self) -> float:
        return self.cluster.peak_gflops

    @property
    def calibrated(self) -> bool:
        return bool(self.fitted)
