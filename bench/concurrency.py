"""Many users at once: N chat requests sent together, and N speech clients, same run.

LLM: the built-in SmolLM2 on one worker with one thread (its own core), greedy, 64 tokens
per request, every prompt unique (so no answer is served from a cache, while the chat
template's own system prompt stays shared, as it is in real use). Each request is a client
of its own, in its own thread; TTFT is submit -> first token as that client sees it.

Sections, each with its baseline measured in the same run:
1. N = 1, 4, 8, 16 at once, on a batching worker (`parallel`, default 8 like llama-server's
   `-np 8`) and on a worker that runs one sequence at a time (`parallel = 1`).
2. N = 8 requests sharing a 200-token system prompt vs 8 with distinct 200-token ones.
3. One realtime request while 8 batch-priority ones fill the places, vs the same request
   alone.
4. TTS: N clients with distinct texts (bench/concurrency_tts.py).

Targets (issue 16): N = 8 TTFT max <= 3x N = 1 TTFT, aggregate tok/s >= 1.1x N = 1; shared
prefix TTFT p50 <= 0.5x distinct; realtime TTFT under load <= 2x alone; TTS 8 clients
req/s >= 1.3x one client and p99 <= 1.0 s.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Client, Daemon, median, pct, table  # noqa: E402

SUBJECTS = ["a lighthouse keeper", "a lost robot", "a mountain village", "a clockmaker",
            "a river pirate", "a desert caravan", "a night train", "an old library",
            "a painter in Paris", "a tiny dragon", "a space station", "a jazz drummer",
            "a snowy forest", "a market in Marrakesh", "a deep-sea diver", "a retired spy"]
TOPICS = ["astronomy", "cooking", "gardening", "sailing", "chess", "photography", "beekeeping",
          "archery", "pottery", "cycling", "origami", "birdwatching", "fencing", "knitting",
          "surfing", "calligraphy"]
_unique = itertools.count(1)

CONFIG = """
[daemon]
heartbeat_ms = 500
[domains.llm]
kind = "llm"
model = "builtin:smollm2-135m-instruct"
priority = "realtime"
context_size = 1024
max_tokens_limit = 1024
threads = 1
parallel = {parallel}
"""


def story(subject: str) -> dict:
    # a unique number per request: no stream holds the whole prompt from an earlier one
    return {"prompt": f"Story {next(_unique)}: write a long story about {subject}.",
            "temperature": 0, "max_tokens": 64}


def system_prompt(topic: str) -> str:
    """About 200 tokens of instructions on `topic`."""
    lines = [f"You are a patient tutor of {topic}. Answer in plain words, one step at a time.",
             f"Begin with what a beginner in {topic} most often gets wrong, then explain why.",
             "Use short sentences. Give one concrete example from everyday life.",
             "Do not use lists or headings. Do not repeat the question.",
             f"If the question is not about {topic}, say so politely and answer briefly.",
             "Never invent facts; when unsure, say what a learner could check.",
             f"Mention one tool or material a student of {topic} needs and what it costs.",
             "Keep a warm tone, like a friend who knows the subject well.",
             "End with one question the learner can think about before the next lesson.",
             f"Remember that most students of {topic} practise in the evening after work."]
    return " ".join(lines)


def with_system(system: str, question: str) -> dict:
    return {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": f"{next(_unique)}. {question}"}],
            "temperature": 0, "max_tokens": 64}


def burst(sock: str, requests: list[tuple[dict, str]],
          decoding: threading.Semaphore | None = None) -> list[dict]:
    """Send all requests at once, each from its own client; per-request timings.
    `decoding` is released once per request at its first token."""
    out: list[dict] = [{} for _ in requests]
    barrier = threading.Barrier(len(requests) + 1)

    def one(i: int, params: dict, priority: str) -> None:
        with Client(sock, timeout=600) as c:
            barrier.wait()
            t0 = time.perf_counter()
            first = last = None
            for ev in c.submit("llm", params, priority=priority):
                if ev["event"] == "token":
                    last = time.perf_counter()
                    if first is None and decoding is not None:
                        decoding.release()
                    first = first or last
                elif ev["event"] == "result":
                    out[i] = {"t0": t0, "ttft": first - t0, "end": last,
                              "tokens": ev["completion_tokens"],
                              "tps": (ev["completion_tokens"] - 1) / (last - first)
                              if last > first else 0.0}
                elif ev["event"] in ("error", "cancelled"):
                    raise RuntimeError(ev)

    threads = [threading.Thread(target=one, args=(i, p, pr)) for i, (p, pr) in
               enumerate(requests)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    return out


def summary(runs: list[dict]) -> dict:
    start = min(r["t0"] for r in runs)
    end = max(r["end"] for r in runs)
    ttft = [r["ttft"] for r in runs]
    return {"agg": sum(r["tokens"] for r in runs) / (end - start),
            "ttft_p50": median(ttft), "ttft_p95": pct(ttft, 0.95), "ttft_max": max(ttft),
            "tps_p50": median([r["tps"] for r in runs]),
            "tokens": sum(r["tokens"] for r in runs)}


def warm(sock: str) -> None:
    # the chat template's system prompt enters the streams, as after any first request
    burst(sock, [(story(s), "normal") for s in SUBJECTS[:2]])


def same_story(n: int) -> list[tuple[dict, str]]:
    """N copies of one request (a new one per burst): what a simple load generator sends."""
    params = story(SUBJECTS[0])
    return [(dict(params), "normal") for _ in range(n)]


def section_same(n: int, parallel: int, reps: int) -> list[list]:
    """N identical requests at once on a fresh daemon, N = 1 first."""
    rows = []
    for label, par in ((f"batched (parallel {parallel})", parallel), ("one at a time", 1)):
        with Daemon(CONFIG.format(parallel=par)) as d:
            cold = summary(burst(d.socket, same_story(1)))
            s = {k: median([x[k] for x in [summary(burst(d.socket, same_story(n)))
                                           for _ in range(reps)]]) for k in cold}
            rows.append([label, n, round(s["agg"], 1), round(cold["ttft_p50"] * 1000),
                         round(s["ttft_max"] * 1000), round(s["ttft_max"] / cold["ttft_p50"], 2)])
    return rows


def section_n(ns: list[int], parallel: int, reps: int) -> list[list]:
    """Each worker kind on a fresh daemon, N = 1 first, as llama-server's anchor was taken
    on a fresh server: that first request also reads the chat template's system prompt,
    which every later one finds in a stream. Both baselines are printed: TTFT max over the
    first (cold) N = 1 TTFT, and over the later (warm) N = 1 TTFT."""
    rows = []
    for label, par in ((f"batched (parallel {parallel})", parallel), ("one at a time", 1)):
        with Daemon(CONFIG.format(parallel=par)) as d:
            cold = summary(burst(d.socket, [(story(SUBJECTS[0]), "normal")]))
            base = None
            for n in ns:
                sums = [summary(burst(d.socket, [(story(SUBJECTS[i % len(SUBJECTS)]),
                                                  "normal") for i in range(n)]))
                        for _ in range(reps)]
                s = {k: median([x[k] for x in sums]) for k in sums[0]}
                if n == 1:
                    base = s
                rows.append([label, n, s["tokens"], round(s["agg"], 1),
                             round(s["agg"] / base["agg"], 2),
                             round(s["ttft_p50"] * 1000), round(s["ttft_p95"] * 1000),
                             round(s["ttft_max"] * 1000),
                             round(s["ttft_max"] / cold["ttft_p50"], 2),
                             round(s["ttft_max"] / base["ttft_p50"], 2),
                             round(s["tps_p50"], 1)])
            rows.append([label, "1 (first)", cold["tokens"], round(cold["agg"], 1), "",
                         round(cold["ttft_p50"] * 1000), "", "", "", "",
                         round(cold["tps_p50"], 1)])
    return rows


def section_prefix(parallel: int, reps: int) -> list[list]:
    rows = []
    with Daemon(CONFIG.format(parallel=parallel)) as d:
        warm(d.socket)
        shared_sys = system_prompt("astronomy")
        results = {"shared": [], "distinct": []}
        for _ in range(reps):  # interleaved, so machine noise hits both alike
            results["distinct"].append(summary(burst(d.socket, [
                (with_system(system_prompt(TOPICS[(i + 1) % len(TOPICS)]) +
                             f" Session {next(_unique)}.", "What should I learn first?"),
                 "normal") for i in range(8)])))
            results["shared"].append(summary(burst(d.socket, [
                (with_system(shared_sys, "What should I learn first?"), "normal")
                for _ in range(8)])))
        base = median([r["ttft_p50"] for r in results["distinct"]])
        for label in ("distinct", "shared"):
            p50 = median([r["ttft_p50"] for r in results[label]])
            rows.append([f"8 x {label} 200-token system prompt", round(p50 * 1000),
                         round(median([r["ttft_max"] for r in results[label]]) * 1000),
                         round(p50 / base, 2)])
    return rows


def section_priority(parallel: int, reps: int) -> list[list]:
    with Daemon(CONFIG.format(parallel=parallel)) as d:
        warm(d.socket)
        alone, loaded = [], []
        for _ in range(reps):
            alone.append(burst(d.socket, [(story("a quiet harbour"), "realtime")])[0]["ttft"])
            decoding = threading.Semaphore(0)
            sender = threading.Thread(target=burst, args=(d.socket, [
                ({**story(SUBJECTS[i]), "max_tokens": 200}, "batch")
                for i in range(parallel)], decoding))
            sender.start()
            for _ in range(parallel):  # every place holds a batch job past its prompt
                decoding.acquire()
            time.sleep(0.2)
            loaded.append(burst(d.socket, [(story("a quiet harbour"), "realtime")])[0]["ttft"])
            sender.join()
        a, b = median(alone), median(loaded)
        return [["realtime alone", round(a * 1000), "1.00"],
                [f"realtime with {parallel} batch jobs decoding", round(b * 1000),
                 f"{b / a:.2f}"]]


def main() -> None:
    # the load generator stays off the LLM worker's core (the daemon's auto layout gives the
    # LLM core 0), as a user's client on another machine or core would: its N receiving
    # threads must not take time from the decode being measured
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1:
        os.sched_setaffinity(0, cores[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2, help="bursts per point (median)")
    ap.add_argument("--only", choices=["n", "same", "prefix", "priority", "tts"], nargs="+")
    args = ap.parse_args()
    only = set(args.only or ["n", "same", "prefix", "priority", "tts"])
    if "n" in only:
        print(table("LLM: N requests at once (64 tokens each, greedy, 1 thread)",
                    ["worker", "N", "tokens", "aggregate tok/s", "x N=1", "TTFT p50 ms",
                     "TTFT p95 ms", "TTFT max ms", "TTFT max / first", "TTFT max / N=1",
                     "per-request tok/s"],
                    section_n(args.ns, args.parallel, args.reps)), flush=True)
    if "same" in only:
        print(table("LLM: N copies of one request at once (as simple load generators send)",
                    ["worker", "N", "aggregate tok/s", "first TTFT ms", "TTFT max ms",
                     "TTFT max / first"],
                    section_same(8, args.parallel, args.reps)), flush=True)
    if "prefix" in only:
        print(table("LLM: 8 at once with a 200-token system prompt",
                    ["load", "TTFT p50 ms", "TTFT max ms", "p50 / distinct"],
                    section_prefix(args.parallel, args.reps + 1)), flush=True)
    if "priority" in only:
        print(table("LLM: a realtime request among batch-priority ones",
                    ["request", "TTFT p50 ms", "x alone"],
                    section_priority(args.parallel, args.reps + 3)), flush=True)
    if "tts" in only:
        os.sched_setaffinity(0, cores)  # speech alone: the clients float, as users' would
        import concurrency_tts
        concurrency_tts.main([])


if __name__ == "__main__":
    main()
