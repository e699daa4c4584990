"""Shared helpers for the benchmarks: a daemon on a temporary socket, percentiles, tables."""
from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
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
