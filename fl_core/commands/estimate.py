"""``sparsefl estimate``: per-layer cost of one local round on a device, sparse beside dense."""

from __future__ import annotations

import argparse
import csv
import io
import json
from typing import Any

from hwmodel.counts import FLOPS_CONVENTION
from hwmodel.estimator import DEFAULT_SAMPLES, Estimate, estimate


def add_round_args(p: argparse.ArgumentParser, from_run: bool = False) -> None:
    """The options ``estimate`` and ``budget`` share. ``from_run`` (budget's ``--run DIR``):
    none is required and each defaults to None, meaning "the run's value, else the usual"."""
    def add(flag: str, default: Any, help: str, run_help: str = "", **kw: Any) -> None:
        if from_run:
            if default is not None:
                help += f" (default: {default}, or the run's{run_help})"
            elif flag == "--model":
                help += " (required unless --run)"
            p.add_argument(flag, default=None, help=help, **kw)
        else:
            p.add_argument(flag, default=default, required=default is None, help=help, **kw)

    add("--model", None, "a builder name (femnist_cnn, resnet8, ...) or a ModelSpec .json file",
        metavar="NAME|PATH")
    add("--device", None,
        "a shipped profile name (rpi4, pixel4, ...) or a profile .toml file"
        + ("; with --run, one of the run's device classes" if from_run else ""),
        metavar="NAME|PATH")
    add("--sparsity", 0.0, "weight (and SWAT activation) sparsity of the sparse layers, in [0, 1)",
        " strategy", type=float)
    add("--mode", "swat", "sparse training mode (swat's sparse layers: all conv/linear but the "
        "first and the classifier; masked: every conv/linear layer)", " strategy's",
        choices=("swat", "masked", "dense"))
    add("--batch", 32, "batch size", type=int)
    add("--samples", DEFAULT_SAMPLES, "local samples per epoch", " median per client", type=int)
    add("--epochs", 1, "local epochs per round", type=int)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``estimate`` on the ``sparsefl`` subparsers."""
    p = subparsers.add_parser(
        "estimate",
        help="FLOPs, memory, time and energy of a local round on a device, sparse beside dense",
        description="Estimate one local round (epochs x samples at the batch size) of a model on a "
        "device profile: per layer forward MACs, training FLOPs, time and energy, and totals "
        "(peak memory of a step, uplink/downlink bytes), sparse beside dense. " + FLOPS_CONVENTION,
    )
    add_round_args(p)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help="output format (json: the stable contract)")
    return p


def si(x: float, unit: str = "") -> str:
    """A number with an SI prefix: 1.23 G, 456 k."""
    if x is None:
        return "-"
    ax = abs(x)
    for f, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if ax >= f:
            return f"{x / f:.3g} {p}{unit}"
    if ax and ax < 1e-3:
        return f"{x * 1e6:.3g} u{unit}"
    if ax and ax < 1:
        return f"{x * 1e3:.3g} m{unit}"
    return f"{x:.3g} {unit}".rstrip()


def mib(x: float) -> str:
    return f"{x / 2**20:.1f} MiB"


def render_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) if i < 2 else str(h).rjust(w)
                       for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(lines)


def table(est: Estimate) -> str:
    t, dt = est.totals, est.dense_totals
    out = [
        f"model {est.model}  device {est.device}  mode {est.mode}  sparsity {est.sparsity:g}",
        f"one local round: {est.epochs} epoch(s) x {est.samples} samples at batch {est.batch} "
        f"= {est.steps} steps; provenance: {est.provenance.value}",
        f"FLOPs convention: {FLOPS_CONVENTION}",
        "",
    ]
    header = ["layer", "type", "params", "fwd MACs", "train FLOPs", "dense FLOPs", "time",
              "dense time", "energy", "dense energy"]
    rows = []
    for s, d in zip(est.layers, est.dense.layers, strict=True):
        rows.append([s.name, s.type, si(s.params), si(s.forward_macs), si(s.train_flops),
                     si(d.train_flops), si(s.time_s, "s"), si(d.time_s, "s"), si(s.energy_j, "J"),
                     si(d.energy_j, "J")])
    rows.append(["TOTAL", "", si(t.params), si(t.forward_macs), si(t.train_flops),
                 si(dt.train_flops), si(t.time_s, "s"), si(dt.time_s, "s"), si(t.energy_j, "J"),
                 si(dt.energy_j, "J")])
    out.append(render_table(rows, header))
    out.append("")
    summary = [
        ["params (non-zero)", f"{t.params:,}", f"{dt.params:,}"],
        ["forward MACs / round", si(t.forward_macs), si(dt.forward_macs)],
        ["train FLOPs / round (2 x MACs + elementwise)", si(t.train_flops), si(dt.train_flops)],
        ["compute time / round", si(t.time_s, "s"), si(dt.time_s, "s")],
        ["compute energy / round", si(t.energy_j, "J"), si(dt.energy_j, "J")],
        ["peak memory of a step", mib(t.peak_memory_bytes), mib(dt.peak_memory_bytes)],
        ["uplink bytes (codec)", f"{t.uplink_bytes:,}", f"{dt.uplink_bytes:,}"],
        ["uplink bytes (papers' CSR count)", f"{est.sparse.uplink_paper_csr_bytes:,}",
         f"{est.dense.uplink_paper_csr_bytes:,}"],
        ["downlink bytes", f"{t.downlink_bytes:,}", f"{dt.downlink_bytes:,}"],
    ]
    if est.radio is not None:
        summary.append([f"radio energy / round ({est.radio})", si(est.radio_energy_j, "J"),
                        si(est.dense_radio_energy_j, "J")])
    out.append(render_table([[r[0], "", r[1], r[2]] for r in summary],
                            ["totals", "", "sparse", "dense"]))
    ram = est.ram_bytes
    verdict = "fits" if t.peak_memory_bytes <= ram else "does NOT fit"
    out.append(f"\nRAM: peak {mib(t.peak_memory_bytes)} {verdict} in {ram / 2**30:.2f} GiB")
    return "\n".join(out)


def to_csv(est: Estimate) -> str:
    buf = io.StringIO()
    buf.write(f"# {FLOPS_CONVENTION}; per local round of {est.steps} steps\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "type", "params", "dense_params", "forward_macs", "dense_forward_macs",
                "train_flops", "dense_train_flops", "time_s", "dense_time_s", "energy_j",
                "dense_energy_j"])
    for s, d in zip(est.layers, est.dense.layers, strict=True):
        w.writerow([s.name, s.type, s.params, d.params, s.forward_macs, d.forward_macs,
                    s.train_flops, d.train_flops, s.time_s, d.time_s, s.energy_j, d.energy_j])
    t, dt = est.totals, est.dense_totals
    w.writerow(["TOTAL", "", t.params, dt.params, t.forward_macs, dt.forward_macs, t.train_flops,
                dt.train_flops, t.time_s, dt.time_s, t.energy_j, dt.energy_j])
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    est = estimate(args.model, args.device, sparsity=args.sparsity, mode=args.mode,
                   batch=args.batch, samples=args.samples, epochs=args.epochs)
    if args.format == "json":
        print(json.dumps(est.to_dict(), indent=1))
    elif args.format == "csv":
        print(to_csv(est), end="")
    else:
        print(table(est))
    return 0
