"""Who listens to which job, and the events each listener is sent.

A listener is a (client identity, request id) pair: the request that submitted a job with a
stream, or a later `watch`. The job's `watchers`, `final_only` and `cancel_waiters` fields
belong to this module; nothing else writes them. Every event goes to the `Outbox`, so it
leaves after the store commit.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

from .domains import Domain
from .jobs import Job
from .outbox import Outbox
from .protocol import Code, Event, JobState, error, event
from .scheduler import Scheduler

log = logging.getLogger("resisod")

Key = tuple[bytes, Any]
# kinds whose jobs are pointless once nobody listens: cancelled when their clients vanish
# (an image runs on, detached, for a later `get`)
LISTENED_KINDS = frozenset({"llm", "tts", "null"})
MAX_ALIVE_ERRORS = 64   # not_found answers one `alive` frame may cause


def final_event(job: Job, rid: Any) -> dict[str, Any]:
    if job.state == JobState.COMPLETED:
        return event(Event.RESULT, rid, **job.record())
    if job.state == JobState.CANCELLED:
        return event(Event.CANCELLED, rid, task_id=job.task_id, status=job.state)
    err = job.error or {"code": Code.ENGINE_ERROR, "message": "failed"}
    return error(rid, err["code"], err["message"], task_id=job.task_id, status=job.state)


class Subscriptions:
    def __init__(self, outbox: Outbox, sched: Scheduler, *, silence_s: float):
        self.post = outbox.post
        self.sched = sched
        self.silence_s = silence_s        # a listener quiet this long is gone
        self.index: dict[Key, Job] = {}   # listener -> the job it watches

    def watch(self, job: Job, ident: bytes, rid: Any, now: float, *,
              partials: bool = True) -> None:
        key = (ident, rid)
        job.watchers[key] = now
        self.index[key] = job
        if not partials:
            job.final_only.add(key)

    def attach(self, job: Job, ident: bytes, rid: Any, now: float) -> None:
        """A `watch` of a known job: where it stands now, then everything that follows."""
        if job.finished:
            self.post(ident, final_event(job, rid))
            return
        self.watch(job, ident, rid, now)
        if job.state == JobState.QUEUED:
            self.post(ident, event(Event.QUEUED, rid, task_id=job.task_id,
                                   position=self.sched.position(job),
                                   estimated_time_ms=round(self.sched.wait_estimate(job, now))))
            return
        self.post(ident, event(Event.STARTED, rid, task_id=job.task_id, attempt=job.attempts))
        if job.progress:
            self.post(ident, event(Event.PROGRESS, rid, task_id=job.task_id, **job.progress))
        if job.paused:
            self.post(ident, event(Event.PAUSED, rid, task_id=job.task_id))

    def add_cancel_waiter(self, job: Job, ident: bytes, rid: Any) -> None:
        job.cancel_waiters.append((ident, rid))

    # --- a job's life, as its listeners hear it ---------------------------------------------
    def started(self, job: Job, worker: str, now: float) -> None:
        for ident, rid in job.streaming_watchers():
            self.post(ident, event(Event.STARTED, rid, task_id=job.task_id,
                                   attempt=job.attempts, worker=worker))
        if job.kind == "image":
            # slow jobs: whoever waits behind this one hears its new position at once
            # (fast domains get positions from the periodic sweep)
            self.send_positions(now, (self.sched.domains[job.domain],))

    def partial(self, job: Job, name: str, fields: dict[str, Any]) -> None:
        for ident, rid in job.streaming_watchers():
            self.post(ident, event(name, rid, task_id=job.task_id, **fields))

    def requeued(self, job: Job, reason: str) -> None:
        job.last_position = self.sched.position(job)
        for ident, rid in job.streaming_watchers():
            self.post(ident, event(Event.QUEUED, rid, task_id=job.task_id,
                                   position=job.last_position, reason=reason, retry=True))

    def ended(self, job: Job) -> None:
        for key in job.watchers:
            self.post(key[0], final_event(job, key[1]))
            self.index.pop(key, None)
        job.watchers.clear()
        job.final_only.clear()
        for ident, rid in job.cancel_waiters:
            self.post(ident, event(Event.RESULT, rid, task_id=job.task_id, status=job.state,
                                   cancelled=job.state == JobState.CANCELLED))
        job.cancel_waiters.clear()

    def send_positions(self, now: float, domains: Iterable[Domain] | None = None) -> None:
        """Tell queued jobs' listeners their new place, when it changed."""
        for domain in domains or self.sched.domains.values():
            base = len(domain.running) - domain.workers + 1
            for index, job in enumerate(domain.queue):
                position = max(0, index + base)
                if not job.watchers or position == job.last_position:
                    continue
                job.last_position = position
                est = round(domain.wait_estimate(job, now))
                for ident, rid in job.streaming_watchers():
                    self.post(ident, event(Event.QUEUED, rid, task_id=job.task_id,
                                           position=position, estimated_time_ms=est))

    # --- liveness of listeners ------------------------------------------------------------------
    def alive(self, ident: bytes, rids: list[Any], now: float) -> None:
        errors = 0
        for r in rids:
            if isinstance(r, bool) or not isinstance(r, (int, str)):
                continue  # not a request id this daemon could have handed out
            job = self.index.get((ident, r))
            if job is not None and (ident, r) in job.watchers:
                job.watchers[(ident, r)] = now
            elif errors < MAX_ALIVE_ERRORS:  # one frame must not fan out into thousands
                errors += 1
                # dropped after a silence (or never watched): say so, so the stream ends
                self.post(ident, error(r, Code.NOT_FOUND, "this request no longer watches a "
                                       "job (it was dropped after the client went silent)"))

    def excuse(self, held: float, now: float, jobs: Iterable[Job]) -> None:
        """The daemon was deaf for `held` seconds: that time does not count as its
        listeners' silence."""
        for job in jobs:
            watchers = job.watchers
            for key, seen in watchers.items():
                watchers[key] = min(now, seen + held)

    def forsaken(self, now: float, jobs: Iterable[Job]) -> list[Job]:
        """Drop listeners silent past the limit; return the jobs left with nobody to hear
        them that are pointless without a listener."""
        out = []
        for job in jobs:
            if not job.watchers or job.detached:
                continue
            gone = [k for k, seen in job.watchers.items() if now - seen > self.silence_s]
            for key in gone:
                del job.watchers[key]
                job.final_only.discard(key)
                self.index.pop(key, None)
            if gone and not job.watchers and job.kind in LISTENED_KINDS:
                log.info("job %s: its client is gone; cancelling", job.task_id)
                out.append(job)
        return out

    def drop_client(self, ident: bytes) -> list[Job]:
        """A client that has gone or stopped reading: forget every request it listens on;
        return its jobs left with nobody to hear them that are pointless without a listener
        (an image runs on, for a later `get`)."""
        keys = [k for k in self.index if k[0] == ident]
        out = []
        for key in keys:
            job = self.index.pop(key)
            job.watchers.pop(key, None)
            job.final_only.discard(key)
            if not job.watchers and not job.detached and job.kind in LISTENED_KINDS \
                    and not job.finished:
                out.append(job)
        for job in out:
            job.cancel_waiters[:] = [w for w in job.cancel_waiters if w[0] != ident]
        return out

    def shutting_down(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            for ident, rid in list(job.watchers):
                self.post(ident, error(rid, Code.SHUTTING_DOWN,
                                       "resisod stopped before this job finished",
                                       task_id=job.task_id))
