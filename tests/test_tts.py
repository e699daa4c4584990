"""TTS domain through the real daemon: Piper with the built-in voice, espeak-ng, Coqui."""
from __future__ import annotations

import array
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
import wave

import pytest

from resiso_cli.client import Rejected

from .conftest import ROOT

TTS_CONFIG = """
[daemon]
heartbeat_ms = 200
[domains.tts]
kind = "tts"
max_chars = 200
[domains.espeak]
kind = "tts"
engine = "espeak"
model = "en-us"
"""


@pytest.fixture(scope="module")
def tts_daemon(make_module_daemon):
    return make_module_daemon(TTS_CONFIG)


def wav_info(data: bytes) -> tuple[int, float, float]:
    with wave.open(io.BytesIO(data)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        frames = w.readframes(w.getnframes())
        rate = w.getframerate()
    samples = array.array("h", frames)
    rms = math.sqrt(sum(s * s for s in samples) / max(1, len(samples)))
    return rate, len(samples) / rate, rms


def test_piper_sentence_is_real_speech(tts_daemon, tmp_path):
    out = tmp_path / "a.wav"
    r = tts_daemon.cli("tts", "The quick brown fox jumps over the lazy dog.", "--out", str(out),
                       "--json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    rate, seconds, rms = wav_info(out.read_bytes())
    assert rate == 22050 and body["sample_rate"] == 22050
    assert 1.0 <= seconds <= 10.0
    assert rms > 300  # not silence
    assert abs(body["duration_ms"] / 1000 - seconds) < 0.05
    assert body["cached"] is False and body["size_bytes"] > 0


def test_first_sentence_arrives_before_the_last_is_synthesized(tts_daemon):
    text = ("Hello. This is the second sentence. " + "And this last sentence is much longer, "
            "so that it takes the synthesizer a good while longer to finish than the first "
            "one did, which leaves time to hear the start.")
    with tts_daemon.client() as c:
        stream = c.submit("tts", {"text": text})
        times = []
        for ev in stream:
            if ev["event"] == "audio":
                times.append((time.monotonic(), ev["index"], len(ev["pcm"])))
        final = stream.final
    assert final["event"] == "result"
    assert [t[1] for t in times] == [0, 1, 2]
    first, last = times[0][0], times[-1][0]
    # the long last sentence takes real synthesis time after the first one was sent
    assert last - first > 0.03, last - first
    assert sum(t[2] for t in times) // 2 == round(final["duration_ms"] * 22.05, -1) or \
        abs(sum(t[2] for t in times) / 2 / 22050 * 1000 - final["duration_ms"]) < 1


def test_repeat_is_cached_and_byte_identical(tts_daemon, tmp_path):
    text = "Caching makes repeated speech instant."
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    r1 = tts_daemon.cli("tts", text, "--out", str(a), "--json")
    r2 = tts_daemon.cli("tts", text, "--out", str(b), "--json")
    assert json.loads(r1.stdout)["cached"] is False
    second = json.loads(r2.stdout)
    assert second["cached"] is True
    assert a.read_bytes() == b.read_bytes()
    with open(second["audio_path"], "rb") as f:
        assert f.read() == a.read_bytes()
    r3 = tts_daemon.cli("tts", text, "--speed", "1.5", "--out", str(tmp_path / "c.wav"),
                        "--json")
    assert json.loads(r3.stdout)["cached"] is False  # another speed is another entry


def test_speed_changes_duration(tts_daemon):
    with tts_daemon.client() as c:
        slow = c.submit("tts", {"text": "Speed test sentence.", "speed": 0.5}).wait()
        fast = c.submit("tts", {"text": "Speed test sentence.", "speed": 2.0}).wait()
    assert slow["duration_ms"] > 2.5 * fast["duration_ms"]


def test_stdout_wav(tts_daemon):
    r = tts_daemon.cli("tts", "Hi there.", "--out", "-")
    assert r.returncode == 0
    rate, seconds, _ = wav_info(r.stdout)
    assert rate == 22050 and seconds > 0.2


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed")
def test_espeak_engine_writes_a_wav(tts_daemon, tmp_path):
    out = tmp_path / "e.wav"
    r = tts_daemon.cli("tts", "Hello from espeak. Second sentence.", "--domain", "espeak",
                       "--out", str(out))
    assert r.returncode == 0, r.stderr
    rate, seconds, rms = wav_info(out.read_bytes())
    assert rate == 22050 and seconds > 0.5 and rms > 100


@pytest.mark.parametrize("params,needle", [
    ({"text": ""}, "empty"),
    ({"text": "   "}, "empty"),
    ({"text": "x" * 201}, "limit is 200"),
    ({"text": "hi", "speed": 0.1}, "speed"),
    ({"text": "hi", "speed": 5}, "speed"),
])
def test_bad_input_rejected(tts_daemon, params, needle):
    with tts_daemon.client() as c:
        with pytest.raises(Rejected) as exc:
            c.submit("tts", params, domain="tts")
    assert exc.value.code == "bad_request" and needle in exc.value.message


def test_unknown_voice(tts_daemon):
    with tts_daemon.client() as c:
        final = c.submit("tts", {"text": "hi", "voice": "martian"}, domain="tts").wait()
    assert final["event"] == "error" and final["code"] == "bad_request"
    assert "martian" in final["message"] and "en_US-joe-medium" in final["message"]


def _coqui_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("TTS") is not None


@pytest.mark.skipif(not _coqui_installed(), reason="coqui-tts is not installed")
def test_coqui_engine_loads_a_glow_tts_checkpoint(make_daemon, tmp_path):
    # see tests/standins/README.md: Coqui's import needs torchaudio, which has no build for
    # this CPU torch; the stand-ins are on PYTHONPATH only here, for the daemon's workers too
    standins = os.path.join(ROOT, "tests", "standins")
    env = {"PYTHONPATH": standins}
    model = tmp_path / "glow"
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "build_coqui_model.py"),
                    str(model)], check=True, timeout=300, env={**os.environ, **env},
                   capture_output=True)
    d = make_daemon(f"""
[domains.coqui]
kind = "tts"
engine = "coqui"
model = "{model}"
""", env=env)
    assert d.status()["domains"]["coqui"]["state"] == "ready"
    out = tmp_path / "c.wav"
    r = d.cli("tts", "hello there. second sentence.", "--domain", "coqui", "--out", str(out),
              timeout=300)
    assert r.returncode == 0, r.stderr
    rate, seconds, rms = wav_info(out.read_bytes())
    assert rate == 22050 and seconds > 0.1 and rms > 0


def _torchaudio_loads() -> bool:
    r = subprocess.run([sys.executable, "-c", "import torchaudio"], capture_output=True,
                       timeout=120)
    return r.returncode == 0


@pytest.mark.skipif(not _coqui_installed() or _torchaudio_loads(),
                    reason="needs coqui-tts installed and torchaudio unloadable")
def test_coqui_import_failure_marks_domain_failed(make_daemon, tmp_path):
    # no stand-ins here: on this machine `import TTS` fails for want of torchaudio
    (tmp_path / "model.pth").write_bytes(b"x")
    (tmp_path / "config.json").write_text("{}")
    d = make_daemon(f"""
[domains.coqui]
kind = "tts"
engine = "coqui"
model = "{tmp_path}"
""")
    st = d.status()["domains"]["coqui"]
    assert st["state"] == "failed" and "cannot be imported" in st["reason"], st
    with d.client() as c:
        with pytest.raises(Rejected) as exc:
            c.submit("tts", {"text": "hi"}, domain="coqui")
    assert exc.value.code == "engine_unavailable"
