"""The client half of each method: what to send back (UplinkRule) and how the mask moves
during local training (MaskSchedule). ``embedded`` exports both names from here."""

from __future__ import annotations

from .mask_schedule import MaskSchedule, ScheduleError
from .uplink import Update, UplinkError, UplinkRule, decode_update

__all__ = ["MaskSchedule", "ScheduleError", "Update", "UplinkError", "UplinkRule",
           "decode_update"]
