"""DeviceProfile: what the cost model knows about one device, every figure with its source.

The data live in ``profiles/<name>.toml`` (shipped inside the wheel); loading and schema
validation are in :mod:`hwmodel.profiles`. This module only defines the records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Dense op classes with their own efficiency factor (fraction of the cluster's FP32 peak).
OP_CLASSES = ("conv", "gemm", "elementwise")


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
