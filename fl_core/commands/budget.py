"""``sparsefl budget``: energy and time per federated round and what a battery or J affords."""

from __future__ import annotations

import argparse
import json

from hwmodel.counts import FLOPS_CONVENTION
from hwmodel.estimator import Budget, budget

from .estimate import add_round_args, mib, render_table, si


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``budget`` on the ``sparsefl`` subparsers."""
    p = subparsers.add_parser(
        "budget",
        help="energy/time per round (compute and radio) and the rounds a battery or J affords",
        description="Energy and time of one federated round (local training plus the radio "
        "transfer of the update and the model) on a device, the rounds within a budget "
        "(a percentage of the battery, or joules for devices without one), whether a training "
        "step fits the RAM, and which sparsities fit the budget. " + FLOPS_CONVENTION,
    )
    add_round_args(p)
    p.add_argument("--radio", default="wifi", help="radio of the device profile (wifi, lte)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--battery-pct", type=float, default=None, metavar="P",
                   help="budget: P %% of the device's battery")
    g.add_argument("--joules", type=float, default=None, metavar="J",
                   help="budget: J joules (devices without a battery)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    return p


def table(b: Budget) -> str:
    out = [
        f"model {b.model}  device {b.device}  mode {b.mode}  sparsity {b.sparsity:g}  "
        f"radio {b.radio}",
        f"one round: {b.epochs} epoch(s) x {b.samples} samples at batch {b.batch}, then the "
        f"uplink and downlink; provenance: {b.provenance}",
        f"FLOPs convention: {b.flops_convention}",
        "",
    ]
    rows = [
        ["time per round", si(b.time_per_round_s, "s"),
         f"compute {si(b.compute_time_per_round_s, 's')} + radio {si(b.radio_time_per_round_s, 's')}"],
        ["energy per round", si(b.energy_per_round_j, "J"),
         f"compute {si(b.compute_energy_per_round_j, 'J')} + radio "
         f"{si(b.radio_energy_per_round_j, 'J')} + idle during radio "
         f"{si(b.idle_energy_per_round_j, 'J')}"],
        ["uplink / downlink", f"{b.uplink_bytes:,} / {b.downlink_bytes:,} B",
         f"papers' CSR count {b.uplink_paper_csr_bytes:,} B"],
        ["budget", "-" if b.budget_j is None else si(b.budget_j, "J"), b.budget_source],
        ["rounds within budget", "-" if b.rounds_within_budget is None
         else f"{b.rounds_within_budget:,}", ""],
        ["peak memory of a step", mib(b.peak_memory_bytes), b.ram_verdict],
    ]
    out.append(render_table(rows, ["", "value", "detail"]))
    out.append("")
    opt = [[f"{o['sparsity']:g}", si(o["energy_per_round_j"], "J"), si(o["time_per_round_s"], "s"),
            "-" if o["rounds_within_budget"] is None else f"{o['rounds_within_budget']:,}",
            mib(o["peak_memory_bytes"]), "yes" if o["fits"] else "no"]
           for o in b.sparsity_options]
    out.append(render_table(opt, ["sparsity", "energy/round", "time/round", "rounds", "peak mem",
                                  "fits"]))
    fit = ", ".join(f"{s:g}" for s in b.sparsities_that_fit) or "none"
    out.append(f"\nsparsities that fit the budget and the RAM: {fit}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    b = budget(args.model, args.device, sparsity=args.sparsity, mode=args.mode, batch=args.batch,
               samples=args.samples, epochs=args.epochs, radio=args.radio,
               battery_pct=args.battery_pct, joules=args.joules)
    if args.format == "json":
        print(json.dumps(b.to_dict(), indent=1))
    else:
        print(table(b))
    return 0
