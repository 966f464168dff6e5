"""Reports: ``report.md`` and PNG plots for a run directory, and comparisons of several runs.

One run (:func:`write_report`): accuracy vs rounds, accuracy vs cumulative client energy,
accuracy vs cumulative uplink MB, energy per round by device class, and a table of the totals
with the provenance of every cost (from ``clients.csv``).

A hybrid run (``clients.csv`` rows with a ``board``) adds "Measured vs estimated, per device
class" (each board round's measured compute time, and energy when a sensor measured it, beside
the cost model's estimate of the same task from the profile calibrated on that board's BENCH
micro-benchmarks, and the relative error |est - meas| / meas), a "Link" table per board
(transfer time beside compute time, bytes), ``measured_vs_estimated.png``, and the boards of
``boards.json``. In ``energy_by_device.png`` boards are their own series (``rpi4 (board)``).

Several runs (:func:`compare`, ``sparsefl report DIR [DIR ...]``): a table of final accuracy,
total client energy and uplink per run, the accuracy–energy Pareto plot and accuracy vs
cumulative energy and vs uplink of every run. A directory holding several runs (``sparsefl run``
writes ``runs/<name>/<strategy>/``) stands for those runs (:func:`find_runs`). Runs whose
resolved configs differ only in ``seed`` and ``[output] dir`` are one group: its figures are
mean ± std (sample std, n-1) over the seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .runlog import atomic_write_text, read_csv

PLOTS = {"accuracy_vs_rounds": "accuracy_vs_rounds.png",
         "accuracy_vs_energy": "accuracy_vs_energy.png",
         "accuracy_vs_uplink": "accuracy_vs_uplink.png",
         "energy_by_device": "energy_by_device.png"}
#: Plots :func:`compare` writes (``<name>.png``).
COMPARE_PLOTS = ("pareto", "accuracy_vs_energy", "accuracy_vs_uplink")
#: Plots of a run with board rows.
HYBRID_PLOTS = {"measured_vs_estimated": "measured_vs_estimated.png"}
#: clients.csv columns of a hybrid run (absent in an all-simulated run's log).
HYBRID_COLUMNS = ("board", "compute_s", "transfer_s", "transfer_provenance", "est_time_s",
                  "est_energy_j", "est_provenance")
#: Time provenances of a board round.
MEASURED_TIME = ("measured", "measured-emulated")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _f(v: str | None) -> float:
    return float(v) if v not in (None, "") else float("nan")


@dataclass
class Run:
    """A run directory's logs, parsed."""

    dir: Path
    rounds: list[dict[str, str]]
    clients: list[dict[str, str]]
    summary: dict[str, Any]

    @property
    def label(self) -> str:
        s = self.summary
        if s.get("label"):          # a comparison's name for the run (e.g. zerofl-0.9)
            return str(s["label"])
        params = s.get("strategy_params") or {}
        extra = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
        return f"{s.get('strategy', '?')}" + (f"({extra})" if extra else "")

    def series(self) -> dict[str, np.ndarray]:
        """Per round: round, accuracy, cumulative energy (J) and uplink (MB)."""
        r = self.rounds
        return {"round": np.array([_f(x["round"]) for x in r]),
                "accuracy": np.array([_f(x["accuracy"]) for x in r]),
                "energy_cum_j": np.cumsum([_f(x["energy_j"]) for x in r]),
                "uplink_cum_mb": np.cumsum([_f(x["uplink_bytes"]) for x in r]) / 1e6,
                "round_energy_j": np.array([_f(x["energy_j"]) for x in r])}


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a run's logs (rounds.csv and clients.csv)."""
    p = Path(path)
    return (p / "rounds.csv").is_file() and (p / "clients.csv").is_file()


def find_runs(path: str | Path) -> list[Path]:
    """``[path]`` for a run directory; for a directory holding runs (the main job's
    ``runs/<name>/<strategy>/``), its run subdirectories, sorted; else a clear error."""
    p = Path(path)
    if is_run_dir(p):
        return [p]
    if p.is_dir():
        subs = sorted(s for s in p.iterdir() if s.is_dir() and is_run_dir(s))
        if subs:
            return subs
    missing = "no such directory" if not p.is_dir() else "missing rounds.csv or clients.csv"
    raise FileNotFoundError(f"{p}: not a run directory nor a directory of runs ({missing})")


def load_run(path: str | Path) -> Run:
    """Read a run directory (rounds.csv, clients.csv, summary.json); clear error if missing."""
    p = Path(path)
    for name in ("rounds.csv", "clients.csv"):
        if not (p / name).is_file():
            raise FileNotFoundError(f"{p}: not a run directory (missing {name})")
    summary = {}
    if (p / "summary.json").is_file():
        summary = json.loads((p / "summary.json").read_text("utf-8"))
    return Run(p, read_csv(p / "rounds.csv"), read_csv(p / "clients.csv"), summary)


# ------------------------------------------------------------------------------ one run
def _line_plot(path: Path, runs: Sequence[Run], x: str, xlabel: str, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        s = run.series()
        m = ~np.isnan(s["accuracy"])
        ax.plot(s[x][m], s["accuracy"][m], marker="o", ms=3, label=run.label)
    ax.set_xlabel(xlabel)
    if x == "round":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def is_board(row: dict[str, str]) -> bool:
    """Whether a clients.csv row is a board client's (its ``board`` column is set)."""
    return bool((row.get("board") or "").strip())


def device_series(row: dict[str, str]) -> str:
    """The energy plot's series of a row: its device class, ``<class> (board)`` for a board."""
    return f"{row['device']} (board)" if is_board(row) else row["device"]


def energy_by_device(run: Run) -> tuple[list[int], dict[str, np.ndarray]]:
    """Per round, the energy (J) of the clients that trained, summed per device class (boards
    apart from the simulated clients of their class: ``rpi4 (board)``)."""
    rounds = sorted({int(r["round"]) for r in run.clients})
    devs = sorted({device_series(r) for r in run.clients})
    idx = {r: i for i, r in enumerate(rounds)}
    out = {d: np.zeros(len(rounds)) for d in devs}
    for r in run.clients:
        if r["status"] != "dropped" and r.get("energy_j"):
            out[device_series(r)][idx[int(r["round"])]] += float(r["energy_j"])
    return rounds, out


def _energy_plot(path: Path, run: Run) -> None:
    plt = _plt()
    rounds, by_dev = energy_by_device(run)
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = np.zeros(len(rounds))
    classes = sorted({d.removesuffix(" (board)") for d in by_dev})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for d, e in by_dev.items():   # a class's boards: its colour, hatched, beside its simulated
        board = d.endswith(" (board)")
        color = colors[classes.index(d.removesuffix(" (board)")) % len(colors)]
        ax.bar(rounds, e, bottom=bottom, label=d, color=color, hatch="//" if board else None,
               edgecolor="white" if board else None)
        bottom += e
    ax.set_xlabel("round")
    ax.set_xticks(rounds if len(rounds) <= 20 else rounds[:: max(1, len(rounds) // 10)])
    ax.set_ylabel("client energy per round (J)")
    ax.set_title("energy per round by device class")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _provenances(run: Run) -> dict[str, list[str]]:
    out: dict[str, set[str]] = {}
    for r in run.clients:
        for q in ("time", "energy", "flops", "bytes", "host_wall"):
            v = r.get(f"{q}_provenance")
            if v:
                out.setdefault(q, set()).add(v)
    return {k: sorted(v) for k, v in out.items()}


def _provenance_line(run: Run) -> str:
    """Per quantity the provenances of its figures; boards and simulated clients apart in a
    hybrid run."""
    if not any(is_board(r) for r in run.clients):
        return "; ".join(f"{k}: {', '.join(v)}" for k, v in _provenances(run).items())
    sides: dict[str, dict[str, set[str]]] = {}
    for r in run.clients:
        side = "boards" if is_board(r) else "simulated"
        for q in ("time", "energy", "flops", "bytes", "host_wall", "transfer", "est"):
            v = r.get(f"{q}_provenance")
            if v:
                sides.setdefault(q, {}).setdefault(side, set()).add(v)
    names = {"est": "board estimates"}
    return "; ".join(
        f"{names.get(q, q)}: " + ", ".join(f"{side} {'/'.join(sorted(v))}"
                                          for side, v in sorted(by.items()))
        for q, by in sides.items())


# ------------------------------------------------------------------------------ hybrid runs
@dataclass
class ErrorStats:
    """Measured beside estimated over ``n`` board rounds; errors are |est - meas| / meas."""

    n: int
    median_measured: float
    median_estimated: float
    median_rel_error: float
    max_rel_error: float

    @classmethod
    def of(cls, measured: Sequence[float], estimated: Sequence[float]) -> ErrorStats:
        m = np.asarray(measured, dtype=float)
        e = np.asarray(estimated, dtype=float)
        err = np.abs(e - m) / m
        return cls(int(m.size), float(np.median(m)), float(np.median(e)),
                   float(np.median(err)), float(np.max(err)))


@dataclass
class ClassComparison:
    """One device class's board rounds (one kind of measurement: real or emulated board)."""

    device: str
    time_provenance: str                  # measured or measured-emulated
    boards: list[str]                     # board UUIDs
    est_provenance: list[str]             # calibrated-estimate and/or estimated
    time: ErrorStats
    energy: ErrorStats | None             # only rounds whose energy a sensor measured
    points: dict[str, list[tuple[float, float]]]  # "time"/"energy": (measured, estimated)

    @property
    def label(self) -> str:
        return self.device + (" (emulated)" if self.time_provenance == "measured-emulated" else "")


def _pos(v: str | None) -> float | None:
    x = _f(v)
    return x if math.isfinite(x) and x > 0 else None


def _finite(v: str | None) -> float | None:
    x = _f(v)
    return x if math.isfinite(x) and x >= 0 else None


def measured_vs_estimated(run: Run) -> list[ClassComparison]:
    """Per device class (and measured vs measured-emulated), the board rounds that have both a
    measured compute time (``compute_s``) and an estimate of the same task (``est_time_s``);
    energy where a sensor measured it (``energy_provenance`` = measured) and ``est_energy_j``."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for r in run.clients:
        if not is_board(r) or r.get("status") != "ok":
            continue
        prov = r.get("time_provenance") or ""
        meas, est = _pos(r.get("compute_s")), _finite(r.get("est_time_s"))
        if prov not in MEASURED_TIME or meas is None or est is None:
            continue
        g = groups.setdefault((r["device"], prov), {"boards": set(), "est": set(), "time": [],
                                                     "energy": []})
        g["boards"].add(r["board"].strip())
        if r.get("est_provenance"):
            g["est"].add(r["est_provenance"])
        g["time"].append((meas, est))
        em, ee = _pos(r.get("energy_j")), _finite(r.get("est_energy_j"))
        if r.get("energy_provenance") == "measured" and em is not None and ee is not None:
            g["energy"].append((em, ee))
    out = []
    for (dev, prov), g in sorted(groups.items()):
        t = ErrorStats.of(*zip(*g["time"], strict=True))
        e = ErrorStats.of(*zip(*g["energy"], strict=True)) if g["energy"] else None
        out.append(ClassComparison(dev, prov, sorted(g["boards"]), sorted(g["est"]), t, e,
                                   {"time": g["time"], "energy": g["energy"]}))
    return out


@dataclass
class BoardLink:
    """One board's serial-link time beside its compute time over the run."""

    client_id: str
    board: str
    device: str
    rounds: int
    transfer_s: float
    compute_s: float
    uplink_bytes: int
    downlink_bytes: int

    @property
    def transfer_share(self) -> float:
        tot = self.transfer_s + self.compute_s
        return self.transfer_s / tot if tot > 0 else float("nan")


def link_by_board(run: Run) -> list[BoardLink]:
    """Per board (in order of first appearance), the summed ``transfer_s``, ``compute_s`` and
    bytes of its rounds that were not dropped."""
    out: dict[str, BoardLink] = {}
    for r in run.clients:
        if not is_board(r) or r.get("status") == "dropped":
            continue
        key = r["board"].strip()
        b = out.setdefault(key, BoardLink(r["client_id"], key, r["device"], 0, 0.0, 0.0, 0, 0))
        tr, co = _finite(r.get("transfer_s")), _finite(r.get("compute_s"))
        if tr is None and co is None:
            continue
        b.rounds += 1
        b.transfer_s += tr or 0.0
        b.compute_s += co or 0.0
        b.uplink_bytes += int(_finite(r.get("uplink_bytes")) or 0)
        b.downlink_bytes += int(_finite(r.get("downlink_bytes")) or 0)
    return list(out.values())


def load_boards(path: str | Path) -> list[dict[str, Any]]:
    """``boards.json`` of a run directory ([] when absent); a clear error when malformed."""
    f = Path(path) / "boards.json"
    if not f.is_file():
        return []
    try:
        doc = json.loads(f.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(doc, list) or not all(isinstance(b, dict) for b in doc):
        raise ValueError(f"{f}: expected a list of board objects")
    for i, b in enumerate(doc):
        for key in ("client_id", "board_uuid", "device"):
            if not isinstance(b.get(key), str):
                raise ValueError(f"{f}: board {i}: {key!r} must be a string, got "
                                 f"{b.get(key)!r}")
    return doc


def _pct(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f} %"


def _list(xs: Any) -> str:
    return ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs or []) or "-"


def _source_lines(cmp: list[ClassComparison], boards: list[dict[str, Any]]) -> list[str]:
    lines = []
    for c in cmp:
        ests = ", ".join(c.est_provenance) or "unknown provenance"
        cal = [b for b in boards if b.get("device") == c.device
               and str(b.get("board_uuid")) in c.boards]
        parts = []
        for b in cal:
            info = b.get("calibration") or {}
            if b.get("calibrated_profile"):
                parts.append(f"`{b['calibrated_profile']}` calibrated on "
                             f"{info.get('n_measurements', '?')} BENCH per-layer "
                             f"micro-benchmarks of board {str(b['board_uuid'])[:8]} (models "
                             f"{_list(info.get('models'))}; sparsities "
                             f"{_list(info.get('sparsities'))})")
            else:
                parts.append(f"the shipped `{c.device}` profile (board "
                             f"{str(b['board_uuid'])[:8]} has no calibration)")
        where = "; ".join(parts) if parts else "the profile of the run (no boards.json entry)"
        lines.append(f"- {c.label}: estimate ({ests}) from {where}.")
    return lines


def _hybrid_section(run: Run, cmp: list[ClassComparison],
                    boards: list[dict[str, Any]]) -> list[str]:
    links = link_by_board(run)
    lines: list[str] = []
    if boards:
        lines += ["", "## Boards", "", "| client | board | port | device | emulated | sensor "
                  "| calibrated profile | BENCH measurements |", "|---|---|---|---|---|---|---|---|"]
        for b in boards:
            info = b.get("calibration") or {}
            lines.append(f"| {b['client_id']} | {b['board_uuid']} | {b.get('port', '-')} | "
                         f"{b['device']} | {'yes' if b.get('emulated') else 'no'} | "
                         f"{b.get('sensor') or '-'} | {b.get('calibrated_profile') or '-'} | "
                         f"{info.get('n_measurements', '-')} |")
    lines += ["", "## Measured vs estimated, per device class", ""]
    if not cmp:
        lines.append("No board round has both a measured compute time and an estimate.")
    else:
        lines += [
            "The estimate is the cost model's figure for the same task (model, plan, batch, "
            "samples) on the device profile calibrated from the board's BENCH per-layer "
            "micro-benchmarks; the measurement is the compute time of the whole TRAIN round on "
            "the board (the serial transfer is apart, in the Link table). No TRAIN round enters "
            "the calibration. Emulated boards (`measured-emulated`) time the host and run "
            "without a profile-driven slow-down, so their error says how well the profile "
            "calibrated on the host predicts whole rounds on the host. Relative error: "
            "|estimated - measured| / measured, per round.", "",
            *_source_lines(cmp, boards), "",
            "| device class | boards | board rounds | median measured time (s) | median "
            "estimated time (s) | median error | max error |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in cmp:
            t = c.time
            lines.append(f"| {c.label} | {len(c.boards)} | {t.n} | {_num(t.median_measured)} | "
                         f"{_num(t.median_estimated)} | {_pct(t.median_rel_error)} | "
                         f"{_pct(t.max_rel_error)} |")
        with_e = [c for c in cmp if c.energy is not None]
        if with_e:
            lines += ["", "Energy, where a sensor measured it:", "",
                      "| device class | board rounds | median measured energy (J) | median "
                      "estimated energy (J) | median error | max error |",
                      "|---|---|---|---|---|---|"]
            for c in with_e:
                e = c.energy
                lines.append(f"| {c.label} | {e.n} | {_num(e.median_measured)} | "
                             f"{_num(e.median_estimated)} | {_pct(e.median_rel_error)} | "
                             f"{_pct(e.max_rel_error)} |")
        else:
            lines += ["", "No board measured its energy with a sensor: board energies are "
                      "estimates, so only time is compared."]
    if links:
        lines += ["", "## Link", "", "Per board, over the run: time on the serial link "
                  "(weights stay resident; only changes travel) beside compute time.", "",
                  "| client | board | device | rounds | transfer (s) | compute (s) | transfer "
                  "share | uplink (B) | downlink (B) |", "|---|---|---|---|---|---|---|---|---|"]
        for b in links:
            lines.append(f"| {b.client_id} | {b.board} | {b.device} | {b.rounds} | "
                         f"{_num(b.transfer_s)} | {_num(b.compute_s)} | "
                         f"{_pct(b.transfer_share)} | {b.uplink_bytes} | {b.downlink_bytes} |")
    return lines


def _mve_plot(path: Path, cmp: list[ClassComparison]) -> None:
    plt = _plt()
    kinds = ["time"] + (["energy"] if any(c.points["energy"] for c in cmp) else [])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        lo, hi = math.inf, 0.0
        for c in cmp:
            pts = c.points[kind]
            if not pts:
                continue
            m, e = (np.array(x) for x in zip(*pts, strict=True))
            ax.scatter(m, e, s=18, label=c.label, alpha=0.8)
            pos = np.concatenate([m, e[e > 0]])
            lo, hi = min(lo, float(pos.min())), max(hi, float(pos.max()))
        if hi > 0:
            from matplotlib.ticker import FuncFormatter, NullFormatter

            a, b = lo / 1.5, hi * 1.5
            ax.plot([a, b], [a, b], "k--", lw=1, label="y = x")
            ax.set_xscale("log")
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(plain)
                axis.set_minor_formatter(plain if b / a < 10 else NullFormatter())
        unit = "s" if kind == "time" else "J"
        what = "compute time" if kind == "time" else "energy (sensor)"
        ax.set_xlabel(f"measured {what} per round ({unit})")
        ax.set_ylabel(f"estimated ({unit})")
        ax.set_title(f"{what}: board rounds")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(path: str | Path) -> Path:
    """Write ``report.md`` and the four PNG plots into the run directory ``path``."""
    run = load_run(path)
    p = run.dir
    boards = load_boards(p)      # a malformed boards.json fails before any plot is drawn
    _line_plot(p / PLOTS["accuracy_vs_rounds"], [run], "round", "round", "accuracy vs rounds")
    _line_plot(p / PLOTS["accuracy_vs_energy"], [run], "energy_cum_j",
               "cumulative client energy (J)", "accuracy vs client energy")
    _line_plot(p / PLOTS["accuracy_vs_uplink"], [run], "uplink_cum_mb", "cumulative uplink (MB)",
               "accuracy vs uplink")
    _energy_plot(p / PLOTS["energy_by_device"], run)
    s = run.summary
    t = s.get("totals", {})
    status = s.get("status", "unknown")
    lines = [f"# sparsefl run: {s.get('name', p.name)}", ""]
    if status != "completed":
        lines += [f"**Partial report: the run is {status}** after "
                  f"{len(run.rounds)} of {s.get('rounds', '?')} rounds "
                  f"(resume with `sparsefl run --resume {p}`).", ""]
    lines += [
        f"- strategy: `{run.label}`, model `{s.get('model', '?')}`, dataset "
        f"`{s.get('dataset', '?')}`, seed {s.get('seed', '?')}, threads {s.get('threads', '?')}",
        f"- final accuracy: {_num(s.get('final_accuracy'))}, final loss: "
        f"{_num(s.get('final_loss'))}",
        f"- total client energy: {_num(t.get('energy_j'))} J, uplink "
        f"{_num(t.get('uplink_bytes', 0) / 1e6)} MB, downlink "
        f"{_num(t.get('downlink_bytes', 0) / 1e6)} MB, training FLOPs {_num(t.get('flops'))}",
        f"- clients ok / failed / dropped: {t.get('clients_ok', '?')} / "
        f"{t.get('clients_failed', '?')} / {t.get('clients_dropped', '?')}",
        f"- wall time: {_num(s.get('wall_time_s'))} s",
        "- provenance of the costs: " + _provenance_line(run),
        "", "| round | accuracy | loss | energy (J) | round time (s) | uplink (B) | ok | failed "
        "| dropped |", "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in run.rounds:
        lines.append(f"| {r['round']} | {_num(_f(r['accuracy']))} | {_num(_f(r['loss']))} | "
                     f"{_num(_f(r['energy_j']))} | {_num(_f(r['round_time_s']))} | "
                     f"{r['uplink_bytes']} | {r['clients_ok']} | {r['clients_failed']} | "
                     f"{r['clients_dropped']} |")
    hybrid = any(is_board(r) for r in run.clients)
    plots = dict(PLOTS)
    if hybrid:
        cmp = measured_vs_estimated(run)
        lines += _hybrid_section(run, cmp, boards)
        if cmp:
            _mve_plot(p / HYBRID_PLOTS["measured_vs_estimated"], cmp)
            plots.update(HYBRID_PLOTS)
    reasons = [r for r in run.clients if r["status"] != "ok"]
    if reasons:
        lines += ["", "## Failed and dropped clients", "", "| round | client | device | status "
                  "| reason |", "|---|---|---|---|---|"]
        lines += [f"| {r['round']} | {r['client_id']} | {r['device']} | {r['status']} | "
                  f"{r['reason']} |" for r in reasons]
    lines += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()]
    out = p / "report.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    v = float(v)
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


# ------------------------------------------------------------------------------ comparisons
def _group_key(run: Run) -> str:
    cfg = dict(run.summary.get("config") or {})
    cfg.pop("seed", None)
    cfg.pop("output", None)
    cfg.pop("name", None)
    train = dict(cfg.get("train") or {})
    train.pop("seed", None)
    cfg["train"] = train
    return json.dumps(cfg, sort_keys=True) if cfg else str(run.dir)


def group_runs(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs of one config with different seeds form a group (order of first appearance)."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(_group_key(r), []).append(r)
    return list(groups.values())


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.array([x for x in xs if x is not None and not math.isnan(x)], dtype=float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def group_stats(group: list[Run]) -> dict[str, Any]:
    """Mean and std over the group's seeds of final accuracy, energy and uplink."""
    acc = [r.summary.get("final_accuracy") for r in group]
    acc = [float("nan") if a is None else float(a) for a in acc]
    en = [float(r.summary.get("totals", {}).get("energy_j", float("nan"))) for r in group]
    up = [float(r.summary.get("totals", {}).get("uplink_bytes", float("nan"))) / 1e6
          for r in group]
    return {"label": group[0].label, "n": len(group),
            "seeds": [r.summary.get("seed") for r in group],
            "accuracy": _mean_std(acc), "energy_j": _mean_std(en), "uplink_mb": _mean_std(up),
            "dirs": [str(r.dir) for r in group]}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (lower energy and higher accuracy is better)."""
    front = []
    for i, (e, a) in enumerate(points):
        dominated = any((e2 <= e and a2 >= a) and (e2 < e or a2 > a)
                        for j, (e2, a2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _pm(ms: tuple[float, float], n: int, fmt: str = "{:.4g}") -> str:
    m, s = ms
    if math.isnan(m):
        return "-"
    return fmt.format(m) + (f" ± {fmt.format(s)}" if n > 1 else "")


def compare(dirs: Sequence[str | Path], out: str | Path | None = None) -> tuple[str, Path | None]:
    """A markdown table of the runs (grouped by config: mean ± std over seeds) and, when ``out``
    is given, into ``out``: ``pareto.png`` (accuracy vs total energy), ``accuracy_vs_energy.png``
    and ``accuracy_vs_uplink.png`` (every run's curve) and ``comparison.md`` (the table and the
    plots). A directory of runs in ``dirs`` stands for its runs (:func:`find_runs`).
    Returns (the table's markdown, the Pareto plot's path or None)."""
    runs = [load_run(x) for d in dirs for x in find_runs(d)]
    stats = [group_stats(g) for g in group_runs(runs)]
    pts = [(s["energy_j"][0], s["accuracy"][0]) for s in stats]
    front = set(pareto_front(pts))
    lines = ["| run | seeds | final accuracy | client energy (J) | uplink (MB) | Pareto |",
             "|---|---|---|---|---|---|"]
    for i, s in enumerate(stats):
        lines.append(f"| {s['label']} | {s['n']} | {_pm(s['accuracy'], s['n'])} | "
                     f"{_pm(s['energy_j'], s['n'])} | {_pm(s['uplink_mb'], s['n'])} | "
                     f"{'yes' if i in front else ''} |")
    table = "\n".join(lines)
    plot = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, s in enumerate(stats):
            ax.errorbar(s["energy_j"][0], s["accuracy"][0], xerr=s["energy_j"][1],
                        yerr=s["accuracy"][1], fmt="o" if i in front else "s", capsize=3,
                        label=f"{s['label']} (n={s['n']})")
        fr = sorted(front, key=lambda i: pts[i][0])
        if len(fr) > 1:
            ax.plot([pts[i][0] for i in fr], [pts[i][1] for i in fr], "k--", lw=1,
                    label="Pareto front")
        ax.set_xlabel("total client energy (J)")
        ax.set_ylabel("final test accuracy")
        ax.set_title("accuracy vs energy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        plot = out / "pareto.png"
        fig.savefig(plot, dpi=110)
        plt.close(fig)
        _line_plot(out / "accuracy_vs_energy.png", runs, "energy_cum_j",
                   "cumulative client energy (J)", "accuracy vs client energy")
        _line_plot(out / "accuracy_vs_uplink.png", runs, "uplink_cum_mb",
                   "cumulative uplink (MB)", "accuracy vs uplink")
        atomic_write_text(out / "comparison.md", "# sparsefl comparison\n\n" + table +
                          "\n\n" + "\n".join(f"![{k}]({k}.png)" for k in COMPARE_PLOTS) + "\n")
    return table, plot


__all__ = ["COMPARE_PLOTS", "HYBRID_COLUMNS", "HYBRID_PLOTS", "MEASURED_TIME", "PLOTS",
           "BoardLink", "ClassComparison", "ErrorStats", "Run", "compare", "device_series",
           "energy_by_device", "find_runs", "group_runs", "group_stats", "is_board",
           "is_run_dir", "link_by_board", "load_boards", "load_run", "measured_vs_estimated",
           "pareto_front", "write_report"]
