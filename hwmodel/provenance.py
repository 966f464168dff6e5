"""Provenance: where a time, energy or byte figure came from. Tagged per quantity."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Provenance(str, Enum):
    """One tag for every time, energy and byte figure sparsefl reports.

    * ``measured`` — read off real hardware (a board's clock, a power sensor, bytes on a link);
    * ``measured-emulated`` — timed on the host for an emulated board (not the board's time);
    * ``calibrated-estimate`` — hwmodel's estimate from a profile fitted to measurements;
    * ``estimated`` — hwmodel's estimate from a datasheet/literature profile.
    """

    MEASURED = "measured"
    MEASURED_EMULATED = "measured-emulated"
    CALIBRATED_ESTIMATE = "calibrated-estimate"
    ESTIMATED = "estimated"

    def __str__(self) -> str:  # "measured", not "Provenance.MEASURED"
        return self.value

    @classmethod
    def parse(cls, value: str | Provenance) -> Provenance:
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(p.value for p in cls)
            raise ValueError(f"provenance: expected one of {allowed}, got {value!r}") from None


@dataclass(frozen=True)
class Tagged:
    """A number with its unit and provenance, e.g. ``Tagged(1.2, "J", Provenance.MEASURED)``."""

    value: float
    unit: str
    provenance: Provenance

    def to_dict(self) -> dict:
        return {"value": self.value, "unit": self.unit, "provenance": self.provenance.value}


def tag(value: float, unit: str, prov: Provenance | str) -> dict:
    """A cost as it travels in a ClientResult: ``{"value", "unit", "provenance"}``."""
    return Tagged(float(value), unit, Provenance.parse(prov)).to_dict()
