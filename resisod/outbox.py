"""Client events waiting for the commit.

Everything the daemon tells a client goes through `post` and leaves only at the end of the
loop iteration, after the store has made durable the state the event reports: a client never
hears of a job a crash could lose. (Worker messages do not wait; `WorkerLink` sends those at
once.)
"""
from __future__ import annotations

from typing import Any, Callable

from .protocol import pack


class Outbox:
    def __init__(self) -> None:
        self.items: list[tuple[bytes, bytes]] = []

    def post(self, ident: bytes, msg: dict[str, Any]) -> None:
        self.items.append((ident, pack(msg)))

    def deliver(self, sock: Any, send: Callable[[Any, bytes, int], Any], more: int,
                noblock: int, refused: type[Exception]) -> dict[bytes, Any]:
        """Send everything posted on `sock` with `send(sock, frame, flags)` (call after the
        store commit). The client socket is ROUTER_MANDATORY with a bounded queue per client,
        so a client that has gone, or has stopped reading while its queue filled up, refuses;
        it gets nothing more from this batch, and its identity is returned (with the error)
        for the broker to drop."""
        dropped: dict[bytes, Any] = {}
        for ident, frame in self.items:
            if dropped and ident in dropped:
                continue
            try:
                send(sock, ident, more | noblock)
                send(sock, frame, noblock)
            except refused as exc:
                dropped[ident] = exc
        self.items.clear()
        return dropped
