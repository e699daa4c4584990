"""The HTTP gateway: real uvicorn on a free loopback port, real daemon, built-in models."""
from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
import wave

import pytest

httpx = pytest.importorskip("httpx")

from .conftest import BIN, free_port, start_gateway, wait_for  # noqa: E402


HTTP_CONFIG = """
[daemon]
heartbeat_ms = 200
[http]
enabled = true
listen = "127.0.0.1:{port}"
max_body_bytes = 65536
[domains.llm]
kind = "llm"
context_size = 512
max_tokens_limit = 48
default_max_tokens = 24
[domains.tts]
kind = "tts"
max_chars = 300
[domains.image]
kind = "image"
default_width = 64
default_height = 64
default_steps = 4
max_side = 128
max_queue = 3
"""


@pytest.fixture(scope="module")
def gw(make_module_daemon):
    return start_gateway(make_module_daemon, HTTP_CONFIG)


def post(gw, path, body, **kw):
    return httpx.post(gw.base + path, json=body, timeout=120, **kw)


def test_seed_llm_example(gw):
    r = post(gw, "/api/llm/generate", {"prompt": "What is the capital of France?",
                                       "model": "smollm2-135m-instruct", "temperature": 0.7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"task_id", "result", "status", "generation_time_ms"}
    assert body["status"] == "completed" and body["result"]


def test_seed_llm_stream(gw):
    with httpx.stream("POST", gw.base + "/api/llm/generate", timeout=60,
                      json={"prompt": "Count to five.", "stream": True, "max_tokens": 16,
                            "temperature": 0}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    import json
    events = [json.loads(ln[6:]) for ln in lines]
    assert sum("token" in e for e in events) >= 3
    assert events[-1]["done"] is True and events[-1]["status"] == "completed"


def test_seed_tts_example_and_audio_url(gw):
    r = post(gw, "/api/tts/synthesize", {"text": "Hello world", "voice": "en_US-joe-medium",
                                         "speed": 1.0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"task_id", "audio_url", "status", "duration_ms", "size_bytes"}
    audio = httpx.get(gw.base + body["audio_url"], timeout=30)
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
    with wave.open(io.BytesIO(audio.content)) as w:
        assert w.getframerate() == 22050
    assert len(audio.content) == body["size_bytes"]


def test_seed_image_example_progress_moves_to_completed(gw):
    blocker = post(gw, "/api/image/generate", {"prompt": "first", "width": 128,
                                               "height": 128, "steps": 30}).json()
    r = post(gw, "/api/image/generate", {"prompt": "A beautiful sunset over mountains",
                                         "width": 64, "height": 64, "use_turbo": False,
                                         "steps": 25, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "queued" and "estimated_time_ms" in body
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        p = httpx.get(f"{gw.base}/api/image/progress/{body['task_id']}", timeout=10).json()
        assert set(p) >= {"task_id", "status", "progress", "estimated_time_remaining_ms"}
        if not seen or seen[-1] != p["status"]:
            seen.append(p["status"])
        if p["status"] == "completed":
            break
        time.sleep(0.02)
    assert seen[0] == "queued" and "processing" in seen and seen[-1] == "completed", seen
    assert p["progress"] == 1.0 and set(p) >= {"image_url", "generation_time_ms", "size_bytes"}
    png = httpx.get(gw.base + p["image_url"], timeout=10)
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n" and len(png.content) == p["size_bytes"]
    # FIFO within a class: the job queued first had finished before the second one ended
    first = httpx.get(f"{gw.base}/api/image/progress/{blocker['task_id']}", timeout=10).json()
    assert first["status"] == "completed" and first["progress"] == 1.0, first


def test_health_and_cancel_and_errors(gw):
    h = httpx.get(gw.base + "/api/health", timeout=10).json()
    assert h["daemon"] == "reachable" and set(h["domains"]) == {"llm", "tts", "image"}
    job = post(gw, "/api/image/generate", {"prompt": "to cancel", "steps": 100,
                                           "width": 128, "height": 128}).json()
    r = httpx.delete(f"{gw.base}/api/jobs/{job['task_id']}", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert httpx.get(gw.base + "/api/image/progress/img_nope", timeout=10).status_code == 404
    assert post(gw, "/api/image/generate", {"width": 64}).status_code == 422
    bad = post(gw, "/api/image/generate", {"prompt": "x", "width": 100})
    assert bad.status_code == 400 and "multiple of 8" in bad.json()["error"]["message"]
    big = httpx.post(gw.base + "/api/llm/generate", content=b"{" + b" " * 70000 + b"}",
                     headers={"content-type": "application/json"}, timeout=10)
    assert big.status_code == 413
    # no Content-Length (chunked): the limit holds on the bytes actually read

    def chunks():
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 4096
        yield b'"}'
    chunked = httpx.post(gw.base + "/api/llm/generate", content=chunks(), timeout=10,
                         headers={"content-type": "application/json"})
    assert chunked.status_code == 413, chunked.text
    assert chunked.json()["error"]["code"] == "too_large"
    v1 = httpx.post(gw.base + "/v1/chat/completions", content=chunks(), timeout=10,
                    headers={"content-type": "application/json"})
    assert v1.status_code == 413 and v1.json()["error"]["code"] == "too_large"
    assert httpx.get(gw.base + "/api/health", timeout=10).status_code == 200


def test_queue_full_is_429_with_retry_after(gw):
    codes, ids = [], []
    for i in range(8):
        r = post(gw, "/api/image/generate", {"prompt": f"fill {i}", "steps": 60,
                                             "width": 128, "height": 128})
        codes.append(r.status_code)
        if r.status_code == 200:
            ids.append(r.json()["task_id"])
        else:
            assert r.headers.get("retry-after")
            assert r.json()["error"]["code"] == "queue_full"
    for t in ids:
        httpx.delete(f"{gw.base}/api/jobs/{t}", timeout=30)
    assert 429 in codes


def test_openai_package_chat_speech_images(gw):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=gw.base + "/v1", api_key="unused")
    models = [m.id for m in client.models.list()]
    assert "smollm2-135m-instruct" in models
    out = client.chat.completions.create(
        model="smollm2-135m-instruct", temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": "What is the capital of France? One sentence."}])
    assert "Paris" in out.choices[0].message.content
    assert out.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(
        model="smollm2-135m-instruct", max_tokens=12, stream=True,
        messages=[{"role": "user", "content": "Say hello."}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 4 and text
    speech = client.audio.speech.create(model="tts", voice="en_US-joe-medium",
                                        input="Hello from the OpenAI client.",
                                        response_format="wav")
    with wave.open(io.BytesIO(speech.content)) as w:
        assert w.getnframes() > 1000
    img = client.images.generate(prompt="a cat", size="64x64", response_format="b64_json")
    assert base64.b64decode(img.data[0].b64_json)[:4] == b"\x89PNG"
    with pytest.raises(openai.NotFoundError) as exc:  # OpenAI's answer to an unknown model
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user",
                                                                 "content": "hi"}])
    assert exc.value.status_code == 404 and exc.value.code == "model_not_found"
    assert "smollm2" in str(exc.value)


def test_metrics_parse_and_count_requests(gw):
    from prometheus_client.parser import text_string_to_metric_families
    before = httpx.get(gw.base + "/metrics", timeout=10).text
    post(gw, "/api/tts/synthesize", {"text": "Metrics count this."})
    text = httpx.get(gw.base + "/metrics", timeout=10).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("resiso_http_requests", "resiso_jobs", "resiso_queue_length",
                 "resiso_worker_rss_bytes", "resiso_preemptions", "resiso_cache_hits",
                 "resiso_job_duration_seconds", "resiso_daemon_up",
                 "resiso_worker_batch_places"):
        assert name in fams, name
    places = {(s.labels["worker"], s.labels["use"]): s.value
              for s in fams["resiso_worker_batch_places"].samples}
    assert places[("llm.0", "capacity")] == 4  # the CPU default of a llama.cpp worker
    devices = {(s.labels["worker"], s.labels["device"])
               for s in fams["resiso_worker_device"].samples}
    assert ("llm.0", "cpu") in devices    # device "auto" on a CPU build: where it really runs
    # the image domain yields to the chat: its time paused or beside it is counted
    hows = {s.labels["how"] for s in fams["resiso_batch_seconds"].samples
            if s.labels["domain"] == "image"}
    assert hows == {"paused", "co_running"}

    def count(src, route):
        fam = {f.name: f for f in text_string_to_metric_families(src)}["resiso_http_requests"]
        return sum(s.value for s in fam.samples if s.labels.get("route") == route
                   and s.name.endswith("_total"))
    assert count(text, "/api/tts/synthesize") == count(before, "/api/tts/synthesize") + 1
    done = {tuple(sorted(s.labels.items())): s.value for s in fams["resiso_jobs"].samples
            if s.name.endswith("_total")}
    assert done[(("domain", "tts"), ("kind", "tts"), ("outcome", "completed"))] >= 1


def test_schemathesis_finds_no_server_errors(gw, tmp_path):
    st = os.path.join(BIN, "schemathesis")
    if not os.path.exists(st):
        pytest.skip("schemathesis is not installed")
    r = subprocess.run([st, "run", gw.base + "/openapi.json", "--checks",
                        "not_a_server_error", "--max-examples", "15", "--request-timeout", "60",
                        "--generation-deterministic", "--exclude-path", "/metrics"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def gateway(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "resisod.http", *args],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_off_loopback_needs_an_api_key(gw, tmp_path):
    p = gateway(["--listen", f"0.0.0.0:{free_port()}", "--socket", gw.socket])
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "api_key" in err
    cfg = tmp_path / "c.toml"
    cfg.write_text('[http]\napi_key = "s3cret"\n')
    port = free_port()
    p = gateway(["--listen", f"0.0.0.0:{port}", "--socket", gw.socket, "--config", str(cfg)])
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _get(base + "/api/health") == 200, 60, 0.2, "auth gateway up")
        assert _get(base + "/v1/models") == 401
        assert _get(base + "/v1/models", {"Authorization": "Bearer wrong"}) == 401
        assert _get(base + "/v1/models", {"Authorization": "Bearer s3cret"}) == 200
    finally:
        p.terminate()
        p.wait(10)


def test_daemon_unreachable_is_503(tmp_path):
    port = free_port()
    p = gateway(["--listen", f"127.0.0.1:{port}", "--socket", str(tmp_path / "none.sock")])
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _get(base + "/api/health") == 503, 60, 0.2, "gateway up")
        r = httpx.post(base + "/api/llm/generate", json={"prompt": "hi"}, timeout=10)
        assert r.status_code == 503
        r = httpx.post(base + "/v1/chat/completions", timeout=10, json={
            "model": "x", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "error" in r.json()
    finally:
        p.terminate()
        p.wait(10)


def _get(url, headers=None):
    try:
        return httpx.get(url, headers=headers or {}, timeout=5).status_code
    except httpx.HTTPError:
        return None
