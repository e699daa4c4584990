"""Continuous batching in the llama.cpp engine, through the real daemon and its workers:
several chat jobs decode together in one worker, each as it would alone."""
from __future__ import annotations

import os
import signal
import pytest

from .conftest import wait_for

BATCH_CONFIG = """
[daemon]
heartbeat_ms = 200
[domains.llm]
kind = "llm"
context_size = 512
parallel = 4
"""

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain gravity in one sentence.", "List three fruits."]


def ask(prompt: str, **kw):
    # the last prompt is sampled with a seed: a seeded answer, too, is the same alone and
    # batched (each sequence has its own sampler state)
    sampling = {"temperature": 0.9, "seed": 11} if prompt == PROMPTS[-1] else \
        {"temperature": 0}
    return {"prompt": prompt, "max_tokens": 48, **sampling, **kw}


@pytest.fixture(scope="module")
def batch_daemon(make_module_daemon):
    return make_module_daemon(BATCH_CONFIG)


@pytest.fixture(scope="module")
def solo(batch_daemon):
    """Each prompt's greedy answer, run alone."""
    out = {}
    with batch_daemon.client() as c:
        for p in PROMPTS:
            out[p] = c.submit("llm", ask(p)).wait()
    assert all(r["status"] == "completed" for r in out.values())
    return out


def worker(daemon) -> dict:
    (w,) = daemon.status()["domains"]["llm"]["workers"]
    return w


def test_the_worker_reports_its_places(batch_daemon):
    w = worker(batch_daemon)
    assert w["capacity"] == 4 and w["jobs"] == [] and w["bumped"] == 0
    out = batch_daemon.cli("status").stdout.decode()
    (line,) = [ln for ln in out.splitlines() if ln.startswith("llm.0 ")]
    assert " 0/4 " in line, line


def test_batched_greedy_and_seeded_answers_equal_solo_ones_token_for_token(batch_daemon, solo):
    most = 0
    with batch_daemon.client() as c:
        streams = {p: c.submit("llm", ask(p)) for p in PROMPTS}
        tokens = {p: [] for p in PROMPTS}
        # the four run in the one worker at once
        while most < len(PROMPTS) and len(worker(batch_daemon)["jobs"]) > 0:
            most = max(most, len(worker(batch_daemon)["jobs"]))
        finals = {}
        for p, s in streams.items():
            for ev in s:
                if ev["event"] == "token":
                    tokens[p].append(ev["text"])
                elif ev["event"] == "result":
                    finals[p] = ev
    assert most >= 2, "the jobs never ran side by side"
    for p in PROMPTS:
        assert finals[p]["result"] == solo[p]["result"], p
        assert finals[p]["result"].isprintable() or "\n" in finals[p]["result"]
        assert "\x00" not in finals[p]["result"] and "\ufffd" not in finals[p]["result"]
        assert finals[p]["completion_tokens"] == solo[p]["completion_tokens"]
        assert "".join(tokens[p]) == finals[p]["result"]


def test_cancel_and_deadline_of_one_sequence_leave_the_others(batch_daemon, solo):
    with batch_daemon.client() as c:
        keep = [c.submit("llm", ask(p)) for p in PROMPTS[:2]]
        victim = c.submit("llm", ask(PROMPTS[2], max_tokens=400))
        late = c.submit("llm", ask("Write a long story about a lighthouse.", max_tokens=400),
                        timeout_ms=700)
        tid = victim.accepted["task_id"]
        for ev in victim:
            if ev["event"] == "token":
                break
        assert c.cancel(tid)["status"] in ("cancelled", "cancelling")
        assert victim.wait()["event"] == "cancelled"
        timed_out = late.wait()
        assert timed_out["event"] == "error" and timed_out["code"] == "timeout", timed_out
        for p, s in zip(PROMPTS[:2], keep):
            assert s.wait()["result"] == solo[p]["result"]
    assert worker(batch_daemon)["jobs"] == []


def test_a_realtime_job_takes_the_place_of_a_batch_job(batch_daemon, solo):
    long = ask(PROMPTS[0], max_tokens=300)
    with batch_daemon.client() as c:
        batch = [c.submit("llm", {**long, "prompt": f"{p} Say more."}, priority="batch")
                 for p in PROMPTS]
        wait_for(lambda: len(worker(batch_daemon)["jobs"]) == 4, 30, 0.05, "4 running")
        rt = c.submit("llm", ask(PROMPTS[1]), priority="realtime")
        seen_bumped = 0
        for _ in rt:
            seen_bumped = max(seen_bumped, worker(batch_daemon)["bumped"])
        final = rt.final
        assert final["result"] == solo[PROMPTS[1]]["result"]
        assert seen_bumped == 1
        # the bumped job paused, resumed and finished like the others
        events = {}
        for s in batch:
            events[s.accepted["task_id"]] = [ev["event"] for ev in s]
        paused = [t for t, evs in events.items() if "paused" in evs]
        assert len(paused) == 1
        evs = events[paused[0]]
        assert evs.index("paused") < evs.index("resumed") < evs.index("result")
        assert all(evs[-1] == "result" for evs in events.values())


def test_a_worker_crash_retries_every_sequence_it_held(batch_daemon, solo):
    with batch_daemon.client() as c:
        streams = {p: c.submit("llm", ask(p), partials=False) for p in PROMPTS}
        wait_for(lambda: len(worker(batch_daemon)["jobs"]) == 4, 30, 0.02, "4 running")
        os.kill(worker(batch_daemon)["pid"], signal.SIGKILL)
        finals = {p: s.wait() for p, s in streams.items()}
        for p, final in finals.items():
            assert final["status"] == "completed", final
            assert final["result"] == solo[p]["result"]
            assert c.get(final["task_id"])["attempts"] == 2
