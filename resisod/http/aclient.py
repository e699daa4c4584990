"""An asyncio client of resisod for the HTTP gateway: one socket, many requests in flight.

Events are routed by the request id they echo into one asyncio queue per request; a
background task tells the daemon which streaming requests are still listened to.
"""
from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from ..paths import _answers
from ..protocol import FINAL_EVENTS, HARD_FRAME_LIMIT, Event, Op, pack, request, unpack


class Unreachable(Exception):
    pass


class DaemonError(Exception):
    def __init__(self, ev: dict[str, Any]):
        super().__init__(ev.get("message", ""))
        self.code = ev.get("code", "")
        self.message = ev.get("message", "")
        self.event = ev


class AsyncDaemon:
    def __init__(self, socket_path: str, *, timeout: float = 30.0):
        self.path = socket_path
        self.timeout = timeout
        self.ctx = zmq.asyncio.Context.instance()
        self.sock: zmq.asyncio.Socket | None = None
        self.queues: dict[int, asyncio.Queue] = {}
        self.streaming: set[int] = set()
        self.rids = itertools.count(1)
        self.tasks: list[asyncio.Task] = []
        self.alive_s = 0.5

    async def start(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
        self.sock.connect(f"ipc://{self.path}")
        self.tasks = [asyncio.create_task(self._reader()), asyncio.create_task(self._alive())]

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.sock is not None:
            self.sock.close(0)

    def reachable(self) -> bool:
        return os.path.exists(self.path) and _answers(self.path)

    async def _reader(self) -> None:
        assert self.sock is not None
        while True:
            ev = unpack(await self.sock.recv(), max_bytes=HARD_FRAME_LIMIT)
            q = self.queues.get(ev.get("rid"))
            if q is not None:
                q.put_nowait(ev)

    async def _alive(self) -> None:
        while True:
            await asyncio.sleep(self.alive_s)
            if self.streaming and self.sock is not None:
                await self.sock.send(pack(request(Op.ALIVE, 0, rids=list(self.streaming))))

    async def _send(self, op: str, **fields: Any) -> tuple[int, asyncio.Queue]:
        if not self.reachable():
            raise Unreachable(f"resisod is not reachable at {self.path}")
        assert self.sock is not None
        rid = next(self.rids)
        try:
            frame = pack(request(op, rid, **fields))
        except (OverflowError, TypeError, ValueError) as exc:
            raise DaemonError({"code": "bad_request", "message": f"unencodable request: {exc}"})
        q: asyncio.Queue = asyncio.Queue()
        self.queues[rid] = q
        await self.sock.send(frame)
        return rid, q

    async def _next(self, rid: int, q: asyncio.Queue, timeout: float | None) -> dict[str, Any]:
        while True:
            try:
                return await asyncio.wait_for(q.get(), timeout=timeout or 3.0)
            except asyncio.TimeoutError:
                if not self.reachable():
                    raise Unreachable("resisod went away")
                if timeout is not None:
                    raise Unreachable(f"resisod did not answer in {timeout:.0f}s")

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        rid, q = await self._send(op, **fields)
        try:
            ev = await self._next(rid, q, self.timeout)
        finally:
            self.queues.pop(rid, None)
        if ev.get("event") == Event.ERROR:
            raise DaemonError(ev)
        return ev

    async def submit(self, kind: str, params: dict[str, Any], *, partials: bool = True,
                     stream: bool = True) -> "AsyncJob":
        rid, q = await self._send(Op.SUBMIT, kind=kind, params=params, stream=stream,
                                  partials=partials)
        first = await self._next(rid, q, self.timeout)
        if first.get("event") == Event.ERROR:
            self.queues.pop(rid, None)
            raise DaemonError(first)
        if not stream:
            self.queues.pop(rid, None)
        else:
            self.streaming.add(rid)
            self.alive_s = min(self.alive_s, first.get("alive_ms", 500) / 1000.0)
        return AsyncJob(self, rid, q, first)

    async def monitor(self, interval_ms: int, *, jobs: int = 0) -> AsyncIterator[dict[str, Any]]:
        """The daemon's `status` snapshots every `interval_ms` (with up to `jobs` live and
        recent jobs), for as long as this iterator is used: its rid is told alive with the
        streams'. A refusal raises DaemonError."""
        rid, q = await self._send(Op.MONITOR, interval_ms=interval_ms, jobs=jobs)
        self.streaming.add(rid)
        try:
            while True:
                ev = await self._next(rid, q, None)
                if ev.get("event") == Event.ERROR:
                    raise DaemonError(ev)
                yield ev
        finally:
            self.queues.pop(rid, None)
            self.streaming.discard(rid)


class AsyncJob:
    def __init__(self, d: AsyncDaemon, rid: int, q: asyncio.Queue, accepted: dict[str, Any]):
        self.d, self.rid, self.q = d, rid, q
        self.accepted = accepted
        self.task_id: str = accepted["task_id"]
        self.final: dict[str, Any] | None = None

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        try:
            while self.final is None:
                ev = await self.d._next(self.rid, self.q, None)
                if ev.get("event") in FINAL_EVENTS:
                    self.final = ev
                yield ev
        finally:
            self.release()

    async def wait(self) -> dict[str, Any]:
        async for _ in self.events():
            pass
        assert self.final is not None
        return self.final

    def release(self) -> None:
        self.d.queues.pop(self.rid, None)
        self.d.streaming.discard(self.rid)

    async def cancel(self) -> None:
        self.release()
        try:
            await self.d.call(Op.CANCEL, task_id=self.task_id)
        except (DaemonError, Unreachable):
            pass
