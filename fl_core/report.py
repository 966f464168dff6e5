"""Reports: ``report.md`` and PNG plots for a run directory, and comparisons of several runs.

One run (:func:`write_report`): accuracy vs rounds, accuracy vs cumulative client energy,
accuracy vs cumulative uplink MB, energy per round by device class, and a table of the totals
with the provenance of every cost (from ``clients.csv``).

Several runs (:func:`compare`, ``sparsefl report DIR [DIR ...]``): a table of final accuracy,
total client energy and uplink per run, and the accuracy–energy Pareto plot. Runs whose
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


def energy_by_device(run: Run) -> tuple[list[int], dict[str, np.ndarray]]:
    """Per round, the energy (J) of the clients that trained, summed per device class."""
    rounds = sorted({int(r["round"]) for r in run.clients})
    devs = sorted({r["device"] for r in run.clients})
    idx = {r: i for i, r in enumerate(rounds)}
    out = {d: np.zeros(len(rounds)) for d in devs}
    for r in run.clients:
        if r["status"] != "dropped" and r.get("energy_j"):
            out[r["device"]][idx[int(r["round"])]] += float(r["energy_j"])
    return rounds, out


def _energy_plot(path: Path, run: Run) -> None:
    plt = _plt()
    rounds, by_dev = energy_by_device(run)
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = np.zeros(len(rounds))
    for d, e in by_dev.items():
        ax.bar(rounds, e, bottom=bottom, label=d)
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


def write_report(path: str | Path) -> Path:
    """Write ``report.md`` and the four PNG plots into the run directory ``path``."""
    run = load_run(path)
    p = run.dir
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
        "- provenance of the costs: " + "; ".join(f"{k}: {', '.join(v)}"
                                                   for k, v in _provenances(run).items()),
        "", "| round | accuracy | loss | energy (J) | round time (s) | uplink (B) | ok | failed "
        "| dropped |", "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in run.rounds:
        lines.append(f"| {r['round']} | {_num(_f(r['accuracy']))} | {_num(_f(r['loss']))} | "
                     f"{_num(_f(r['energy_j']))} | {_num(_f(r['round_time_s']))} | "
                     f"{r['uplink_bytes']} | {r['clients_ok']} | {r['clients_failed']} | "
                     f"{r['clients_dropped']} |")
    reasons = [r for r in run.clients if r["status"] != "ok"]
    if reasons:
        lines += ["", "## Failed and dropped clients", "", "| round | client | device | status "
                  "| reason |", "|---|---|---|---|---|"]
        lines += [f"| {r['round']} | {r['client_id']} | {r['device']} | {r['status']} | "
                  f"{r['reason']} |" for r in reasons]
    lines += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in PLOTS.items()]
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
    """A markdown table of the runs (grouped by config: mean ± std over seeds) and the
    accuracy–energy Pareto plot (``out``/pareto.png when ``out`` is given)."""
    runs = [load_run(d) for d in dirs]
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
        atomic_write_text(out / "comparison.md", "# sparsefl comparison\n\n" + table +
                          "\n\n![pareto](pareto.png)\n")
    return table, plot


__all__ = ["PLOTS", "Run", "compare", "energy_by_device", "group_runs", "group_stats",
           "load_run", "pareto_front", "write_report"]
