"""Shared helpers for the benchmarks: a daemon on a temporary socket, percentiles, tables."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from resiso_cli.client import Client  # noqa: E402
from resisod.paths import _answers  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)


class Daemon:
    """resisod with a given config in a temporary directory, stopped on exit."""

    def __init__(self, config: str, env: dict[str, str] | None = None):
        self.dir = tempfile.mkdtemp(prefix="rsb-", dir="/tmp")
        self.socket = os.path.join(self.dir, "d.sock")
        cfg = os.path.join(self.dir, "config.toml")
        with open(cfg, "w") as f:
            f.write(textwrap.dedent(config))
        self.log = open(os.path.join(self.dir, "daemon.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resisod", "--config", cfg, "--socket", self.socket,
             "--state-dir", os.path.join(self.dir, "state")],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})

    def __enter__(self) -> "Daemon":
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if os.path.exists(self.socket) and _answers(self.socket):
                with Client(self.socket) as c:
                    st = c.status()
                if all(d["state"] != "loading" for d in st["domains"].values()):
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(open(self.log.name).read())
            time.sleep(0.1)
        raise RuntimeError("daemon did not become ready")

    def client(self) -> Client:
        return Client(self.socket)

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def table(title: str, header: list[str], rows: list[list[object]]) -> str:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r]
                        for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa
    out = [f"### {title}", "", line(cells[0]),
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def cached_dir(path: str, build, marker: str) -> bool:
    """Make `path` with `build(tmp)` unless it already holds `marker`; False when it did.
    Built in a sibling directory and renamed into place, so a half-built one is never used."""
    if os.path.exists(os.path.join(path, marker)):
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
    try:
        build(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def timed_chat(client: Client, params: dict) -> tuple[float, float]:
    """One streamed LLM request: (TTFT ms to the first token event, decode tokens/s over
    the tokens after the first, by the result's own token count)."""
    t0 = time.perf_counter()
    first = None
    for ev in client.submit("llm", params):
        if ev["event"] == "token" and first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    if ev["event"] != "result" or first is None:
        raise RuntimeError(f"the chat did not stream to a result: {ev}")
    return (first - t0) * 1000, (ev["completion_tokens"] - 1) / (end - first)


class StepLoop(threading.Thread):
    """Jobs back to back from a thread: `job(n, loop)` runs job n and appends the time of each
    of its steps to `loop.steps`, and should stop early once `loop.stop` is set; `cpus` pins
    this thread. `window` gives steps/min over a stretch of the loop."""

    def __init__(self, job, cpus: set[int] | None = None):
        super().__init__(daemon=True)
        self.job, self.cpus = job, cpus
        self.stop = threading.Event()
        self.steps: list[float] = []
        self.errors: list[object] = []

    def run(self) -> None:
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)  # this thread only
        n = 0
        while not self.stop.is_set():
            n += 1
            self.job(n, self)

    def window(self, settle_s: float, window_s: float = 0.0, during=None) -> tuple[float, object]:
        """Start, let `settle_s` pass, then (steps/min over `window_s` or over a call of
        `during()`, what `during` returned); the loop is stopped and joined before returning."""
        self.start()
        time.sleep(settle_s)
        t0 = time.monotonic()
        out = during() if during else time.sleep(window_s)
        t1 = time.monotonic()
        self.stop.set()
        self.join(600)
        if self.errors:
            raise RuntimeError(f"a job of the loop failed: {self.errors[0]}")
        return sum(t0 <= s <= t1 for s in self.steps) / (t1 - t0) * 60, out


@contextlib.contextmanager
def ready_daemon(config: str, env: dict[str, str] | None = None):
    """A Daemon whose every domain must be ready (not failed) once it has loaded."""
    with Daemon(config, env) as d:
        with d.client() as c:
            bad = {n: s["state"] for n, s in c.status()["domains"].items()
                   if s["state"] != "ready"}
        if bad:
            with open(d.log.name, errors="replace") as f:
                raise RuntimeError(f"domains not ready: {bad}; daemon log:\n{f.read()[-4000:]}")
        yield d
