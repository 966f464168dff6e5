"""``sparsefl profiles``: list device profiles with their key figures (and, as JSON, their sources)."""

from __future__ import annotations

import argparse
import json

from hwmodel.profile import DeviceProfile
from hwmodel.profiles import list_profiles, load_profile

#: JSON key -> (value getter, source path getter); the sources travel beside the figures.
_FIGURES = {
    "cores": (lambda p: p.cluster.cores, lambda p: f"clusters.{p.train_cluster}.cores"),
    "freq_ghz": (lambda p: p.cluster.freq_ghz, lambda p: f"clusters.{p.train_cluster}.freq_ghz"),
    "peak_gflops": (lambda p: p.cluster.peak_gflops, lambda p: f"clusters.{p.train_cluster}.peak_gflops"),
    "ram_bytes": (lambda p: p.ram_bytes, lambda p: "memory.ram_bytes"),
    "mem_bandwidth_gbs": (lambda p: p.mem_bandwidth_gbs, lambda p: "memory.bandwidth_gbs"),
    "idle_w": (lambda p: p.idle_w, lambda p: "power.idle_w"),
    "busy_w": (lambda p: p.busy_w, lambda p: "power.busy_w"),
    "battery_wh": (lambda p: p.battery_wh, lambda p: "power.battery_wh"),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``profiles`` on the ``sparsefl`` subparsers."""
    p = subparsers.add_parser(
        "profiles",
        help="list device profiles with their key figures and sources",
        description="List the shipped device profiles (or the given names / .toml paths) with the "
        "train cluster's cores, clock and FP32 peak, RAM, memory bandwidth, idle/busy power and "
        "battery. --format json adds every figure's source. Giving a path validates that file.",
    )
    p.add_argument("devices", nargs="*", metavar="NAME|PATH",
                   help="profile names or .toml paths (default: every shipped profile)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    return p


def summary(p: DeviceProfile) -> dict:
    """The key figures of one profile and the source of each (a JSON-ready dict)."""
    out: dict = {
        "name": p.name,
        "description": p.description,
        "train_cluster": p.train_cluster,
        "clusters": [{"name": c.name, "cores": c.cores, "freq_ghz": c.freq_ghz,
                      "peak_gflops": c.peak_gflops} for c in p.clusters],
    }
    sources = {}
    for key, (get, path) in _FIGURES.items():
        out[key] = get(p)
        if out[key] is not None:
            sources[key] = p.sources[path(p)]
    out["radios"] = sorted(p.radios)
    out["calibrated"] = p.calibrated
    out["fitted"] = list(p.fitted)
    out["path"] = p.path
    out["sources"] = sources
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """A fixed-width text table of :func:`summary` rows."""
    head = ["device", "cluster", "cores", "GHz", "GFLOPS", "RAM GiB", "BW GB/s", "idle W",
            "busy W", "batt Wh", "radios", "cal"]
    body = [[r["name"], r["train_cluster"], str(r["cores"]), _fmt(r["freq_ghz"], ".2f"),
             _fmt(r["peak_gflops"], ".1f"), _fmt(r["ram_bytes"] / 2**30, ".1f"),
             _fmt(r["mem_bandwidth_gbs"], ".2f"), _fmt(r["idle_w"], ".2f"), _fmt(r["busy_w"], ".2f"),
             _fmt(r["battery_wh"], ".2f"), ",".join(r["radios"]) or "-",
             "yes" if r["calibrated"] else "no"] for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("peak = FP32 GFLOPS of the train cluster; figures and their sources: --format json")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the profiles as a table or JSON; a bad name or file raises ProfileError (a ValueError)."""
    names = args.devices or list_profiles()
    rows = [summary(load_profile(n)) for n in names]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows))
    return 0
