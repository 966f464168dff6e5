"""``sparsefl board``: find, probe, benchmark, calibrate and emulate boards (docs/boards.md).

    sparsefl board list
    sparsefl board probe PORT [--format json]
    sparsefl board pair PORT --token-file FILE
    sparsefl board bench PORT --model NAME --sparsity S [--format table|json]
    sparsefl board calibrate PORT --out my-board.toml
    sparsefl board emulate [--profile NAME]
    sparsefl board import-power meter.csv [--board UUID] [--offset S]

PORT is a serial device (prefer ``/dev/serial/by-id/...``: it names the board, not the USB
socket) or ``socket://HOST:PORT``. The pairing token is found by the board's UUID under
``$SPARSEFL_HOME/boards/<uuid>/token`` (``board emulate`` and ``board pair`` put it there) unless
``--token-file`` is given.

The meter CSV of ``import-power`` (one row per sample, a header row first)::

    time,volts,amps
    1763769600.000,5.12,0.81
    1763769600.100,5.11,0.95

``time``: Unix seconds (host clock, or the board's with ``--clock board``) or ISO 8601
(``2026-11-22T00:00:00.1+00:00``; without a zone it is UTC). Column names are matched without
case; accepted aliases: ``timestamp``/``t``, ``voltage``/``v``/``voltage_v``,
``current``/``a``/``current_a``; an optional ``watts`` (``power``/``w``) column is used instead of
volts × amps. The energy of each recorded BENCH/TRAIN window (``boards/<uuid>/windows.jsonl``)
is the trapezoid integral of the meter's power over it; the idle baseline is the mean power of
the samples outside every window, and dynamic = total − idle × duration.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from fl_core.commands import CLIError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``board`` and its subcommands on the ``sparsefl`` subparsers."""
    p = subparsers.add_parser(
        "board", help="find, probe, benchmark, calibrate and emulate real boards",
        description="Work with boards running `python -m embedded.agent` (docs/boards.md).")
    sub = p.add_subparsers(dest="board_command", metavar="SUBCOMMAND")
    sub.required = True

    def port_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("port", metavar="PORT", help="serial device (/dev/serial/by-id/...) or "
                       "socket://HOST:PORT")
        q.add_argument("--baud", type=int, default=921600)
        q.add_argument("--token-file", default=None, help="pairing token (default: "
                       "$SPARSEFL_HOME/boards/<uuid>/token)")
        q.add_argument("--timeout", type=float, default=2.0, help="link timeout per attempt (s)")

    q = sub.add_parser("list", help="serial ports that may have a board")
    q.add_argument("--format", choices=("table", "json"), default="table")

    q = sub.add_parser("probe", help="the board's INFO reply")
    port_args(q)
    q.add_argument("--format", choices=("table", "json"), default="table")

    q = sub.add_parser("pair", help="store a board's token so later commands find it")
    port_args(q)

    q = sub.add_parser("bench", help="per-layer timings measured on the board beside hwmodel's "
                       "estimate")
    port_args(q)
    q.add_argument("--model", required=True, help="builder name (see `sparsefl estimate`)")
    q.add_argument("--sparsity", type=float, default=0.0, help="SWAT sparsity in [0, 1)")
    q.add_argument("--batch", type=int, default=16)
    q.add_argument("--repeats", type=int, default=10)
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--profile", default=None, help="profile of the estimate (default: this "
                   "board's calibration if cached, else a guess from its INFO)")
    q.add_argument("--format", choices=("table", "json"), default="table")

    q = sub.add_parser("calibrate", help="BENCH several models and sparsities, fit a profile")
    port_args(q)
    q.add_argument("--out", required=True, help="profile TOML to write")
    q.add_argument("--models", default="mlp,lenet5", help="comma-separated builder names")
    q.add_argument("--sparsities", default="0,0.5,0.9", help="comma-separated")
    q.add_argument("--batch", type=int, default=16)
    q.add_argument("--repeats", type=int, default=10)
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--base", default=None, help="profile to start from (default: a guess "
                   "from the board's INFO)")
    q.add_argument("--name", default=None, help="name of the fitted profile")

    q = sub.add_parser("emulate", help="run the real agent on a pseudo-terminal (prints its "
                       "path first) until terminated")
    q.add_argument("--profile", default=None, help="slow TRAIN down to this device profile's "
                   "estimated time (labelled measured-emulated)")
    q.add_argument("--state-dir", default=None, help="agent state (default: a temporary dir)")
    q.add_argument("--warmup", action="store_true", help="compile every kernel first")
    q.add_argument("--data-root", default=None, help="the directory LOAD_DATA may read files "
                   "from (as the agent's --data-root)")

    q = sub.add_parser("import-power", help="attach a USB meter's CSV log to BENCH/TRAIN "
                       "windows as measured energy")
    q.add_argument("csv", metavar="METER_CSV")
    q.add_argument("--board", default=None, help="board UUID (default: every board with "
                   "recorded windows)")
    q.add_argument("--windows", default=None, help="a windows.jsonl to use instead")
    q.add_argument("--clock", choices=("host", "board"), default="host",
                   help="which clock the meter's time column is in")
    q.add_argument("--offset", type=float, default=0.0, help="seconds added to the meter's "
                   "times (to correct its clock)")
    q.add_argument("--format", choices=("table", "json"), default="table")
    return p


def run(args: argparse.Namespace) -> int:
    return {"list": cmd_list, "probe": cmd_probe, "pair": cmd_pair, "bench": cmd_bench,
            "calibrate": cmd_calibrate, "emulate": cmd_emulate,
            "import-power": cmd_import_power}[args.board_command](args)


# --- helpers ---------------------------------------------------------------------------------
def _client(args: argparse.Namespace):
    from fl_core.board_client import BoardClient, BoardError
    bc = BoardClient(args.port, baud=args.baud, token_file=args.token_file,
                     timeout=args.timeout)
    try:
        bc.connect()
    except BoardError as e:
        raise CLIError(str(e)) from None
    return bc


def _table(rows: list[list[str]], header: list[str]) -> str:
    w = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w[i]) if i else str(v).ljust(w[i])  # noqa: E731
                               for i, v in enumerate(r))
    return "\n".join([line(header), line(["-" * x for x in w]), *map(line, rows)])


def _us(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x * 1e6:.1f}"


# --- list / probe / pair -----------------------------------------------------------------------
def list_ports() -> list[dict[str, Any]]:
    """Serial ports, each with its stable ``/dev/serial/by-id`` path when there is one."""
    from serial.tools import list_ports as lp

    by_id: dict[str, str] = {}
    d = "/dev/serial/by-id"
    if os.path.isdir(d):
        for name in sorted(os.listdir(d)):
            by_id[os.path.realpath(os.path.join(d, name))] = os.path.join(d, name)
    out = []
    for p in sorted(lp.comports(), key=lambda p: p.device):
        out.append({"port": by_id.get(os.path.realpath(p.device), p.device),
                    "device": p.device, "description": p.description,
                    "hwid": p.hwid, "by_id": os.path.realpath(p.device) in by_id})
    return out


def cmd_list(args: argparse.Namespace) -> int:
    ports = list_ports()
    if args.format == "json":
        print(json.dumps(ports, indent=2))
        return 0
    if not ports:
        print("no serial ports found (a board on USB gadget serial appears as /dev/ttyACM*; "
              "see docs/boards.md)")
        return 0
    print(_table([[p["port"], p["device"], p["description"]] for p in ports],
                 ["port", "device", "description"]))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    bc = _client(args)
    try:
        info = dict(bc.info)
        info["port"] = args.port
        info["board_changed"] = bc.board_changed
        info["clock_offset_s"] = bc.clock_offset_s
    finally:
        bc.close()
    if args.format == "json":
        print(json.dumps(info, indent=2, default=str))
        return 0
    mem = info.get("memory") or {}
    freq = info.get("freq") or {}
    rows = [["board", info.get("board_uuid")],
            ["emulated", info.get("emulated")],
            ["agent", info.get("agent")],
            ["board model", info.get("board_model")], ["cpu", info.get("cpu_model")],
            ["machine", f"{info.get('system')} {info.get('machine')}"],
            ["cores", info.get("cores")],
            ["freq MHz", f"{freq.get('cur_mhz')} (max {freq.get('max_mhz')}, "
                         f"{freq.get('governor')})"],
            ["RAM", f"{(mem.get('available_bytes') or 0) / 2**20:.0f} MiB free of "
                    f"{(mem.get('total_bytes') or 0) / 2**20:.0f} MiB"],
            ["max temperature C", info.get("max_temperature_c")],
            ["throttling", info.get("throttling")],
            ["python / numpy / numba", f"{info.get('python')} / {info.get('numpy')} / "
                                       f"{info.get('numba')}"],
            ["kernels compiled", info.get("kernels_compiled")],
            ["sensors", ", ".join(s.get("kind", "?") for s in info.get("sensors") or [])
             or "none (energy estimated)"]]
    def show(v: object) -> str:      # what the board does not report: "-", not "None"
        return "-" if v is None or str(v).replace("None", "").strip(" /(),") == "" else \
            str(v).replace("None", "-")

    print(_table([[k, show(v)] for k, v in rows], ["field", "value"]))
    if bc.board_changed:
        print(f"note: a different board than before answers on {args.port}")
    return 0


def cmd_pair(args: argparse.Namespace) -> int:
    from fl_core.board_client import save_token
    if not args.token_file:
        raise CLIError("pair: --token-file FILE (the token the agent printed on its first "
                       "start, also in its STATE_DIR/token) is required")
    bc = _client(args)
    bc.close()
    tok = Path(args.token_file).read_bytes()
    p = save_token(bc.board_uuid, tok)
    print(f"paired with board {bc.board_uuid}; token stored in {p}")
    return 0


# --- bench -------------------------------------------------------------------------------------
def bench_rows(measurements: list, profile: Any) -> list[dict[str, Any]]:
    """Each measurement beside hwmodel's prediction under ``profile`` and the relative error."""
    from hwmodel.calibration import predict
    pred = predict(profile, measurements)
    rows = []
    for m, p in zip(measurements, pred, strict=True):
        est = None if p != p else float(p)
        rows.append({"layer": m.layer, "type": m.layer_type, "phase": m.phase,
                     "density": m.density, "act_density": m.act_density,
                     "measured_s": m.median_s, "iqr_s": m.iqr_s, "repeats": m.repeats,
                     "estimated_s": est,
                     "error_pct": None if est is None else 100.0 * (est - m.median_s)
                     / m.median_s,
                     "temperature_c": m.temperature_c, "freq_mhz": m.freq_mhz})
    return rows


def _estimate_profile(bc: Any, name: str | None) -> Any:
    import hwmodel
    from fl_core.board_client import guess_profile
    if name:
        return hwmodel.load_profile(name)
    return bc.cached_calibration() or hwmodel.load_profile(guess_profile(bc.info))


def cmd_bench(args: argparse.Namespace) -> int:
    from hwmodel.estimator import provenance_of
    if not 0.0 <= args.sparsity < 1.0:
        raise CLIError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    bc = _client(args)
    try:
        rep = bc.bench(args.model, [args.sparsity], batch=args.batch, repeats=args.repeats,
                       threads=args.threads)
        profile = _estimate_profile(bc, args.profile)
    finally:
        bc.close()
    ms = rep["measurements"]
    rows = bench_rows(ms, profile)
    used = [r for r in rows if r["estimated_s"] is not None]
    tm = sum(r["measured_s"] for r in used)
    te = sum(r["estimated_s"] for r in used)
    total = {"measured_s": tm, "estimated_s": te,
             "error_pct": 100.0 * (te - tm) / tm if tm > 0 else None, "rows": len(used)}
    meas_prov = ms[0].provenance if ms else "measured"
    est_prov = provenance_of(profile).value
    if args.format == "json":
        print(json.dumps({"board": bc.board_uuid, "model": rep["model"],
                          "sparsity": args.sparsity, "batch": args.batch,
                          "profile": profile.name, "measured_provenance": meas_prov,
                          "estimate_provenance": est_prov, "energy": rep.get("energy"),
                          "rows": rows, "total": total}, indent=2))
        return 0
    print(f"board {bc.board_uuid}  model {rep['model']}  sparsity {args.sparsity:g}  batch "
          f"{args.batch}  ({meas_prov}; estimate: {profile.name}, {est_prov})")
    body = [[r["layer"], r["phase"], f"{r['density']:.2f}", _us(r["measured_s"]),
             _us(r["iqr_s"]), _us(r["estimated_s"]),
             "-" if r["error_pct"] is None else f"{r['error_pct']:+.0f}%"] for r in rows]
    body.append(["step (sum)", "", "", _us(tm), "", _us(te),
                 "-" if total["error_pct"] is None else f"{total['error_pct']:+.0f}%"])
    print(_table(body, ["layer", "phase", "density", "measured us", "IQR us", "estimate us",
                        "error"]))
    return 0


# --- calibrate ---------------------------------------------------------------------------------
def cmd_calibrate(args: argparse.Namespace) -> int:
    import hwmodel
    from fl_core.board_client import calibrate_board, calibration_path, guess_profile
    from hwmodel.calibration import CalibrationError, calibration_error
    from hwmodel.profiles import load_profile, save_profile

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        sps = [float(s) for s in args.sparsities.split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"--sparsities: expected numbers separated by commas, got "
                       f"{args.sparsities!r}") from None
    for m in models:
        if m not in hwmodel.BUILDERS:
            raise CLIError(f"--models: unknown model {m!r}; known: {sorted(hwmodel.BUILDERS)}")
    bc = _client(args)
    try:
        fitted, ms = calibrate_board(bc, models, sps, base=args.base, name=args.name,
                                     batch=args.batch, repeats=args.repeats,
                                     threads=args.threads,
                                     log=lambda s: print(s, file=sys.stderr, flush=True))
    except CalibrationError as e:
        raise CLIError(f"calibrate: {e}") from None
    finally:
        bc.close()
    out = save_profile(fitted, args.out)
    base = load_profile(args.base or guess_profile(bc.info))
    err0 = calibration_error(base, ms)
    err1 = calibration_error(fitted, ms)
    print(f"wrote {out} (also cached in {calibration_path(bc.board_uuid)})")
    print(f"fitted: {', '.join(fitted.fitted)}")
    print(f"per-layer error: {base.name} median {err0['median_ape_pct']:.0f}% -> calibrated "
          f"median {err1['median_ape_pct']:.0f}% (p90 {err1['p90_ape_pct']:.0f}%, "
          f"n={err1['n']})")
    return 0


# --- emulate -----------------------------------------------------------------------------------
def cmd_emulate(args: argparse.Namespace) -> int:
    from fl_core.board_client import BoardError, EmulatedBoard
    if args.profile:
        import hwmodel
        hwmodel.load_profile(args.profile)   # a bad name fails here, with the list of names
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        extra = (["--warmup"] if args.warmup else []) + \
            (["--data-root", args.data_root] if args.data_root else [])
        emu = EmulatedBoard(profile=args.profile, state_dir=args.state_dir, agent_args=extra,
                            start_timeout=600.0 if args.warmup else 60.0)
    except BoardError as e:
        raise CLIError(str(e)) from None
    try:
        print(emu.path, flush=True)
        print(f"emulated board {emu.board_uuid} (agent pid {emu.proc.pid}"
              f"{', slowed to ' + args.profile if args.profile else ''}); "
              f"`sparsefl board probe {emu.path}`", flush=True)
        while not stop.is_set():
            if emu.proc.poll() is not None:
                print(f"sparsefl board emulate: the agent exited ({emu.proc.returncode}); see "
                      f"{emu.agent_log}", file=sys.stderr, flush=True)
                return 1
            stop.wait(0.2)
    finally:
        emu.close()
    return 0


# --- import-power ------------------------------------------------------------------------------
_ALIASES = {"time": ("time", "timestamp", "t"),
            "volts": ("volts", "voltage", "v", "voltage_v"),
            "amps": ("amps", "current", "a", "current_a"),
            "watts": ("watts", "power", "w", "power_w")}


def _parse_time(s: str, where: str) -> float:
    try:
        return float(s)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(s.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CLIError(f"{where}: time {s!r} is neither Unix seconds nor ISO 8601") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp()


def read_meter_csv(path: str) -> tuple[list[float], list[float]]:
    """(times in Unix seconds, power in W) from a meter CSV (see the module docstring)."""
    try:
        f = open(path, newline="")  # noqa: SIM115 - closed below
    except OSError as e:
        raise CLIError(f"{path}: {e.strerror}") from None
    with f:
        rd = csv.reader(f)
        try:
            header = [h.strip().lower() for h in next(rd)]
        except StopIteration:
            raise CLIError(f"{path}: empty file; expected a header row time,volts,amps") from None
        col: dict[str, int] = {}
        for key, names in _ALIASES.items():
            for n in names:
                if n in header:
                    col[key] = header.index(n)
                    break
        if "time" not in col or not ("watts" in col or {"volts", "amps"} <= set(col)):
            raise CLIError(f"{path}: header {header} must have a time column and volts and amps "
                           "(or watts) columns")
        ts, ps = [], []
        for i, row in enumerate(rd, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            where = f"{path} line {i}"
            try:
                t = _parse_time(row[col["time"]], where)
                if "watts" in col:
                    p = float(row[col["watts"]])
                else:
                    p = float(row[col["volts"]]) * float(row[col["amps"]])
            except (IndexError, ValueError):
                raise CLIError(f"{where}: expected numbers in the time/volts/amps columns, got "
                               f"{row}") from None
            if ts and t < ts[-1]:
                raise CLIError(f"{where}: time goes backwards ({t} after {ts[-1]})")
            if not p >= 0 or p == float("inf"):
                raise CLIError(f"{where}: power must be a finite number >= 0, got {p}")
            ts.append(t)
            ps.append(p)
    if len(ts) < 2:
        raise CLIError(f"{path}: need at least 2 samples, got {len(ts)}")
    return ts, ps


def _window_files(args: argparse.Namespace) -> list[Path]:
    from fl_core.board_client import board_dir, boards_dir
    if args.windows:
        return [Path(args.windows)]
    if args.board:
        return [board_dir(args.board) / "windows.jsonl"]
    return sorted(boards_dir().glob("*/windows.jsonl"))


def attach_power(windows: list[dict], ts: list[float], ps: list[float], clock: str,
                 source: str) -> list[dict]:
    """Measured energy of each window that the meter log covers (others are left alone)."""
    from embedded.sensors.base import integrate_power
    k0, k1 = ("t_start", "t_end") if clock == "host" else ("t_start_board", "t_end_board")
    spans = [(w[k0], w[k1]) for w in windows]
    outside = [p for t, p in zip(ts, ps, strict=True)
               if not any(a <= t <= b for a, b in spans)]
    idle = sum(outside) / len(outside) if outside else None
    out = []
    for w in windows:
        a, b = w[k0], w[k1]
        if a < ts[0] or b > ts[-1] or b <= a:
            out.append(w)
            continue
        e = integrate_power(ts, ps, a, b)
        n = sum(1 for t in ts if a <= t <= b)
        out.append(dict(w, energy_j=e, energy_provenance="measured", energy_source=source,
                        meter_samples=n, mean_power_w=e / (b - a), idle_power_w=idle,
                        dynamic_energy_j=None if idle is None else e - idle * (b - a)))
    return out


def cmd_import_power(args: argparse.Namespace) -> int:
    ts, ps = read_meter_csv(args.csv)
    ts = [t + args.offset for t in ts]
    files = [p for p in _window_files(args) if p.exists()]
    if not files:
        raise CLIError("no recorded BENCH/TRAIN windows (run `sparsefl board bench` or a "
                       "federation with boards first, or give --windows FILE)")
    matched: list[dict] = []
    for path in files:
        try:
            windows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except ValueError as e:
            raise CLIError(f"{path}: not JSON lines: {e}") from None
        new = attach_power(windows, ts, ps, args.clock, os.path.abspath(args.csv))
        from fl_core.runlog import atomic_write_text

        atomic_write_text(path, "".join(json.dumps(w) + "\n" for w in new))
        matched += [w for w, old in zip(new, windows, strict=True) if w is not old]
    if args.format == "json":
        print(json.dumps(matched, indent=2))
        return 0
    if not matched:
        print(f"the meter log ({ts[0]:.1f} .. {ts[-1]:.1f}) covers none of the recorded "
              "windows: check the clocks (--clock, --offset)")
        return 1
    print(_table([[w["kind"], w["id"][:40], f"{w['t_end'] - w['t_start']:.2f}",
                   f"{w['energy_j']:.3f}", f"{w['mean_power_w']:.2f}",
                   "-" if w["dynamic_energy_j"] is None else f"{w['dynamic_energy_j']:.3f}"]
                  for w in matched],
                 ["kind", "window", "seconds", "energy J", "mean W", "dynamic J"]))
    return 0
