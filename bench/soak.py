"""Soak: mixed load on the built-in models for a bounded time, with faults thrown in.

Load, each from its own client thread:
  chat      LLM requests (16 tokens, greedy), back to back
  speech    a TTS request every second
  images    small image jobs, back to back
  cancels   image jobs cancelled after a random delay
  vanish    LLM requests whose client closes its socket without reading
  nulls     null jobs that append their task id to a record file when they complete
  killer    a SIGKILL to a random worker every minute
At the end every accepted job is looked up:
  lost        accepted, but not in a finished state once the load stopped and drained
  duplicated  a null job recorded as completed more than once
Also reported: daemon and worker RSS at start (after a warm-up that fills the job table to
its 10,000 finished jobs) and at the end, and the longest loop iteration.
Targets: 0 lost, 0 duplicated, daemon RSS growth <= 10 %, longest loop iteration <= 100 ms.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Daemon, table  # noqa: E402

from resiso_cli.client import Client, Rejected  # noqa: E402
from resisod import isolation  # noqa: E402

CONFIG = """
[daemon]
result_ttl_hours = {ttl}
[domains.llm]
kind = "llm"
[domains.tts]
kind = "tts"
[domains.image]
kind = "image"
[domains.null]
kind = "null"
workers = 1
max_queue = 1000
"""
FINAL = {"completed", "failed", "cancelled"}


def rss_mb(pid: int) -> float:
    return isolation.rss_mb(pid) or 0.0


class Ledger:
    """Every job the soak got accepted, and what its client saw."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted: dict[str, str] = {}            # task id -> load name
        self.seen = collections.Counter()             # (load, final event/code)
        self.rejected = collections.Counter()         # refused at submit, by code

    def add(self, task_id: str | None, load: str) -> None:
        if task_id:
            with self.lock:
                self.accepted[task_id] = load

    def final(self, load: str, ev: dict) -> None:
        with self.lock:
            self.seen[(load, ev.get("code") or ev["event"])] += 1

    def refused(self, exc: Rejected) -> None:
        with self.lock:
            self.rejected[exc.code] += 1


def loop(stop: threading.Event, sock: str, ledger: Ledger, name: str, body) -> None:
    with Client(sock) as c:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                body(c, n)
            except Rejected as exc:
                ledger.refused(exc)
                time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0)
    a = ap.parse_args()
    record = tempfile.mktemp(prefix="rs-soak-", suffix=".log", dir="/tmp")
    ledger = Ledger()
    stop = threading.Event()
    rng = random.Random(7)
    # results outlive the soak, so every accepted job can be looked up at the end
    with Daemon(CONFIG.format(ttl=a.minutes / 60 + 1)) as d, d.client() as ctl:
        sock = d.socket

        def chat(c, n):
            s = c.submit("llm", {"prompt": f"Count to {n % 9 + 2}.", "max_tokens": 16,
                                 "temperature": 0})
            ledger.add(s.task_id, "chat")
            ledger.final("chat", s.wait())

        def speech(c, n):
            s = c.submit("tts", {"text": f"Sentence number {n}."})
            ledger.add(s.task_id, "speech")
            ledger.final("speech", s.wait())
            time.sleep(1.0)

        def images(c, n):
            s = c.submit("image", {"prompt": f"a lighthouse {n}", "steps": 4, "width": 64,
                                   "height": 64})
            ledger.add(s.task_id, "images")
            ledger.final("images", s.wait())

        def cancels(c, n):
            s = c.submit("image", {"prompt": f"a forest {n}", "steps": 30, "width": 64,
                                   "height": 64})
            ledger.add(s.task_id, "cancels")
            time.sleep(rng.uniform(0.0, 1.5))
            c.cancel(s.task_id)
            ledger.final("cancels", s.wait())

        def vanish(c, n):
            with Client(sock) as gone:
                s = gone.submit("llm", {"prompt": "Tell me a long story.", "max_tokens": 64})
                ledger.add(s.task_id, "vanish")
            time.sleep(2.0)

        def nulls(c, n):
            s = c.submit("null", {"steps": 2, "delay_ms": 5, "record": record},
                         partials=False)
            ledger.add(s.task_id, "nulls")
            ledger.final("nulls", s.wait())

        def killer(c, n):
            for _ in range(60):
                if stop.is_set():
                    return
                time.sleep(1.0)
            workers = [w for dom in c.status()["domains"].values() for w in dom["workers"]
                       if w["pid"] and w["state"] in ("ready", "busy")]
            if workers:
                victim = rng.choice(workers)
                try:
                    os.kill(victim["pid"], signal.SIGKILL)
                    ledger.final("killer", {"event": victim["name"]})
                except ProcessLookupError:
                    pass

        loads = {"chat": chat, "speech": speech, "images": images, "cancels": cancels,
                 "vanish": vanish, "nulls": nulls, "killer": killer}
        threads = [threading.Thread(target=loop, args=(stop, sock, ledger, name, body),
                                    daemon=True, name=name) for name, body in loads.items()]
        start = time.monotonic()
        raw_rss = rss_mb(d.proc.pid)
        for t in threads:
            t.start()
        # warm-up: until the job table holds its 10,000 finished jobs (or half the soak)
        while time.monotonic() - start < a.minutes * 30 and len(ledger.accepted) < 10500:
            time.sleep(1.0)
        warm_s, warm_jobs = time.monotonic() - start, len(ledger.accepted)
        rss0 = rss_mb(d.proc.pid)
        w_rss0 = {w["name"]: w["rss_mb"] for dom in ctl.status()["domains"].values()
                  for w in dom["workers"]}
        while time.monotonic() - start < a.minutes * 60:
            time.sleep(5.0)
        stop.set()
        for t in threads:
            t.join(300)
        # let what is still queued or running finish before counting
        deadline = time.monotonic() + 300
        states = {}
        while time.monotonic() < deadline:
            states = {}
            for task_id in list(ledger.accepted):
                try:
                    states[task_id] = ctl.get(task_id)
                except Rejected as exc:
                    states[task_id] = {"status": "missing:" + exc.code}
            if all(s["status"] in FINAL for s in states.values()):
                break
            time.sleep(2.0)
        st = ctl.status()
        rss1 = rss_mb(d.proc.pid)
        with open(d.log.name, errors="replace") as f:  # the daemon names each stall's phase
            stalls = [line.strip() for line in f if "loop iteration took" in line]
        w_rss1 = {w["name"]: w["rss_mb"] for dom in st["domains"].values()
                  for w in dom["workers"]}
    lost = [t for t, s in states.items() if s["status"] not in FINAL]
    with open(record) as f:
        runs = collections.Counter(line.strip() for line in f if line.strip())
    os.unlink(record)
    dup = [t for t, k in runs.items() if k > 1]
    by_code = collections.Counter()
    for s in states.values():
        by_code[s["status"] if s["status"] != "failed" else
                "failed:" + (s.get("error") or {}).get("code", "?")] += 1
    print(table(f"soak: {a.minutes:g} min, built-in models + null, faults on "
                f"({os.cpu_count()} CPUs)", ["measure", "value"], [
        ["jobs accepted", len(states)],
        *[[f"  ended {k}", v] for k, v in sorted(by_code.items())],
        ["refused at submit", ", ".join(f"{k} {v}" for k, v in ledger.rejected.items()) or 0],
        ["workers killed", sum(v for (ld, _), v in ledger.seen.items() if ld == "killer")],
        ["lost (target 0)", len(lost)],
        ["duplicated (target 0)", len(dup)],
        ["warm-up", f"{warm_s:.0f} s, {warm_jobs} jobs"],
        ["daemon RSS MB: at launch / after warm-up / end", f"{raw_rss:.1f} / {rss0:.1f} / "
                                                           f"{rss1:.1f}"],
        ["daemon RSS growth after warm-up (target <= 10 %)",
         f"{(rss1 - rss0) / rss0 * 100:+.1f} %"],
        ["longest loop iteration ms (target <= 100)", st["loop"]["max_iteration_ms"]],
        ["loop iterations over 100 ms", st["loop"]["stalls"]],
        *[[f"worker {n} RSS MB start / end", f"{(w_rss0.get(n) or 0):.0f} / {(r or 0):.0f}"]
          for n, r in sorted(w_rss1.items())],
    ]))
    for line in stalls[:20]:
        print("stall:", line)
    if lost:
        print("lost:", lost[:20])
    if dup:
        print("duplicated:", dup[:20])


if __name__ == "__main__":
    main()
