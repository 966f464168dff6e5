"""``sparsefl budget``: energy and time per federated round and what a battery or J affords.

Besides a model and a shipped device profile, the workload and the profile can come from what a
hybrid run or a board calibration knows:

* ``--run DIR``: the run's model, batch size, local epochs, samples per client (the median over
  the run's clients of ``clients.csv`` ``num_samples``), its strategy's round-1 plan (sparsity
  and mode), its radio; and for ``--device`` the profile the run calibrated for that device class
  (``DIR/calibration/<device>.toml``, or the one ``boards.json`` names) when it has one.
* ``--profile FILE.toml``: a profile file, e.g. the ``calibration.toml`` that
  ``sparsefl board calibrate`` writes under ``~/.cache/sparsefl/boards/<uuid>/``.

A profile with fitted values gives ``calibrated-estimate`` figures, and the output names the file.
Options given explicitly (``--model``, ``--batch``, ...) override what the run says.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwmodel.counts import FLOPS_CONVENTION
from hwmodel.estimator import DEFAULT_SAMPLES, Budget, budget

from .estimate import add_round_args, mib, render_table, si


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``budget`` on the ``sparsefl`` subparsers."""
    p = subparsers.add_parser(
        "budget",
        help="energy/time per round (compute and radio) and the rounds a battery or J affords",
        description="Energy and time of one federated round (local training plus the radio "
        "transfer of the update and the model) on a device, the rounds within a budget "
        "(a percentage of the battery, or joules for devices without one), whether a training "
        "step fits the RAM, and which sparsities fit the budget. With --run DIR the workload "
        "(model, batch, epochs, samples per client, the strategy's sparsity) comes from a run "
        "directory and the device's profile from the run's calibration when it has one; "
        "--profile FILE uses a calibrated profile file (sparsefl board calibrate). "
        + FLOPS_CONVENTION,
    )
    p.add_argument("--run", default=None, metavar="DIR",
                   help="take the workload (and the calibrated profile of --device) from this "
                   "run directory")
    p.add_argument("--profile", default=None, metavar="FILE.toml",
                   help="a device profile file, e.g. a board's calibration.toml "
                   "(instead of --device)")
    add_round_args(p, from_run=True)
    p.add_argument("--radio", default=None,
                   help="radio of the device profile (wifi, lte; default: wifi, or the run's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--battery-pct", type=float, default=None, metavar="P",
                   help="budget: P %% of the device's battery")
    g.add_argument("--joules", type=float, default=None, metavar="J",
                   help="budget: J joules (devices without a battery)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    return p


# ------------------------------------------------------------------------------ a run's workload
@dataclass
class RunWorkload:
    """What a run directory says about one client's round, and its device classes."""

    dir: Path
    model: str
    batch: int
    epochs: int
    samples: int
    n_clients: int
    strategy: str
    sparsity: float
    radio: str
    devices: list[str]
    calibrations: dict[str, Path] = field(default_factory=dict)
    max_steps: int | None = None
    config: Any = None   # the run's fl_core.config.RunConfig

    def plan(self, device: str) -> Any:
        """The strategy's plan for a client of ``device`` in round 1."""
        from hwmodel.estimator import resolve_model

        from ..strategies import ClientInfo, make_strategy

        cfg = self.config
        strat = make_strategy(cfg.strategy_name, resolve_model(self.model), rounds=cfg.rounds,
                              seed=cfg.seed, train=cfg.train_config(), **cfg.strategy_params)
        return strat.plan_for(1, ClientInfo("budget", device, self.samples))


def _is_run_dir(p: Path) -> bool:
    return (p / "config.toml").is_file() and (p / "clients.csv").is_file()


def load_run_workload(path: str | Path) -> RunWorkload:
    """Read the workload of the run in ``path`` (config.toml, clients.csv, boards.json, the
    ``calibration/`` profiles); clear errors for a missing or a multi-run directory."""
    from ..config import load_config
    from ..runlog import read_csv

    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"--run {d}: no such run directory")
    if not _is_run_dir(d):
        subs = sorted(s.name for s in d.iterdir() if s.is_dir() and _is_run_dir(s))
        if subs:
            raise ValueError(f"--run {d}: holds several runs ({', '.join(subs)}); give one of "
                             f"them, e.g. --run {d / subs[0]}")
        missing = [n for n in ("config.toml", "clients.csv") if not (d / n).is_file()]
        raise FileNotFoundError(f"--run {d}: not a run directory (missing {', '.join(missing)})")
    cfg = load_config(d / "config.toml")
    rows = read_csv(d / "clients.csv")
    per_client: dict[str, int] = {}
    for r in rows:
        try:
            per_client[r["client_id"]] = int(float(r["num_samples"]))
        except (KeyError, ValueError):
            raise ValueError(f"{d / 'clients.csv'}: client {r.get('client_id')!r} round "
                             f"{r.get('round')!r}: num_samples {r.get('num_samples')!r} is not a "
                             "number") from None
    if not per_client:
        raise ValueError(f"{d / 'clients.csv'}: no client rows yet (the run has not finished a "
                         "round); give --samples and the other options instead")
    samples = max(1, int(round(statistics.median(per_client.values()))))
    from ..report import load_boards

    boards = load_boards(d)
    devices = sorted({r["device"] for r in rows if r.get("device")}
                     | {b["device"] for b in boards if b.get("device")}
                     | set(getattr(cfg.fleet, "devices", {}) or {}))
    tc = cfg.train_config()
    params = cfg.strategy_params
    return RunWorkload(
        dir=d, model=str(cfg.model["name"]), batch=int(tc.batch_size), epochs=int(tc.epochs),
        samples=samples, n_clients=len(per_client), strategy=cfg.strategy_name,
        sparsity=float(params.get("sparsity", 0.0) or 0.0),
        radio=str(getattr(cfg.fleet, "radio", "wifi") or "wifi"), devices=devices,
        calibrations=_calibrations(d, boards), max_steps=tc.max_steps, config=cfg)


def _calibrations(d: Path, boards: list[dict[str, Any]]) -> dict[str, Path]:
    """Device class -> calibrated profile file of the run (``calibration/<device>.toml``, else
    the ``calibrated_profile`` that boards.json names, relative to the run directory)."""
    out: dict[str, Path] = {}
    for b in boards:
        rel = b.get("calibrated_profile")
        if b.get("device") and rel and (d / rel).is_file():
            out.setdefault(str(b["device"]), d / rel)
    cal = d / "calibration"
    if cal.is_dir():
        named = {p.resolve() for p in out.values()}
        for f in sorted(cal.glob("*.toml")):
            if f.resolve() not in named:
                out.setdefault(f.stem, f)
    return out


# ------------------------------------------------------------------------------ resolving
@dataclass
class Resolved:
    """What ``budget`` is called with and where its profile came from."""

    model: str
    profile: Any
    profile_source: str
    sparsity: float
    mode: str
    batch: int
    samples: int
    epochs: int
    radio: str
    plan: Any = None
    notes: list[str] = field(default_factory=list)
    run: RunWorkload | None = None


def _profile_note(profile: Any) -> str:
    """The calibration note of a fitted profile (its fitted values' source)."""
    for path in profile.fitted:
        src = profile.sources.get(path)
        if src:
            return src
    return "fitted values without a source"


def resolve(args: argparse.Namespace) -> Resolved:
    """Combine ``--run``, ``--profile``, ``--device`` and the explicit options."""
    from hwmodel.profiles import load_profile

    if args.profile is not None and args.device is not None:
        raise ValueError("give --device or --profile, not both")
    run = load_run_workload(args.run) if args.run is not None else None
    notes: list[str] = []
    if args.profile is not None:
        f = Path(args.profile)
        if not f.is_file():
            raise FileNotFoundError(f"--profile {f}: no such profile file")
        profile = load_profile(f)
        source = str(f)
        device_class = profile.name
    else:
        device = args.device
        if device is None and run is not None:
            cands = run.devices if len(run.devices) == 1 else sorted(
                set(run.calibrations) & set(run.devices))
            if len(cands) != 1:
                raise ValueError(f"--run {run.dir}: give --device, one of the run's device "
                                 f"classes: {', '.join(run.devices)}")
            device = cands[0]
        if device is None:
            raise ValueError("give --device NAME|PATH or --profile FILE.toml (or --run DIR)")
        if run is not None:
            if device not in run.devices:
                raise ValueError(f"--device {device!r}: the run {run.dir} has no such device "
                                 f"class; its devices: {', '.join(run.devices) or 'none'}")
            cal = run.calibrations.get(device)
            if cal is not None:
                profile, source = load_profile(cal), str(cal)
            else:
                profile, source = load_profile(device), f"shipped profile {device!r}"
                notes.append(f"the run has no calibration for {device!r}: shipped profile")
        else:
            profile = load_profile(device)
            source = profile.path or f"shipped profile {device!r}"
        device_class = device
    if profile.fitted:
        notes.insert(0, f"calibrated profile: {_profile_note(profile)}")
    elif args.profile is not None:
        notes.insert(0, f"{source} has no fitted values (not a calibration): figures are "
                     "estimated")

    def pick(opt: Any, from_run: Any, default: Any) -> Any:
        if opt is not None:
            return opt
        return from_run if run is not None else default

    model = pick(args.model, run.model if run else None, None)
    if model is None:
        raise ValueError("give --model NAME|PATH (or --run DIR)")
    res = Resolved(
        model=model, profile=profile, profile_source=source,
        sparsity=float(pick(args.sparsity, run.sparsity if run else None, 0.0)),
        mode="swat", batch=int(pick(args.batch, run.batch if run else None, 32)),
        samples=int(pick(args.samples, run.samples if run else None, DEFAULT_SAMPLES)),
        epochs=int(pick(args.epochs, run.epochs if run else None, 1)),
        radio=str(pick(args.radio, run.radio if run else None, "wifi")), notes=notes, run=run)
    if run is not None:
        run_plan = run.plan(device_class)
        if args.model is None and args.sparsity is None and args.mode is None:
            res.plan = run_plan   # the strategy's own per-layer plan
        res.mode = args.mode or run_plan.mode
    elif args.mode is not None:
        res.mode = args.mode
    if run is not None and run.max_steps is not None:
        res.notes.append(f"the run caps a round at train.max_steps = {run.max_steps} steps; "
                         "these figures count whole epochs")
    return res


# ------------------------------------------------------------------------------ output
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


def _header(r: Resolved, b: Budget) -> list[str]:
    lines = []
    if r.run is not None:
        w = r.run
        how = "its round-1 plan" if r.plan is not None else "uniform plan"
        lines.append(f"workload from run {w.dir}: strategy {w.strategy} ({how}), "
                     f"samples {r.samples} (median of {w.n_clients} clients' num_samples)")
    lines.append(f"profile: {r.profile_source}; figures: {b.provenance}")
    lines += [f"note: {n}" for n in r.notes]
    return lines


def run(args: argparse.Namespace) -> int:
    r = resolve(args)
    b = budget(r.model, r.profile, sparsity=r.sparsity, mode=r.mode, batch=r.batch,
               samples=r.samples, epochs=r.epochs, radio=r.radio, battery_pct=args.battery_pct,
               joules=args.joules, plan=r.plan)
    if args.format == "json":
        d = b.to_dict()
        d["profile_source"] = r.profile_source
        d["notes"] = r.notes
        if r.run is not None:
            d["run"] = {"dir": str(r.run.dir), "strategy": r.run.strategy,
                        "clients": r.run.n_clients, "devices": r.run.devices,
                        "calibrations": {k: str(v) for k, v in r.run.calibrations.items()}}
        print(json.dumps(d, indent=1))
    else:
        print("\n".join(_header(r, b)))
        print(table(b))
    return 0
