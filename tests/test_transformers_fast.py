"""The transformers engine's fast paths: a lone job on its own cache, the static-cache lane with
a compiled step (forced on the CPU through the domain's `compile`), the fallback when
compiling fails, the compile cache under the state dir, and token-by-token streaming."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .engine_steps import control, drain, tiny_llama

pytest.importorskip("transformers")

PROMPT = "Tell me a story about a dragon"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_llama(tmp_path_factory)


def make_engine(model, state_dir, compile_setting):
    from resisod.engines.base import EngineContext
    from resisod.engines.transformers_llm import TransformersEngine
    domain = {"model": model, "dtype": "auto", "context_size": 256, "parallel": 4,
              "engine": "transformers", "kind": "llm", "compile": compile_setting}
    ctx = EngineContext(domain_name="hf", state_dir=str(state_dir),
                        results_dir=os.path.join(str(state_dir), "results"), device="cpu",
                        threads=2, gpu_share=1.0)
    engine = TransformersEngine(domain, ctx)
    engine.load()
    return engine


def params(prompt, **kw):
    p = {"prompt": prompt, "max_tokens": 16, "temperature": 0.0, "top_p": 0.95, "top_k": 40,
         "seed": None, "stop": []}
    p.update(kw)
    return p


# -- decisions ----------------------------------------------------------------------------

def test_compile_decision_and_cache_dir(tmp_path):
    from resisod.engines.base import EngineUnavailable
    from resisod.engines.hf_static import compile_cache_dir, compile_wanted
    from resisod.engines.hf_model import compile_setting
    assert compile_wanted("auto", "cuda") and not compile_wanted("auto", "cpu")
    assert compile_wanted("on", "cpu") and not compile_wanted("off", "cuda")
    assert compile_cache_dir(str(tmp_path)).startswith(str(tmp_path) + os.sep)
    assert compile_setting({}) == "auto"
    assert compile_setting({"compile": "on"}) == "on"
    assert compile_setting({"compile": "off"}) == "off"
    with pytest.raises(EngineUnavailable):
        compile_setting({"compile": "yes"})


# -- streaming: each token's text as soon as it is whole, from a small window of ids --------

def test_ids_text_streams_multibyte_from_a_small_window():
    from transformers import AutoTokenizer
    from resisod import builtin
    from resisod.engines.hf_model import text_decoder
    path = builtin.llm_path("builtin:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path),
                                        gguf_file=os.path.basename(path), local_files_only=True)
    text = "Voilà: naïve café, 東京の天気は晴れ 🙂 and the word-pieces of tokenization. " * 8
    ids = tok(text, add_special_tokens=False).input_ids
    lengths = []
    decoder = text_decoder(tok)
    inner = decoder._decode
    decoder._decode = lambda part: lengths.append(len(part)) or inner(part)
    pieces = [decoder.feed([i]) for i in ids] + [decoder.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # each token's text comes out with it, unless the text so far ends inside a character
    for n, piece in enumerate(pieces[:-1], 1):
        cut = tok.decode(ids[:n], clean_up_tokenization_spaces=False).endswith("\ufffd")
        assert (piece == "") == cut, (n, piece)
    assert pieces.count("") >= 8  # the split characters waited for their last byte
    # never the whole text again: each decode sees the ids of the last piece or two
    assert max(lengths) <= 8, max(lengths)


# -- the engine in-process on a tiny real model ---------------------------------------------

@pytest.fixture(scope="module")
def eager(tiny_model, tmp_path_factory):
    return make_engine(tiny_model, tmp_path_factory.mktemp("state"), "off")


@pytest.fixture(scope="module")
def compiled(tiny_model, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    return make_engine(tiny_model, state, "on"), state


def test_lone_job_streams_one_token_per_step(eager):
    events, out = {}, {}
    eager.add(params(PROMPT), control("a", events))
    steps = drain(eager, out)
    assert eager.runs_on() == {"device": "cpu", "decode": "dynamic"}
    result = out["a"]
    assert result["completion_tokens"] == 16 and steps == 16
    tokens = [f["text"] for e, f in events["a"] if e == "token"]
    assert "".join(tokens) == result["result"]
    assert len(tokens) >= 14  # one event a step (a split character may wait one)


def test_forced_compile_matches_the_dynamic_path(eager, compiled):
    engine, state = compiled
    assert engine.runs_on()["decode"] == "static+compiled", engine.runs_on()
    cache = os.path.join(str(state), "compile-cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == cache
    assert any(files for _, _, files in os.walk(cache))  # the compiled step was saved there
    for prompt in (PROMPT, "2+2?"):
        want = eager.run(params(prompt), control("x", {}))
        events = {}
        got = engine.run(params(prompt), control("y", events))
        assert got["result"] == want["result"] and got["completion_tokens"] == 16
        assert "".join(f["text"] for e, f in events["y"] if e == "token") == got["result"]


def test_lane_hands_over_to_the_batch_and_back(eager, compiled):
    """A job starts alone on the lane, two more join (the batch), they end, it finishes
    alone on the lane again: the same text as each job alone on the dynamic path."""
    engine, _ = compiled
    jobs = [params(PROMPT, max_tokens=24), params("2+2?", max_tokens=6),
            params("Hello there", max_tokens=8)]
    solo = [eager.run(p, control("s", {}))["result"] for p in jobs]
    events, out = {}, {}
    engine.add(jobs[0], control("0", events))

    def hook(step):
        if step == 3:
            assert engine._lane.owner is not None  # alone: on the lane
            engine.add(jobs[1], control("1", events))
            engine.add(jobs[2], control("2", events))
        if step == 6:
            assert engine._lane.owner is None and engine._cache is not None

    drain(engine, out, hook)
    assert [out[str(i)]["result"] for i in range(3)] == solo
    assert engine._lane.owner is None and engine._cache is None and engine.jobs() == 0


def test_paused_lane_job_resumes_where_it_stopped(eager, compiled):
    engine, _ = compiled
    p = params(PROMPT, max_tokens=20)
    want = eager.run(p, control("s", {}))["result"]
    events, out = {}, {}
    job = control("p", events)
    engine.add(p, job)
    for _ in range(4):
        assert engine.step() == []
    assert engine._lane.owner is not None
    job.pause()
    assert engine.step() == []
    assert not engine.pending() and engine._lane.owner is None  # its state left with it
    job.resume()
    drain(engine, out)
    assert out["p"]["result"] == want
    assert [e for e, _ in events["p"] if e != "token"] == ["paused", "resumed"]


def test_compile_restart_reads_the_cache(compiled, tiny_model):
    """A second worker on the same state dir finds the compiled step in the cache."""
    _, state = compiled
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "from tests.test_transformers_fast import make_engine\n"
        "e = make_engine(sys.argv[1], sys.argv[2], 'on')\n"
        "from torch._dynamo.utils import counters\n"
        "print('decode', e.runs_on()['decode'])\n"
        "print('hits', counters['inductor']['fxgraph_cache_hit'])\n"
        "print('misses', counters['inductor']['fxgraph_cache_miss'])\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, tiny_model, str(state), root],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines["decode"] == "static+compiled"
    assert int(lines["hits"]) >= 1 and int(lines["misses"]) == 0, out.stdout


def test_failed_compile_falls_back_with_the_reason(tiny_model, tmp_path, monkeypatch, capfd):
    import torch

    def broken(*a, **kw):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    engine = make_engine(tiny_model, tmp_path, "on")
    where = engine.runs_on()
    assert where["decode"] == "dynamic"
    assert "no C++ compiler here" in where["compile_error"]
    assert "no C++ compiler here" in capfd.readouterr().err
    result = engine.run(params(PROMPT), control("f", {}))
    assert result["completion_tokens"] == 16 and result["result"]


def test_daemon_worker_compiles_under_the_state_dir(make_daemon, tiny_model):
    """The domain's `compile` reaches the engine in its worker: the compiled lane runs, its
    cache lies under the daemon's state dir, and tokens stream one by one to the client."""
    d = make_daemon(f"""
[domains.hf]
kind = "llm"
engine = "transformers"
model = "{tiny_model}"
context_size = 256
compile = "on"
""", start=False).start(timeout=300)
    st = d.status()["domains"]["hf"]
    assert st["state"] == "ready", st
    assert st["workers"][0]["runs_on"]["decode"] == "static+compiled", st["workers"][0]
    cache = os.path.join(d.state_dir, "compile-cache")
    assert any(files for _, _, files in os.walk(cache))
    with d.client() as c:
        events = list(c.submit("llm", {"prompt": PROMPT, "temperature": 0, "max_tokens": 12}))
    final = events[-1]
    assert final["event"] == "result" and final["completion_tokens"] == 12, final
    tokens = [e["text"] for e in events if e["event"] == "token"]
    assert "".join(tokens) == final["result"] and len(tokens) >= 10
