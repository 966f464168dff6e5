"""What a board is: CPU model, cores, frequency, RAM, temperature, throttling — from /proc and
/sys, every reader tolerant of missing or unreadable files (the value is then None)."""

from __future__ import annotations

import glob
import importlib.metadata
import os
import platform
import sys


def _read(path: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _int(path: str) -> int | None:
    s = _read(path)
    try:
        return int(s.strip()) if s is not None else None
    except ValueError:
        return None


def cpu_model(root: str = "/") -> str | None:
    """CPU model name (x86 ``model name``; ARM device-tree model or ``Hardware``/``Model``)."""
    info = _read(os.path.join(root, "proc/cpuinfo")) or ""
    fields: dict[str, str] = {}
    for line in info.splitlines():
        k, sep, v = line.partition(":")
        if sep and k.strip() not in fields:
            fields[k.strip()] = v.strip()
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        if fields.get(key):
            return fields[key]
    parts = [fields.get("CPU implementer"), fields.get("CPU part")]
    if all(parts):
        return f"ARM implementer {parts[0]} part {parts[1]}"
    return platform.processor() or None


def board_model(root: str = "/") -> str | None:
    """Device-tree model string (e.g. 'Raspberry Pi 4 Model B Rev 1.4'), if any."""
    s = _read(os.path.join(root, "proc/device-tree/model"))
    return s.strip("\x00\n ") if s else None


def cpu_freq_mhz(root: str = "/") -> dict:
    """Current and maximum frequency of cpu0 (MHz), from cpufreq."""
    d = os.path.join(root, "sys/devices/system/cpu/cpu0/cpufreq")
    cur = _int(os.path.join(d, "scaling_cur_freq"))
    mx = _int(os.path.join(d, "cpuinfo_max_freq"))
    return {"cur_mhz": None if cur is None else cur / 1000,
            "max_mhz": None if mx is None else mx / 1000,
            "governor": (_read(os.path.join(d, "scaling_governor")) or "").strip() or None}


def memory(root: str = "/") -> dict:
    """Total and available RAM (bytes) from /proc/meminfo."""
    out: dict[str, int | None] = {"total_bytes": None, "available_bytes": None}
    for line in (_read(os.path.join(root, "proc/meminfo")) or "").splitlines():
        k, _, v = line.partition(":")
        parts = v.split()
        if not parts or not parts[0].isdigit():
            continue
        if k == "MemTotal":
            out["total_bytes"] = int(parts[0]) * 1024
        elif k == "MemAvailable":
            out["available_bytes"] = int(parts[0]) * 1024
    return out


def temperatures_c(root: str = "/") -> dict[str, float]:
    """Thermal zones: type -> °C."""
    out: dict[str, float] = {}
    for d in sorted(glob.glob(os.path.join(root, "sys/class/thermal/thermal_zone*"))):
        t = _int(os.path.join(d, "temp"))
        if t is None:
            continue
        name = (_read(os.path.join(d, "type")) or os.path.basename(d)).strip()
        key, k = name, 1
        while key in out:
            k += 1
            key = f"{name}#{k}"
        out[key] = t / 1000.0
    return out


def throttling(root: str = "/") -> dict | None:
    """Throttling state where the kernel exposes it (Raspberry Pi firmware ``get_throttled``)."""
    for p in ("sys/devices/platform/soc/soc:firmware/get_throttled",
              "sys/devices/platform/soc:firmware/get_throttled"):
        s = _read(os.path.join(root, p))
        if s is not None:
            try:
                v = int(s.strip(), 16)
            except ValueError:
                continue
            return {"raw": v, "under_voltage": bool(v & 0x1), "freq_capped": bool(v & 0x2),
                    "throttled": bool(v & 0x4), "soft_temp_limit": bool(v & 0x8),
                    "under_voltage_occurred": bool(v & 0x10000),
                    "throttled_occurred": bool(v & 0x40000)}
    return None


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def system_info(root: str = "/") -> dict:
    """Everything INFO reports about the machine (no sensor, no agent state)."""
    temps = temperatures_c(root)
    return {
        "cpu_model": cpu_model(root),
        "board_model": board_model(root),
        "machine": platform.machine(),
        "system": platform.system(),
        "cores": os.cpu_count(),
        "freq": cpu_freq_mhz(root),
        "memory": memory(root),
        "temperature_c": temps,
        "max_temperature_c": max(temps.values()) if temps else None,
        "throttling": throttling(root),
        "python": sys.version.split()[0],
        "numpy": _version("numpy"),
        "numba": _version("numba"),
    }
