"""Operations: systemd units, logging (rotation, JSON, privacy), --check-config."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from .conftest import BIN, ROOT


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is absent")
@pytest.mark.parametrize("unit", ["systemd/resisod.service", "systemd/user/resisod.service"])
def test_systemd_units_verify(unit, tmp_path):
    text = open(os.path.join(ROOT, unit)).read()
    # verify checks that ExecStart exists: point it at this checkout's resisod
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            exe = line.split("=", 1)[1].split()[0]
            text = text.replace(exe, os.path.join(BIN, "resisod"))
    path = tmp_path / "resisod.service"
    path.write_text(text)
    user = "/user/" in unit
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)} if user else None
    r = subprocess.run(["systemd-analyze", "verify", *(["--user"] if user else []), str(path)],
                       capture_output=True, text=True, timeout=60, env=env)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                if "resisod.service" in ln and "Failed to" not in ln]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr
    assert "Type=notify" in text and "WatchdogSec=" in text


def check(tmp_path, body: str | None):
    args = [sys.executable, "-m", "resisod", "--check-config"]
    if body is not None:
        cfg = tmp_path / "c.toml"
        cfg.write_text(body)
        args += ["--config", str(cfg)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_check_config_valid_prints_effective_config(tmp_path):
    r = check(tmp_path, "[domains.image]\nkind = 'image'\ndefault_steps = 8\n")
    assert r.returncode == 0, r.stderr
    eff = json.loads(r.stdout)
    assert eff["domains"]["image"]["default_steps"] == 8
    assert eff["domains"]["image"]["max_side"] == 2048            # default filled in
    assert eff["resources"]["gpu_allocation"] == {"llm": 70, "image": 30}


def test_repository_config_is_the_defaults(tmp_path):
    r = check(tmp_path, open(os.path.join(ROOT, "config.toml")).read())
    assert r.returncode == 0, r.stderr
    d = check(tmp_path, None)
    assert json.loads(r.stdout)["domains"] == json.loads(d.stdout)["domains"]


@pytest.mark.parametrize("body,needle", [
    ("[daemon]\nsocket_mode = 1\n", "daemon.socket_mode: unknown key"),
    ("[domains.llm]\nkind = 'llm'\ncontext_size = 'big'\n",
     "domains.llm.context_size: must be an integer"),
    ("[domains.image]\nkind = 'image'\ndefault_steps = 500\n",
     "domains.image.default_steps: must be between 1 and 150"),
    ("[logging]\nlevel = 'LOUD'\n", "logging.level: must be one of"),
])
def test_check_config_errors(tmp_path, body, needle):
    r = check(tmp_path, body)
    assert r.returncode != 0
    assert needle in r.stderr, r.stderr
    assert r.stdout == ""


def test_log_rotation_json_lines_and_privacy(make_daemon, tmp_path):
    log = tmp_path / "resisod.log"
    d = make_daemon(f"""
[logging]
file = "{log}"
max_size_mb = 0.002
backups = 2
json = true
[domains.null]
kind = "null"
""")
    secret = "my-private-prompt-text"
    with d.client() as c:
        ids = [c.submit("null", {"text": secret}).wait()["task_id"] for _ in range(30)]
    d.stop()
    files = sorted(glob.glob(str(log) + "*"))
    assert str(log) + ".1" in files and len(files) <= 3      # rotated, bounded
    lines = [json.loads(ln) for f in files for ln in open(f) if ln.strip()]
    assert all({"ts", "level", "logger", "msg"} <= set(ln) for ln in lines)
    by_task = [ln for ln in lines if ln.get("task_id") == ids[-1]]
    msgs = " ".join(ln["msg"] for ln in by_task)
    # two lines a job at INFO: when it starts and when it ends (acceptance is at DEBUG)
    assert len(by_task) == 2 and "started" in msgs and "completed" in msgs, by_task
    assert secret not in open(files[0]).read() + d.read_log()  # no prompt text at INFO


def test_debug_level_logs_params(make_daemon):
    d = make_daemon("""
[logging]
level = "DEBUG"
[domains.null]
kind = "null"
""")
    with d.client() as c:
        c.submit("null", {"text": "visible-at-debug"}).wait()
    d.stop()
    assert "visible-at-debug" in d.read_log()
