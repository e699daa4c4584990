"""Chinese text end to end: every streamed LLM piece is whole characters, and the pieces join
to exactly the final result, through the Python client, the CLI, REST SSE and OpenAI SSE.

The built-in SmolLM2's tokenizer is byte-level BPE: one CJK character or emoji is split over
two to four tokens, so a piece per model token would carry half characters.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from resisod import builtin
from resisod.engines.llm_common import REPLACEMENT, StopText, Utf8Text

from .conftest import start_gateway

httpx = pytest.importorskip("httpx")

BUILTIN = "builtin:smollm2-135m-instruct"
SAMPLE = "资源隔离调度：先到先得，🙂 也要完整。Ελληνικά"
# the built-in model answers this one in Chinese (greedy): 29 CJK characters in 64 tokens
PROMPT = "请简单解释什么是资源隔离调度？"
MAX_TOKENS = 64


def cjk(text: str) -> int:
    return sum("\u4e00" <= ch <= "\u9fff" for ch in text)


def assert_whole_pieces(pieces: list[str], result: str) -> None:
    """Each piece is text on its own, and together they are the result."""
    assert pieces, "no token events"
    for p in pieces:
        assert isinstance(p, str) and p, pieces
        p.encode("utf-8")  # half of a surrogate pair (half an emoji) would raise here
        assert REPLACEMENT not in p, (p, pieces)
    assert "".join(pieces) == result


# --- the engines' decoders with the real tokenizers ---------------------------------------

@pytest.fixture(scope="module")
def gguf_vocab():
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=builtin.llm_path(BUILTIN), vocab_only=True,
                          verbose=False)
    yield llm
    llm.close()


def token_bytes(vocab, text: str) -> list[bytes]:
    """Each token's bytes as the llama.cpp engine reads them (`detokenize([token])`)."""
    ids = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    return [vocab.detokenize([t]) for t in ids]


def utf8_ok(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_gguf_tokens_split_characters_and_the_decoder_rejoins_them(gguf_vocab):
    raw = token_bytes(gguf_vocab, SAMPLE)
    assert b"".join(raw) == SAMPLE.encode("utf-8")
    assert sum(not utf8_ok(b) for b in raw) >= 5  # fragments the decoder must hold back
    utf8 = Utf8Text()
    pieces = [utf8.feed(b) for b in raw]
    assert "" in pieces  # a fragment alone produced no text
    assert_whole_pieces([p for p in pieces if p], SAMPLE)
    assert utf8.pending() == b""


def test_a_character_cut_short_is_left_out(gguf_vocab):
    """max_tokens may end generation inside a character: the answer is the whole characters
    before it, and the pieces agree with it."""
    raw = token_bytes(gguf_vocab, SAMPLE)
    cut_inside = 0
    for n in range(1, len(raw) + 1):
        utf8, out = Utf8Text(), StopText([])
        for b in raw[:n]:
            out.feed(utf8.feed(b))
        out.flush()
        assert SAMPLE.startswith(out.text) and REPLACEMENT not in out.text
        assert out.text.encode("utf-8") + utf8.pending() == b"".join(raw[:n])
        cut_inside += bool(utf8.pending())
    assert cut_inside >= 5


@pytest.mark.parametrize("stop,expect", [
    ("先得", SAMPLE[:SAMPLE.index("先得")]),    # trims: "先" must wait until "得" decides
    ("先到后", SAMPLE),                        # starts like a stop, then is not one
    ("🙂", SAMPLE[:SAMPLE.index("🙂")]),      # a stop made of one four-byte character
])
def test_stop_strings_never_reach_the_pieces(gguf_vocab, stop, expect):
    utf8, out = Utf8Text(), StopText([stop])
    pieces = []
    for b in token_bytes(gguf_vocab, SAMPLE):
        piece = out.feed(utf8.feed(b))
        if piece:
            pieces.append(piece)
        if out.stopped:
            break
    tail = out.flush()
    if tail:
        pieces.append(tail)
    assert_whole_pieces(pieces, expect)
    assert out.text == expect and out.stopped == (expect != SAMPLE)


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = builtin.llm_path(BUILTIN)
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True)


def test_hf_tokens_split_characters_and_the_decoder_rejoins_them(hf_tokenizer):
    from resisod.engines.hf_model import text_decoder
    ids = hf_tokenizer(SAMPLE, add_special_tokens=False).input_ids
    alone = [hf_tokenizer.decode([i]) for i in ids]
    assert sum(REPLACEMENT in t for t in alone) >= 5  # fragments decode to U+FFFD alone
    decoder = text_decoder(hf_tokenizer)
    pieces = [decoder.feed([i]) for i in ids]
    assert "" in pieces
    pieces.append(decoder.finish())
    assert_whole_pieces([p for p in pieces if p], SAMPLE)


def test_hf_decoder_leaves_out_a_character_cut_short(hf_tokenizer):
    from resisod.engines.hf_model import text_decoder
    ids = hf_tokenizer(SAMPLE, add_special_tokens=False).input_ids
    cut_inside = 0
    for n in range(1, len(ids) + 1):
        decoder = text_decoder(hf_tokenizer)
        text = "".join(decoder.feed([i]) for i in ids[:n]) + decoder.finish()
        assert SAMPLE.startswith(text) and REPLACEMENT not in text
        whole = hf_tokenizer.decode(ids[:n])
        cut_inside += whole.endswith(REPLACEMENT)
        assert text == whole.rstrip(REPLACEMENT)
    assert cut_inside >= 5


# --- end to end through the daemon: client, CLI, REST SSE, OpenAI SSE ---------------------

ZH_CONFIG = """
[daemon]
heartbeat_ms = 200
[http]
enabled = true
listen = "127.0.0.1:{port}"
[domains.llm]
kind = "llm"
context_size = 512
max_tokens_limit = 256
"""

GREEDY = {"prompt": PROMPT, "temperature": 0, "seed": 7, "max_tokens": MAX_TOKENS}


@pytest.fixture(scope="module")
def zh(make_module_daemon):
    return start_gateway(make_module_daemon, ZH_CONFIG)


def client_stream(d, params):
    with d.client() as c:
        stream = c.submit("llm", params)
        pieces = [ev["text"] for ev in stream if ev["event"] == "token"]
    return pieces, stream.final


@pytest.fixture(scope="module")
def answer(zh):
    """The greedy answer through the Python client; every other path must give the same."""
    pieces, final = client_stream(zh, GREEDY)
    assert final["event"] == "result", final
    return pieces, final


def test_client_pieces_are_whole_characters(answer):
    pieces, final = answer
    assert_whole_pieces(pieces, final["result"])
    assert cjk(final["result"]) >= 5 and REPLACEMENT not in final["result"], final["result"]
    # several model tokens make one character, so there are fewer pieces than tokens
    assert final["completion_tokens"] > len(pieces)


@pytest.mark.parametrize("locale_env", [
    {},
    # an ASCII locale without Python's UTF-8 mode: the answer would not encode, and the
    # argument would arrive as surrogate escapes
    {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
     "PYTHONIOENCODING": ""},
], ids=["default-locale", "ascii-locale"])
@pytest.mark.parametrize("via", ["argv", "stdin"])
def test_cli_prints_the_answer_as_utf8(zh, answer, locale_env, via):
    args = ["llm", PROMPT if via == "argv" else "-", "--temperature", "0", "--seed", "7",
            "--max-tokens", str(MAX_TOKENS)]
    r = zh.cli(*args, env=locale_env,
               input=PROMPT.encode("utf-8") if via == "stdin" else None)
    assert r.returncode == 0, r.stderr.decode("utf-8", "replace")
    assert r.stdout.decode("utf-8") == answer[1]["result"] + "\n"


def sse_events(raw: bytes) -> list[str]:
    """The `data:` payloads of a whole SSE body, decoded strictly as UTF-8."""
    body = raw.decode("utf-8")  # raises on any invalid byte sequence
    return [ln[len("data: "):] for ln in body.split("\n") if ln.startswith("data: ")]


def read_sse(r) -> bytes:
    assert r.status_code == 200, r.read()
    assert "charset=utf-8" in r.headers["content-type"].replace(" ", "").lower()
    return r.read()


def test_rest_sse_pieces_are_whole_characters(zh, answer):
    with httpx.stream("POST", zh.base + "/api/llm/generate", timeout=120,
                      json={**GREEDY, "stream": True}) as r:
        raw = read_sse(r)
    events = [json.loads(e) for e in sse_events(raw)]
    pieces = [e["token"] for e in events if "token" in e]
    final = events[-1]
    assert final["done"] is True and final["status"] == "completed", final
    assert_whole_pieces(pieces, final["result"])
    assert final["result"] == answer[1]["result"]
    # the text travels as UTF-8, not as \u escapes
    first = next(ch for ch in final["result"] if cjk(ch))
    assert first.encode("utf-8") in raw


def test_openai_sse_pieces_are_whole_characters(zh, answer):
    body = {"model": "smollm2-135m-instruct", "stream": True, "temperature": 0, "seed": 7,
            "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": PROMPT}]}
    with httpx.stream("POST", zh.base + "/v1/chat/completions", timeout=120,
                      json=body) as r:
        payloads = sse_events(read_sse(r))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks]
    pieces = [d for d in deltas[1:] if d]  # the first chunk only names the role
    with zh.client() as c:
        stored = c.get(chunks[0]["id"].removeprefix("chatcmpl-"))
    assert chunks[-1]["choices"][0]["finish_reason"] == stored["finish_reason"]
    assert_whole_pieces(pieces, stored["result"])
    assert stored["result"] == answer[1]["result"]


def test_stop_string_trims_pieces_and_result_alike(zh, answer):
    text = answer[1]["result"]
    # a stop string inside the answer, made of characters that each span several tokens
    at = next(i for i in range(3, len(text) - 1) if cjk(text[i]) and cjk(text[i + 1]))
    stop = text[at:at + 2]
    pieces, final = client_stream(zh, {**GREEDY, "stop": [stop]})
    assert final["event"] == "result" and final["finish_reason"] == "stop", final
    assert final["result"] == text[:text.index(stop)]
    assert_whole_pieces(pieces, final["result"])


def test_text_held_for_a_stop_string_that_never_comes(zh, answer):
    """The answer's last characters begin a stop string, then max_tokens ends generation:
    the text held back in case the stop string completed is still part of the answer."""
    text = answer[1]["result"]
    tail = text[-2:]
    assert cjk(tail) == 2, text
    pieces, final = client_stream(zh, {**GREEDY, "stop": [tail + "¶"]})
    assert final["event"] == "result" and final["finish_reason"] == "length", final
    assert final["result"] == text
    assert_whole_pieces(pieces, final["result"])


def test_max_tokens_inside_a_character(zh, answer):
    """Cutting generation after each of the first tokens: some cuts fall inside a character,
    whose bytes are left out of pieces and result alike."""
    full = answer[1]["result"]
    cut_inside, longest = 0, ""
    for n in range(1, 25):
        pieces, final = client_stream(zh, {**GREEDY, "max_tokens": n})
        assert final["event"] == "result", final
        result = final["result"]
        assert full.startswith(result) and REPLACEMENT not in result
        if result:
            assert_whole_pieces(pieces, result)
        else:
            assert pieces == []
        if final["completion_tokens"] == n and result == longest and n > 1:
            cut_inside += 1  # one more token, no more text: it began a character
        longest = result
    assert cut_inside >= 2 and cjk(longest) >= 2, longest


# --- the transformers engine on the same built-in model ------------------------------------

# transformers loads a GGUF file only with `accelerate` installed, so the built-in model's
# weights are dequantized into a model directory first, the way the engine is meant to be used
GGUF_TO_HF = r"""
import os, sys
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
path, out = sys.argv[1], sys.argv[2]
src, name = os.path.split(path)
config = AutoConfig.from_pretrained(src, gguf_file=name, local_files_only=True)
model = AutoModelForCausalLM.from_config(config)
tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
missing, unexpected = model.load_state_dict(tensors, strict=False)
assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
model.save_pretrained(out)
AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True).save_pretrained(out)
"""


def test_transformers_engine_streams_whole_characters(make_daemon, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    model_dir = tmp_path / "smollm2-hf"
    subprocess.run([sys.executable, "-c", GGUF_TO_HF, builtin.llm_path(BUILTIN),
                    str(model_dir)], check=True, timeout=600, capture_output=True)
    d = make_daemon(f"""
[daemon]
heartbeat_ms = 200
[domains.hf]
kind = "llm"
engine = "transformers"
model = "{model_dir}"
context_size = 512
""", start=False).start(timeout=300)
    st = d.status()["domains"]["hf"]
    assert st["state"] == "ready", st
    # fewer tokens than on llama.cpp: torch on one CPU core is slower
    params = {**GREEDY, "max_tokens": 24}
    pieces, final = client_stream(d, params)
    assert final["event"] == "result", final
    text = final["result"]
    assert_whole_pieces(pieces, text)
    assert cjk(text) >= 5 and REPLACEMENT not in text, text
    assert final["completion_tokens"] > len(pieces)
    at = next(i for i in range(3, len(text) - 1) if cjk(text[i]) and cjk(text[i + 1]))
    stop = text[at:at + 2]
    pieces, final = client_stream(d, {**params, "stop": [stop]})
    assert final["event"] == "result" and final["finish_reason"] == "stop", final
    assert final["result"] == text[:text.index(stop)]
    assert_whole_pieces(pieces, final["result"])
