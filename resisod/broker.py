"""The broker: the daemon's sockets and its one loop. It moves messages; it decides nothing.

    poll → drain clients (ClientOps) → drain workers (WorkerLink) → commit what they reported
         (when no job is queued) → dispatch (Scheduler) → every TICK_S: tick → commit (store,
         then the Outbox to clients)

A job's data path reads straight through: a client request enters `ClientOps`, the
`Scheduler` decides, its effects go out through the `WorkerLink`; the worker's answers come
back through the `WorkerLink` into the `Scheduler`, whose effects the `Subscriptions` turn
into client events, which leave once the store has committed what they report.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import signal
from typing import Any, Callable

import zmq

from . import __version__, cluster, estimates, expiry, logsetup, status, zmq_raw
from .client_ops import ClientOps
from .loop_health import LoopWatch
from .monitors import Monitors
from .outbox import Outbox
from .paths import SocketClaim
from .protocol import HARD_FRAME_LIMIT
from .effects import Effects
from .scheduler import Scheduler
from .sdnotify import Notifier
from .store import JobStore
from .subscriptions import Subscriptions
from .supervisor import Gateway, Supervisor
from .worker_link import WorkerLink
from .zmq_raw import EVENTS, NOBLOCK, POLLIN, SNDMORE

log = logging.getLogger("resisod")

TICK_S = 0.05
POSITION_UPDATE_S = 0.25
DRAIN_BATCH = 512          # messages per socket per turn: one busy side cannot starve the other
# Per-peer queue bounds, in messages. A client's events are small (a token, a progress
# step; a result of up to max_request_bytes-sized fields): 10,000 of them is seconds of
# streaming that the client did not read, and then it is dropped. Its requests queue up to
# 1,000 before libzmq stops reading its connection. Workers are the daemon's own processes.
CLIENT_SNDHWM = 10000
CLIENT_RCVHWM = 1000
WORKER_HWM = 100000

class Broker:
    def __init__(self, cfg: dict[str, Any], *, claim: SocketClaim, sched: Scheduler,
                 store: JobStore, supervisor: Supervisor, gateway: Gateway | None,
                 worker_path: str, gpus: bool):
        remote = cluster.plan(cfg)  # first: a secure endpoint without keys never starts
        self.cfg, self.claim, self.sched, self.store = cfg, claim, sched, store
        self.supervisor, self.gateway = supervisor, gateway
        self.socket_path, self.state_dir = cfg["daemon"]["socket"], cfg["daemon"]["state_dir"]
        self.clock = sched.clock
        self.hb = cfg["daemon"]["heartbeat_ms"] / 1000.0
        self.notifier = Notifier()
        self.loop = LoopWatch()
        self.stop_requested = False
        self.started = sched.wall()
        self.next_tick = self.next_positions = self.next_heartbeat = 0.0
        self.next_watchdog = 0.0
        self.next_estimates_save = sched.clock() + estimates.SAVE_EVERY_S
        self.expiry = expiry.Expiry(store, sched.jobs, state_dir=self.state_dir,
                                    ttl_hours=cfg["daemon"]["result_ttl_hours"])
        self.ctx = zmq.Context()
        self.client = self._router(f"ipc://{self.socket_path}", sndhwm=CLIENT_SNDHWM,
                                   rcvhwm=CLIENT_RCVHWM)
        claim.after_bind()
        if os.path.exists(worker_path):
            os.unlink(worker_path)  # ours by the lock we hold: a leftover of a dead daemon
        self.workers = self._router(f"ipc://{worker_path}", sndhwm=WORKER_HWM,
                                    rcvhwm=WORKER_HWM)
        os.chmod(worker_path, 0o600)
        self.outbox = Outbox()
        self.subs = Subscriptions(self.outbox, sched, silence_s=max(4 * self.hb, 1.0))
        self.monitors = Monitors(self.outbox.post, silence_s=self.subs.silence_s)
        self.link = WorkerLink(self.workers, supervisor, sched, self.subs)
        self.apply = Effects(link=self.link, store=store, subs=self.subs, supervisor=supervisor,
                             clock=self.clock).apply
        self.cluster = cluster.Cluster(remote, cfg, self.ctx, supervisor, sched, self.link) \
            if remote is not None else None
        self.ops = ClientOps(
            sched, self.subs, self.outbox, store, apply=self.apply,
            status=lambda: {**status.snapshot(sched, socket_path=self.socket_path,
                                              state_dir=self.state_dir, started=self.started,
                                              gpus=gpus, loop=self.loop.report(),
                                              aliases=cfg["aliases"]),
                            "monitors": len(self.monitors.open)},
            max_request_bytes=cfg["daemon"]["max_request_bytes"],
            alive_ms=round(self.hb * 1000), aliases=cfg["aliases"], monitors=self.monitors)

    def _router(self, endpoint: str, *, sndhwm: int, rcvhwm: int) -> zmq.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        # a send to a peer that is gone, or whose queue is full, fails instead of vanishing
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
        s.setsockopt(zmq.SNDHWM, sndhwm)
        s.setsockopt(zmq.RCVHWM, rcvhwm)
        s.bind(endpoint)
        return s

    def request_stop(self, *_: Any) -> None:
        # a signal handler: it only raises a flag; the loop acts on it between messages,
        # so no send is ever cut in two
        self.stop_requested = True

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.supervisor.start_all()
        if self.gateway is not None:
            self.gateway.start()
        # the loop allocates many short-lived dicts per job; collecting them in generation 0
        # every 700 allocations costs more than it frees. Long-lived state is frozen.
        gc.freeze()
        gc.set_threshold(20000, 20, 20)
        self.notifier.ready()
        log.info("resisod %s serving on %s (state %s)", __version__, self.socket_path,
                 self.state_dir)
        remote = self.cluster.sock if self.cluster is not None else None
        polled = [(self.client, POLLIN), (self.workers, POLLIN)]
        if remote is not None:
            polled.append((remote, POLLIN))
        sched, from_client, began = self.sched, self.ops.handle, self.loop.began
        domains = list(sched.domains.values())
        client_streak = workers_streak = False
        self.loop.watch_gc()
        while True:
            now = self.clock()
            # whole milliseconds, rounded up: pyzmq truncates, and a 0 ms timeout in the last
            # millisecond before a tick would spin the loop
            ready = dict(zmq_raw.poll(polled, max(0, math.ceil((self.next_tick - now) * 1000))))
            t0 = self.clock()
            began()
            # a socket readable two iterations running is being streamed to: it is drained
            # in batches. One that is not gives one message this turn (the next poll says if
            # more came), which spares a quiet loop a readiness check per message.
            client_ready, workers_ready = self.client in ready, self.workers in ready
            if client_ready:
                self.drain(self.client, from_client, batch=client_streak)
            if workers_ready:
                self.drain(self.workers, self.from_worker, batch=workers_streak)
            client_streak, workers_streak = client_ready, workers_ready
            if remote in ready:
                self.cluster.drain(self.apply)
            if self.outbox.items and (workers_ready or remote in ready) and \
                    not any(d.queue for d in domains):
                # what workers reported (results, tokens) leaves before the scheduling round
                # when no job waits for a worker. When jobs wait, the round comes first (a
                # freed worker must not idle through a commit) and one commit covers both.
                self.commit()
            if self.stop_requested and not sched.stopping:
                self.stop()
            t1 = self.clock()
            if sched.dispatch_due:
                self.apply(sched.dispatch())
            now = t2 = self.clock()
            ticked = now >= self.next_tick
            if ticked:
                self.tick(now)
                logsetup.flush()  # log lines leave within one tick, in one write
                self.next_tick = now + TICK_S
            t3 = self.clock()
            self.commit()
            t4 = self.clock()
            if t4 - t0 > self.loop.notice_s:
                self.loop.busy(t0, t1, t2, t3, t4)
            if ticked:
                self.loop.mark_cpu()
            if sched.drained(now):
                break
        self.loop.unwatch_gc()
        self.close()
        logsetup.flush()
        return 0

    def drain(self, sock: zmq.Socket, handle: Callable[[bytes, list[bytes]], Any], *,
              batch: bool = True) -> None:
        """Handle what `sock` holds, up to DRAIN_BATCH messages (one without `batch`); poll
        said it is readable.

        Per message of a batch this costs two recvs and one EVENTS check (a system call
        inside libzmq): recv_multipart asks RCVMORE after every frame, and pyzmq's
        `getsockopt` builds an enum (its `get` does not); ending on a raised `Again` costs
        twice an EVENTS check."""
        recv = sock.recv
        for _ in range(DRAIN_BATCH):
            try:
                ident = recv(NOBLOCK)
            except zmq.Again:  # readiness from poll can be stale
                return
            # a ROUTER hands over whole messages: the body frame is already there
            frame = recv(NOBLOCK, copy=False)
            frames = [frame.bytes]
            while frame.more:
                frame = recv(NOBLOCK, copy=False)
                frames.append(frame.bytes)
            handle(ident, frames)
            if not batch or not zmq_raw.get(sock, EVENTS) & POLLIN:
                return

    def from_worker(self, ident: bytes, frames: list[bytes]) -> None:
        self.apply(self.link.on_message(ident, frames))

    def tick(self, now: float) -> None:
        held = now - self.next_tick  # how far past its due time this tick runs
        if self.next_tick and held > self.hb:
            self.excuse(held, now)
        self.apply(self.link.reap())
        if self.cluster is not None:
            self.apply(self.cluster.reap(now))
        self.supervisor.restart_due()
        self.apply(self.sched.tick(now))
        for job in self.subs.forsaken(now, list(self.sched.jobs.live)):
            self.apply(self.sched.cancel(job))
        if self.gateway is not None:
            self.gateway.check(stopping=self.sched.stopping)
        self.expiry.tick(now)
        if now >= self.next_estimates_save:
            estimates.save(self.state_dir, self.sched.domains)
            self.next_estimates_save = now + estimates.SAVE_EVERY_S
        if self.notifier.watchdog_s and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.notifier.watchdog_s
        if now >= self.next_positions:
            self.subs.send_positions(now)
            self.next_positions = now + POSITION_UPDATE_S
        self.monitors.tick(now, self.ops.status, self.ops.recent_jobs)
        if now >= self.next_heartbeat:
            self.link.heartbeat()
            if self.cluster is not None:
                self.cluster.heartbeat(now)
            self.supervisor.check_memory()
            self.next_heartbeat = now + self.hb

    def excuse(self, held: float, now: float) -> None:
        """The loop could not listen for `held` seconds (kept off the CPU, stopped, one long
        iteration). What peers sent meanwhile waits unread in the sockets, so that time is not
        their silence: it is taken off every silence judged here (workers' beats, clients'
        and monitors' alive messages) before the reaper and the forsaken-client check run."""
        log.warning("the loop was held up for %.1f s; silences are counted from after it", held)
        for slot in self.sched.slots:
            slot.last_seen = min(now, slot.last_seen + held)
        self.subs.excuse(held, now, self.sched.jobs.live)
        self.monitors.excuse(held, now)

    def commit(self) -> None:
        """Make this iteration's state changes durable, then tell clients about them."""
        self.store.commit()
        if self.outbox.items:
            dropped = self.outbox.deliver(self.client, zmq_raw.send, SNDMORE, NOBLOCK,
                                          zmq.ZMQError)
            for ident, exc in dropped.items():
                self.drop_client(ident, stalled=exc.errno == zmq.EAGAIN)

    def drop_client(self, ident: bytes, *, stalled: bool) -> None:
        """A client gone, or not reading while CLIENT_SNDHWM events piled up for it: it is
        forgotten before the daemon's memory grows; its detached jobs and images run on."""
        jobs = self.subs.drop_client(ident)
        self.monitors.drop_client(ident)
        (log.warning if stalled else log.info)(
            "client %s %s; dropped it and cancelled %d of its jobs", ident.hex(),
            "stopped reading" if stalled else "has gone", len(jobs))
        for job in jobs:
            self.apply(self.sched.cancel(job))

    def stop(self) -> None:
        log.info("shutting down: no new jobs accepted")
        self.notifier.stopping()
        self.apply(self.sched.stop(self.clock()))

    def close(self) -> None:
        self.subs.shutting_down(list(self.sched.jobs.live))
        estimates.save(self.state_dir, self.sched.domains)
        self.link.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
        self.commit()
        self.store.close()
        if self.gateway is not None:
            self.gateway.stop()
        self.supervisor.shutdown()
        self.client.close(0)
        self.workers.close(0)
        if self.cluster is not None:
            self.cluster.close()
        self.ctx.term()
        self.claim.release()
        log.info("resisod stopped")
