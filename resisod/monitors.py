"""Live views of the machine: clients that asked for the status every so often.

`resiso top` and the gateway's web console each hold one `monitor` request open; the daemon
builds the snapshot once per tick for every monitor that is due and pushes it as a `status`
event, so ten open views cost the loop one snapshot, and none costs a request per refresh.
A monitor lives while its client keeps saying `alive` for it, like a job stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .protocol import Code, Event, ProtocolError, event

MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 60.0
MAX_MONITORS = 64        # open views at once, over all clients
MAX_JOBS = 200           # jobs listed per snapshot


@dataclass
class Monitor:
    ident: bytes
    rid: Any
    interval_s: float
    jobs: int
    next_due: float
    last_seen: float


class Monitors:
    def __init__(self, post: Callable[[bytes, dict[str, Any]], None], *, silence_s: float):
        self.post = post
        self.silence_s = silence_s
        self.open: dict[tuple[bytes, Any], Monitor] = {}

    def add(self, ident: bytes, rid: Any, now: float, *, interval_s: float, jobs: int) -> None:
        if not MIN_INTERVAL_S <= interval_s <= MAX_INTERVAL_S:
            raise ProtocolError(Code.BAD_REQUEST, f"'interval_ms' must be between "
                                f"{MIN_INTERVAL_S * 1000:.0f} and {MAX_INTERVAL_S * 1000:.0f}")
        if not 0 <= jobs <= MAX_JOBS:
            raise ProtocolError(Code.BAD_REQUEST, f"'jobs' must be between 0 and {MAX_JOBS}")
        if (ident, rid) not in self.open and len(self.open) >= MAX_MONITORS:
            raise ProtocolError(Code.QUEUE_FULL, f"{MAX_MONITORS} monitors are open; close one")
        # the first snapshot goes out at the next tick
        self.open[(ident, rid)] = Monitor(ident, rid, interval_s, jobs, now, now)

    def alive(self, ident: bytes, rids: list[Any], now: float) -> list[Any]:
        """Note the monitors among `rids` as listened to; return the other rids."""
        rest = []
        for r in rids:
            m = self.open.get((ident, r)) if isinstance(r, (int, str)) else None
            if m is None:
                rest.append(r)
            else:
                m.last_seen = now
        return rest

    def drop_client(self, ident: bytes) -> None:
        for key in [k for k in self.open if k[0] == ident]:
            del self.open[key]

    def excuse(self, held: float, now: float) -> None:
        """The daemon was deaf for `held` seconds: not the monitors' silence."""
        for m in self.open.values():
            m.last_seen = min(now, m.last_seen + held)

    def tick(self, now: float, snapshot: Callable[[], dict[str, Any]],
             jobs: Callable[[int], list[dict[str, Any]]]) -> int:
        """Push a snapshot to every monitor that is due; forget silent ones. Returns how
        many were sent."""
        if not self.open:
            return 0
        for key in [k for k, m in self.open.items() if now - m.last_seen > self.silence_s]:
            del self.open[key]
        due = [m for m in self.open.values() if now >= m.next_due]
        if not due:
            return 0
        st = snapshot()
        listed = jobs(max(m.jobs for m in due)) if any(m.jobs for m in due) else []
        for m in due:
            self.post(m.ident, event(Event.STATUS, m.rid, **st, jobs=listed[:m.jobs]))
            m.next_due = now + m.interval_s
        return len(due)
