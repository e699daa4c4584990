"""Fixtures: a real resisod on a temporary socket with real worker processes.

Every daemon a test starts is stopped at the end of the test (or module) and the test fails
if any of its worker processes outlives it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any, Callable

import pytest

from resiso_cli.client import Client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def wait_for(pred, timeout: float = 20.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# A runner may start the suite with SIGINT ignored (a shell's background job does), and every
# child would inherit that: the CLI's Ctrl-C tests would then fail for the runner's reasons. A
# handler, unlike SIG_IGN, is reset to the default in a child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_answers(base: str) -> bool:
    import httpx
    try:
        return httpx.get(base + "/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_gateway(make: Callable[..., "DaemonHandle"], config: str | Callable[[int], str], *,
                  timeout: float = 90.0, **kw: Any) -> "DaemonHandle":
    """A daemon with its HTTP gateway on a free loopback port, once the gateway answers.
    `config` is a template with `{port}`, or a function of the port (for JSON configs, whose
    braces a template cannot hold). The handle's `base` is the gateway's URL."""
    port = free_port()
    d = make(config(port) if callable(config) else config.format(port=port), **kw)
    d.base = f"http://127.0.0.1:{port}"
    wait_for(lambda: http_answers(d.base), timeout, 0.2, "gateway up")
    return d


class DaemonHandle:
    def __init__(self, config: str, *, env: dict[str, str] | None = None,
                 state_dir: str | None = None, run_dir: str | None = None,
                 config_name: str = "config.toml"):
        # ipc:// paths must stay short: keep the socket in a short directory under /tmp
        self.run_dir = run_dir or tempfile.mkdtemp(prefix="rs-", dir="/tmp")
        self.socket = os.path.join(self.run_dir, "sock", "d.sock")
        self.state_dir = state_dir or os.path.join(self.run_dir, "state")
        self.config_path = os.path.join(self.run_dir, config_name)
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(config))
        self.log_path = os.path.join(self.run_dir, "daemon.log")
        self.env = {**os.environ, "RESISO_SOCKET": self.socket, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.worker_pids: set[int] = set()

    def start(self, *, wait_ready: bool = True, timeout: float = 180.0) -> "DaemonHandle":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resisod", "--config", self.config_path,
             "--socket", self.socket, "--state-dir", self.state_dir],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for(lambda: self.proc.poll() is not None or self._answers(), 30,
                 what="daemon socket")
        if self.proc.poll() is not None:
            raise AssertionError(f"resisod exited {self.proc.returncode}:\n{self.read_log()}")
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def _answers(self) -> bool:
        from resisod.paths import _answers
        return os.path.exists(self.socket) and _answers(self.socket)

    def client(self, **kw: Any) -> Client:
        return Client(self.socket, **kw)

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            st = c.status()
        for d in st["domains"].values():
            for w in d["workers"]:
                if w["pid"]:
                    self.worker_pids.add(w["pid"])
        return st

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready():
            st = self.status()
            return all(d["state"] in ("ready", "failed") for d in st["domains"].values())
        wait_for(ready, timeout, 0.1, "domains ready")

    def cli(self, *args: str, input: bytes | None = None, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(BIN, "resiso"), *args], input=input,
                              capture_output=True, timeout=timeout,
                              env={**self.env, **(env or {})}, cwd=self.run_dir)

    def read_log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        try:
            self.status()  # remember the current worker pids for the leak check
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        code = self.proc.returncode
        self.proc = None
        return code

    def leaked_workers(self) -> list[int]:
        time.sleep(0.05)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            alive = [p for p in self.worker_pids if pid_alive(p)]
            if not alive:
                return []
            time.sleep(0.1)
        return alive


@contextlib.contextmanager
def daemons():
    """Start daemons with `make(config)`; all are stopped and checked for leaks at the end."""
    handles: list[DaemonHandle] = []

    def make(config: str, *, start: bool = True, **kw: Any) -> DaemonHandle:
        h = DaemonHandle(config, **kw)
        handles.append(h)
        return h.start() if start else h

    yield make
    leaks = []
    for h in handles:
        h.stop()
        leaks += h.leaked_workers()
        shutil.rmtree(h.run_dir, ignore_errors=True)
    for pid in leaks:
        os.kill(pid, signal.SIGKILL)
    assert not leaks, f"worker processes outlived their daemon: {leaks}"


@pytest.fixture
def make_daemon():
    with daemons() as make:
        yield make


@pytest.fixture(scope="module")
def make_module_daemon():
    with daemons() as make:
        yield make


NULL_CONFIG = """
[daemon]
heartbeat_ms = 200
[domains.null]
kind = "null"
workers = 1
max_queue = 8
"""


@pytest.fixture
def null_daemon(make_daemon) -> DaemonHandle:
    return make_daemon(NULL_CONFIG)
