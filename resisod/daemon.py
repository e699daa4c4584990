"""The broker: client ROUTER, worker ROUTER, scheduler and supervisor in one loop.

The loop reads like a table of contents: poll, route client requests, route worker messages,
dispatch queued jobs to idle workers, and on each tick purge dead workers, enforce deadlines,
drop vanished clients, preempt batch work and send heartbeats. This process never imports a
model library.
"""
from __future__ import annotations

import collections
import gc
import itertools
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import zmq

from . import __version__, gpu, isolation, logsetup, params as job_params, preemption
from .domains import Domain
from .jobs import Job, new_task_id
from .paths import SocketClaim
from .sdnotify import Notifier
from .store import JobStore
from .protocol import (HARD_FRAME_LIMIT, HEARTBEAT_SUFFIX, PRIORITY_ORDER, Code, Event,
                       JobState, Op, ProtocolError, WorkerMsg, check_request, error, event, field, pack,
                       unpack)
from .supervisor import SlotState, Supervisor

log = logging.getLogger("resisod")
jlog = logsetup.JobLines(log)  # job transitions: formatted at the tick's flush, not inline

TICK_S = 0.05
POSITION_UPDATE_S = 0.25
MAX_FINISHED_IN_MEMORY = 10000
DRAIN_BATCH = 512
# plain ints: pyzmq's enum flags cost an enum operation per send on the hot path
NOBLOCK, SNDMORE, POLLIN, EVENTS = (int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.POLLIN),
                                    int(zmq.EVENTS))


class Daemon:
    def __init__(self, cfg: dict[str, Any], *, socket_path: str, state_dir: str,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.clock = clock
        self.hb = cfg["daemon"]["heartbeat_ms"] / 1000.0
        self.max_request = cfg["daemon"]["max_request_bytes"]
        self.domains = {name: Domain(name, d) for name, d in cfg["domains"].items()}
        self.jobs: dict[str, Job] = {}
        self.active: set[Job] = set()
        self.finished_order: collections.deque[str] = collections.deque()
        self.watch_index: dict[tuple[bytes, Any], Job] = {}
        self.seq = itertools.count()
        self.stopping = False
        # set whenever a job is queued or a worker frees up; the loop dispatches only then
        self.dispatch_due = True
        self.stop_deadline = 0.0
        self.started = time.time()
        self.next_tick = 0.0
        self.next_positions = 0.0
        self.next_heartbeat = 0.0
        self.next_cleanup = 0.0
        self.next_watchdog = 0.0
        # client events wait here until the store has committed the state they report
        self.outbox: list[tuple[bytes, bytes]] = []
        self.notifier = Notifier()
        self.gateway: Any = None
        self.ops = {Op.SUBMIT: self.op_submit, Op.WATCH: self.op_watch,
                    Op.CANCEL: self.op_cancel, Op.GET: self.op_get,
                    Op.STATUS: self.op_status, Op.JOBS: self.op_jobs,
                    Op.PING: self.op_ping, Op.ALIVE: self.op_alive}

    # --- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:
        self.claim = SocketClaim(self.socket_path, self.cfg["daemon"]["socket_group"])
        worker_path = self.socket_path + ".workers"
        if len(worker_path) > 100:
            raise ValueError(f"socket path {self.socket_path!r} is too long for a Unix socket "
                             f"(keep it under 90 characters)")
        self.claim.acquire()
        os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
        self.ctx = zmq.Context()
        self.client = self.ctx.socket(zmq.ROUTER)
        self.workers = self.ctx.socket(zmq.ROUTER)
        for s in (self.client, self.workers):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
            s.setsockopt(zmq.SNDHWM, 100000)
            s.setsockopt(zmq.RCVHWM, 100000)
        self.client.bind(f"ipc://{self.socket_path}")
        self.claim.after_bind()
        if os.path.exists(worker_path):
            os.unlink(worker_path)  # ours by the lock we hold: a leftover of a dead daemon
        self.workers.bind(f"ipc://{worker_path}")
        os.chmod(worker_path, 0o600)
        self.supervisor = Supervisor(self.cfg, self.state_dir, f"ipc://{worker_path}",
                                     clock=self.clock)
        self.store = JobStore(os.path.join(self.state_dir, "jobs.db"))
        self.recover()
        self.gpus = gpu.probe()
        self.plan_preemption()
        cpus = isolation.available_cpus()
        mine = isolation.daemon_cpus(self.supervisor.layout, self.cfg["domains"], cpus)
        if mine != cpus and self.cfg["resources"]["isolation"]:
            os.sched_setaffinity(0, mine)  # workers get their own sets; this is ours
            log.info("daemon pinned to cpus %s", mine)

    def start_gateway(self) -> None:
        """The HTTP gateway runs as a child process and is a client like any other."""
        if not self.cfg["http"]["enabled"] or self.stopping:
            return
        import json
        import subprocess
        import sys
        env = {**os.environ, "RESISO_HTTP": json.dumps(self.cfg["http"]),
               "RESISO_SOCKET": self.socket_path}
        self.gateway = subprocess.Popen([sys.executable, "-m", "resisod.http"], env=env,
                                        stdin=subprocess.DEVNULL)
        self.gateway_started = self.clock()
        log.info("HTTP gateway started on %s (pid %d)", self.cfg["http"]["listen"],
                 self.gateway.pid)

    def check_gateway(self, now: float) -> None:
        if self.gateway is None or self.gateway.poll() is None:
            return
        code = self.gateway.returncode
        if code == 2:  # refused its configuration: restarting would not help
            log.error("HTTP gateway refused to start (see above); not restarting")
            self.gateway = None
        elif now - self.gateway_started > 1.0:
            log.warning("HTTP gateway exited with %s; restarting", code)
            self.start_gateway()

    def plan_preemption(self) -> None:
        """Which realtime domains each preemptible batch domain must yield to."""
        res = self.cfg["resources"]
        self.yields_to: dict[str, list[Domain]] = {}
        self.turns: dict[str, preemption.Turn] = {}
        if not res["isolation"]:
            return
        layout = self.supervisor.layout
        for b in self.domains.values():
            if not (b.cfg["preemptible"] and b.cfg["priority"] == "batch"):
                continue
            rts = [r for r in self.domains.values() if r.cfg["priority"] == "realtime" and
                   preemption.shares_device(b.cfg, r.cfg, layout[b.name], layout[r.name],
                                            gpus=len(self.gpus),
                                            across_cores=res["preempt_across_cores"])]
            if rts:
                self.yields_to[b.name] = rts
                self.turns[b.name] = preemption.Turn()
                log.info("domain %s yields to %s", b.name, ", ".join(r.name for r in rts))

    def preempt(self, now: float) -> None:
        """Pause or resume batch work so realtime work on a shared device runs alone."""
        floor = self.cfg["resources"]["gpu_allocation"]["image"] / 100.0
        for name, rts in self.yields_to.items():
            batch, turn = self.domains[name], self.turns[name]
            busy = any(r.running or len(r.queue) for r in rts)
            paused = preemption.want_paused(now, busy, turn, floor)
            if not preemption.apply(turn, paused):
                continue
            batch.paused = paused
            op = WorkerMsg.PAUSE if paused else WorkerMsg.RESUME
            for job in batch.running:
                if job.worker:
                    self.to_worker(job.worker, {"op": op, "task_id": job.task_id})
            if paused and batch.running:
                batch.preemptions += 1

    def recover(self) -> None:
        """Reload the store: queued jobs in order, interrupted running jobs re-queued once."""
        now, wall = self.clock(), time.time()
        requeued = failed = 0
        for job in self.store.recent_finished(MAX_FINISHED_IN_MEMORY):
            self.jobs[job.task_id] = job
            self.finished_order.append(job.task_id)
        for job, deadline_at in self.store.unfinished():
            self.jobs[job.task_id] = job
            domain = self.domains.get(job.domain)
            if domain is None:
                job.state, job.finished_at = JobState.FAILED, wall
                job.error = {"code": Code.ENGINE_UNAVAILABLE,
                             "message": f"domain {job.domain!r} is no longer configured"}
                self.store.update(job)
                failed += 1
                continue
            if job.state == JobState.RUNNING:
                job.interrupted += 1
                if job.interrupted > 1:
                    job.state, job.finished_at = JobState.FAILED, wall
                    job.error = {"code": Code.INTERRUPTED, "message":
                                 "the job was cut off by a daemon stop twice; not retried"}
                    domain.failed += 1
                    self.store.update(job)
                    failed += 1
                    continue
                job.state = JobState.QUEUED
                self.store.update(job)
            job.deadline = None if deadline_at is None else now + (deadline_at - wall)
            job.estimate_ms = domain.estimate(job)
            self.active.add(job)
            domain.queue.push(job)
            requeued += 1
        self.seq = itertools.count(self.store.max_seq() + 1)
        self.store.commit()
        if requeued or failed:
            log.info("recovered %d queued jobs from the store (%d failed as interrupted)",
                     requeued, failed)

    def cleanup_expired(self) -> None:
        """Delete finished jobs older than result_ttl_hours, with their result files."""
        ttl_s = self.cfg["daemon"]["result_ttl_hours"] * 3600
        expired = self.store.expired(time.time() - ttl_s)
        for job in expired:
            for key, value in (job.result or {}).items():
                if key.endswith("_path") and isinstance(value, str) and \
                        value.startswith(self.state_dir):
                    try:
                        os.unlink(value)
                    except FileNotFoundError:
                        pass
            self.jobs.pop(job.task_id, None)
        if expired:
            self.store.delete([j.task_id for j in expired])
            log.info("removed %d expired jobs and their files", len(expired))
        self.store.checkpoint()

    def request_stop(self, *_: Any) -> None:
        if not self.stopping:
            log.info("shutting down: no new jobs accepted")
            self.notifier.stopping()
            self.stopping = True
            self.stop_deadline = self.clock() + self.cfg["daemon"]["shutdown_grace_s"]
            for job in list(self.active):
                if job.state == JobState.RUNNING and \
                        self.domains[job.domain].cfg["priority"] == "batch":
                    self.cancel_running(job, "shutdown")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.supervisor.start_all()
        self.start_gateway()
        # the loop allocates many short-lived dicts per job; collecting them in generation 0
        # every 700 allocations costs more than it frees. Long-lived state is frozen.
        gc.freeze()
        gc.set_threshold(20000, 20, 20)
        self.notifier.ready()
        log.info("resisod %s serving on %s (state %s)", __version__, self.socket_path,
                 self.state_dir)
        poller = zmq.Poller()
        poller.register(self.client, zmq.POLLIN)
        poller.register(self.workers, zmq.POLLIN)
        while True:
            now = self.clock()
            # whole milliseconds, rounded up: pyzmq truncates, and a 0 ms timeout in the last
            # millisecond before a tick would spin the loop
            ready = dict(poller.poll(max(0, math.ceil((self.next_tick - now) * 1000))))
            if self.client in ready:
                self.drain(self.client, self.on_client)
            if self.workers in ready:
                self.drain(self.workers, self.on_worker)
            if self.dispatch_due:
                self.dispatch()
                if self.yields_to:
                    self.preempt(self.clock())
            now = self.clock()
            if now >= self.next_tick:
                self.tick(now)
                logsetup.flush()  # log lines leave within one tick, in one write
                self.next_tick = now + TICK_S
            self.commit()
            if self.stopping and self.drained(now):
                break
        self.close()
        logsetup.flush()
        return 0

    def commit(self) -> None:
        """Make this iteration's state changes durable, then tell clients about them."""
        self.store.commit()
        if self.outbox:
            send = self.client.send
            for ident, frame in self.outbox:
                try:
                    send(ident, SNDMORE | NOBLOCK)
                    send(frame, NOBLOCK)
                except zmq.Again:
                    log.warning("a client's receive queue is full; dropped an event")
            self.outbox.clear()

    def drained(self, now: float) -> bool:
        running = [j for j in self.active if j.state == JobState.RUNNING]
        if not running:
            return True
        if now >= self.stop_deadline:
            for job in running:
                if not job.cancel_requested:
                    self.cancel_running(job, "shutdown")
            return now >= self.stop_deadline + 2 * self.hb
        return False

    def close(self) -> None:
        for job in list(self.active):
            for ident, rid in list(job.watchers):
                self.send(ident, error(rid, Code.SHUTTING_DOWN,
                                       "resisod stopped before this job finished",
                                       task_id=job.task_id))
        for slot in self.supervisor.slots:
            if slot.identity:
                self.workers.send_multipart([slot.identity,
                                             pack({"op": WorkerMsg.SHUTDOWN})])
        self.commit()
        self.store.close()
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.terminate()
            try:
                self.gateway.wait(5)
            except Exception:
                self.gateway.kill()
        self.supervisor.shutdown()
        self.client.close(0)
        self.workers.close(0)
        self.ctx.term()
        self.claim.release()
        log.info("resisod stopped")

    # --- routing -----------------------------------------------------------------------------
    def drain(self, sock: zmq.Socket, handle: Callable[[bytes, list[bytes]], None]) -> None:
        for _ in range(DRAIN_BATCH):
            if not sock.getsockopt(EVENTS) & POLLIN:
                return
            frames = sock.recv_multipart(NOBLOCK)
            handle(frames[0], frames[1:])

    def send(self, ident: bytes, msg: dict[str, Any]) -> None:
        self.outbox.append((ident, pack(msg)))

    def on_client(self, ident: bytes, frames: list[bytes]) -> None:
        rid = None
        try:
            if len(frames) != 1:
                raise ProtocolError(Code.BAD_REQUEST,
                                    f"a request is one frame; got {len(frames)} frames")
            msg = unpack(frames[0], max_bytes=self.max_request)
            op, rid = check_request(msg)
            self.ops[op](ident, rid, msg)
        except ProtocolError as exc:
            self.send(ident, error(rid, exc.code, exc.message))
        except Exception:  # a bug must cost one request, never the daemon
            log.exception("request handling failed")
            self.send(ident, error(rid, Code.BAD_REQUEST, "the request could not be handled "
                                   "(the daemon logged the details)"))

    def on_worker(self, ident: bytes, frames: list[bytes]) -> None:
        slot = self.supervisor.by_identity.get(ident)
        if slot is None or len(frames) != 1:
            return  # a worker of an earlier generation, already replaced
        try:
            msg = unpack(frames[0], max_bytes=HARD_FRAME_LIMIT)
        except ProtocolError:
            log.error("worker %s sent an unreadable frame", slot.name)
            return
        slot.last_seen = self.clock()
        op = msg.get("op")
        domain = self.domains[slot.domain]
        if op == WorkerMsg.HEARTBEAT:
            return
        if op == WorkerMsg.PARTIAL:
            self.on_partial(slot, msg)
        elif op in (WorkerMsg.DONE, WorkerMsg.FAILED):
            self.on_job_end(slot, msg)
        elif op == WorkerMsg.HELLO:
            slot.state = SlotState.LOADING
        elif op == WorkerMsg.READY:
            slot.state = SlotState.READY
            self.dispatch_due = True
            slot.ready_since = self.clock()
            slot.loaded = True
            if domain.unavailable_reason:
                log.info("domain %s recovered", domain.name)
            domain.unavailable_reason = ""
            log.info("worker %s ready (load %.0f ms)", slot.name, msg.get("load_ms", 0))
        elif op == WorkerMsg.LOAD_FAILED:
            slot.state = SlotState.FAILED
            slot.last_error = str(msg.get("reason", "engine failed to load"))
            log.error("worker %s failed to load its engine: %s", slot.name, slot.last_error)
            self.check_domain_health(domain)
        elif op == WorkerMsg.UNLOADED:
            slot.loaded = False
            log.info("worker %s unloaded its model after %.0fs idle", slot.name,
                     domain.cfg["keep_alive_s"])
        elif op == WorkerMsg.RELOADED:
            slot.loaded = True

    # --- client ops --------------------------------------------------------------------------
    def pick_domain(self, msg: dict[str, Any]) -> Domain:
        name = field(msg, "domain", str)
        if name is not None:
            if name not in self.domains:
                raise ProtocolError(Code.BAD_REQUEST, f"no domain {name!r}; configured: "
                                    f"{', '.join(sorted(self.domains)) or 'none'}")
            return self.domains[name]
        kind = field(msg, "kind", str, required=True)
        candidates = [d for d in self.domains.values() if d.kind == kind]
        if not candidates:
            raise ProtocolError(Code.BAD_REQUEST, f"no domain serves kind {kind!r}; served "
                                f"kinds: {', '.join(sorted({d.kind for d in self.domains.values()}))}")
        p = msg.get("params")
        model = p.get("model") if isinstance(p, dict) else None
        if model:
            if not isinstance(model, str):
                raise ProtocolError(Code.BAD_REQUEST, "'model' must be a string")
            for d in candidates:
                if model in served_names(d.cfg):
                    return d
            names = sorted(n for d in candidates for n in served_names(d.cfg))
            raise ProtocolError(Code.BAD_REQUEST, f"model {model!r} is not served; served "
                                f"{kind} models: {', '.join(names)}")
        return candidates[0]

    def op_submit(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        if self.stopping:
            raise ProtocolError(Code.SHUTTING_DOWN,
                                "resisod is shutting down; submit again once it is back")
        domain = self.pick_domain(msg)
        if domain.unavailable_reason:
            raise ProtocolError(Code.ENGINE_UNAVAILABLE, f"domain {domain.name!r} cannot run "
                                f"jobs: {domain.unavailable_reason}")
        p = job_params.validate(domain.kind, msg.get("params", {}), domain.cfg)
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
        if len(domain.queue) >= domain.cfg["max_queue"]:
            raise ProtocolError(Code.QUEUE_FULL, f"domain {domain.name!r} has "
                                f"{len(domain.queue)} jobs queued (max_queue); retry later")
        now = self.clock()
        job = Job(new_task_id(domain.kind), domain.name, domain.kind, p, priority,
                  seq=next(self.seq), detached=not stream)
        if timeout_ms is None:
            timeout_ms = domain.cfg["timeout_ms"] or (
                self.cfg["daemon"]["batch_timeout_ms"] if priority == "batch"
                else self.cfg["daemon"]["request_timeout_ms"])
        job.deadline = now + timeout_ms / 1000.0 if timeout_ms else None
        if stream:
            job.watchers[(ident, rid)] = now
            self.watch_index[(ident, rid)] = job
            if not partials:
                job.final_only.add((ident, rid))
        job.estimate_ms = domain.estimate(job)
        self.store.insert(job, None if job.deadline is None else
                          time.time() + (job.deadline - now))
        self.jobs[job.task_id] = job
        self.active.add(job)
        domain.queue.push(job)
        self.dispatch_due = True
        position = self.position(job)
        job.last_position = position
        if ack:
            self.send(ident, event(Event.ACCEPTED, rid, task_id=job.task_id,
                                   status=JobState.QUEUED, position=position,
                                   estimated_time_ms=round(self.wait_estimate(job, now)),
                                   alive_ms=round(self.hb * 1000)))
        jlog.info("job %s accepted domain=%s priority=%s position=%d", job.task_id,
                  domain.name, priority, position)
        log.debug("job %s params %r", job.task_id, p)

    def position(self, job: Job) -> int:
        """How many jobs must finish before this one starts (0 = it starts next)."""
        domain = self.domains[job.domain]
        ahead = domain.queue.position(job) + len(domain.running)
        return max(0, ahead - domain.cfg["workers"] + 1)

    def wait_estimate(self, job: Job, now: float) -> float:
        domain = self.domains[job.domain]
        return domain.wait_estimate(job, now, domain.cfg["workers"])

    def lookup(self, msg: dict[str, Any]) -> Job:
        task_id = field(msg, "task_id", str, required=True)
        job = self.jobs.get(task_id) or self.store.get(task_id)
        if job is None:
            raise ProtocolError(Code.NOT_FOUND, f"no job {task_id!r} (it may have expired)")
        return job

    def op_watch(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        job = self.lookup(msg)
        if job.finished:
            self.send(ident, self.final_event(job, rid))
            return
        now = self.clock()
        job.watchers[(ident, rid)] = now
        self.watch_index[(ident, rid)] = job
        if job.state == JobState.QUEUED:
            self.send(ident, event(Event.QUEUED, rid, task_id=job.task_id,
                                   position=self.position(job),
                                   estimated_time_ms=round(self.wait_estimate(job, now))))
        else:
            self.send(ident, event(Event.STARTED, rid, task_id=job.task_id,
                                   attempt=job.attempts))
            if job.progress:
                self.send(ident, event(Event.PROGRESS, rid, task_id=job.task_id,
                                       **job.progress))
            if job.paused:
                self.send(ident, event(Event.PAUSED, rid, task_id=job.task_id))

    def op_cancel(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        job = self.lookup(msg)
        if job.finished:
            self.send(ident, event(Event.RESULT, rid, task_id=job.task_id,
                                   status=job.state, cancelled=False))
        elif job.state == JobState.QUEUED:
            self.domains[job.domain].queue.remove(job)
            self.finish(job, JobState.CANCELLED)
            self.send(ident, event(Event.RESULT, rid, task_id=job.task_id,
                                   status=job.state, cancelled=True))
        else:
            job.cancel_waiters.append((ident, rid))
            self.cancel_running(job, "client")

    def op_get(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        job = self.lookup(msg)
        out = job.record()
        if job.state == JobState.QUEUED and job in self.active:
            out["position"] = self.position(job)
            out["estimated_time_ms"] = round(self.wait_estimate(job, self.clock()))
        elif job.state == JobState.RUNNING:
            out["estimated_time_remaining_ms"] = round(
                self.domains[job.domain].remaining(job, self.clock()))
        if field(msg, "data", bool, default=False) and job.state == JobState.COMPLETED:
            path = out.get("image_path") or out.get("audio_path")
            if path:
                try:
                    with open(path, "rb") as f:
                        out["data"] = f.read()
                except OSError as exc:
                    raise ProtocolError(Code.NOT_FOUND, f"the result file of {job.task_id} is "
                                        f"gone: {exc.strerror}")
        self.send(ident, event(Event.RESULT, rid, **out))

    def op_jobs(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        limit = field(msg, "limit", int, default=20)
        state = field(msg, "state", str)
        picked = []
        for job in sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True):
            if state is None or job.state == state:
                picked.append(job.record())
                if len(picked) >= max(1, min(limit, 1000)):
                    break
        self.send(ident, event(Event.RESULT, rid, jobs=picked))

    def op_ping(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        self.send(ident, event(Event.RESULT, rid, pong=True, version=__version__,
                               pid=os.getpid()))

    def op_alive(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        rids = field(msg, "rids", list, default=[])
        now = self.clock()
        for r in rids[:4096]:
            if isinstance(r, bool) or not isinstance(r, (int, str)):
                continue  # not a request id this daemon could have handed out
            job = self.watch_index.get((ident, r))
            if job is not None and (ident, r) in job.watchers:
                job.watchers[(ident, r)] = now
            else:
                # dropped after a silence (or never watched): say so, so the stream ends
                self.send(ident, error(r, Code.NOT_FOUND, "this request no longer watches a "
                                       "job (it was dropped after the client went silent)"))

    def op_status(self, ident: bytes, rid: Any, msg: dict[str, Any]) -> None:
        self.send(ident, event(Event.RESULT, rid, **self.status()))

    def status(self) -> dict[str, Any]:
        domains = {}
        for name, d in self.domains.items():
            workers = []
            for slot in self.supervisor.slots:
                if slot.domain != name:
                    continue
                workers.append({
                    "name": slot.name, "pid": slot.pid or slot.last_pid, "state": slot.state,
                    "cpus": slot.cpus, "threads": slot.threads,
                    "sched": describe_sched(slot), "device": d.cfg["device"],
                    "rss_mb": round(slot.rss_mb, 1) if slot.rss_mb is not None else None,
                    "job": slot.job.task_id if slot.job else None,
                    "restarts": slot.generation - 1, "last_error": slot.last_error,
                    "loaded": slot.loaded,
                })
            states = {w["state"] for w in workers}
            if d.unavailable_reason:
                state = "failed"
            elif states & {SlotState.READY, SlotState.BUSY}:
                state = "ready"
            else:
                state = "loading"
            domains[name] = {"kind": d.kind, "engine": d.cfg["engine"], "model": d.cfg["model"],
                             "models": served_names(d.cfg),
                             "priority": d.cfg["priority"], "state": state,
                             "reason": d.unavailable_reason, "paused": d.paused,
                             "workers": workers, **d.stats()}
        return {"version": __version__, "pid": os.getpid(), "socket": self.socket_path,
                "state_dir": self.state_dir, "uptime_s": round(time.time() - self.started, 1),
                "stopping": self.stopping, "domains": domains,
                "gpus": gpu.probe() if self.gpus else []}

    # --- job lifecycle -----------------------------------------------------------------------
    def dispatch(self) -> None:
        self.dispatch_due = False
        if self.stopping:
            return
        for slot in self.supervisor.slots:
            if slot.state != SlotState.READY or slot.job is not None:
                continue
            domain = self.domains[slot.domain]
            job = domain.queue.pop()
            if job is None:
                continue
            now = self.clock()
            slot.state, slot.job = SlotState.BUSY, job
            job.state, job.worker = JobState.RUNNING, slot.identity
            job.started_at = time.time()
            job.attempts += 1
            job.progress = None
            domain.running.add(job)
            self.store.update(job)
            self.to_worker(slot.identity, {"op": WorkerMsg.RUN, "task_id": job.task_id,
                                           "params": job.params, "attempt": job.attempts})
            if domain.paused:
                self.to_worker(slot.identity, {"op": WorkerMsg.PAUSE, "task_id": job.task_id})
                domain.preemptions += 1
            for ident, rid in job.streaming_watchers():
                self.send(ident, event(Event.STARTED, rid, task_id=job.task_id,
                                       attempt=job.attempts, worker=slot.name))
            job.step_mark = now
            if domain.kind == "image":
                # slow jobs: whoever waits behind this one hears its new position at once
                # (fast domains get positions from the periodic sweep)
                self.send_positions(now, (domain,))
            jlog.info("job %s started domain=%s worker=%s attempt=%d waited_ms=%.0f",
                      job.task_id, domain.name, slot.name, job.attempts,
                      (job.started_at - job.created_at) * 1000)

    def on_partial(self, slot: Any, msg: dict[str, Any]) -> None:
        job = slot.job
        if job is None or job.task_id != msg.get("task_id"):
            return
        name = msg.get("event")
        fields = {k: v for k, v in msg.items() if k not in ("op", "task_id", "event")}
        domain = self.domains[job.domain]
        if name == Event.PROGRESS:
            now = self.clock()
            if fields.get("step", 0) > 0:
                domain.learn_step((now - job.step_mark) * 1000)
            job.step_mark = now
            est = domain.step_ms or 0.0
            left = max(0, fields.get("total", 0) - fields.get("step", 0))
            fields["estimated_time_remaining_ms"] = round(est * left)
            job.progress = fields
        elif name == Event.PAUSED:
            job.paused = True
        elif name == Event.RESUMED:
            job.paused = False
            job.step_mark = self.clock()  # time spent paused is not step time
        for ident, rid in job.streaming_watchers():
            self.send(ident, event(name, rid, task_id=job.task_id, **fields))

    def to_worker(self, identity: bytes, msg: dict[str, Any]) -> None:
        self.workers.send(identity, SNDMORE)
        self.workers.send(pack(msg))

    def on_job_end(self, slot: Any, msg: dict[str, Any]) -> None:
        job = slot.job
        slot.job = None
        if slot.state == SlotState.BUSY:
            slot.state = SlotState.READY
            self.dispatch_due = True
        if job is None or job.task_id != msg.get("task_id"):
            return
        if msg["op"] == WorkerMsg.DONE:
            result = dict(msg.get("result") or {})
            result.setdefault("generation_time_ms",
                              round((time.time() - job.started_at) * 1000, 1))
            self.finish(job, JobState.COMPLETED, result=result)
        elif msg.get("code") == Code.CANCELLED:
            self.end_cancelled(job)
        else:
            self.finish(job, JobState.FAILED,
                        error={"code": msg.get("code", Code.ENGINE_ERROR),
                               "message": msg.get("message", "")})

    def end_cancelled(self, job: Job) -> None:
        reason = job.cancel_reason
        if reason == "timeout":
            self.finish(job, JobState.FAILED, error={
                "code": Code.TIMEOUT, "message": "the job ran past its deadline"})
        elif reason == "shutdown" and self.domains[job.domain].cfg["priority"] == "batch":
            self.requeue(job, "resisod is shutting down")
        elif reason == "shutdown":
            self.finish(job, JobState.FAILED, error={
                "code": Code.INTERRUPTED,
                "message": "resisod shut down before the job finished"})
        else:
            self.finish(job, JobState.CANCELLED)

    def cancel_running(self, job: Job, reason: str) -> None:
        if job.cancel_requested:
            return
        job.cancel_requested = True
        job.cancel_reason = reason
        if job.worker:
            self.to_worker(job.worker, {"op": WorkerMsg.CANCEL, "task_id": job.task_id})

    def requeue(self, job: Job, why: str) -> None:
        domain = self.domains[job.domain]
        domain.running.discard(job)
        job.state, job.worker, job.progress, job.paused = JobState.QUEUED, None, None, False
        job.cancel_requested, job.cancel_reason = False, ""
        domain.queue.push(job)
        self.dispatch_due = True
        self.store.update(job)
        job.last_position = self.position(job)
        for ident, rid in job.streaming_watchers():
            self.send(ident, event(Event.QUEUED, rid, task_id=job.task_id,
                                   position=job.last_position, reason=why, retry=True))
        log.warning("job %s re-queued: %s", job.task_id, why)

    def finish(self, job: Job, state: str, *, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> None:
        domain = self.domains[job.domain]
        job.state, job.finished_at = state, time.time()
        job.result, job.error, job.paused = result, error, False
        domain.running.discard(job)
        self.active.discard(job)
        self.store.update(job)
        if state == JobState.COMPLETED:
            domain.completed += 1
            domain.learn(job, (job.finished_at - job.started_at) * 1000)
        elif state == JobState.FAILED:
            domain.failed += 1
        else:
            domain.cancelled += 1
        for key in job.watchers:
            self.send(key[0], self.final_event(job, key[1]))
            self.watch_index.pop(key, None)
        job.watchers.clear()
        job.final_only.clear()
        for ident, rid in job.cancel_waiters:
            self.send(ident, event(Event.RESULT, rid, task_id=job.task_id,
                                   status=job.state, cancelled=state == JobState.CANCELLED))
        job.cancel_waiters.clear()
        self.finished_order.append(job.task_id)
        while len(self.finished_order) > MAX_FINISHED_IN_MEMORY:
            self.jobs.pop(self.finished_order.popleft(), None)
        took = (job.finished_at - job.created_at) * 1000
        if error:
            jlog.info("job %s %s domain=%s code=%s total_ms=%.0f", job.task_id, state,
                      job.domain, error["code"], took)
        else:
            jlog.info("job %s %s domain=%s total_ms=%.0f", job.task_id, state, job.domain, took)

    def final_event(self, job: Job, rid: Any) -> dict[str, Any]:
        if job.state == JobState.COMPLETED:
            return event(Event.RESULT, rid, **job.record())
        if job.state == JobState.CANCELLED:
            return event(Event.CANCELLED, rid, task_id=job.task_id, status=job.state)
        err = job.error or {"code": Code.ENGINE_ERROR, "message": "failed"}
        return error(rid, err["code"], err["message"], task_id=job.task_id, status=job.state)

    # --- periodic work -----------------------------------------------------------------------
    def tick(self, now: float) -> None:
        self.dispatch_due = True  # a cheap safety net: no state change can strand a job
        self.reap_workers()
        self.supervisor.restart_due()
        self.enforce_deadlines(now)
        self.drop_vanished_clients(now)
        if self.yields_to:
            self.preempt(now)
        self.check_gateway(now)
        if now >= self.next_cleanup:
            self.cleanup_expired()
            ttl_s = self.cfg["daemon"]["result_ttl_hours"] * 3600
            self.next_cleanup = now + min(60.0, max(0.5, ttl_s / 4))
        if self.notifier.watchdog_s and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.notifier.watchdog_s
        if now >= self.next_positions:
            self.send_positions(now)
            self.next_positions = now + POSITION_UPDATE_S
        if now >= self.next_heartbeat:
            beat = pack({"op": WorkerMsg.HEARTBEAT})
            for slot in self.supervisor.slots:
                if slot.proc is not None:
                    self.workers.send_multipart([slot.identity + HEARTBEAT_SUFFIX, beat])
            self.supervisor.check_memory()
            self.next_heartbeat = now + self.hb

    def reap_workers(self) -> None:
        for slot, reason in self.supervisor.reap():
            job = slot.job
            load_failed = slot.state == SlotState.FAILED
            memory = slot.kill_reason == "memory_limit"
            delay = self.supervisor.schedule_restart(
                slot, slot.last_error if load_failed else reason, load_failed=load_failed)
            log.warning("worker %s died (%s); restart in %.1fs", slot.name, reason, delay)
            if job is not None and not job.finished:
                self.domains[job.domain].running.discard(job)
                if memory:
                    budget = self.cfg["domains"][job.domain]["max_memory_mb"] or \
                        self.cfg["resources"]["max_memory_mb"]
                    self.finish(job, JobState.FAILED, error={
                        "code": Code.MEMORY_LIMIT, "message":
                            f"the worker passed its memory budget of {budget} MB and was "
                            f"restarted"})
                elif job.cancel_requested:
                    self.end_cancelled(job)
                elif job.attempts < 2 and not self.stopping:
                    self.requeue(job, f"worker {slot.name} died ({reason}); retrying once")
                else:
                    self.finish(job, JobState.FAILED, error={
                        "code": Code.WORKER_CRASHED,
                        "message": f"the worker running this job died ({reason})"})
            self.check_domain_health(self.domains[slot.domain])

    def check_domain_health(self, domain: Domain) -> None:
        """A domain none of whose workers can load (or that crash-loops) rejects its jobs."""
        slots = [s for s in self.supervisor.slots if s.domain == domain.name]
        if any(s.state in (SlotState.READY, SlotState.BUSY) for s in slots):
            return
        load_failed = all(s.state == SlotState.FAILED for s in slots)
        crash_loop = all(s.crashes >= 5 for s in slots)
        if not (load_failed or crash_loop):
            return
        last = next((s.last_error for s in slots if s.last_error), "unknown error")
        reason = last if load_failed else f"workers keep crashing: {last}"
        if domain.unavailable_reason != reason:
            log.error("domain %s unavailable: %s", domain.name, reason)
        domain.unavailable_reason = reason
        while (job := domain.queue.pop()) is not None:
            self.finish(job, JobState.FAILED, error={
                "code": Code.ENGINE_UNAVAILABLE,
                "message": f"domain {domain.name!r} cannot run jobs: {reason}"})

    def enforce_deadlines(self, now: float) -> None:
        for job in list(self.active):
            if job.deadline is None or now < job.deadline:
                continue
            if job.state == JobState.QUEUED:
                self.domains[job.domain].queue.remove(job)
                self.finish(job, JobState.FAILED, error={
                    "code": Code.TIMEOUT,
                    "message": "the job waited in the queue past its deadline"})
            elif not job.cancel_requested:
                self.cancel_running(job, "timeout")

    def drop_vanished_clients(self, now: float) -> None:
        """Stop streaming jobs nobody listens to any more (image jobs run on, detached)."""
        limit = max(4 * self.hb, 1.0)
        for job in list(self.active):
            if not job.watchers or job.detached:
                continue
            gone = [k for k, seen in job.watchers.items() if now - seen > limit]
            for key in gone:
                del job.watchers[key]
                job.final_only.discard(key)
                self.watch_index.pop(key, None)
            if gone and not job.watchers and job.kind in ("llm", "tts", "null"):
                log.info("job %s: its client is gone; cancelling", job.task_id)
                if job.state == JobState.QUEUED:
                    self.domains[job.domain].queue.remove(job)
                    self.finish(job, JobState.CANCELLED)
                else:
                    self.cancel_running(job, "client_gone")

    def send_positions(self, now: float, domains: Any = None) -> None:
        for domain in domains or self.domains.values():
            base = len(domain.running) - domain.cfg["workers"] + 1
            for index, job in enumerate(domain.queue):
                position = max(0, index + base)
                if not job.watchers or position == job.last_position:
                    continue
                job.last_position = position
                est = round(self.wait_estimate(job, now))
                for ident, rid in job.streaming_watchers():
                    self.send(ident, event(Event.QUEUED, rid, task_id=job.task_id,
                                           position=position, estimated_time_ms=est))


def served_names(domain_cfg: dict[str, Any]) -> list[str]:
    """Names a client may use in `model` to pick this domain."""
    names = [domain_cfg["model"]]
    if domain_cfg.get("model_name"):
        names.append(domain_cfg["model_name"])
    model = domain_cfg["model"]
    if model.startswith("builtin:"):
        names.append(model[len("builtin:"):])
    else:
        names.append(os.path.basename(model.rstrip("/")))
    return names


def describe_sched(slot: Any) -> str:
    pid = slot.pid
    return isolation.describe_policy(pid) if pid else slot.sched
