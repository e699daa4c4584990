"""Jobs, how an attempt ends (`Outcome`), the job table and the per-domain priority queue."""
from __future__ import annotations

import collections
import heapq
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from .protocol import FINISHED_STATES, KIND_PREFIX, PRIORITY_ORDER, Code, JobState

# seeded from the OS once: a getrandom() syscall per job is measurable at thousands of jobs/s
_rng = random.Random(os.urandom(16))


def new_task_id(kind: str, node: str = "") -> str:
    """`<kind>_<ms timestamp><random>`: sortable by creation, unique across restarts.

    With a node name (`[daemon] node`), `<kind>_<node>-<ms timestamp><random>`: a load
    balancer in front of several daemons sends every request about the job to its owner by
    the part between `_` and `-` (hex digits hold no `-`, so ids without a node never match).
    """
    head = _heads.get((kind, node))
    if head is None:
        head = _heads[(kind, node)] = f"{KIND_PREFIX.get(kind, kind[:3])}_" + \
            (f"{node}-" if node else "")
    # the 12 hex digits of the ms timestamp, then 10 of random bits, in one format
    return "%s%022x" % (head, int(time.time() * 1000) << 40 | _rng.getrandbits(40))


_heads: dict[tuple[str, str], str] = {}  # (kind, node) -> the id's fixed start


def task_node(task_id: str) -> str:
    """The node part of a task id ("" for an id made without one)."""
    rest = task_id.partition("_")[2]
    node, dash, _ = rest.partition("-")
    return node if dash else ""


@dataclass(eq=False, slots=True)  # slots: one is built per request and read on every event
class Job:
    task_id: str
    domain: str
    kind: str
    params: dict[str, Any]
    priority: str
    created_at: float = field(default_factory=time.time)
    state: str = JobState.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    deadline: float | None = None       # monotonic seconds; None = no deadline
    attempts: int = 0                   # how many times a worker started it
    interrupted: int = 0                # times a daemon crash or stop cut it off mid-run
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # {"code", "message"}
    progress: dict[str, Any] | None = None  # the last progress event, for late watchers
    paused: bool = False
    # paused by the scheduler to give its batch place to a job of higher priority
    bumped: bool = False
    slot: Any = None                    # the worker slot running it
    estimate_ms: float = 0.0
    # (client identity, rid) -> monotonic time the client was last heard from
    watchers: dict[tuple[bytes, Any], float] = field(default_factory=dict)
    # (client identity, rid) of `cancel` requests waiting for the job to stop
    cancel_waiters: list[tuple[bytes, Any]] = field(default_factory=list)
    # watchers that asked for the final event only (non-streaming clients)
    final_only: set[tuple[bytes, Any]] = field(default_factory=set)
    # set when a cancel is sent to the worker: how the job ends once the worker stops it,
    # decided where the cause was known (a deadline, a client, a shutdown)
    on_cancel: "Outcome | None" = None
    stop_by: float | None = None        # monotonic; a worker not done with the cancel by then is killed
    detached: bool = False              # submitted without a streaming client: never auto-cancel
    last_position: int = -1             # the queue position last told to watchers
    step_mark: float = 0.0              # monotonic time of dispatch, then of the last step
    eta_ms: float | None = None         # the remaining time last told: a countdown never rises
    units: int = 0                      # tokens / audio chunks relayed (pace measurement)
    seq: int = 0                        # FIFO order within a priority class

    def streaming_watchers(self) -> Any:
        """Watchers that want partial events (tokens, progress, audio, positions)."""
        if not self.final_only:
            return self.watchers
        return [k for k in self.watchers if k not in self.final_only]

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def cancel_requested(self) -> bool:
        return self.on_cancel is not None

    def record(self) -> dict[str, Any]:
        """The job as clients see it (seed API field names)."""
        out: dict[str, Any] = {
            "task_id": self.task_id, "status": self.state, "domain": self.domain,
            "kind": self.kind, "priority": self.priority, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "attempts": self.attempts,
        }
        if self.kind in ("image", "null"):  # stepped kinds report how far they are
            if self.progress:
                out["progress"] = self.progress.get("progress")
                out["step"], out["total"] = self.progress.get("step"), self.progress.get("total")
            if self.state == JobState.COMPLETED:
                out["progress"] = 1.0
        if self.result:
            out.update(self.result)
        if self.error:
            out["error"] = self.error
        if self.paused:
            out["paused"] = True
        return out


# not frozen: a frozen dataclass sets its fields through object.__setattr__, which costs
# more than the rest of a job's ending; nothing changes an outcome once it is made
@dataclass(slots=True)
class Outcome:
    """How one attempt at a job ends: a finished state, or back to the queue (`retry`)."""
    state: str                          # a finished JobState, or QUEUED for a retry
    code: str = ""                      # error code for FAILED; empty otherwise
    message: str = ""                   # error message for FAILED, the reason for a retry
    result: dict[str, Any] | None = None

    @property
    def retry(self) -> bool:
        return self.state == JobState.QUEUED

    @property
    def error(self) -> dict[str, Any] | None:
        return {"code": self.code, "message": self.message} if self.code else None


def completed(result: dict[str, Any]) -> Outcome:
    return Outcome(JobState.COMPLETED, result=result)


def failed(code: str, message: str) -> Outcome:
    return Outcome(JobState.FAILED, code or Code.ENGINE_ERROR, message)


def retry(reason: str) -> Outcome:
    return Outcome(JobState.QUEUED, message=reason)


CANCELLED = Outcome(JobState.CANCELLED)


class JobTable:
    """Which jobs exist: the live ones (queued or running) and the most recent finished ones.

    Finished jobs beyond `keep_finished` leave memory but stay in the store, where `get`
    still finds them until their results expire.
    """

    def __init__(self, keep_finished: int = 10000):
        self.keep_finished = keep_finished
        self.by_id: dict[str, Job] = {}
        self.live: set[Job] = set()
        self._finished: collections.deque[str] = collections.deque()

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, task_id: str) -> Job | None:
        return self.by_id.get(task_id)

    def add(self, job: Job) -> None:
        self.by_id[job.task_id] = job
        if job.state in FINISHED_STATES:
            self._retain(job)
        else:
            self.live.add(job)

    def finish(self, job: Job) -> None:
        self.live.discard(job)
        self._retain(job)

    def _retain(self, job: Job) -> None:
        self._finished.append(job.task_id)
        while len(self._finished) > self.keep_finished:
            self.by_id.pop(self._finished.popleft(), None)

    def forget(self, task_id: str) -> None:
        """An expired job: its row and files are being deleted."""
        self.by_id.pop(task_id, None)

    def recent(self, limit: int, state: str | None = None) -> list[Job]:
        """Newest first, optionally of one state."""
        if state is None:  # the common case, asked every refresh of a live view: no full sort
            return heapq.nlargest(limit, self.by_id.values(), key=lambda j: j.created_at)
        picked: list[Job] = []
        for job in sorted(self.by_id.values(), key=lambda j: j.created_at, reverse=True):
            if job.state == state:
                picked.append(job)
                if len(picked) >= limit:
                    break
        return picked


class DomainQueue:
    """Jobs waiting for a worker: realtime before normal before batch, FIFO within a class."""

    def __init__(self) -> None:
        self._classes: dict[str, collections.deque[Job]] = {
            p: collections.deque() for p in PRIORITY_ORDER}
        # summed estimate_ms per class: the wait estimate of a job just queued is O(1),
        # not a walk over a queue that may hold thousands
        self._ms: dict[str, float] = {p: 0.0 for p in PRIORITY_ORDER}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Job]:
        for p in PRIORITY_ORDER:
            yield from self._classes[p]

    def push(self, job: Job) -> None:
        q = self._classes[job.priority]
        if q and q[-1].seq > job.seq:
            # a recovered or re-queued job goes back to its original place
            items = sorted([*q, job], key=lambda j: j.seq)
            q.clear()
            q.extend(items)
        else:
            q.append(job)
        self._ms[job.priority] += job.estimate_ms
        self._len += 1

    def _took(self, job: Job) -> None:
        q = self._classes[job.priority]
        self._ms[job.priority] = self._ms[job.priority] - job.estimate_ms if q else 0.0
        self._len -= 1

    def pop(self) -> Job | None:
        for p in PRIORITY_ORDER:
            if self._classes[p]:
                job = self._classes[p].popleft()
                self._took(job)
                return job
        return None

    def peek(self) -> Job | None:
        for p in PRIORITY_ORDER:
            if self._classes[p]:
                return self._classes[p][0]
        return None

    def remove(self, job: Job) -> bool:
        try:
            self._classes[job.priority].remove(job)
        except ValueError:
            return False
        self._took(job)
        return True

    def position(self, job: Job) -> int:
        """Jobs ahead of `job` in this queue; -1 if it is not queued."""
        n = 0
        for p in PRIORITY_ORDER:
            q = self._classes[p]
            if p == job.priority:
                # a job just submitted is at the end: look there first
                if q and q[-1] is job:
                    return n + len(q) - 1
                for i, j in enumerate(q):
                    if j is job:
                        return n + i
                return -1
            n += len(q)
        return -1

    def estimate_ahead_ms(self, job: Job) -> float:
        """Summed run-time estimates of the jobs queued ahead of `job`."""
        ahead = 0.0
        for p in PRIORITY_ORDER:
            q = self._classes[p]
            if p != job.priority:
                ahead += self._ms[p]
                continue
            if q and q[-1] is job:
                return ahead + max(0.0, self._ms[p] - job.estimate_ms)
            for j in q:
                if j is job:
                    break
                ahead += j.estimate_ms
            return ahead
        return ahead

    def depth_by_class(self) -> dict[str, int]:
        return {p: len(q) for p, q in self._classes.items()}
