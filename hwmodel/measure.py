"""One measurement record for the trainer's TrainStats, a board's BENCH and calibration alike."""

from __future__ import annotations

import csv
import io
from dataclasses import MISSING, asdict, dataclass, fields

import numpy as np

#: Phases of one training step of a layer.
PHASES = ("forward", "backward_input", "backward_weight", "update")


@dataclass
class Measurement:
    """Timing of one layer and phase (or ``layer="step"`` for a whole step), repeated.

    ``density`` is the weight density the kernel ran at (measured, not planned), ``act_density``
    the saved-activation density; ``median_s`` and ``iqr_s`` summarise ``repeats`` timings.
    """

    model: str
    layer: str
    layer_type: str
    phase: str
    density: float
    act_density: float
    batch: int
    threads: int
    median_s: float
    iqr_s: float
    repeats: int
    device: str = ""
    provenance: str = "measured"
    temperature_c: float | None = None
    freq_mhz: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Measurement:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"measurement: unknown field(s) {sorted(unknown)}")
        kw = {}
        for f in fields(cls):
            if f.name not in d:
                if f.default is not MISSING:
                    continue
                raise ValueError(f"measurement: missing field {f.name!r}")
            v = d[f.name]
            if v in ("", None) and f.name in ("temperature_c", "freq_mhz"):
                v = None
            elif f.name in ("density", "act_density", "median_s", "iqr_s",
                            "temperature_c", "freq_mhz"):
                v = float(v)
            elif f.name in ("batch", "threads", "repeats"):
                v = int(v)
            kw[f.name] = v
        return cls(**kw)

    @staticmethod
    def summarise(times_s: list[float] | np.ndarray) -> tuple[float, float]:
        """Median and inter-quartile range of repeated timings."""
        t = np.asarray(times_s, dtype=np.float64)
        q1, med, q3 = np.percentile(t, [25, 50, 75])
        return float(med), float(q3 - q1)


def to_csv(records: list[Measurement]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[f.name for f in fields(Measurement)])
    w.writeheader()
    for r in records:
        w.writerow(r.to_dict())
    return buf.getvalue()


def from_csv(text: str) -> list[Measurement]:
    return [Measurement.from_dict(row) for row in csv.DictReader(io.StringIO(text))]
