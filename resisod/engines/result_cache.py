"""The result cache several daemons share: Redis behind a circuit breaker, in workers only.

Every failure of the shared cache is a miss: a job never fails because Redis is slow or down.
Each call is bounded by `timeout_ms`, and after `failure_threshold` failed calls in a row the
breaker opens: Redis is not called at all (no time lost per job) and the local cache serves
alone, until `cooldown_s` later one trial call (half-open) closes it again or reopens it.

The breaker is pybreaker's: thread-safe, widely used, and its states are the three this
cache reports. redis and pybreaker are imported when a worker opens the cache, never by the
daemon (`tests/test_core.py` checks the daemon's imports).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

__all__ = ["SharedCache", "open_shared", "digest"]


def digest(*parts: Any) -> str:
    """SHA-256 of the parts; dicts and lists as canonical JSON, so key order never matters."""
    text = "\x00".join(p if isinstance(p, str) else json.dumps(p, sort_keys=True, default=str)
                       for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()


class SharedCache:
    def __init__(self, cfg: dict[str, Any]):
        try:
            import pybreaker
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            from .base import EngineUnavailable
            raise EngineUnavailable(f"[cache] backend = \"redis\" needs the redis and pybreaker "
                                    f"packages (pip install 'resiso[cache]'): {exc}")

        timeout = cfg["timeout_ms"] / 1000
        # no retries: a retry inside a call would multiply the time a dead server costs a job;
        # the breaker is the retry policy
        self.client = redis.Redis.from_url(
            cfg["url"], socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
        self.breaker = pybreaker.CircuitBreaker(fail_max=cfg["failure_threshold"],
                                                reset_timeout=cfg["cooldown_s"])
        self.namespace = cfg["namespace"]
        self.ttl = cfg["ttl_s"] or None
        self.hits = 0
        self.errors = 0

    def get(self, key: str) -> bytes | None:
        value = self._call(self.client.get, self.namespace + key)
        if value is not None:
            self.hits += 1
        return value

    def put(self, key: str, value: bytes) -> None:
        self._call(self.client.set, self.namespace + key, value, ex=self.ttl)

    def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            return self.breaker.call(self._counted, fn, *args, **kw)
        except Exception:  # Redis failed, or the breaker is open: a miss, never the job's error
            return None

    def _counted(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        # counted here, inside the breaker: the call that trips it raises the breaker's own
        # error instead of Redis's, yet it was a Redis failure all the same
        try:
            return fn(*args, **kw)
        except Exception:
            self.errors += 1
            raise

    def view(self) -> dict[str, Any]:
        """What the worker reports to the daemon (`status`, `/metrics`)."""
        return {"backend": "redis", "breaker": self.breaker.current_state,
                "hits": self.hits, "errors": self.errors}


def open_shared(cfg: dict[str, Any] | None, kind: str) -> SharedCache | None:
    """The shared cache for a worker of this kind, or None (local only, or nothing to cache)."""
    if not cfg or cfg["backend"] != "redis" or kind not in ("tts", "llm"):
        return None
    return SharedCache(cfg)
