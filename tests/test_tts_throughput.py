"""Concurrent speech: the default TTS domain runs requests side by side in several Piper
workers, each with one onnxruntime thread, and every request still streams its audio one
chunk per sentence. The mechanism is checked here, not the speed (bench/concurrency_tts.py)."""
from __future__ import annotations

import array
import math
import os
import threading
import time
import wave

import pytest

from .conftest import wait_for

DEFAULT_TTS = """
[daemon]
heartbeat_ms = 200
[domains.tts]
kind = "tts"
"""


def test_default_layout_gives_the_speech_workers_a_core_each():
    from resisod import config, isolation
    cfg = config.build({})
    tts = cfg["domains"]["tts"]
    assert tts["workers"] >= 2 and tts["threads"] == 1
    layout = isolation.auto_layout(cfg["domains"], [0, 1])
    # two workers on two cores: they float over both (the LLM's core too), one thread each
    assert layout["tts"] == [0, 1] and layout["llm"] == [0]
    assert layout["tts-zh"] == [1] and layout["image"] == [1]
    assert isolation.thread_count(tts, layout["tts"], 0) == 1
    # ... but the first, which takes a lone request, keeps off the LLM's core
    assert [isolation.worker_cpus(cfg["domains"], layout, "tts", i) for i in (0, 1)] == \
        [[1], [0, 1]]
    assert isolation.worker_cpus(cfg["domains"], layout, "llm", 0) == [0]
    # enough batch cores: the speech workers stay off the LLM's
    layout = isolation.auto_layout(cfg["domains"], [0, 1, 2, 3])
    assert layout["llm"] == [0, 1] and layout["tts"] == [2, 3]
    # one worker (the old setup) keeps to the batch core
    one = config.build({"domains": {"llm": {}, "tts": {"workers": 1}}})
    assert isolation.auto_layout(one["domains"], [0, 1])["tts"] == [1]
    assert one["domains"]["tts"]["threads"] == 1


def speak(client, text: str) -> tuple[list[dict], dict]:
    audio, final = [], None
    for ev in client.submit("tts", {"text": text}):
        if ev["event"] == "audio":
            audio.append(ev)
        elif ev["event"] == "result":
            final = ev
        else:
            assert ev["event"] not in ("error", "cancelled"), ev
    assert final is not None
    return audio, final


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
def test_concurrent_requests_run_in_several_workers(make_daemon):
    d = make_daemon(DEFAULT_TTS)
    # the domain is ready once any worker is: wait for all, or every request lands on one
    def all_ready():
        ws = d.status()["domains"]["tts"]["workers"]
        return ws if all(w["state"] == "ready" for w in ws) else None
    workers = wait_for(all_ready, 120, 0.1, "every tts worker ready")
    assert len(workers) >= 2
    assert all(w["threads"] == 1 for w in workers)
    assert len({c for w in workers for c in w["cpus"]}) >= 2
    with d.client() as c:
        speak(c, "Warm up.")

    busy_at_once: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        with d.client() as c:
            while not done.is_set():
                ws = c.status()["domains"]["tts"]["workers"]
                busy = {w["name"] for w in ws if w["job"]}
                if len(busy) > len(busy_at_once):
                    busy_at_once.clear()
                    busy_at_once.update(busy)
                time.sleep(0.01)

    texts = [f"Request {i} starts the day early. It ends with number {i * 7} tonight."
             for i in range(6)]
    results: dict[int, tuple[list[dict], dict]] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with d.client() as c:
                results[i] = speak(c, texts[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(texts))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        done.set()
        watcher.join(10)
    assert not errors, errors[0]
    assert len(results) == len(texts)
    # more than one worker had a job at the same moment
    assert len(busy_at_once) >= 2, busy_at_once

    for i, (audio, final) in results.items():
        # sentence streaming is kept: one audio event per sentence, in order
        assert final["cached"] is False and final["chunks"] == 2
        assert [ev["index"] for ev in audio] == [0, 1]
        assert all(ev["sample_rate"] == 22050 and len(ev["pcm"]) > 2000 for ev in audio)
        pcm = b"".join(ev["pcm"] for ev in audio)
        with wave.open(final["audio_path"], "rb") as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 22050)
            assert w.readframes(w.getnframes()) == pcm  # the file is what was streamed
        seconds = len(pcm) / 2 / 22050
        assert 1.5 <= seconds <= 12 and abs(final["duration_ms"] / 1000 - seconds) < 0.01
        samples = array.array("h", pcm)
        assert math.sqrt(sum(s * s for s in samples) / len(samples)) > 300  # speech

    # both workers stay healthy and the domain settles back to idle
    wait_for(lambda: all(not w["job"] and w["state"] == "ready"
                         for w in d.status()["domains"]["tts"]["workers"]),
             30, 0.1, "tts workers idle")
    assert all(w["restarts"] == 0 for w in d.status()["domains"]["tts"]["workers"])
