"""Continuous batching in the transformers LLM engine: the engine in-process (the real class on
a tiny real model), and the same through a real daemon and its worker."""
from __future__ import annotations

import time

import pytest

from .engine_steps import control, drain, tiny_llama

PROMPTS = ["Hello there", "Tell me a story about a dragon and a knight", "2+2?",
           "What is the capital of France? Answer in one sentence."]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_llama(tmp_path_factory)


def params(prompt, **kw):
    p = {"prompt": prompt, "max_tokens": 24, "temperature": 0.0, "top_p": 0.95, "top_k": 40,
         "seed": None, "stop": []}
    p.update(kw)
    return p


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    from resisod.engines.base import EngineContext
    from resisod.engines.transformers_llm import TransformersEngine
    state = tmp_path_factory.mktemp("state")
    domain = {"model": tiny_model, "dtype": "auto", "context_size": 256, "parallel": 4,
              "engine": "transformers", "kind": "llm"}
    ctx = EngineContext(domain_name="hf", state_dir=str(state),
                        results_dir=str(state / "results"), device="cpu", threads=2,
                        gpu_share=1.0)
    e = TransformersEngine(domain, ctx)
    e.load()
    assert e.capacity == 4
    return e


def alone(engine, p):
    events, out = {}, {}
    engine.add(p, control("solo", events))
    drain(engine, out)
    return out["solo"]


def test_parallel_slots():
    from resisod.engines.llm_common import parallel_slots
    assert parallel_slots({"parallel": 0}, "cpu") == 4
    assert parallel_slots({"parallel": 0}, "cuda") == 16
    assert parallel_slots({"parallel": 3}, "cuda") == 3


def test_batched_equals_alone_in_process(engine):
    jobs = [params(p) for p in PROMPTS[:3]] + [params(PROMPTS[3], temperature=0.8, seed=7)]
    solo = [alone(engine, p) for p in jobs]
    events, out = {}, {}
    for i, p in enumerate(jobs):
        engine.add(p, control(str(i), events))
    assert engine.jobs() == 4
    steps = drain(engine, out)
    assert steps == 24  # one token per job per step: all four decoded together
    for i, s in enumerate(solo):
        assert out[str(i)]["result"] == s["result"]
        assert out[str(i)]["completion_tokens"] == s["completion_tokens"] == 24
        streamed = "".join(f["text"] for e, f in events[str(i)] if e == "token")
        assert streamed == out[str(i)]["result"]
    assert engine.jobs() == 0


def test_join_cancel_pause_in_process(engine):
    from resisod.engines.base import Cancelled
    jobs = [params(p) for p in PROMPTS[:3]]
    solo = [alone(engine, p)["result"] for p in jobs]
    events, out = {}, {}
    a, b, c = (control(n, events) for n in "abc")
    engine.add(jobs[0], a)
    engine.add(jobs[1], b)

    def hook(step):
        if step == 3:
            engine.add(jobs[2], c)  # joins running jobs
        if step == 5:
            b.cancel()
        if step == 6:
            a.pause()
        if step == 9:
            assert events["a"][-1][0] == "paused"  # no token since
            a.resume()

    drain(engine, out, hook)
    assert isinstance(out["b"], Cancelled)
    assert out["a"]["result"] == solo[0] and out["c"]["result"] == solo[2]
    kinds = [e for e, _ in events["a"] if e != "token"]
    assert kinds == ["paused", "resumed"]
    assert engine.jobs() == 0


def test_stop_and_overflow_in_process(engine):
    from resisod.engines.base import JobError
    full = alone(engine, params(PROMPTS[0]))["result"]
    stop = full[5:9]
    r = alone(engine, params(PROMPTS[0], stop=[stop]))
    assert r["finish_reason"] == "stop" and r["result"] == full[:full.index(stop)]
    with pytest.raises(JobError) as exc:
        engine.add(params("word " * 400), control("big", {}))
    assert exc.value.code == "context_overflow"


HF_CONFIG = """
[daemon]
heartbeat_ms = 200
[domains.hf]
kind = "llm"
engine = "transformers"
model = "{model}"
context_size = 256
parallel = 4
workers = 1
"""


def test_daemon_batches_and_cancels(make_daemon, tiny_model):
    d = make_daemon(HF_CONFIG.format(model=tiny_model))
    st = d.status()["domains"]["hf"]
    assert st["state"] == "ready", st["reason"]
    jobs = [{"prompt": p, "temperature": 0, "max_tokens": 24} for p in PROMPTS]
    with d.client() as c:
        solo = [c.submit("llm", p).wait()["result"] for p in jobs]
        streams = [c.submit("llm", p) for p in jobs]
        peak = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = [c.get(s.task_id)["status"] for s in streams]
            peak = max(peak, states.count("running"))
            if all(st not in ("queued", "running") for st in states):
                break
            time.sleep(0.02)
        finals = [s.wait() for s in streams]
        assert [f["result"] for f in finals] == solo

        # cancel one of three running jobs: the other two complete normally
        long = [{"prompt": p, "temperature": 0, "max_tokens": 400} for p in PROMPTS[:3]]
        full = [c.submit("llm", p).wait()["result"] for p in (long[0], long[2])]
        streams = [c.submit("llm", p) for p in long]
        for ev in streams[1]:  # cancelled mid-answer, beside the other two
            if ev["event"] == "token":
                break
        c.cancel(streams[1].task_id)
        finals = [s.wait() for s in streams]
        assert finals[1]["event"] == "cancelled"
        assert [finals[0]["result"], finals[2]["result"]] == full
    assert peak >= 2, "the jobs never ran side by side"
