"""Daemon overhead: a `null` job through resisod vs a raw pyzmq ipc relay, same run.

Baseline: client DEALER -> broker ROUTER/ROUTER -> worker DEALER -> back, the smallest
message path a broker architecture can have. resiso: submit -> accepted -> started ->
result of a null job (no steps) through the real daemon and a real worker process.
Targets (2 cores): p50 <= 2x the relay's p50; >= 5,000 null jobs/s with 16 in flight.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Daemon, pct, table  # noqa: E402

from resisod.protocol import pack, unpack  # noqa: E402


def relay_broker(front: str, back: str) -> None:
    ctx = zmq.Context()
    f, b = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    f.bind(front)
    b.bind(back)
    worker = b.recv_multipart()[0]  # the worker says hello
    poller = zmq.Poller()
    poller.register(f, zmq.POLLIN)
    poller.register(b, zmq.POLLIN)
    while True:
        ready = dict(poller.poll())
        if f in ready:
            client, msg = f.recv_multipart()
            if msg == b"stop":
                return
            m = unpack(msg)
            b.send_multipart([worker, pack({"c": client, "m": m})])
        if b in ready:
            _, msg = b.recv_multipart()
            m = unpack(msg)
            f.send_multipart([m["c"], pack(m["m"])])


def relay_worker(back: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(back)
    s.send(b"hello")
    while True:
        s.send(s.recv())


def measure_relay(n: int, inflight: int) -> tuple[list[float], float]:
    d = tempfile.mkdtemp(prefix="rsr-", dir="/tmp")
    front, back = f"ipc://{d}/front", f"ipc://{d}/back"
    procs = [mp.Process(target=relay_broker, args=(front, back), daemon=True),
             mp.Process(target=relay_worker, args=(back,), daemon=True)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.connect(front)
    msg = {"v": 1, "op": "submit", "kind": "null", "params": {}}
    for _ in range(200):  # warm up
        s.send(pack(msg))
        s.recv()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        s.send(pack(msg))
        unpack(s.recv())
        lat.append((time.perf_counter() - t) * 1e6)
    total = n * 4
    t = time.perf_counter()
    for _ in range(inflight):
        s.send(pack(msg))
    for i in range(total):
        unpack(s.recv())
        if i + inflight < total:
            s.send(pack(msg))
    rate = total / (time.perf_counter() - t)
    s.send(b"stop")
    s.close(0)
    for p in procs:
        p.terminate()
    return lat, rate


def measure_resiso(n: int, inflight: int, workers: int, level: str = "INFO",
                   partials: bool = True) -> tuple[list[float], float]:
    config = f"""
    [daemon]
    heartbeat_ms = 500
    [logging]
    level = "{level}"
    [domains.null]
    kind = "null"
    workers = {workers}
    max_queue = 100000
    """
    with Daemon(config) as d, d.client() as c:
        for _ in range(200):
            c.submit("null", {}, partials=partials).wait()
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            c.submit("null", {}, partials=partials).wait()
            lat.append((time.perf_counter() - t) * 1e6)
        # throughput: keep `inflight` jobs submitted; count finals
        total = n * 4
        sock = c.sock
        body = {"kind": "null", "params": {}, "stream": True, "partials": partials}
        t = time.perf_counter()
        for i in range(inflight):
            sock.send(pack({"v": 1, "op": "submit", "rid": i, **body}))
        sent, done = inflight, 0
        while done < total:
            ev = unpack(sock.recv(), max_bytes=1 << 24)
            if ev["event"] in ("result", "error", "cancelled"):
                done += 1
                if ev["event"] != "result":
                    raise RuntimeError(ev)
                if sent < total:
                    sock.send(pack({"v": 1, "op": "submit", "rid": sent, **body}))
                    sent += 1
        rate = total / (time.perf_counter() - t)
    return lat, rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--inflight", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    a = ap.parse_args()
    r_lat, r_rate = measure_relay(a.n, a.inflight)
    rows = [["raw pyzmq ipc relay", "-", "-", pct(r_lat, .5), pct(r_lat, .99), r_rate, "1.00"]]
    best = None
    for w in a.workers:
        for partials in (False, True):
            lat, rate = measure_resiso(a.n, a.inflight, w, partials=partials)
            mode = "accepted+started+result" if partials else "accepted+result"
            rows.append(["resiso null job", mode, w, pct(lat, .5), pct(lat, .99), rate,
                         f"{pct(lat, .5) / pct(r_lat, .5):.2f}"])
            if not partials and w == a.workers[0]:
                best = (pct(lat, .5) / pct(r_lat, .5), rate)
            if not partials:
                best = (best[0], max(best[1], rate))
    print(table(f"Round trip and throughput ({os.cpu_count()} CPUs, {a.inflight} in flight, "
                f"logging at INFO)", ["path", "events", "null workers", "p50 us", "p99 us",
                                      "jobs/s", "p50 / relay p50"], rows))
    print()
    print(f"targets: p50 ratio <= 2.0 -> {best[0]:.2f}; jobs/s >= 5000 -> {best[1]:.0f}")


if __name__ == "__main__":
    main()
