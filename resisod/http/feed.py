"""The console's live feed: one daemon `monitor` per gateway process, shared by every tab.

Each open page holds a small queue here. The first subscriber starts the monitor, every
snapshot is copied to all queues, and the last one to leave stops it: ten open tabs cost
the daemon one monitor, and a gateway nobody looks at costs it nothing.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from .aclient import DaemonError, Unreachable

log = logging.getLogger("resisod.http")

# per-domain numbers the console does not draw (Prometheus reads them from /metrics)
HEAVY_DOMAIN_KEYS = ("duration_hist", "ttft_hist")


def slim(ev: dict[str, Any]) -> dict[str, Any]:
    """A snapshot as the page uses it: no envelope, no histograms or engine inventory."""
    out = {k: v for k, v in ev.items() if k not in ("v", "rid", "event", "engines", "aliases")}
    out["domains"] = {name: {k: v for k, v in d.items() if k not in HEAVY_DOMAIN_KEYS}
                      for name, d in ev.get("domains", {}).items()}
    return out


class Feed:
    def __init__(self, daemon: Any, *, interval_ms: int = 1000, jobs: int = 100):
        self.daemon = daemon
        self.interval_ms, self.jobs = interval_ms, jobs
        # a daemon that restarted under a standalone gateway forgets the monitor without a
        # word: a feed silent this long opens a new one
        self.stale_s = max(5.0, 5 * interval_ms / 1000)
        self.queues: set[asyncio.Queue] = set()
        self.task: asyncio.Task | None = None
        self.last: dict[str, Any] | None = None
        self.opened = 0  # monitors opened so far

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=1)
        self.queues.add(q)
        if self.last is not None:  # a new tab draws the machine at once, not a second later
            q.put_nowait({**self.last, "viewers": len(self.queues)})
        if self.task is None:
            self.task = asyncio.create_task(self._run())
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.queues.discard(q)
        if not self.queues and self.task is not None:
            self.task.cancel()
            self.task, self.last = None, None

    def publish(self, msg: dict[str, Any]) -> None:
        msg = {**msg, "viewers": len(self.queues)}
        for q in self.queues:
            if q.full():  # a tab that fell behind needs only the newest snapshot
                q.get_nowait()
            q.put_nowait(msg)

    async def _run(self) -> None:
        while True:
            self.opened += 1
            stream = self.daemon.monitor(self.interval_ms, jobs=self.jobs)
            try:
                while True:
                    ev = await asyncio.wait_for(anext(stream), self.stale_s)
                    self.last = {"type": "status", **slim(ev)}
                    self.publish(self.last)
            except asyncio.CancelledError:
                raise
            except asyncio.TimeoutError:
                self.fail("unreachable", f"resisod sent no snapshot for {self.stale_s:.0f}s")
            except Unreachable as exc:
                self.fail("unreachable", str(exc))
            except DaemonError as exc:
                self.fail(exc.code or "error", exc.message)
            except Exception as exc:  # the feed must outlive a bad snapshot
                log.exception("console feed failed")
                self.fail("gateway_error", f"the live feed failed ({type(exc).__name__})")
            finally:
                await stream.aclose()
            await asyncio.sleep(1.0)

    def fail(self, code: str, message: str) -> None:
        self.last = None
        self.publish({"type": "error", "error": {"code": code, "message": message}})
