"""The original design's own requests, config file and Chinese text, as a new user sends them:
against the default configuration (which serves a Mandarin voice), and against a daemon
started from the design's `config.json`."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import wave

import pytest

from resisod import builtin, config as rconfig
from resisod.domains import Domain, pick
from resisod.protocol import Code, ProtocolError
from resisod.voices import detect_language, language_of_name, split_sentences

from .conftest import ROOT, start_gateway

httpx = pytest.importorskip("httpx")
espeak = pytest.mark.skipif(not (os.path.exists("/usr/bin/espeak-ng")),
                            reason="espeak-ng is not installed")

# the design documents' three example requests, as bytes
SEED_TTS = '{"text": "这是一段测试文本", "voice": "zh-CN", "speed": 1.0}'.encode()
SEED_LLM = ('{"prompt": "请简单解释什么是资源隔离调度？", "model": "qwen2.5", '
            '"max_tokens": 64, "temperature": 0.7}').encode()
SEED_IMAGE = ('{"prompt": "一只在月光下奔跑的狐狸", "width": 256, "height": 256, '
              '"use_turbo": true}').encode()
JSON = {"content-type": "application/json"}


def seed_config(port: int, llm_path: str, **models: dict) -> dict:
    """The design's deployment-guide config.json, its paths pointed at real files."""
    return {
        "server": {"port": port, "max_concurrent_connections": 32,
                   "request_timeout_ms": 120000},
        "resources": {"gpu_allocation": {"llm_percentage": 70, "image_percentage": 30},
                      "cpu_threads": 2, "max_memory_mb": 8192},
        "models": {
            "llm": {"engine_type": "QWEN_2_5", "model_path": llm_path, "device_id": 0,
                    "default_max_tokens": 64},
            **models,
        },
        "logging": {"level": "INFO", "file": "logs/server.log", "max_size_mb": 20},
    }


@pytest.fixture(scope="module")
def default_gw(make_module_daemon):
    """The default configuration, as shipped; only the gateway's port is chosen."""
    return start_gateway(make_module_daemon, """
[http]
enabled = true
listen = "127.0.0.1:{port}"
""")


@pytest.fixture(scope="module")
def seed_gw(make_module_daemon):
    """A daemon started from the design's config.json (the LLM served as qwen2.5)."""
    def config(port: int) -> str:
        cfg = seed_config(port, builtin.llm_path("builtin:smollm2-135m-instruct"),
                          tts={"engine_type": "PYTTSX3", "voice": "zh-CN", "speed": 1.0})
        return json.dumps(cfg, ensure_ascii=False, indent=2)
    return start_gateway(make_module_daemon, config, config_name="config.json")


# --- routing, pure -------------------------------------------------------------------------
def test_voice_names_and_scripts():
    assert [language_of_name(n) for n in ("zh-CN", "zh_CN", "zh", "cmn", "zh-cn",
                                          "zh_CN-huayan-medium", "en_US-joe-medium")] == \
        ["zh", "zh", "zh", "zh", "zh", "zh", "en"]
    assert language_of_name("alloy") is None
    assert detect_language("这是一段测试文本") == "zh"
    assert detect_language("これはテストです") == "ja"  # kana, though it has Han too
    assert detect_language("Hello") == "en" and detect_language("123 !") is None
    assert split_sentences("这是一段测试文本。第二句。") == ["这是一段测试文本。", "第二句。"]
    assert split_sentences("你好！Hi there. 再见？好；") == ["你好！", "Hi there.", "再见？", "好；"]
    assert split_sentences("One. Two?\nThree") == ["One.", "Two?", "Three"]


def _domains(cfg_text: dict) -> tuple[dict, dict]:
    cfg = rconfig.build(cfg_text)
    return {n: Domain(n, c) for n, c in cfg["domains"].items()}, cfg["aliases"]


def test_tts_requests_route_by_voice_then_by_the_texts_language():
    domains, aliases = _domains({})  # the default configuration: tts (English), tts-zh
    route = lambda p: (lambda d, r: (d.name, r.get("voice")))(*pick(domains, None, "tts", p,
                                                                     aliases))
    for voice in ("zh-CN", "zh", "cmn", "zh_CN", "ZH-cn", "mandarin"):
        assert route({"text": "x", "voice": voice}) == ("tts-zh", ""), voice
    assert route({"text": "这是一段测试文本"}) == ("tts-zh", "")
    assert route({"text": "Hello there"}) == ("tts", "")
    assert route({"text": "Hello", "voice": "en_US-joe-medium"}) == ("tts", "")
    assert route({"text": "Hello", "voice": "en-US"}) == ("tts", "")
    # OpenAI's voices: a voice of the text's language
    assert route({"text": "你好", "voice": "alloy"}) == ("tts-zh", "")
    assert route({"text": "Hello", "voice": "nova"}) == ("tts", "")
    # a name no domain claims goes to the engine of the text's language, which checks it
    assert route({"text": "Hello", "voice": "p225"}) == ("tts", "p225")
    # a piper Chinese voice file, configured by the user, is found by its file name
    domains, aliases = _domains({"domains": {"tts": {}, "zh": {
        "kind": "tts", "engine": "piper", "model": "/voices/zh_CN-huayan-medium.onnx"}}})
    assert pick(domains, None, "tts", {"text": "x", "voice": "zh_CN-huayan-medium"},
                aliases)[0].name == "zh"
    assert pick(domains, None, "tts", {"text": "中文"}, aliases)[0].name == "zh"


def test_model_names_and_aliases_route_or_answer_model_not_found():
    domains, aliases = _domains({"domains": {"llm": {"model_name": "qwen2.5"}, "tts": {},
                                             "tts-zh": {}, "image": {}}})
    assert pick(domains, None, "llm", {"model": "qwen2.5"}, aliases)[0].name == "llm"
    assert pick(domains, None, "tts", {"model": "tts-1", "text": "中文"},
                aliases)[0].name == "tts-zh"
    assert pick(domains, None, "image", {"model": "dall-e-3"}, aliases)[0].name == "image"
    for kind, model in (("llm", "gpt-4o"), ("llm", "dall-e-3"), ("image", "sdxl")):
        with pytest.raises(ProtocolError) as exc:
            pick(domains, None, kind, {"model": model}, aliases)
        assert exc.value.code == Code.MODEL_NOT_FOUND and model in exc.value.message
    # a user maps gpt-4o onto the LLM domain
    domains, aliases = _domains({"aliases": {"models": {"gpt-4o": "llm"}}})
    assert pick(domains, None, "llm", {"model": "gpt-4o"}, aliases)[0].name == "llm"
    with pytest.raises(rconfig.ConfigError, match="aliases.models.x: 'nowhere' is neither"):
        rconfig.build({"aliases": {"models": {"x": "nowhere"}}})


# --- the seed's config.json ----------------------------------------------------------------
def check_config(path: str, **env: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "resisod", "--check-config"]
    if path:
        args += ["--config", path]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, **env})


def test_the_seed_config_json_maps_field_by_field(tmp_path):
    llm = tmp_path / "models" / "qwen2.5-7b-instruct-q4_k_m.gguf"
    llm.parent.mkdir()
    llm.write_bytes(b"GGUF")
    (tmp_path / "models" / "glow-tts").mkdir()
    (tmp_path / "models" / "sd-turbo").mkdir()
    cfg = seed_config(8080, "./models/qwen2.5-7b-instruct-q4_k_m.gguf",
                      tts={"engine_type": "COQUI_GLOW_TTS", "model_path": "./models/glow-tts",
                           "voice": "zh-CN", "speed": 1.2, "device_id": -1},
                      image={"engine_type": "STABLE_DIFFUSION_1_5_TURBO",
                             "model_path": "./models/sd-turbo", "device_id": 0,
                             "default_width": 512, "default_height": 512,
                             "default_steps": 4})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    r = check_config(str(path))
    assert r.returncode == 0, r.stderr
    eff = json.loads(r.stdout)
    assert eff["http"]["enabled"] is True and eff["http"]["listen"] == "127.0.0.1:8080"
    assert eff["daemon"]["max_clients"] == 32
    assert eff["daemon"]["request_timeout_ms"] == 120000
    assert eff["resources"]["gpu_allocation"] == {"llm": 70, "image": 30}
    assert eff["resources"]["cpu_threads"] == 2 and eff["resources"]["max_memory_mb"] == 8192
    assert eff["logging"]["level"] == "INFO" and eff["logging"]["max_size_mb"] == 20
    assert eff["logging"]["file"] == str(tmp_path / "logs" / "server.log")
    d = eff["domains"]
    assert list(d) == ["llm", "tts", "image"]
    assert (d["llm"]["kind"], d["llm"]["engine"], d["llm"]["model"], d["llm"]["model_name"],
            d["llm"]["device"], d["llm"]["default_max_tokens"]) == \
        ("llm", "llama_cpp", str(llm), "qwen2.5", "cuda:0", 64)
    assert (d["tts"]["engine"], d["tts"]["model"], d["tts"]["voice"], d["tts"]["speed"],
            d["tts"]["device"]) == \
        ("coqui", str(tmp_path / "models" / "glow-tts"), "zh-CN", 1.2, "cpu")
    assert (d["image"]["engine"], d["image"]["model"], d["image"]["device"],
            d["image"]["default_width"], d["image"]["default_height"],
            d["image"]["default_steps"]) == \
        ("diffusers", str(tmp_path / "models" / "sd-turbo"), "cuda:0", 512, 512, 4)
    # the same file through the seed's environment variable, and --port over server.port
    r = check_config("", CONFIG_PATH=str(path))
    assert r.returncode == 0 and json.loads(r.stdout)["domains"]["llm"]["model_name"] == "qwen2.5"
    r = subprocess.run([sys.executable, "-m", "resisod", "--check-config", "--config",
                        str(path), "--port", "9090"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert json.loads(r.stdout)["http"]["listen"] == "127.0.0.1:9090"


@pytest.mark.parametrize("change, message", [
    (lambda c: c["models"]["llm"].update(engine_type="GPT_5"),
     "models.llm.engine_type: 'GPT_5' is not an engine type for llm; allowed: LLAMA,"),
    (lambda c: c["models"]["llm"].update(model_path="./models/missing.gguf"),
     "models.llm.model_path: './models/missing.gguf' does not exist"),
    (lambda c: c["server"].update(max_connections=10),
     "server.max_connections: unknown key; allowed: host, max_concurrent_connections, port, "
     "request_timeout_ms"),
])
def test_broken_seed_configs_are_refused_with_the_key(tmp_path, change, message):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    cfg = seed_config(8080, "./m.gguf")
    change(cfg)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    r = check_config(str(path))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    path.write_text("{not json")
    r = check_config(str(path))
    assert r.returncode == 2 and "not valid JSON" in r.stderr


# --- the seed's requests against a running daemon ---------------------------------------
@espeak
def test_seed_tts_example_speaks_mandarin_with_the_default_config(default_gw):
    r = httpx.post(default_gw.base + "/api/tts/synthesize", content=SEED_TTS, headers=JSON,
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"task_id", "audio_url", "status", "duration_ms", "size_bytes"}
    assert (body["status"], body["domain"], body["voice"]) == ("completed", "tts-zh", "cmn")
    audio = httpx.get(default_gw.base + body["audio_url"], timeout=30)
    with wave.open(io.BytesIO(audio.content)) as w:
        seconds = w.getnframes() / w.getframerate()
    assert abs(seconds * 1000 - body["duration_ms"]) < 50 and seconds > 0.5
    # without a voice, the text's script chooses the Mandarin voice too
    r = httpx.post(default_gw.base + "/api/tts/synthesize", timeout=60,
                   json={"text": "第二段测试文本"})
    assert (r.json()["domain"], r.json()["voice"]) == ("tts-zh", "cmn")
    r = httpx.post(default_gw.base + "/api/tts/synthesize", timeout=60,
                   json={"text": "An English sentence."})
    assert r.json()["domain"] == "tts"


@espeak
def test_cli_tts_without_a_voice_speaks_chinese_in_sentence_chunks(default_gw, tmp_path):
    out = tmp_path / "a.wav"
    r = default_gw.cli("tts", "这是一段测试文本。第二句。", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    final = json.loads(r.stdout.decode("utf-8").strip().splitlines()[-1])
    assert (final["domain"], final["voice"], final["chunks"]) == ("tts-zh", "cmn", 2)
    with wave.open(str(out)) as w:
        assert w.getnframes() > 0.5 * w.getframerate()


def test_seed_image_example_estimates_from_the_first_job(default_gw):
    r = httpx.post(default_gw.base + "/api/image/generate", content=SEED_IMAGE, headers=JSON,
                   timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "queued" and body["estimated_time_ms"] > 0, body
    remaining, status = [], None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and status != "completed":
        p = httpx.get(f"{default_gw.base}/api/image/progress/{body['task_id']}",
                      timeout=10).json()
        status = p["status"]
        if status == "processing":
            remaining.append(p["estimated_time_remaining_ms"])
        time.sleep(0.02)
    assert status == "completed", p
    assert p["width"] == 256 and p["height"] == 256
    assert remaining == sorted(remaining, reverse=True)  # it counts down, never up


def test_openai_clients_names_work_with_the_default_config(default_gw):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=default_gw.base + "/v1", api_key="unused")
    ids = {m.id for m in client.models.list()}
    assert {"tts-1", "tts-1-hd", "gpt-4o-mini-tts", "dall-e-2", "dall-e-3"} <= ids
    speech = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.",
                                        response_format="wav")
    with wave.open(io.BytesIO(speech.content)) as w:
        assert w.getnframes() > 1000
    img = client.images.generate(model="dall-e-3", prompt="一只猫", size="64x64")
    assert img.data[0].url.startswith("/images/")
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user",
                                                                  "content": "你好"}])
    assert exc.value.code == "model_not_found" and "smollm2-135m-instruct" in str(exc.value)
    # the seed's LLM request names a model this configuration does not serve
    r = httpx.post(default_gw.base + "/api/llm/generate", content=SEED_LLM, headers=JSON,
                   timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_seed_llm_example_with_the_seed_config(seed_gw):
    r = httpx.post(seed_gw.base + "/api/llm/generate", content=SEED_LLM, headers=JSON,
                   timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"task_id", "result", "status", "generation_time_ms"}
    assert body["status"] == "completed" and body["result"] and body["domain"] == "llm"
    st = seed_gw.status()
    assert "qwen2.5" in st["domains"]["llm"]["models"]
    assert os.path.exists(os.path.join(seed_gw.run_dir, "logs", "server.log"))


@espeak
def test_seed_tts_example_with_the_seed_config(seed_gw):
    r = httpx.post(seed_gw.base + "/api/tts/synthesize", content=SEED_TTS, headers=JSON,
                   timeout=60)
    assert r.status_code == 200, r.text
    assert (r.json()["domain"], r.json()["voice"]) == ("tts", "cmn")


def test_chinese_image_prompt_from_the_cli_and_the_client(default_gw, tmp_path):
    out = tmp_path / "猫.png"
    r = default_gw.cli("image", "一只在月光下奔跑的狐狸", "--width", "64", "--height", "64",
                       "--steps", "2", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr.decode("utf-8", "replace")
    final = json.loads(r.stdout.decode("utf-8").strip().splitlines()[-1])
    assert final["status"] == "completed" and out.read_bytes()[:4] == b"\x89PNG"
    with default_gw.client() as c:
        final = c.run("image", {"prompt": "一只猫", "width": 64, "height": 64, "steps": 2})
        assert final["event"] == "result"
        rec = c.get(final["task_id"])
        assert rec["status"] == "completed" and rec["width"] == 64
