"""Pieces both LLM engines share: the chat turn list, the streamed text, the result's numbers.

Streamed text obeys two rules in both engines: a `token` event never holds part of a
character (byte-level tokenizers split one CJK character or emoji over two to four tokens),
and the events join to exactly the final `result`, so the result is built from the pieces
themselves. A character still incomplete when generation ends (max_tokens cut it) is dropped
from both.
"""
from __future__ import annotations

import codecs
import json
import time
from typing import Any, Callable, Sequence

REPLACEMENT = "\ufffd"


class Utf8Text:
    """Token bytes in, whole characters out (llama.cpp hands out each token's raw bytes).

    A sequence that cannot become valid UTF-8 is decoded to U+FFFD as soon as that is
    certain; an incomplete one waits for its next bytes."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def pending(self) -> bytes:
        """Bytes held back as the start of a character (dropped if generation ends here)."""
        return self._decoder.getstate()[0]


class IdsText:
    """Token ids in, whole characters out, for tokenizers that only decode id sequences.

    Decoding one id alone loses context (a byte-fallback fragment becomes U+FFFD, some
    tokenizers drop a leading space), so each step decodes the ids since the last emitted
    piece together with the ids before it and emits the new suffix, once it no longer ends
    in U+FFFD: a trailing U+FFFD is most often a character whose remaining bytes are still
    to come. `decode` must map a prefix of the ids to a prefix of the text (no clean-up of
    spaces across tokens)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] were emitted; kept as context for the next piece
        self._read = 0

    def feed(self, ids: Sequence[int]) -> str:
        self._ids.extend(ids)
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(before) or text.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before):]

    def finish(self) -> str:
        """What the held-back ids decode to once no more come, less the trailing U+FFFD of
        a character they leave incomplete (the same choice `Utf8Text` makes)."""
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(before):].rstrip(REPLACEMENT)


class StopText:
    """Decoded text in, the pieces a job streams out: text that a stop string may yet trim
    is held back until it is clear either way, so no piece is ever taken back."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.pieces: list[str] = []
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text to stream now ('' when all of it is held back)."""
        if self.stopped:
            return ""
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return self._out(text[:min(hits)])
        keep = 0  # the longest end of the text that begins some stop string
        for s in self._stops:
            for i in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:i]):
                    keep = i
                    break
        self._held = text[len(text) - keep:] if keep else ""
        return self._out(text[:len(text) - keep])

    def flush(self) -> str:
        """Generation ended without a stop: the held-back text is part of the answer."""
        held, self._held = self._held, ""
        return "" if self.stopped else self._out(held)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def _out(self, piece: str) -> str:
        if piece:
            self.pieces.append(piece)
        return piece


def chat_messages(params: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in params:
        messages = list(params["messages"])
    else:
        messages = [{"role": "user", "content": params["prompt"]}]
    if params.get("system") is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": params["system"]})
    return messages


def repeatable(params: dict[str, Any]) -> bool:
    """Greedy (temperature 0) or seeded: the engines then give the same answer to the same
    request, so the answer may be served from the shared cache."""
    return params["temperature"] == 0 or params.get("seed") is not None


def parallel_slots(domain: dict[str, Any], device: str) -> int:
    """Sequences one worker decodes at once: the domain's `parallel`, or when 0 (auto) 4 on
    a CPU (a core gains little from wider batches) and 16 on a GPU (batching is what fills
    it)."""
    return domain.get("parallel") or (4 if device == "cpu" else 16)


def cached_answer(engine: Any, params: dict[str, Any]) -> tuple[str | None, dict | None]:
    """(the key a repeatable request's answer goes under in the cache shared between
    daemons, the answer found there); (None, None) when nothing is shared for it."""
    shared = engine.ctx.shared_cache
    if shared is None or not repeatable(params):
        return None, None
    from .result_cache import digest
    domain = engine.domain
    key = digest("llm", domain["engine"], domain["model"], domain["context_size"], params)
    raw = shared.get(key)
    if raw is not None:
        try:
            result = json.loads(raw)
        except ValueError:
            result = None  # not one of ours: generate instead
        if isinstance(result, dict) and isinstance(result.get("result"), str):
            return key, result
    return key, None


def replay(result: dict[str, Any], job: Any, t0: float) -> dict[str, Any]:
    """A cached answer streamed as one `token` event, so a client sees a hit the way it
    sees a generation."""
    if result["result"]:
        job.emit("token", text=result["result"])
    ms = round((time.perf_counter() - t0) * 1000, 2)
    return {**result, "cached": True, "ttft_ms": ms, "generation_time_ms": ms}


def share(engine: Any, key: str, result: dict[str, Any]) -> None:
    engine.ctx.shared_cache.put(key, json.dumps(result).encode())


def finish_stats(text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                 ttft: float | None, t0: float) -> dict[str, Any]:
    total = time.perf_counter() - t0
    decode = total - (ttft or 0.0)
    return {
        "result": text, "finish_reason": finish, "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "ttft_ms": round((ttft or total) * 1000, 2),
        # decode speed: tokens after the first over the time after the first
        "tokens_per_s": round((completion_tokens - 1) / decode, 2)
        if completion_tokens > 1 and decode > 0 else 0.0,
        "generation_time_ms": round(total * 1000, 2),
    }
