"""`resiso top`: the panel as a pure function, the live view through a pseudo-terminal, and
the one-snapshot report when piped."""
from __future__ import annotations

import io
import os
import time

import pytest

from .conftest import BIN

pexpect = pytest.importorskip("pexpect")

TWO_NULL_DOMAINS = """
[daemon]
heartbeat_ms = 200
[domains.alpha]
kind = "null"
workers = 1
max_queue = 8
[domains.bravo]
kind = "null"
workers = 1
max_queue = 8
"""
QUIT_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def daemon(make_module_daemon):
    return make_module_daemon(TWO_NULL_DOMAINS)


def _snapshot(**worker_extra):
    worker = {"name": "img.0", "pid": 4242, "state": "busy", "cpus": [1], "threads": 1,
              "sched": "idle", "device": "cuda:0", "rss_mb": 812.4, "job": "img_run",
              "restarts": 2, "last_error": "", "loaded": True, **worker_extra}
    return {
        "version": "0.1.0", "pid": 100, "socket": "/run/resiso/resisod.sock",
        "uptime_s": 3725.0, "stopping": False, "loop": {"max_iteration_ms": 3.2, "stalls": 0},
        "domains": {"img": {
            "kind": "image", "engine": "diffusers", "model": "/models/sd-turbo/",
            "state": "ready", "reason": "", "paused": True, "workers": [worker],
            "queue": {"realtime": 0, "normal": 1, "batch": 2}, "running": 1,
            "completed": 7, "failed": 1, "cancelled": 0, "preemptions": 5,
            "p50_ms": 1500.0, "p95_ms": 2900.0}},
        "gpus": [{"index": 0, "name": "RTX", "used_mb": 2048.0, "total_mb": 8192.0}],
        "jobs": [
            {"task_id": "img_run", "status": "running", "domain": "img", "progress": 0.3,
             "step": 3, "total": 10, "started_at": 1000.0,
             "estimated_time_remaining_ms": 4200, "paused": True},
            {"task_id": "img_wait", "status": "queued", "domain": "img", "position": 1,
             "estimated_time_ms": 9000},
            {"task_id": "img_bad", "status": "failed", "domain": "img",
             "generation_time_ms": 120, "error": {"code": "engine_error", "message": "x"}},
        ],
    }


def _text(renderable, width=160):
    from rich.console import Console
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(renderable)
    return buf.getvalue()


def test_panel_shows_domains_workers_and_jobs():
    from resiso_cli import panel
    out = _text(panel.render(_snapshot(), now=1002.5, footer="q quits"))
    assert "resisod 0.1.0" in out and "up 1h02m" in out
    img = next(line for line in out.splitlines() if "diffusers" in line)
    for cell in ("image", "sd-turbo", "ready", "0/1/2", "1500", "2900", "yes"):
        assert cell in img, (cell, img)
    worker = next(line for line in out.splitlines() if "img.0" in line)
    for cell in ("4242", "idle", "cuda:0", "812", "img_run"):
        assert cell in worker, (cell, worker)
    assert "vram MB" not in out  # no worker reports one
    running = next(line for line in out.splitlines() if "img_run" in line and "3/10" in line
                   and "running" in line)
    assert "4.2s" in running and "paused" in running and "2.5s" in running
    assert "━" in running  # a bar, not only the numbers
    queued = next(line for line in out.splitlines() if "img_wait" in line)
    assert "queued #1" in queued and "9.0s" in queued
    assert "engine_error" in next(line for line in out.splitlines() if "img_bad" in line)
    assert "GPU 0 RTX: 2048/8192 MB" in out and "q quits" in out


def test_panel_vram_column_and_height_trims_jobs():
    from resiso_cli import panel
    out = _text(panel.render(_snapshot(vram_mb=1536.0)))
    assert "vram MB" in out
    assert "1536" in next(line for line in out.splitlines() if "img.0" in line)
    for height in (15, 16, 40):  # the job list gives way; the live jobs come first
        out = _text(panel.render(_snapshot(), height=height, footer="q quits", now=1002.5))
        assert len(out.splitlines()) <= height, (height, out)
        assert "img_run" in out and "q quits" in out
    assert "img_wait" not in _text(panel.render(_snapshot(), height=15, footer="q quits"))
    assert "img_bad" in _text(panel.render(_snapshot(), height=40))


def test_piped_top_prints_one_snapshot(daemon):
    t = time.monotonic()
    r = daemon.cli("top")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "alpha" in out and "bravo" in out and "alpha.0" in out and "jobs" in out
    assert "\x1b[" not in out  # a report, not a screen
    assert time.monotonic() - t < 30


def test_bad_interval_is_a_usage_error(daemon):
    r = daemon.cli("top", "--interval", "5")
    assert r.returncode == 2


def _spawn(daemon, cmd: str):
    env = {**daemon.env, "TERM": "xterm-256color", "COLUMNS": "150", "LINES": "45"}
    return pexpect.spawn("/bin/bash", ["--norc", "--noprofile", "-c", cmd], env=env,
                         dimensions=(45, 150), timeout=30, cwd=daemon.run_dir)


def test_live_view_follows_jobs_and_quits_on_q(daemon):
    top = os.path.join(BIN, "resiso")
    # the terminal settings after `top` exits tell whether it put cbreak mode back
    child = _spawn(daemon, f"stty -a > before.txt; {top} top --interval 200; rc=$?; "
                           f"stty -a > after.txt; exit $rc")
    try:
        child.expect("alpha")
        child.expect("bravo")
        with daemon.client() as c:
            job = c.submit("null", {"steps": 400, "delay_ms": 20}, domain="bravo", stream=False)
        child.expect(job.task_id)
        child.expect("running")
        t = time.monotonic()
        child.send("q")
        child.expect(pexpect.EOF, timeout=QUIT_WITHIN_S + 10)
        took = time.monotonic() - t
        child.close()
        assert child.exitstatus == 0, child.before
        assert took < QUIT_WITHIN_S
        before, after = (open(os.path.join(daemon.run_dir, n)).read()
                         for n in ("before.txt", "after.txt"))
        assert " icanon" in after and " echo " in after
        assert after == before
        with daemon.client() as c:
            c.cancel(job.task_id)
    finally:
        child.close(force=True)


def test_ctrl_c_quits_with_status_0(daemon):
    child = _spawn(daemon, f"exec {os.path.join(BIN, 'resiso')} top")
    try:
        child.expect("alpha.0")
        t = time.monotonic()
        child.sendintr()
        child.expect(pexpect.EOF, timeout=QUIT_WITHIN_S + 10)
        child.close()
        assert child.exitstatus == 0 and time.monotonic() - t < QUIT_WITHIN_S
    finally:
        child.close(force=True)

