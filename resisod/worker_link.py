"""The daemon's side of its workers: their messages become scheduler events, and the
scheduler's decisions become their messages.

Unlike client events (which wait in the `Outbox` for the commit), worker messages are sent at
once: a `run` or `cancel` carries no state a client could be told about too early.
"""
from __future__ import annotations

import logging
from typing import Any

import zmq

from .jobs import Job
from .protocol import (HARD_FRAME_LIMIT, HEARTBEAT_ECHO, HEARTBEAT_SUFFIX, Code, Event,
                       ProtocolError, WorkerMsg, pack, unpack)
from .remote_slots import note_rtt
from .scheduler import Scheduler
from .slots import Slot, SlotState
from .subscriptions import Subscriptions
from .supervisor import Supervisor
from .zmq_raw import NOBLOCK, SNDMORE, send

log = logging.getLogger("resisod")

# partial events that change what the scheduler knows of a job (the rest are only relayed)
STATEFUL_PARTIALS = frozenset({Event.PROGRESS, Event.PAUSED, Event.RESUMED})
NOT_FIELDS = frozenset({"op", "task_id", "event"})
NOTHING: tuple[()] = ()


class WorkerLink:
    def __init__(self, sock: zmq.Socket, supervisor: Supervisor, sched: Scheduler,
                 subs: Subscriptions):
        self.sock, self.supervisor, self.sched, self.subs = sock, supervisor, sched, subs
        self.clock = sched.clock

    # --- in -------------------------------------------------------------------------------------
    def on_message(self, ident: bytes, frames: list[bytes]) -> Any:
        """One worker message; returns the scheduler's effects for the broker to apply."""
        slot = self.supervisor.by_identity.get(ident)
        if slot is None or len(frames) != 1:
            return NOTHING  # a worker of an earlier generation, already replaced
        try:
            msg = unpack(frames[0], max_bytes=HARD_FRAME_LIMIT)
        except ProtocolError:
            log.error("worker %s sent an unreadable frame", slot.name)
            return NOTHING
        slot.last_seen = self.clock()
        op = msg.get("op")
        if op == WorkerMsg.HEARTBEAT:
            echo = msg.get(HEARTBEAT_ECHO)  # a remote worker's answer to a stamped beat
            if echo is not None and slot.remote is not None and isinstance(echo, float):
                note_rtt(slot, self.clock() - echo)
            return NOTHING
        if op in (WorkerMsg.READY, WorkerMsg.DONE, WorkerMsg.FAILED) and "cache" in msg:
            slot.cache = msg["cache"]  # the shared cache's breaker, shown by `status`
        if op == WorkerMsg.PARTIAL:
            job = self.sched.running_job(slot, msg.get("task_id"))
            if job is not None:
                name = msg.get("event")
                fields = {k: v for k, v in msg.items() if k not in NOT_FIELDS}
                if name in STATEFUL_PARTIALS:
                    self.sched.partial(job, name, fields)
                elif job.domain in self.sched.pacing.paces:  # realtime work batch work shares
                    self.sched.pacing.paced(job, name, fields)
                self.subs.partial(job, name, fields)
            return NOTHING
        if op in (WorkerMsg.DONE, WorkerMsg.FAILED):
            task_id = msg.get("task_id")
            if self.sched.running_job(slot, task_id) is None:
                log.warning("worker %s reported %s for %r, which it is not running; ignored",
                            slot.name, op, task_id)
                return NOTHING
            if op == WorkerMsg.DONE:
                return self.sched.job_done(slot, task_id, msg.get("result"))
            return self.sched.job_failed(slot, task_id, msg.get("code", Code.ENGINE_ERROR),
                                         msg.get("message", ""))
        if op == WorkerMsg.HELLO:
            slot.state = SlotState.LOADING
            slot.cache = None  # a new process: its predecessor's counters went with it
        elif op == WorkerMsg.READY:
            log.info("worker %s ready (load %.0f ms)", slot.name, msg.get("load_ms", 0))
            return self.sched.worker_ready(slot, msg.get("warm_up"), msg.get("capacity", 1),
                                           msg.get("runs_on"))
        elif op == WorkerMsg.LOAD_FAILED:
            reason = str(msg.get("reason", "engine failed to load"))
            log.error("worker %s failed to load its engine: %s", slot.name, reason)
            return self.sched.worker_load_failed(slot, reason)
        elif op == WorkerMsg.UNLOADED:
            slot.loaded = False
            log.info("worker %s unloaded its model after %.0fs idle", slot.name,
                     self.sched.domains[slot.domain].cfg["keep_alive_s"])
        elif op == WorkerMsg.RELOADED:
            slot.loaded = True
        return NOTHING

    def reap(self) -> list[Any]:
        """Workers that died or went silent: schedule their restart, settle their jobs."""
        effects: list[Any] = []
        for slot, reason in self.supervisor.reap():
            load_failed = slot.state == SlotState.FAILED
            limit = None
            if slot.kill_reason == "memory_limit":
                limit = ("memory", self.supervisor.memory_budget(slot))
            elif slot.kill_reason == "vram_limit":
                limit = ("GPU memory", self.supervisor.vram_budget(slot))
            delay = self.supervisor.schedule_restart(
                slot, slot.last_error if load_failed else reason, load_failed=load_failed)
            log.warning("worker %s died (%s); restart in %.1fs", slot.name, reason, delay)
            effects += self.sched.worker_lost(slot, reason, limit=limit)
        return effects

    # --- out (sent at once) -----------------------------------------------------------------------
    def send_now(self, slot: Slot, msg: dict[str, Any]) -> None:
        """Send to a worker at once. The worker ROUTER is ROUTER_MANDATORY: a worker that is
        no longer connected (or not reading) refuses the message, and is treated as lost."""
        sock = slot.sock or self.sock  # a remote worker's is the cluster's TCP ROUTER
        try:
            send(sock, slot.identity, SNDMORE | NOBLOCK)
            send(sock, pack(msg), NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("worker %s refused a %s message (%s); treating it as lost", slot.name,
                        msg.get("op"), exc.strerror)
            self.supervisor.kill(slot, f"unreachable: {exc.strerror}")

    def run(self, slot: Slot, job: Job) -> None:
        self.send_now(slot, {"op": WorkerMsg.RUN, "task_id": job.task_id,
                             "params": job.params, "attempt": job.attempts,
                             "priority": job.priority})

    def signal(self, slot: Slot, job: Job, op: str) -> None:
        self.send_now(slot, {"op": op, "task_id": job.task_id})

    def heartbeat(self) -> None:
        beat = pack({"op": WorkerMsg.HEARTBEAT})
        for slot in self.supervisor.slots:
            if slot.proc is not None:
                try:
                    self.sock.send_multipart([slot.identity + HEARTBEAT_SUFFIX, beat], NOBLOCK)
                except zmq.ZMQError:
                    pass  # not connected yet (starting), or gone: its silence tells the reaper

    def shutdown(self) -> None:
        bye = pack({"op": WorkerMsg.SHUTDOWN})
        for slot in self.supervisor.slots:
            if slot.identity:
                try:
                    self.sock.send_multipart([slot.identity, bye], NOBLOCK)
                except zmq.ZMQError:
                    pass  # already gone; the supervisor's SIGTERM follows anyway
