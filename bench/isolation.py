"""Does the LLM stay fast while images render and speech is spoken? Built-in models, one run.

Phases:
  image alone  — image jobs back to back, nothing else (steps/min baseline)
  (a) LLM alone — chat requests, nothing else
  (b) mixed, isolation on  — chat requests while image jobs run back to back and a TTS
      request arrives every second; pinning, scheduling classes and preemption as configured
  (c) mixed, isolation off — the same load with `[resources] isolation = false`: no pinning,
      no scheduling classes, no preemption, every engine sized to all cores (what three
      separate servers would do)
Targets on 2 cores: (b)/(a) TTFT p95 <= 1.25 and tokens/s >= 0.85; image steps/min in (b)
>= 30 % of image alone. (c) is reported as measured.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Daemon, median, pct, table  # noqa: E402

PROMPTS = ["What is the capital of France?", "Name three kinds of trees.",
           "Explain what a CPU does in two sentences.", "Write a haiku about the sea.",
           "Give me a tip for learning to cook.", "Why is the sky blue?"]

CONFIG = """
[resources]
isolation = {isolation}
[domains.llm]
kind = "llm"
[domains.tts]
kind = "tts"
[domains.image]
kind = "image"
"""


class Load(threading.Thread):
    """A background client: image jobs back to back, or one TTS request per second."""

    def __init__(self, socket: str, kind: str):
        super().__init__(daemon=True)
        self.socket, self.kind = socket, kind
        self.stop = threading.Event()
        self.steps: list[float] = []   # time of every image step
        self.tts_ms: list[float] = []

    def run(self) -> None:
        from resiso_cli.client import Client
        with Client(self.socket) as c:
            n = 0
            while not self.stop.is_set():
                n += 1
                if self.kind == "image":
                    s = c.submit("image", {"prompt": f"a lighthouse {n}", "steps": 20,
                                           "width": 256, "height": 256})
                    for ev in s:
                        if ev["event"] == "progress":
                            self.steps.append(time.monotonic())
                        if self.stop.is_set() and ev["event"] == "progress":
                            c.cancel(s.task_id)
                else:
                    t0 = time.monotonic()
                    c.submit("tts", {"text": f"Reminder number {n}. Your tea is ready."}).wait()
                    self.tts_ms.append((time.monotonic() - t0) * 1000)
                    self.stop.wait(max(0.0, 1.0 - (time.monotonic() - t0)))


def chat(client, rounds: int, think_s: float) -> tuple[list[float], list[float]]:
    ttft, tps = [], []
    for i in range(rounds):
        t0 = time.perf_counter()
        first = last = None
        n = 0
        for ev in client.submit("llm", {"prompt": PROMPTS[i % len(PROMPTS)], "temperature": 0,
                                        "max_tokens": 64}):
            if ev["event"] == "token":
                last = time.perf_counter()
                first = first or last
                n += 1
        ttft.append((first - t0) * 1000)
        tps.append((n - 1) / (last - first))
        time.sleep(think_s)
    return ttft, tps


def rate(steps: list[float], t0: float, t1: float) -> float:
    return sum(t0 <= s <= t1 for s in steps) / (t1 - t0) * 60


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--think", type=float, default=0.3, help="pause between chat requests")
    ap.add_argument("--image-alone-s", type=float, default=20.0)
    a = ap.parse_args()
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    results = {}
    with Daemon(CONFIG.format(isolation="true")) as d:
        with d.client() as c:
            chat(c, 2, 0)  # warm up
            results["a"] = chat(c, a.rounds, a.think)
        img = Load(d.socket, "image")
        img.start()
        time.sleep(3)
        t0 = time.monotonic()
        time.sleep(a.image_alone_s)
        alone = rate(img.steps, t0, time.monotonic())
        tts = Load(d.socket, "tts")
        tts.start()
        t0 = time.monotonic()
        with d.client() as c:
            results["b"] = chat(c, a.rounds, a.think)
            mixed = rate(img.steps, t0, time.monotonic())
            preempt = c.status()["domains"]["image"]["preemptions"]
        img.stop.set()
        tts.stop.set()
        img.join(30)
        tts.join(30)
        tts_b = tts.tts_ms
    with Daemon(CONFIG.format(isolation="false")) as d:
        with d.client() as c:
            chat(c, 2, 0)
        img, tts = Load(d.socket, "image"), Load(d.socket, "tts")
        img.start()
        tts.start()
        time.sleep(3)
        t0 = time.monotonic()
        with d.client() as c:
            results["c"] = chat(c, a.rounds, a.think)
        mixed_off = rate(img.steps, t0, time.monotonic())
        img.stop.set()
        tts.stop.set()
        img.join(30)
        tts.join(30)
        tts_c = tts.tts_ms
    (ta, sa), (tb, sb), (tc, sc) = results["a"], results["b"], results["c"]
    rows = [
        ["(a) LLM alone", pct(ta, .5), pct(ta, .95), median(sa), "1.00", "1.00", "-", "-"],
        ["(b) mixed, isolation on", pct(tb, .5), pct(tb, .95), median(sb),
         f"{pct(tb, .95) / pct(ta, .95):.2f}", f"{median(sb) / median(sa):.2f}",
         f"{mixed:.0f} ({mixed / alone:.0%})", f"{median(tts_b):.0f}"],
        ["(c) mixed, isolation off", pct(tc, .5), pct(tc, .95), median(sc),
         f"{pct(tc, .95) / pct(ta, .95):.2f}", f"{median(sc) / median(sa):.2f}",
         f"{mixed_off:.0f} ({mixed_off / alone:.0%})", f"{median(tts_c):.0f}"],
    ]
    print(table(f"LLM under load ({os.cpu_count()} CPUs; image alone: {alone:.0f} steps/min "
                f"at 256x256; {a.rounds} chats of 64 tokens each)",
                ["setup", "TTFT p50 ms", "TTFT p95 ms", "tok/s p50", "TTFT p95 / (a)",
                 "tok/s / (a)", "image steps/min (vs alone)", "TTS p50 ms"], rows))
    print(f"\nimage preemptions in (b): {preempt}")
    print(f"targets: (b)/(a) TTFT p95 <= 1.25 -> {pct(tb, .95) / pct(ta, .95):.2f}; "
          f"tok/s >= 0.85 -> {median(sb) / median(sa):.2f}; image in (b) >= 30% of alone -> "
          f"{mixed / alone:.0%}")


if __name__ == "__main__":
    main()
