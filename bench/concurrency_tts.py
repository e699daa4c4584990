"""TTS throughput with N concurrent clients through a real daemon.

Each client is a thread with its own connection; every request has a fresh text (a counter
in the sentence), so the result cache never answers. Each row: clients, requests, req/s, the
ratio to the 1-client rate of the same setup, latency p50/p99 (submit to result, the audio
streamed one chunk per sentence on the way). Acceptance: with the default configuration,
8 clients reach >= 1.3x the 1-client req/s at p99 <= 1.0 s.

    python bench/concurrency_tts.py                       # default config, 1/4/8/16 clients
    python bench/concurrency_tts.py --compare-workers 1 2 # the old 1-worker setup beside it
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Daemon, pct, table  # noqa: E402

# short sentences of the same shape and length (about 1 s of speech, about the cost of the
# earlier single-client measurement), so that the latency spread is the queueing's; 1024 of
# them, no digits (a number would be spoken as words of varying length)
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack",
         "Kate", "Leo", "Maria", "Nick", "Olga", "Paul"]
WORDS = ["order", "parcel", "ticket", "table", "room", "flight", "train", "locker"]
STATES = ["is ready", "was sent", "is late", "has arrived", "is waiting", "was moved",
          "is closed", "is open"]

# the default domains by name, so that a worker count can be set and everything else stays the
# default: the same layout (cores, threads) as a daemon started without a config
DEFAULT_WITH_TTS_WORKERS = """
[domains.llm]
[domains.tts]
workers = {workers}
[domains.tts-zh]
[domains.image]
"""

_serial = itertools.count()


def fresh_text() -> str:
    """A sentence this process has not sent before (up to 1024; one_request notices a
    repeat, which the cache would answer)."""
    n = next(_serial) % 1024
    return f"{NAMES[n % 16]}'s {WORDS[(n // 16) % 8]} {STATES[n // 128]}."


def one_request(client: Any, domain: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    chunks = 0
    for ev in client.submit("tts", {"text": fresh_text()}, domain=domain):
        if ev["event"] == "audio":
            chunks += 1
        elif ev["event"] == "result":
            if ev.get("cached") or chunks != ev.get("chunks") or not ev.get("duration_ms"):
                raise RuntimeError(f"unexpected result {ev} after {chunks} audio chunks")
            return time.perf_counter() - t0, chunks
        elif ev["event"] in ("error", "cancelled"):
            raise RuntimeError(f"request failed: {ev}")
    raise RuntimeError("stream ended without a result")


def _cpu_seconds(pids: set[int]) -> tuple[float, float]:
    """(CPU seconds the machine was busy, CPU seconds of `pids` and their children)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(v[:8]) - v[3] - v[4]) / tick  # user..steal, less idle and iowait
    mine = 0
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if int(p) in pids or int(fields[1]) in pids:
            mine += int(fields[11]) + int(fields[12])
    return busy, mine / tick


def wait_quiet(max_wait_s: float, below: float = 0.3) -> None:
    """On a shared machine: wait (at most `max_wait_s`) for a second in which other programs
    keep fewer than `below` cores busy (nothing of this benchmark runs between bursts)."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        b0, _ = _cpu_seconds(set())
        time.sleep(1.0)
        b1, _ = _cpu_seconds(set())
        if b1 - b0 < below:
            return


def burst(daemon: Daemon, clients: int, per_client: int, domain: str) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client_loop() -> None:
        with daemon.client() as c:
            start.wait()
            for _ in range(per_client):
                try:
                    lat, _ = one_request(c, domain)
                except Exception as exc:  # noqa: BLE001 - counted, and the first printed
                    with lock:
                        errors.append(exc)
                    continue
                with lock:
                    latencies.append(lat)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    pids = {os.getpid(), daemon.proc.pid}
    busy0, mine0 = _cpu_seconds(pids)
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    busy1, mine1 = _cpu_seconds(pids)
    if errors:
        print(f"{len(errors)} of {clients * per_client} requests failed; the first: "
              f"{errors[0]!r}", file=sys.stderr)
    if not latencies:
        raise RuntimeError(f"every request failed: {errors[0]!r}")
    return {"clients": clients, "requests": len(latencies), "errors": len(errors),
            "rps": len(latencies) / elapsed,
            "p50_ms": pct(latencies, 0.5) * 1000, "p99_ms": pct(latencies, 0.99) * 1000,
            # cores busy with other programs meanwhile: on a shared machine, a run with
            # other load is not a measurement of resiso
            "other_cores": max(0.0, (busy1 - busy0) - (mine1 - mine0)) / elapsed}



def run_tts(clients_list=(1, 4, 8, 16), requests_per_client: int = 8,
            config: str | None = None, domain: str = "tts",
            min_requests: int = 24) -> list[dict[str, Any]]:
    """One daemon with `config` (None: the default configuration), then for each client
    count a burst of `requests_per_client` requests per client (at least `min_requests` in
    all). Rows: clients, requests, errors, rps, ratio (to the 1-client rps, or the first
    row's), p50_ms, p99_ms, other_cores, workers."""
    return run_many([config], clients_list, requests_per_client, domain, min_requests)[0]


def run_many(configs: list[str | None], clients_list=(1, 4, 8, 16),
             requests_per_client: int = 8, domain: str = "tts",
             min_requests: int = 24, quiet_s: float = 0) -> list[list[dict[str, Any]]]:
    """run_tts for several configurations at once: their daemons run side by side (an idle
    one costs nothing) and the bursts alternate between them, so that a shared machine's
    other load falls on all of them alike. One list of rows per configuration."""
    with contextlib.ExitStack() as stack:
        daemons = [stack.enter_context(Daemon(cfg or "")) for cfg in configs]
        workers = []
        for d in daemons:
            with d.client() as c:  # warm the voice and the connection path
                for _ in range(2):
                    one_request(c, domain)
                workers.append(len(c.status()["domains"][domain]["workers"]))
        rows: list[list[dict[str, Any]]] = [[] for _ in daemons]
        for n in clients_list:
            per = max(requests_per_client, -(-min_requests // n))
            for i, d in enumerate(daemons):
                wait_quiet(quiet_s)
                rows[i].append({**burst(d, n, per, domain), "workers": workers[i]})
    for setup in rows:
        base = next((r["rps"] for r in setup if r["clients"] == 1), setup[0]["rps"])
        for r in setup:
            r["ratio"] = r["rps"] / base
    return rows


def render(title: str, rows: list[dict[str, Any]], old: dict[int, float] | None = None) -> str:
    header = ["workers", "clients", "requests", "failed", "req/s", "ratio to 1 client",
              "p50 ms", "p99 ms", "other load (cores)"]
    if old:
        header.append("ratio to 1 worker")
    out = []
    for r in rows:
        line = [r["workers"], r["clients"], r["requests"], r["errors"], f"{r['rps']:.2f}",
                f"{r['ratio']:.2f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
                f"{r['other_cores']:.2f}"]
        if old:
            line.append(f"{r['rps'] / old[r['clients']]:.2f}" if r["clients"] in old else "")
        out.append(line)
    return table(title, header, out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--compare-workers", type=int, nargs="+", metavar="N",
                    help="instead: the default config with N TTS workers, for each N (e.g. 1 2) "
                         "in the same run, bursts alternating; the first N is the baseline "
                         "of the 'ratio to 1 worker' column")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before each burst wait up to S seconds for the machine's other "
                         "load to drop below 0.3 cores (a shared machine)")
    a = ap.parse_args(argv)
    runs: list[tuple[str, str | None]] = [("default configuration", None)]
    if a.compare_workers:
        runs = [(f"default configuration, tts workers = {n}",
                 DEFAULT_WITH_TTS_WORKERS.format(workers=n)) for n in a.compare_workers]
    t0 = time.perf_counter()
    all_rows = run_many([cfg for _, cfg in runs], a.clients, a.requests,
                        quiet_s=a.wait_quiet)
    took = time.perf_counter() - t0
    results = [(title, rows) for (title, _), rows in zip(runs, all_rows)]
    old = {r["clients"]: r["rps"] for r in results[0][1]} if len(results) > 1 else None
    for i, (title, rows) in enumerate(results):
        print(render(f"TTS {title}", rows, old if i else None))
        print()
    print(f"({took:.0f} s in all; text: one short sentence per request, a fresh one each time)")
    title, rows = results[-1]
    r8 = next((r for r in rows if r["clients"] == 8), None)
    if r8 is not None:
        ok = r8["ratio"] >= 1.3 and r8["p99_ms"] <= 1000 and not r8["errors"]
        print(f"target (8 clients, {title}): req/s >= 1.3x 1 client -> {r8['ratio']:.2f}x; "
              f"p99 <= 1000 ms -> {r8['p99_ms']:.0f} ms: {'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
