"""The shared result cache: real redis-server, real daemons and workers, no mocks.

Two daemons share one Redis (a result made on one is a hit on the other), and a Redis that
dies mid-run costs no request: the breaker opens, the local cache serves, and once Redis is
back and the cooldown has passed the breaker closes again.
"""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from .conftest import free_port, wait_for

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (scripts/setup.sh installs "
    "Debian's redis-server package)")
redis = pytest.importorskip("redis", reason="the redis package is not installed "
                            "(pip install -e '.[cache]')")
pytest.importorskip("pybreaker", reason="the pybreaker package is not installed "
                    "(pip install -e '.[cache]')")


class RedisServer:
    """A throwaway redis-server: no persistence, its own directory and port."""

    def __init__(self, directory: str):
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                assert self.proc.poll() is None, "redis-server exited at start"
                return False
        wait_for(up, 20, 0.05, "redis-server")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def keys(self) -> list[bytes]:
        return redis.Redis(port=self.port, socket_timeout=1).keys("*")


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(str(tmp_path)).start()
    yield server
    server.stop()


def config(url: str, *, llm: bool, cooldown_s: float = 30.0) -> str:
    # timeout_ms is generous here: two cores run daemons, workers and Redis, and a call that
    # merely waits for a core must not count as a failure in the tests that expect hits
    body = f"""
[daemon]
heartbeat_ms = 200
[cache]
backend = "redis"
url = "{url}"
namespace = "test:"
ttl_s = 600
failure_threshold = 2
cooldown_s = {cooldown_s}
timeout_ms = 1000
[domains.tts]
kind = "tts"
"""
    if llm:
        body += """
[domains.llm]
kind = "llm"
context_size = 256
"""
    return body


def speak(daemon, text: str) -> tuple[dict, list[dict]]:
    with daemon.client() as c:
        stream = c.submit("tts", {"text": text})
        audio = [ev for ev in stream if ev["event"] == "audio"]
        final = stream.final
    assert final["event"] == "result", final
    return final, audio


def cache_of(daemon, domain: str) -> dict:
    return daemon.status()["domains"][domain]["cache"]


def test_two_daemons_share_tts_and_greedy_llm_results(make_daemon, redis_server):
    first = make_daemon(config(redis_server.url, llm=True))
    second = make_daemon(config(redis_server.url, llm=True))

    made, made_audio = speak(first, "Shared caches save time.")
    assert made["cached"] is False
    assert any(k.startswith(b"test:") for k in redis_server.keys())
    hit, hit_audio = speak(second, "Shared caches save time.")
    assert hit["cached"] is True, hit
    assert len(hit_audio) == 1 and hit["duration_ms"] == made["duration_ms"]
    assert b"".join(a["pcm"] for a in hit_audio) == b"".join(a["pcm"] for a in made_audio)
    assert cache_of(second, "tts") == {"backend": "redis", "breaker": "closed", "hits": 1,
                                       "errors": 0}

    p = {"prompt": "Name a colour.", "temperature": 0, "max_tokens": 6}
    with first.client() as c:
        made = c.submit("llm", p).wait()
    assert made["event"] == "result" and not made.get("cached"), made
    with second.client() as c:
        stream = c.submit("llm", p)
        tokens = [ev["text"] for ev in stream if ev["event"] == "token"]
        hit = stream.final
    assert hit["event"] == "result" and hit.get("cached") is True, hit
    assert hit["result"] == made["result"] == "".join(tokens) and tokens
    assert hit["completion_tokens"] == made["completion_tokens"]
    assert cache_of(second, "llm")["hits"] == 1
    assert second.status()["domains"]["llm"]["cache_hits"] == 1

    # a sampled request is not repeatable: it never comes from the cache
    with second.client() as c:
        sampled = c.submit("llm", {**p, "temperature": 0.8}).wait()
    assert sampled["event"] == "result" and not sampled.get("cached")


def test_breaker_opens_when_redis_dies_and_closes_after_it_returns(make_daemon, redis_server):
    cooldown = 3.0
    d = make_daemon(config(redis_server.url, llm=False, cooldown_s=cooldown))
    # each speech worker keeps its own breaker and the domain shows the worst one: every
    # job here must go to the same worker, the first one, which takes any job while it is
    # free, once both have loaded
    workers = lambda: d.status()["domains"]["tts"]["workers"]  # noqa: E731
    wait_for(lambda: all(w["state"] == "ready" for w in workers()), 60, 0.1, "both workers")
    first, _ = speak(d, "Before the outage.")
    assert first["cached"] is False
    assert cache_of(d, "tts")["breaker"] == "closed"

    redis_server.stop()
    # no request fails because the cache did: the get and the put both fail (2 = threshold)
    during, audio = speak(d, "During the outage.")
    assert during["cached"] is False and audio
    view = cache_of(d, "tts")
    assert view["breaker"] == "open" and view["errors"] >= 2, view
    tripped = time.monotonic()
    # while open, the local disk cache serves what this daemon made, without Redis
    again, _ = speak(d, "Before the outage.")
    assert again["cached"] is True
    assert cache_of(d, "tts")["errors"] == view["errors"]  # open: Redis was not even called

    redis_server.start()
    time.sleep(max(0.0, cooldown + 0.5 - (time.monotonic() - tripped)))
    # the cooldown is over: this job's first call is the half-open trial, which succeeds
    after, _ = speak(d, "After the outage.")
    assert after["cached"] is False
    view = cache_of(d, "tts")
    assert view["breaker"] == "closed", view
    # closed again means Redis is written again: the fresh server holds this result
    assert len([k for k in redis_server.keys() if k.startswith(b"test:")]) == 1


def test_metrics_gauge_follows_the_breaker():
    from resisod.http.metrics import GatewayMetrics

    def status(breaker: str) -> dict:
        domain = {"kind": "tts", "completed": 0, "failed": 0, "cancelled": 0, "queue": {},
                  "running": 0, "preemptions": 0, "workers": [],
                  "cache": {"backend": "redis", "breaker": breaker, "hits": 0, "errors": 3}}
        return {"domains": {"tts": domain}}

    metrics = GatewayMetrics()
    assert b'resiso_cache_breaker_open{domain="tts"} 1.0' in metrics.render(status("open"))[0]
    assert b'resiso_cache_breaker_open{domain="tts"} 0.0' in metrics.render(status("closed"))[0]


def test_cache_section_is_validated_key_by_key():
    from resisod.config import ConfigError, build

    assert build({})["cache"]["backend"] == "local"
    for section, needle in (({"backend": "memcached"}, "cache.backend: must be one of"),
                            ({"url": "http://x"}, "cache.url: must be a redis://"),
                            ({"timeout_ms": 0}, "cache.timeout_ms: must be between"),
                            ({"size_mb": 1}, "cache.size_mb: unknown key")):
        with pytest.raises(ConfigError) as exc:
            build({"cache": section})
        assert any(needle in e for e in exc.value.errors), exc.value.errors
