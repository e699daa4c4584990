"""A remote worker's overhead: the same null worker over loopback TCP with CURVE vs over ipc.

One daemon, two `null` domains: `local` with one worker over ipc (the daemon's child), and
`remote` with no local worker and one `resiso-worker` joined over tcp://127.0.0.1 with
CURVE (encryption and the ZAP-checked handshake included). Rounds alternate between the two,
so machine noise hits both; the job path is bench/overhead.py's (`Client.run`: the final
event is the one reply; throughput with N in flight).
Targets: remote p50 <= 1.5x ipc p50; remote jobs/s >= 0.7x ipc jobs/s.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, Daemon, median, pct, table  # noqa: E402

from resisod import cluster_keys  # noqa: E402
from resisod.protocol import pack, unpack  # noqa: E402


def free_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def round_trips(c, domain: str, n: int) -> list[float]:
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        c.run("null", {}, domain=domain)
        lat.append((time.perf_counter() - t) * 1e6)
    return lat


def throughput(c, domain: str, seconds: float, inflight: int) -> float:
    """Keep `inflight` jobs submitted for `seconds`; count finals (bench/overhead.py's way)."""
    sock = c.sock
    body = {"kind": "null", "domain": domain, "params": {}, "stream": True, "ack": False,
            "partials": False}
    t = time.perf_counter()
    end = t + seconds
    for i in range(inflight):
        sock.send(pack({"v": 1, "op": "submit", "rid": f"t{i}", **body}))
    sent, done = inflight, 0
    while done < sent:
        ev = unpack(sock.recv(), max_bytes=1 << 24)
        if ev["event"] in ("result", "error", "cancelled"):
            if ev["event"] != "result":
                raise RuntimeError(ev)
            done += 1
            if time.perf_counter() < end:
                sock.send(pack({"v": 1, "op": "submit", "rid": f"t{sent}", **body}))
                sent += 1
    return done / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--inflight", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tp-rounds", type=int, default=5)
    ap.add_argument("--tp-s", type=float, default=1.5)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="rsbr-", dir="/tmp")
    keys = os.path.join(work, "keys")
    server, _ = cluster_keys.init_server(keys)
    public, _, _ = cluster_keys.worker_pair(os.path.join(work, "w", "w.key_secret"))
    cluster_keys.add(keys, "bench", public)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = f"""
    [daemon]
    heartbeat_ms = 500
    [cluster]
    listen = "{endpoint}"
    keys_dir = "{keys}"
    [domains.local]
    kind = "null"
    workers = 1
    max_queue = 100000
    [domains.remote]
    kind = "null"
    workers = 0
    max_queue = 100000
    """
    d = Daemon(config)
    worker = subprocess.Popen(
        [sys.executable, "-m", "resisod.remote_worker", "--connect", endpoint, "--domain",
         "remote", "--server-key", server, "--key-file", os.path.join(work, "w", "w.key_secret")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lat: dict[str, list[float]] = {"local": [], "remote": []}
    rates: dict[str, list[float]] = {"local": [], "remote": []}
    try:
        with d, d.client() as c:
            for dom in lat:
                round_trips(c, dom, 200)  # warm both paths
            for _ in range(a.rounds):
                for dom in lat:
                    lat[dom] += round_trips(c, dom, a.n // a.rounds)
            for _ in range(a.tp_rounds):
                for dom in rates:
                    rates[dom].append(throughput(c, dom, a.tp_s, a.inflight))
                    time.sleep(0.2)  # let the store's writes of the round land
            st = c.status()
        rtt = st["domains"]["remote"]["workers"][0]["remote"]["rtt_ms"]
    finally:
        worker.kill()
        worker.wait()
        shutil.rmtree(work, ignore_errors=True)
    p50 = {k: pct(v, .5) for k, v in lat.items()}
    rate = {k: median(v) for k, v in rates.items()}
    rows = [["ipc (local worker)", p50["local"], pct(lat["local"], .99), rate["local"], "1.00",
             "1.00"],
            ["tcp + CURVE (remote worker, loopback)", p50["remote"], pct(lat["remote"], .99),
             rate["remote"], f"{p50['remote'] / p50['local']:.2f}",
             f"{rate['remote'] / rate['local']:.2f}"]]
    print(table(f"null job: remote worker over loopback TCP + CURVE vs local worker over ipc "
                f"({os.cpu_count()} CPUs, {a.n} jobs each, {a.inflight} in flight, rounds "
                f"interleaved)",
                ["worker", "p50 us", "p99 us", "jobs/s", "p50 ratio", "jobs/s ratio"], rows))
    print(f"\nheartbeat round trip of the remote worker (status rtt_ms): {rtt} ms")
    lat_ok = p50["remote"] <= 1.5 * p50["local"]
    rate_ok = rate["remote"] >= 0.7 * rate["local"]
    print(f"p50 ratio {p50['remote'] / p50['local']:.2f} (target <= 1.5: "
          f"{'met' if lat_ok else 'missed'}); jobs/s ratio {rate['remote'] / rate['local']:.2f} "
          f"(target >= 0.7: {'met' if rate_ok else 'missed'})")


if __name__ == "__main__":
    main()
