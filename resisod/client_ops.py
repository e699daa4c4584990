"""Client requests: one handler per op of the protocol.

A handler checks its request, asks the scheduler (admit, cancel) or the subscriptions
(watch), and posts its answers to the outbox. A bad request raises `ProtocolError` and costs
only itself: `handle` answers it with its stable code.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

from . import __version__, domains as domain_routing, params as job_params
from .jobs import CANCELLED, Job
from .monitors import Monitors
from .outbox import Outbox
from .protocol import (PRIORITY_ORDER, Code, Event, JobState, Op, ProtocolError, check_request,
                       error, event, field, unpack)
from .scheduler import Scheduler
from .store import JobStore
from .subscriptions import Subscriptions

log = logging.getLogger("resisod")

MAX_ALIVE_RIDS = 4096   # request ids one `alive` may name
MAX_JOBS_LISTED = 1000
DATA_CHUNK = 4 << 20    # bytes of a result file one `get` carries


class ClientOps:
    def __init__(self, sched: Scheduler, subs: Subscriptions, outbox: Outbox, store: JobStore,
                 *, apply: Callable[[list[Any]], None], status: Callable[[], dict[str, Any]],
                 max_request_bytes: int, alive_ms: int,
                 aliases: dict[str, dict[str, str]] | None = None,
                 monitors: Monitors | None = None):
        self.sched, self.subs, self.store = sched, subs, store
        self.post = outbox.post
        self.apply = apply                  # the broker applies scheduler effects
        self.status = status
        self.max_request = max_request_bytes
        self.alive_ms = alive_ms
        self.aliases = aliases
        self.monitors = monitors or Monitors(outbox.post, silence_s=1.0)
        self.debug = log.isEnabledFor(logging.DEBUG)  # the level is fixed at start-up
        self.ops = {Op.SUBMIT: self.op_submit, Op.WATCH: self.op_watch,
                    Op.CANCEL: self.op_cancel, Op.GET: self.op_get,
                    Op.STATUS: self.op_status, Op.JOBS: self.op_jobs,
                    Op.PING: self.op_ping, Op.ALIVE: self.op_alive,
                    Op.MONITOR: self.op_monitor}

    def handle(self, ident: bytes, frames: list[bytes]) -> None:
        rid = None
        try:
            if len(frames) != 1:
                raise ProtocolError(Code.BAD_REQUEST,
                                    f"a request is one frame; got {len(frames)} frames")
            msg = unpack(frames[0], max_bytes=self.max_request)
            op, rid = check_request(msg)
            self.ops[op](ident, rid, msg)
        except ProtocolError as exc:
            self.post(ident, error(rid, exc.code, exc.message))
        except Exception:  # a bug must cost one request, never the daemon
            log.exception("request handling failed")
            self.post(ident, error(rid, Code.BAD_REQUEST, "the request could not be handled "
                                   "(the daemon logged the details)"))

    def lookup(self, msg: dict[str, Any]) -> Job:
        task_id = field(msg, "task_id", str, required=True)
        job = self.sched.jobs.get(task_id) or self.store.get(task_id)
        if job is None:
            raise ProtocolError(Code.NOT_FOUND, f"no job {task_id!r} (it may have expired)")
        return job

    def op_submit(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        sched = self.sched
        if sched.stopping:
            raise ProtocolError(Code.SHUTTING_DOWN,
                                "resisod is shutting down; submit again once it is back")
        p = msg.get("params", {})
        domain, routed = domain_routing.pick(sched.domains, field(msg, "domain", str),
                                             field(msg, "kind", str), p, self.aliases)
        sched.refuse(domain)
        if self.store.full is not None:
            raise ProtocolError(Code.STORAGE_FULL, f"no space left for the job store in "
                                f"{os.path.dirname(self.store.path)} "
                                f"({self.store.full.strerror}); new jobs are refused until "
                                f"there is, while queued and running jobs go on")
        if routed and isinstance(p, dict):
            p = {**p, **routed}
        params = job_params.validate(domain.kind, p, domain.cfg)
        priority = field(msg, "priority", str, default=domain.cfg["priority"])
        if priority not in PRIORITY_ORDER:
            raise ProtocolError(Code.BAD_REQUEST, f"'priority' must be one of "
                                f"{', '.join(PRIORITY_ORDER)}, got {priority!r}")
        timeout_ms = field(msg, "timeout_ms", int)
        if timeout_ms is not None and timeout_ms < 0:
            raise ProtocolError(Code.BAD_REQUEST, "'timeout_ms' must be >= 0")
        stream = field(msg, "stream", bool, default=True)
        # partials=false: a streaming client that wants only `accepted` and the final event
        partials = field(msg, "partials", bool, default=True)
        # ack=false: no `accepted`; the request's one answer is the job's final event (which
        # carries the task id), for callers that only block on the result
        ack = field(msg, "ack", bool, default=True)
        if not (ack or stream):
            raise ProtocolError(Code.BAD_REQUEST, "'ack': false needs 'stream': true (a "
                                "detached job's only answer is `accepted`)")
        job = sched.admit(domain, params, priority, timeout_ms=timeout_ms, detached=not stream)
        now = sched.clock()
        if stream:
            self.subs.watch(job, ident, rid, now, partials=partials)
        self.store.insert(job, None if job.deadline is None else
                          sched.wall() + (job.deadline - now))
        if ack:  # the position told here is the one watchers last heard
            job.last_position = position = domain.position(job)
            self.post(ident, event(Event.ACCEPTED, rid, task_id=job.task_id,
                                   status=JobState.QUEUED, position=position,
                                   estimated_time_ms=round(domain.wait_estimate(job, now)),
                                   alive_ms=self.alive_ms))
        if self.debug:  # at INFO a job has two lines: started and ended
            log.debug("job %s accepted domain=%s priority=%s position=%d params %r",
                      job.task_id, domain.name, priority, domain.position(job), params)

    def op_watch(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        self.subs.attach(self.lookup(msg), ident, rid, self.sched.clock())

    def op_cancel(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        job = self.lookup(msg)
        if job.finished:
            self.post(ident, event(Event.RESULT, rid, task_id=job.task_id,
                                   status=job.state, cancelled=False))
            return
        # answered when the job ends: at once for a queued job, when the worker stops a
        # running one
        self.subs.add_cancel_waiter(job, ident, rid)
        self.apply(self.sched.cancel(job, CANCELLED))

    def op_get(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        job = self.lookup(msg)
        out = {**job.record(), **self.timing(job, self.sched.clock())}
        if field(msg, "params", bool, default=False):  # prompts: only for who asks by id
            out["params"] = job.params
        if field(msg, "data", bool, default=False) and job.state == JobState.COMPLETED:
            path = out.get("image_path") or out.get("audio_path") or out.get("result_path")
            if path:
                offset = field(msg, "offset", int, default=0)
                if offset < 0:
                    raise ProtocolError(Code.BAD_REQUEST, "'offset' must be >= 0")
                # one bounded chunk per request: a large file costs the loop no more than
                # DATA_CHUNK of reading, and the client's queue no more than one chunk
                try:
                    with open(path, "rb") as f:
                        out["data_size"] = os.fstat(f.fileno()).st_size
                        f.seek(offset)
                        out["data"] = f.read(DATA_CHUNK)
                except OSError as exc:
                    raise ProtocolError(Code.NOT_FOUND, f"the result file of {job.task_id} is "
                                        f"gone: {exc.strerror}")
                out["data_offset"] = offset
        self.post(ident, event(Event.RESULT, rid, **out))

    def timing(self, job: Job, now: float) -> dict[str, Any]:
        """Where a live job stands: a queued one's position and wait, a running one's
        remaining time."""
        if job.state == JobState.QUEUED and job in self.sched.jobs.live:
            return {"position": self.sched.position(job),
                    "estimated_time_ms": round(self.sched.wait_estimate(job, now))}
        if job.state == JobState.RUNNING:
            domain = self.sched.domains[job.domain]
            return {"estimated_time_remaining_ms": round(
                domain.countdown(job, domain.remaining(job, now)))}
        return {}

    def recent_jobs(self, limit: int) -> list[dict[str, Any]]:
        """For live views: the live jobs first (running, then queued), then the newest."""
        live = sorted(self.sched.jobs.live, key=lambda j: (j.state != "running", j.created_at))
        picked = live[:limit]
        seen = set(picked)
        picked += [j for j in self.sched.jobs.recent(limit, None) if j not in seen]
        now = self.sched.clock()
        return [{**j.record(), **self.timing(j, now)} for j in picked[:limit]]

    def op_jobs(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        limit = max(1, min(field(msg, "limit", int, default=20), MAX_JOBS_LISTED))
        jobs = self.sched.jobs.recent(limit, field(msg, "state", str))
        self.post(ident, event(Event.RESULT, rid, jobs=[j.record() for j in jobs]))

    def op_ping(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        self.post(ident, event(Event.RESULT, rid, pong=True, version=__version__,
                               pid=os.getpid()))

    def op_alive(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        rids = field(msg, "rids", list, default=[])[:MAX_ALIVE_RIDS]
        now = self.sched.clock()
        self.subs.alive(ident, self.monitors.alive(ident, rids, now), now)

    def op_monitor(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        self.monitors.add(ident, rid, self.sched.clock(),
                          interval_s=field(msg, "interval_ms", int, default=1000) / 1000.0,
                          jobs=field(msg, "jobs", int, default=0))

    def op_status(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        self.post(ident, event(Event.RESULT, rid, **self.status()))
