"""Pieces both LLM engines share: the chat turn list and the result's numbers."""
from __future__ import annotations

import time
from typing import Any


def chat_messages(params: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in params:
        messages = list(params["messages"])
    else:
        messages = [{"role": "user", "content": params["prompt"]}]
    if params.get("system") is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": params["system"]})
    return messages


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
