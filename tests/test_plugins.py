"""Engine plugins: distributions that declare entry points in `resiso.engines`.

Each test builds its plugins as plain directories (a package and its `.dist-info`) on a
PYTHONPATH handed to the daemon, so the daemon finds them through package metadata and its
workers import them, as they would a plugin installed with pip.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from resiso_cli.client import Rejected

ECHO = '''
import time

from resisod.engines.base import Engine


class EchoEngine(Engine):
    """Streams the prompt back word by word, as an LLM engine streams its answer."""
    kind = "llm"

    def load(self):
        self.prefix = self.domain["options"].get("prefix", "")

    def run(self, params, job):
        t0 = time.perf_counter()
        prompt = params["messages"][-1]["content"] if "messages" in params else params["prompt"]
        words = (self.prefix + prompt).split()
        out, ttft = [], None
        for word in words[:params["max_tokens"]]:
            job.checkpoint()
            piece = word if not out else " " + word
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            out.append(piece)
            job.emit("token", text=piece)
        total = time.perf_counter() - t0
        return {"result": "".join(out),
                "finish_reason": "length" if len(words) > params["max_tokens"] else "stop",
                "prompt_tokens": len(prompt.split()), "completion_tokens": len(out),
                "ttft_ms": round((ttft or total) * 1000, 2),
                "tokens_per_s": round(len(out) / total, 2) if total else 0.0,
                "generation_time_ms": round(total * 1000, 2)}
'''

BROKEN = '''
import nonexistent_dep  # a dependency the plugin's installer forgot


class BrokenEngine:
    pass
'''


def make_plugin(site, dist: str, version: str, entries: dict[str, str],
                package: str | None = None, code: str = "") -> None:
    """A distribution as pip leaves it in site-packages: its package and its metadata."""
    if package:
        (site / package).mkdir()
        (site / package / "__init__.py").write_text(textwrap.dedent(code))
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "[resiso.engines]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))


@pytest.fixture
def site(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    make_plugin(site, "echoplug", "0.1", {"llm:echo": "echoplug:EchoEngine"}, "echoplug", ECHO)
    make_plugin(site, "brokenplug", "0.1", {"llm:broken": "brokenplug:BrokenEngine"},
                "brokenplug", BROKEN)
    # claims a built-in's name: the built-in must keep it
    make_plugin(site, "clashplug", "2.0", {"llm:llama_cpp": "clashplug:Impostor"})
    return site


def plugin_env(site) -> dict[str, str]:
    paths = [str(site)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def check_config(site, body: str) -> subprocess.CompletedProcess:
    cfg = site.parent / "c.toml"
    cfg.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, "-m", "resisod", "--check-config", "--config",
                           str(cfg)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **plugin_env(site)})


def test_plugin_engine_streams_through_the_daemon(make_daemon, site):
    d = make_daemon("""
[daemon]
heartbeat_ms = 200
[domains.echo]
kind = "llm"
engine = "echo"
model = "echo-1"
options = { prefix = ">> " }
""", env=plugin_env(site))
    with d.client() as c:
        stream = c.submit("llm", {"prompt": "hello plugin world", "max_tokens": 3},
                          domain="echo")
        events = list(stream)
        st = c.status()
    tokens = [e["text"] for e in events if e["event"] == "token"]
    assert tokens == [">>", " hello", " plugin"]
    final = events[-1]
    assert final["event"] == "result" and final["status"] == "completed", final
    assert final["result"] == "".join(tokens)
    assert final["finish_reason"] == "length"
    assert final["completion_tokens"] == 3 and final["prompt_tokens"] == 3
    assert final["generation_time_ms"] >= 0 and "ttft_ms" in final and "tokens_per_s" in final
    assert st["domains"]["echo"]["state"] == "ready"
    assert st["engines"]["llm"]["echo"]["source"] == "plugin"
    assert st["engines"]["llm"]["llama_cpp"]["source"] == "built-in"
    out = d.cli("status")
    assert out.returncode == 0, out.stderr
    assert b"echo (plugin echoplug 0.1)" in out.stdout and b"llama_cpp (built-in)" in out.stdout


def test_plugin_that_cannot_be_imported_fails_only_its_domain(make_daemon, site):
    d = make_daemon("""
[daemon]
heartbeat_ms = 200
load_attempts = 1
[domains.broken]
kind = "llm"
engine = "broken"
model = "none"
[domains.null]
kind = "null"
""", env=plugin_env(site))
    st = d.status()
    broken = st["domains"]["broken"]
    assert broken["state"] == "failed", broken
    assert broken["reason"] == ("engine 'broken' (plugin brokenplug 0.1) cannot be imported: "
                                "No module named 'nonexistent_dep'")
    assert st["domains"]["null"]["state"] == "ready"
    with d.client() as c:
        assert c.submit("null", {"text": "still serving"}).wait()["result"] == "still serving"
        with pytest.raises(Rejected) as err:
            c.submit("llm", {"prompt": "hi"}, domain="broken")
    assert err.value.code == "engine_unavailable"
    assert "nonexistent_dep" in err.value.message


def test_check_config_lists_engines_and_refuses_unknown_ones(site):
    r = check_config(site, """
[domains.echo]
kind = "llm"
engine = "echo"
model = "echo-1"
""")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    echo = out["engines"]["llm"]["echo"]
    assert echo["source"] == "plugin"
    assert (echo["distribution"], echo["version"]) == ("echoplug", "0.1")
    assert out["engines"]["llm"]["llama_cpp"]["source"] == "built-in"
    assert out["engines"]["llm"]["llama_cpp"]["distribution"] == "resiso"
    assert set(out["engines"]["tts"]) == {"piper", "espeak", "coqui"}
    assert out["domains"]["echo"]["engine"] == "echo"
    assert out["domains"]["echo"]["options"] == {}
    # the clash is reported, not fatal, and the built-in keeps its name
    clash = [w for w in out["engine_warnings"] if "clashplug" in w]
    assert clash and "llm:llama_cpp" in clash[0], out["engine_warnings"]
    assert "clashplug" in r.stderr

    r = check_config(site, """
[domains.x]
kind = "llm"
engine = "vllm"
model = "m"
""")
    assert r.returncode == 2 and r.stdout == ""
    assert "domains.x.engine: for kind 'llm' must be one of" in r.stderr, r.stderr
    for needle in ("'vllm'", "'llama_cpp' (built-in)", "'transformers' (built-in)",
                   "'echo' (plugin echoplug 0.1)", "'broken' (plugin brokenplug 0.1)"):
        assert needle in r.stderr, r.stderr


def test_discovery_imports_no_engine_module(site):
    code = ("import json, sys, resisod.engines, resisod.config, resisod.status, resisod.main; "
            "print(json.dumps({'llm': resisod.config.ENGINES['llm'], "
            "'defaults': [resisod.config.ENGINES[k][0] for k in resisod.config.KINDS], "
            "'imported': [m for m in ('echoplug', 'brokenplug', 'resisod.engines.llama_cpp', "
            "'resisod.engines.null', 'torch', 'llama_cpp') if m in sys.modules]}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env={**os.environ, **plugin_env(site)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"llama_cpp", "transformers", "echo", "broken"} <= set(out["llm"])
    assert out["defaults"] == ["llama_cpp", "piper", "diffusers", "null"]
    assert out["imported"] == []
