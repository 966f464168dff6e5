"""Serial-link efficiency: wire bytes per payload byte and throughput vs the line rate.

Setup (all real): the board agent in its own process on one pseudo-terminal, the host's pyserial
on another, and the relay (tests/relay.py, its own process) between them, throttled to an 8N1
UART at 921,600 baud (92,160 bytes/s each way) with 5 ms one-way latency.

Measured per transfer size (median over repeats):
* ``wire_ratio_down`` — bytes the host wrote (COBS frames, headers, CRCs, transfer control,
  retransmissions) / payload bytes, for LOAD (host -> board);
* ``ack_bytes_per_payload`` — bytes coming back meanwhile (acknowledgements);
* ``throughput_vs_line`` — payload bytes / wall time of the whole request (BULK_BEGIN handshake
  and reply included) / 92,160 B/s;
* ECHO (the same payload down, then up) gives the board -> host direction.

Targets (issue 5): wire ratio <= 1.05, throughput >= 90 % of the line rate.

    python benchmarks/serial_link.py [--sizes 65536,262144,1048576] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import serial  # noqa: E402
from relay import spawn_agent, stop_agent  # noqa: E402

from embedded.protocol.messages import MSG  # noqa: E402
from embedded.protocol.transport import Link  # noqa: E402

BAUD = 921_600
LINE_BYTES_PER_S = BAUD / 10      # 8N1: start + 8 data + stop bits per byte
LATENCY_S = 0.005
TOKEN = b"benchmark-token-0123456789abcdef"


def start_relay(tmp: str) -> tuple[subprocess.Popen, str, str]:
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "relay.py"),
                          "--baud", str(BAUD), "--latency", str(LATENCY_S),
                          "--stats-file", os.path.join(tmp, "relay.json")],
                         stdout=subprocess.PIPE, env=env)
    a_path, b_path = p.stdout.readline().decode().split()
    return p, a_path, b_path


def measure(link: Link, msg: int, size: int) -> dict:
    data = os.urandom(size)
    out0, in0 = link.stats.bytes_out, link.stats.bytes_in
    rt0 = link.stats.retransmits
    t0 = time.perf_counter()
    if msg == MSG.LOAD:
        rep = link.request(MSG.LOAD, {"name": "bench", "data": data}, timeout=5.0)
        assert rep["size"] == size
    else:
        rep = link.request(MSG.ECHO, {"data": data}, timeout=5.0)
        assert rep["data"] == data, "ECHO came back different"
    dt = time.perf_counter() - t0
    down = link.stats.bytes_out - out0
    up = link.stats.bytes_in - in0
    r = {"seconds": dt, "wire_down": down, "wire_up": up,
         "retransmits": link.stats.retransmits - rt0}
    if msg == MSG.LOAD:
        r["wire_ratio_down"] = down / size
        r["ack_bytes_per_payload"] = up / size
        r["throughput_Bps"] = size / dt
    else:
        r["wire_ratio_down"] = down / size
        r["wire_ratio_up"] = up / size
        r["throughput_Bps"] = 2 * size / dt   # both directions in sequence, each at line rate
    r["throughput_vs_line"] = r["throughput_Bps"] / LINE_BYTES_PER_S
    return r


def median_of(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def femnist_projection(thr_Bps: float) -> dict | None:
    """Time to ship femnist_cnn's dense fp32 weights at the measured throughput (a projection
    from the measurement, not a measurement)."""
    try:
        import math

        import hwmodel
        spec = hwmodel.build("femnist_cnn")
        n = sum(math.prod(s) for s in spec.param_shapes().values())
    except Exception:  # noqa: BLE001
        return None
    b = 4 * n
    return {"model": "femnist_cnn", "dense_fp32_bytes": b, "projected_seconds": b / thr_Bps,
            "note": "dense weights / measured LOAD throughput; projection, not measured"}


def update_sizes(thr_Bps: float, sparsities=(0.9, 0.95)) -> dict:
    """Bytes of a femnist_cnn model update at each sparsity for every codec (fp32 and fp16
    values), against the dense fp32 state frame — real ``len()`` of the encoded update, made by
    the ZeroFL ``topk_weights`` uplink rule on every conv/linear weight (biases dense) — and the
    time each would take up the link at the measured throughput (a projection)."""
    import numpy as np

    import hwmodel
    from embedded import codec
    from embedded.network import Network
    from embedded.uplink import UplinkRule
    from hwmodel import wire

    spec = hwmodel.build("femnist_cnn")
    state = Network.from_spec(spec, seed=0).state_dict()
    rng = np.random.default_rng(0)  # a trained model's weights are not the init's: perturb
    state = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
             if v.dtype == np.float32 else v for k, v in state.items()}
    dense = len(codec.encode_state(state, "dense32"))
    out = {"model": "femnist_cnn", "dense_fp32_bytes": dense,
           "dense_projected_seconds": dense / thr_Bps, "rows": []}
    for sp in sparsities:
        plan = hwmodel.SparsityPlan.uniform(spec, sp, layers="all")
        for dtype in ("f32", "f16"):
            for c in wire.CODECS:
                b = len(UplinkRule("topk_weights", mask_ratio=0.0, codec=c, dtype=dtype)
                        .make_update(state, state, plan))
                out["rows"].append({"sparsity": sp, "codec": c, "dtype": dtype, "bytes": b,
                                    "x_fewer_than_dense_fp32": dense / b,
                                    "projected_up_seconds": b / thr_Bps})
        best = min((r for r in out["rows"] if r["sparsity"] == sp), key=lambda r: r["bytes"])
        print(f"femnist_cnn update at sparsity {sp}: best {best['codec']}/{best['dtype']} "
              f"{best['bytes'] / 1e6:.2f} MB = {best['x_fewer_than_dense_fp32']:.1f}x fewer "
              f"than dense fp32 ({dense / 1e6:.2f} MB); up the link in "
              f"{best['projected_up_seconds']:.0f} s (projected) vs "
              f"{dense / thr_Bps:.0f} s dense down", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="65536,262144,1048576")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="one 256 KiB transfer each way")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "serial_link.json"))
    a = ap.parse_args(argv)
    sizes = [262144] if a.quick else [int(s) for s in a.sizes.split(",")]
    repeats = 1 if a.quick else a.repeats

    tmp = tempfile.mkdtemp(prefix="serial-link-")
    with open(os.path.join(tmp, "token"), "wb") as f:
        f.write(TOKEN)
    relay, a_path, b_path = start_relay(tmp)
    agent, _ = spawn_agent(["--port", a_path, "--token-file", os.path.join(tmp, "token"),
                            "--sensor", "none", "--chunk-size", str(a.chunk_size),
                            "--window", str(a.window)], os.path.join(tmp, "state"))
    results: dict = {"rows": []}
    try:
        ser = serial.Serial(b_path, BAUD, timeout=0.01, write_timeout=10)
        link = Link(ser, chunk_size=a.chunk_size, window=a.window, timeout=2.0)
        link.hello(TOKEN)
        t0 = time.perf_counter()
        for _ in range(10):
            link.request(MSG.PING)
        rtt = (time.perf_counter() - t0) / 10
        for size in sizes:
            for msg in (MSG.LOAD, MSG.ECHO):
                rows = [measure(link, msg, size) for _ in range(repeats)]
                med = median_of(rows)
                row = {"command": msg.name, "payload_bytes": size, "repeats": repeats, **med}
                results["rows"].append(row)
                print(f"{msg.name:5s} {size:>8d} B  wire/payload {med['wire_ratio_down']:.4f}  "
                      f"throughput {med['throughput_Bps'] / 1e3:7.1f} kB/s = "
                      f"{100 * med['throughput_vs_line']:5.1f} % of line  "
                      f"retx {med['retransmits']:.0f}", flush=True)
        ser.close()
    finally:
        stop_agent(agent)
        relay.terminate()
        relay.wait(timeout=5)
    big = [r for r in results["rows"] if r["command"] == "LOAD"
           and r["payload_bytes"] == max(sizes)][0]
    results.update({
        "benchmark": "serial_link",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "setup": {"baud": BAUD, "line_bytes_per_s": LINE_BYTES_PER_S, "latency_s": LATENCY_S,
                  "chunk_size": a.chunk_size, "window": a.window, "transport": "pty + relay "
                  "process + pty, agent in its own process, host pyserial",
                  "python": platform.python_version(), "machine": platform.machine(),
                  "cpu_count": os.cpu_count(),
                  "note": "shared 2-core machine: other jobs may have been running"},
        "ping_rtt_s": rtt,
        "largest_load": {"payload_bytes": big["payload_bytes"],
                         "wire_ratio": big["wire_ratio_down"],
                         "throughput_vs_line": big["throughput_vs_line"],
                         "target_wire_ratio_max": 1.05, "target_throughput_min": 0.90,
                         "meets_targets": big["wire_ratio_down"] <= 1.05
                         and big["throughput_vs_line"] >= 0.90},
        "femnist_cnn": femnist_projection(big["throughput_Bps"]),
        "update_sizes": update_sizes(big["throughput_Bps"]),
    })
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"ping RTT {1e3 * rtt:.1f} ms; largest LOAD: wire ratio {big['wire_ratio_down']:.4f}, "
          f"{100 * big['throughput_vs_line']:.1f} % of line rate -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
