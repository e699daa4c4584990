"""The `resiso` command through its real entry point against a real daemon."""
from __future__ import annotations

import json
import os
import subprocess

from .conftest import BIN


def run(args, env=None, **kw):
    return subprocess.run([os.path.join(BIN, "resiso"), *args], capture_output=True,
                          timeout=60, env={**os.environ, **(env or {})}, **kw)


def test_version():
    r = run(["--version"])
    assert r.returncode == 0 and r.stdout.decode().startswith("resiso ")


def test_unreachable_daemon_exits_3_and_says_how_to_start(tmp_path):
    r = run(["status"], env={"RESISO_SOCKET": str(tmp_path / "none.sock")})
    assert r.returncode == 3
    assert r.stdout == b""
    assert b"resisod" in r.stderr and b"start" in r.stderr
    r = run(["llm", "hi", "--json"], env={"RESISO_SOCKET": str(tmp_path / "none.sock")})
    assert r.returncode == 3
    body = json.loads(r.stdout)
    assert body["error"]["code"] == "unreachable"


def test_usage_error_exits_2(null_daemon):
    r = null_daemon.cli("image", "x", "--width", "notanumber")
    assert r.returncode == 2


def test_submit_json_shape_and_stream_separation(null_daemon):
    r = null_daemon.cli("submit", "null", "-p", "steps=3", "-p", 'text="done"', "--json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert body["status"] == "completed" and body["result"] == "done"
    assert body["task_id"].startswith("nul_")
    for k in ("generation_time_ms", "created_at", "finished_at"):
        assert k in body
    assert r.stderr == b""


def test_failed_job_exits_1_with_error_code(null_daemon):
    r = null_daemon.cli("submit", "null", "-p", 'fail="engine_error"', "--json")
    assert r.returncode == 1
    body = json.loads(r.stdout)
    assert body["status"] == "failed" and body["error"]["code"] == "engine_error"
    r = null_daemon.cli("submit", "null", "-p", 'fail="engine_error"')
    assert r.returncode == 1 and b"engine_error" in r.stderr and r.stdout == b""


def test_rejected_exits_4(null_daemon):
    r = null_daemon.cli("submit", "null", "-p", 'steps="many"')
    assert r.returncode == 4 and b"bad_request" in r.stderr
    r = null_daemon.cli("show", "nul_doesnotexist", "--json")
    assert r.returncode == 4 and json.loads(r.stdout)["error"]["code"] == "not_found"


def test_no_wait_wait_show_jobs_cancel(null_daemon):
    r = null_daemon.cli("submit", "null", "-p", "steps=2", "-p", "delay_ms=50", "--no-wait")
    assert r.returncode == 0
    task_id = r.stdout.decode().strip()
    assert task_id.startswith("nul_")
    r = null_daemon.cli("wait", task_id, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "completed"
    r = null_daemon.cli("show", task_id, "--json")
    assert json.loads(r.stdout)["task_id"] == task_id
    r = null_daemon.cli("jobs", "--json")
    assert task_id in [j["task_id"] for j in json.loads(r.stdout)["jobs"]]
    r = null_daemon.cli("submit", "null", "-p", "steps=5000", "-p", "delay_ms=10", "--no-wait")
    long_id = r.stdout.decode().strip()
    r = null_daemon.cli("cancel", long_id, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {
        "task_id": long_id, "status": "cancelled", "cancelled": True}
    r = null_daemon.cli("wait", long_id)
    assert r.returncode == 1


def test_status_json(null_daemon):
    r = null_daemon.cli("status", "--json")
    assert r.returncode == 0
    st = json.loads(r.stdout)
    w = st["domains"]["null"]["workers"][0]
    for k in ("pid", "state", "cpus", "sched", "device", "rss_mb"):
        assert k in w
    r = null_daemon.cli("status")
    assert r.returncode == 0 and b"null" in r.stdout
