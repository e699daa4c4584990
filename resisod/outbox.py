"""Client events waiting for the commit.

Everything the daemon tells a client goes through `post` and leaves only at the end of the
loop iteration, after the store has made durable the state the event reports: a client never
hears of a job a crash could lose. (Worker messages do not wait; `WorkerLink` sends those at
once.)
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from .protocol import pack

log = logging.getLogger("resisod")


class Outbox:
    def __init__(self) -> None:
        self.items: list[tuple[bytes, bytes]] = []

    def post(self, ident: bytes, msg: dict[str, Any]) -> None:
        self.items.append((ident, pack(msg)))

    def deliver(self, send: Callable[[bytes, int], Any], more: int, noblock: int,
                full: type[Exception]) -> None:
        """Send everything posted (call after the store commit). A client whose receive
        queue is full loses that event, never the daemon its loop."""
        for ident, frame in self.items:
            try:
                send(ident, more | noblock)
                send(frame, noblock)
            except full:
                log.warning("a client's receive queue is full; dropped an event")
        self.items.clear()
