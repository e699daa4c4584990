"""The Python client of resisod — the same one the CLI uses.

    from resiso_cli.client import Client
    with Client() as c:
        stream = c.submit("llm", {"prompt": "Hello", "max_tokens": 32})
        for ev in stream:
            if ev["event"] == "token":
                print(ev["text"], end="", flush=True)
        print(stream.final)
"""
from __future__ import annotations

import collections
import itertools
import math
import os
import time
import weakref
from typing import Any, Iterator

import zmq

from resisod import zmq_raw
from resisod.paths import _answers, client_socket
from resisod.protocol import FINAL_EVENTS, HARD_FRAME_LIMIT, Event, Op, pack, request, unpack

RCVTIMEO = int(zmq.RCVTIMEO)
RCVTIMEO_SLACK_MS = 5


class DaemonUnreachable(Exception):
    def __init__(self, path: str, detail: str = ""):
        super().__init__(
            f"cannot reach resisod at {path}{': ' + detail if detail else ''}. Start it with "
            f"`resisod` (or `systemctl start resisod`), or point RESISO_SOCKET at its socket.")
        self.path = path


class Rejected(Exception):
    """The daemon answered with an error (bad request, queue full, not found, ...)."""

    def __init__(self, event: dict[str, Any]):
        super().__init__(f"{event.get('code')}: {event.get('message')}")
        self.code = event.get("code", "")
        self.message = event.get("message", "")
        self.event = event


class Client:
    def __init__(self, socket_path: str | None = None, *, timeout: float = 30.0):
        self.path = socket_path or client_socket()
        self.timeout = timeout
        if not os.path.exists(self.path):
            raise DaemonUnreachable(self.path, "no socket there")
        if not _answers(self.path):
            raise DaemonUnreachable(self.path, "nothing listens on the socket")
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
        self.sock.connect(f"ipc://{self.path}")
        self._rcvtimeo = -1
        self._rids = itertools.count(1)
        self._inbox: dict[Any, collections.deque] = collections.defaultdict(collections.deque)
        # streams still waiting for their final event, kept alive by every wait of this
        # client (a `cancel` or `status` call included); a stream the caller dropped is
        # forgotten, and the daemon cancels its job once it stops hearing about it
        self._streams: weakref.WeakValueDictionary[Any, JobStream] = \
            weakref.WeakValueDictionary()
        self._last_alive = time.monotonic()
        self._alive_due = math.inf  # when an alive may next be due (see keep_alive)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close(0)

    # --- plumbing ----------------------------------------------------------------------------
    def send(self, op: str, **fields: Any) -> int:
        rid = next(self._rids)
        zmq_raw.send(self.sock, pack(request(op, rid, **fields)), 0)
        return rid

    def keep_alive(self, now: float) -> float | None:
        """Tell the daemon the open streams still listen, when due; returns the seconds
        until the next time (None: no open stream)."""
        if not self._streams:
            return None
        if now < self._alive_due:  # the common case, once per event: no scan of the streams
            return self._alive_due - now
        streams = list(self._streams.values())
        if not streams:
            return None
        interval = min(s.alive_s for s in streams)
        if now - self._last_alive >= interval:
            # a streaming job whose client stops saying this is cancelled by the daemon
            self.send(Op.ALIVE, rids=[s.rid for s in streams])
            self._last_alive = now
        self._alive_due = self._last_alive + interval
        return max(0.0, self._alive_due - now)

    def listen(self, stream: "JobStream | Monitor") -> None:
        """Keep `stream` told of in the alives; its interval may bring the next one forward."""
        self._streams[stream.rid] = stream
        self._alive_due = min(self._alive_due, self._last_alive + stream.alive_s)

    def recv(self, rid: Any, timeout: float | None) -> dict[str, Any] | None:
        """The next event for `rid`, or None after `timeout` seconds without one."""
        box = self._inbox.get(rid)
        if box:
            return box.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = self.sock
        while True:
            now = time.monotonic()
            alive_in = self.keep_alive(now)
            left = None if deadline is None else deadline - now
            if alive_in is not None and (left is None or alive_in < left):
                left = alive_in
            # a blocking recv with a receive timeout: one wake-up per event, where poll-then-
            # recv costs a poller per call
            wait = -1 if left is None else max(0, math.ceil(left * 1000))
            # the timeout is set again only when it would wake more than RCVTIMEO_SLACK_MS
            # late, or far too early (one waking early just loops once more): the wait left
            # shrinks a little with every event, and a setsockopt per event is measurable
            have = self._rcvtimeo
            if wait != have and (have < 0 or wait < 0 or have > wait + RCVTIMEO_SLACK_MS
                                 or have < wait // 2):
                sock.setsockopt(RCVTIMEO, wait)
                self._rcvtimeo = wait
            try:
                frame = sock.recv()
            except zmq.Again:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue  # an alive was due
            msg = unpack(frame, max_bytes=HARD_FRAME_LIMIT)
            other = msg.get("rid")
            if other == rid:
                return msg
            if msg.get("event") in FINAL_EVENTS:
                self._streams.pop(other, None)  # it has all it waits for: stop the alives
            self._inbox[other].append(msg)

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        rid = self.send(op, **fields)
        deadline = time.monotonic() + self.timeout
        while True:
            ev = self.recv(rid, timeout=min(2.0, max(0.0, deadline - time.monotonic())))
            if ev is not None:
                break
            if not _answers(self.path):
                raise DaemonUnreachable(self.path, "the daemon went away")
            if time.monotonic() >= deadline:
                raise DaemonUnreachable(self.path, f"no answer to {op!r} in {self.timeout:.0f}s")
        if ev.get("event") == Event.ERROR:
            raise Rejected(ev)
        return ev

    # --- ops ---------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return self.call(Op.PING)

    def status(self) -> dict[str, Any]:
        return self.call(Op.STATUS)

    def jobs(self, *, limit: int = 20, state: str | None = None) -> list[dict[str, Any]]:
        fields: dict[str, Any] = {"limit": limit}
        if state:
            fields["state"] = state
        return self.call(Op.JOBS, **fields)["jobs"]

    def get(self, task_id: str, *, data: bool = False) -> dict[str, Any]:
        """The job's record; with data=True also its result file's bytes in `data`, fetched
        chunk by chunk."""
        rec = self.call(Op.GET, task_id=task_id, data=data)
        if data and "data" in rec:
            parts = [rec["data"]]
            got = len(rec["data"])
            while got < rec["data_size"]:
                more = self.call(Op.GET, task_id=task_id, data=True, offset=got)["data"]
                if not more:
                    break  # the file shrank under us; return what there is
                parts.append(more)
                got += len(more)
            rec["data"] = b"".join(parts)
        return rec

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self.call(Op.CANCEL, task_id=task_id)

    def submit(self, kind: str, params: dict[str, Any], *, domain: str | None = None,
               priority: str | None = None, timeout_ms: int | None = None,
               stream: bool = True, partials: bool = True) -> "JobStream":
        """Submit a job. Raises Rejected if the daemon refuses it; otherwise the returned
        stream's `accepted` holds the task id, queue position and estimate. With
        stream=False the job is detached: iterate nothing, `watch` it later. With
        partials=False only `accepted` and the final event arrive."""
        fields = self._submit_fields(kind, params, domain, priority, timeout_ms)
        fields["stream"] = stream
        if not partials:
            fields["partials"] = False
        rid = self.send(Op.SUBMIT, **fields)
        return JobStream(self, rid)

    def run(self, kind: str, params: dict[str, Any], *, domain: str | None = None,
            priority: str | None = None, timeout_ms: int | None = None) -> dict[str, Any]:
        """Submit a job and block until it ends; returns its final event (`result`,
        `error` with the job's `task_id`, or `cancelled`). The daemon sends nothing else for
        it — no `accepted`, no partials — so this is the cheapest way to run a job. Raises
        Rejected if the daemon refuses the job."""
        fields = self._submit_fields(kind, params, domain, priority, timeout_ms)
        rid = self.send(Op.SUBMIT, ack=False, partials=False, **fields)
        stream = JobStream(self, rid, acked=False)
        final = stream.wait()
        if final["event"] == Event.ERROR and "task_id" not in final:
            raise Rejected(final)  # refused before it became a job
        return final

    @staticmethod
    def _submit_fields(kind: str, params: dict[str, Any], domain: str | None,
                       priority: str | None, timeout_ms: int | None) -> dict[str, Any]:
        fields: dict[str, Any] = {"kind": kind, "params": params}
        if domain:
            fields["domain"] = domain
        if priority:
            fields["priority"] = priority
        if timeout_ms is not None:
            fields["timeout_ms"] = timeout_ms
        return fields

    def watch(self, task_id: str) -> "JobStream":
        rid = self.send(Op.WATCH, task_id=task_id)
        return JobStream(self, rid)

    def monitor(self, interval_ms: int = 1000, *, jobs: int = 0) -> "Monitor":
        """A live view: iterate it for a status snapshot (with up to `jobs` live and recent
        jobs) every `interval_ms`; it lasts while it is iterated (or the client waits)."""
        return Monitor(self, self.send(Op.MONITOR, interval_ms=interval_ms, jobs=jobs))


class Monitor:
    """The `status` events of one `monitor` request; an error event raises `Rejected`."""

    def __init__(self, client: Client, rid: int):
        self.client, self.rid = client, rid
        self.alive_s = 0.5
        client.listen(self)  # kept alive by every wait of the client

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next snapshot, or None after `timeout` seconds without one."""
        ev = self.client.recv(self.rid, timeout)
        if ev is not None and ev.get("event") == Event.ERROR:
            self.client._streams.pop(self.rid, None)
            raise Rejected(ev)
        return ev

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            ev = self.next(None)
            if ev is not None:
                yield ev

    def close(self) -> None:
        self.client._streams.pop(self.rid, None)  # the daemon forgets it after a silence


class JobStream:
    """Events of one job, ending with its final event (kept in `final`).

    `acked=False` is a request the daemon answers with the final event only: nothing is
    read up front and the task id becomes known with that event."""

    def __init__(self, client: Client, rid: int, *, acked: bool = True):
        self.client = client
        self.rid = rid
        self.final: dict[str, Any] | None = None
        self.task_id: str | None = None
        self.accepted: dict[str, Any] | None = None
        self.alive_s = 0.5
        self._pending: collections.deque = collections.deque()
        client.listen(self)
        if not acked:
            return
        first = self._next(client.timeout)
        if first["event"] == Event.ERROR and "task_id" not in first:
            raise Rejected(first)  # refused before it became a job
        self.task_id = first.get("task_id")
        self.accepted = first
        self.alive_s = first.get("alive_ms", 500) / 1000.0
        client.listen(self)
        self._pending.append(first)

    def _next(self, timeout: float | None) -> dict[str, Any]:
        """Next event (the client keeps the daemon told we listen); notices a dead daemon."""
        deadline = None if timeout is None else time.monotonic() + timeout
        silent_since = time.monotonic()
        while True:
            ev = self.client.recv(self.rid, timeout=self.alive_s)
            if ev is not None:
                if ev.get("event") in FINAL_EVENTS:
                    self.client._streams.pop(self.rid, None)
                return ev
            now = time.monotonic()
            if now - silent_since > 3.0:
                if not _answers(self.client.path):
                    raise DaemonUnreachable(self.client.path, "the daemon went away")
                silent_since = now
            if deadline is not None and now >= deadline:
                raise DaemonUnreachable(self.client.path, "no answer")

    def _step(self) -> dict[str, Any]:
        ev = self._pending.popleft() if self._pending else self._next(None)
        if ev.get("event") in FINAL_EVENTS:
            self.final = ev
            self.task_id = self.task_id or ev.get("task_id")
        return ev

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.final is None:
            yield self._step()

    def wait(self) -> dict[str, Any]:
        while self.final is None:
            self._step()
        return self.final

    def cancel(self) -> dict[str, Any]:
        return self.client.cancel(self.task_id) if self.task_id else {}
