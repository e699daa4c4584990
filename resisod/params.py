"""Validation of job parameters per kind, done in the daemon before a job is accepted.

Everything that can be checked without the model is checked here, so a bad request is
answered at once with `bad_request` and never occupies a queue slot. Checks that need the
model (prompt longer than the context) happen in the worker.
"""
from __future__ import annotations

import random
from typing import Any

from .protocol import Code, ProtocolError, field


def _num(p: dict, name: str, lo: float, hi: float, default: float | None) -> float | None:
    if name not in p:  # most parameters of most requests: the default, unchecked
        return default
    v = field(p, name, (int, float), default=default)
    if v is not None and not lo <= v <= hi:
        raise ProtocolError(Code.BAD_REQUEST, f"'{name}' must be between {lo} and {hi}, got {v}")
    return v


def _int(p: dict, name: str, lo: int, hi: int, default: int | None) -> int | None:
    if name not in p:
        return default
    v = field(p, name, int, default=default)
    if v is not None and not lo <= v <= hi:
        raise ProtocolError(Code.BAD_REQUEST, f"'{name}' must be between {lo} and {hi}, got {v}")
    return v


def _text(p: dict, name: str, *, required: bool, what: str) -> str | None:
    v = field(p, name, str, required=required)
    if required and not v.strip():
        raise ProtocolError(Code.BAD_REQUEST, f"'{name}' is empty: give the {what}")
    return v


def llm(p: dict[str, Any], domain: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    messages = field(p, "messages", list)
    if messages is not None:
        if not messages:
            raise ProtocolError(Code.BAD_REQUEST, "'messages' is empty: give at least one message")
        for i, m in enumerate(messages):
            if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
                    or not isinstance(m.get("content"), str)):
                raise ProtocolError(Code.BAD_REQUEST, f"messages[{i}] must be a map with string "
                                    f"'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise ProtocolError(Code.BAD_REQUEST, f"messages[{i}].role must be system, user "
                                    f"or assistant, got {m['role']!r}")
        out["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
        if p.get("prompt") is not None:
            raise ProtocolError(Code.BAD_REQUEST, "give either 'prompt' or 'messages', not both")
    else:
        out["prompt"] = _text(p, "prompt", required=True, what="prompt text")
    system = field(p, "system", str)
    if system is not None:
        out["system"] = system
    limit = domain["max_tokens_limit"]
    out["max_tokens"] = _int(p, "max_tokens", 1, limit, domain["default_max_tokens"])
    out["temperature"] = _num(p, "temperature", 0.0, 2.0, domain["default_temperature"])
    out["top_p"] = _num(p, "top_p", 0.0, 1.0, 0.95)
    out["top_k"] = _int(p, "top_k", 0, 1000, 40)
    out["seed"] = _int(p, "seed", 0, 2**32 - 1, None)
    stop = p.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) \
            or len(stop) > 16:
        raise ProtocolError(Code.BAD_REQUEST, "'stop' must be a string or a list of up to 16 "
                            "non-empty strings")
    out["stop"] = stop
    return out


def tts(p: dict[str, Any], domain: dict[str, Any]) -> dict[str, Any]:
    text = _text(p, "text", required=True, what="text to speak")
    if len(text) > domain["max_chars"]:
        raise ProtocolError(Code.BAD_REQUEST, f"'text' has {len(text)} characters; the limit is "
                            f"{domain['max_chars']} (domains.<name>.max_chars)")
    fmt = field(p, "format", str, default="wav")
    if fmt != "wav":
        raise ProtocolError(Code.BAD_REQUEST, f"'format' must be 'wav', got {fmt!r}")
    return {
        "text": text,
        "voice": field(p, "voice", str, default="") or "",
        "speed": _num(p, "speed", 0.25, 4.0, domain["speed"]),
        "format": fmt,
    }


def image(p: dict[str, Any], domain: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt": _text(p, "prompt", required=True, what="image description")}
    max_side = domain["max_side"]
    for name in ("width", "height"):
        v = _int(p, name, 8, max_side, domain[f"default_{name}"])
        if v % 8:
            raise ProtocolError(Code.BAD_REQUEST, f"'{name}' must be a multiple of 8, got {v}")
        out[name] = v
    out["use_turbo"] = field(p, "use_turbo", bool, default=False)
    default_steps = domain["turbo_steps"] if out["use_turbo"] else domain["default_steps"]
    out["steps"] = _int(p, "steps", 1, 150, default_steps)
    out["negative_prompt"] = field(p, "negative_prompt", str, default="")
    out["guidance_scale"] = _num(p, "guidance_scale", 0.0, 50.0,
                                 0.0 if out["use_turbo"] else 7.5)
    seed = _int(p, "seed", 0, 2**32 - 1, None)
    # the daemon picks the seed so the result can report it and the image be reproduced
    out["seed"] = seed if seed is not None else random.randrange(2**32)
    return out


def null(p: dict[str, Any], domain: dict[str, Any]) -> dict[str, Any]:
    out = {
        "steps": _int(p, "steps", 0, 1000000, domain["steps"]),
        "delay_ms": _num(p, "delay_ms", 0, 3600000, domain["delay_ms"]),
        "alloc_mb": _int(p, "alloc_mb", 0, 1000000, 0),
        # hold the worker without a checkpoint, as an engine stuck in native code would
        "block_ms": _num(p, "block_ms", 0, 3600000, 0),
        # the worker kills itself with this signal at this step, as a native crash would
        "crash_signal": _int(p, "crash_signal", 0, 64, 0),
        "crash_at_step": _int(p, "crash_at_step", 0, 1000000, 0),
        # a result file of this many MB (a large WAV or PNG, or a disk that fills up)
        "write_mb": _int(p, "write_mb", 0, 100000, 0),
        # the result write fails as on a full disk, where no small filesystem can be mounted
        "disk_full": field(p, "disk_full", bool, default=False),
        "crash": field(p, "crash", bool, default=False),
        # the job fails as torch does when a CUDA allocation of this many MB fails
        "oom_mb": _int(p, "oom_mb", 0, 10000000, 0),
        "fail": field(p, "fail", str, default=""),
        "write_file": field(p, "write_file", bool, default=False),
        "record": field(p, "record", str, default=""),
    }
    text = field(p, "text", str)
    if text is not None:
        out["text"] = text
    return out


VALIDATORS = {"llm": llm, "tts": tts, "image": image, "null": null}


def validate(kind: str, p: Any, domain: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(p, dict):
        raise ProtocolError(Code.BAD_REQUEST, "field 'params' must be a map")
    return VALIDATORS[kind](p, domain)
