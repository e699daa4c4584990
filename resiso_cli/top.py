"""`resiso top`: the machine panel, live, fed by the daemon's `monitor` stream.

The daemon pushes a snapshot every interval; this side only draws it (`panel.render`) and
reads keys. On a terminal the view takes the alternate screen and quits on `q` or Ctrl-C;
piped, it prints one snapshot and exits, so `resiso top | less` and scripts get a report.
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import typer

from .session import connected

if TYPE_CHECKING:
    from .client import Client, Monitor


def top(interval: int = typer.Option(500, "--interval", "-i",
                                     help="Refresh every N milliseconds (100-60000)."),
        jobs: int = typer.Option(30, "--jobs", "-n", help="Live and recent jobs to list "
                                                        "(0-200).")) -> None:
    """A live view of domains, workers and jobs (q or Ctrl-C quits); one snapshot when
    piped."""
    # checked here rather than with Typer's min/max, whose range check imports pydantic
    for value, low, high, name in ((interval, 100, 60000, "--interval"),
                                   (jobs, 0, 200, "--jobs")):
        if not low <= value <= high:
            raise typer.BadParameter(f"must be between {low} and {high}", param_hint=name)
    with connected() as client:
        monitor = client.monitor(interval, jobs=jobs)
        if not sys.stdout.isatty():
            _print_once(client, monitor)
            return
        try:
            _live(client, monitor, interval, jobs)
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a live view is left, as with `q`
        finally:
            monitor.close()


def _print_once(client: Client, monitor: Monitor) -> None:
    from rich.console import Console

    from . import panel
    from .client import DaemonUnreachable
    snap = monitor.next(client.timeout)
    monitor.close()
    if snap is None:
        raise DaemonUnreachable(client.path, "no snapshot")
    # piped output keeps whole columns instead of the 80-column default
    Console(width=200).print(panel.render(snap))


def _live(client: Client, monitor: Monitor, interval_ms: int, jobs: int) -> None:
    import zmq
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from resisod.paths import _answers

    from . import keys, panel
    from .client import DaemonUnreachable

    console = Console()
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    poller = zmq.Poller()
    poller.register(client.sock, zmq.POLLIN)
    if fd is not None:
        poller.register(fd, zmq.POLLIN)
    # a daemon silent this long is gone, or restarted and has forgotten this view
    silence_s = max(3.0, 3 * interval_ms / 1000)
    last_seen = time.monotonic()
    snap: dict[str, Any] | None = None
    note = ""
    with keys.cbreak(fd), Live(Text("waiting for resisod…"), console=console, screen=True,
                               auto_refresh=False, redirect_stderr=False) as live:
        while True:
            # wake for a key, a snapshot, or the next `alive` that keeps the view open
            wait_s = client.keep_alive(time.monotonic())
            ready = dict(poller.poll(round(1000 * min(0.5, wait_s if wait_s is not None
                                                      else 0.5))))
            if fd is not None and fd in ready and keys.quit_pressed(fd):
                return
            fresh = None
            while (ev := monitor.next(0)) is not None:
                fresh = ev  # only the newest of a backlog is drawn
            now = time.monotonic()
            if fresh is not None:
                snap, last_seen, note = fresh, now, ""
            elif now - last_seen > silence_s:
                if not _answers(client.path):
                    raise DaemonUnreachable(client.path, "the daemon went away")
                monitor.close()
                monitor = client.monitor(interval_ms, jobs=jobs)
                last_seen, note = now, "  (resubscribed: the daemon restarted)"
            else:
                continue
            if snap is not None:
                footer = (f"q quits · every {interval_ms} ms · "
                          f"{time.strftime('%H:%M:%S')}{note}")
                live.update(panel.render(snap, height=console.height, footer=footer),
                            refresh=True)
