"""Remote workers: a second worker ROUTER on TCP, CURVE-encrypted, for workers on other machines.

The daemon binds `[cluster] listen` as a CURVE server with its key pair from the keys
directory (`cluster_keys.py`); every handshake is checked by ZAP against the allowed keys
(`cluster_auth.py`). A remote worker (`resiso-worker`, `remote_worker.py`) says hello naming
a domain and is answered with the domain's settings; from then on it is a `Slot` like a local
one: the scheduler dispatches to it, the `WorkerLink` reads its messages and sends to it on
this socket (`Slot.sock`). What is different is only its life: no process here, so it is
never restarted; it is dropped when silent, revoked or unreachable (`remote_slots.py`).

`insecure = true` binds plain TCP without CURVE or ZAP (a trusted network, or a test);
the daemon warns at start.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from . import cluster_auth, cluster_keys, remote_slots, zmq_raw
from .protocol import HARD_FRAME_LIMIT, HEARTBEAT_SUFFIX, ProtocolError, WorkerMsg, pack, unpack
from .slots import Slot, SlotState
from .supervisor import SILENT_BEATS
from .zmq_raw import EVENTS, NOBLOCK, POLLIN

log = logging.getLogger("resisod.cluster")

DRAIN_BATCH = 512
HWM = 100000
MAX_IDENTITY = 200           # a routing id longer than this is not one of our workers'


@dataclass(frozen=True)
class Plan:
    endpoint: str
    insecure: bool
    keys_dir: str
    public: bytes = b""
    secret: bytes = b""


def plan(cfg: dict[str, Any]) -> Plan | None:
    """The cluster endpoint to open, or None when off. Raises ValueError for a secure endpoint
    without the daemon's key pair: plain TCP is never a fallback."""
    c = cfg["cluster"]
    if not c["listen"]:
        return None
    directory = cluster_keys.keys_dir(cfg)
    if c["insecure"]:
        return Plan(c["listen"], True, directory)
    try:
        pair = cluster_keys.server_pair(directory)
    except (OSError, ValueError, cluster_keys.KeysError) as exc:
        raise ValueError(f"[cluster] listen = {c['listen']!r}: cannot read the daemon's key "
                         f"pair in {directory}: {exc}")
    if pair is None:
        raise ValueError(f"[cluster] listen = {c['listen']!r} needs the daemon's CURVE key pair "
                         f"in {directory}, and there is none: run `resiso keys init --keys-dir "
                         f"{directory}` (then `resiso keys add` each worker's key), or set "
                         f"[cluster] insecure = true for plain TCP on a trusted network")
    return Plan(c["listen"], False, directory, *pair)


class Cluster:
    def __init__(self, p: Plan, cfg: dict[str, Any], ctx: zmq.Context, supervisor: Any,
                 sched: Any, link: Any):
        self.plan, self.cfg, self.sched, self.link = p, cfg, sched, link
        self.by_identity: dict[bytes, Slot] = supervisor.by_identity
        self.clock: Callable[[], float] = sched.clock
        self.silent_s = SILENT_BEATS * cfg["daemon"]["heartbeat_ms"] / 1000.0
        self.slots: list[Slot] = []
        self.keys: dict[Slot, str] = {}        # slot -> its Z85 public key
        self.allowed: cluster_auth.AllowedKeys | None = None
        self.auth: Any = None
        s = self.sock = ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone worker fails: it is lost
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
        s.setsockopt(zmq.SNDHWM, HWM)
        s.setsockopt(zmq.RCVHWM, HWM)
        # a worker on a link that went dead (cable, VM) is noticed by heartbeats; keepalive
        # lets the kernel free the connection as well
        s.setsockopt(zmq.TCP_KEEPALIVE, 1)
        s.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
        if p.insecure:
            log.warning("cluster endpoint %s is plain TCP (insecure = true): anyone who can "
                        "reach it can join as a worker and read every job", p.endpoint)
        else:
            self.allowed = cluster_auth.AllowedKeys(p.keys_dir)
            self.auth = cluster_auth.start_authenticator(ctx, self.allowed)
            s.curve_server = True
            s.curve_publickey, s.curve_secretkey = p.public, p.secret
            s.zap_domain = cluster_auth.ZAP_DOMAIN.encode()
        try:
            s.bind(p.endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(f"[cluster] listen = {p.endpoint!r}: {exc}") from None
        log.info("remote workers: listening on %s (%s, keys in %s)", p.endpoint,
                 "plain TCP" if p.insecure else "CURVE", p.keys_dir)

    # --- in -------------------------------------------------------------------------------------
    def drain(self, apply: Callable[[Any], None]) -> None:
        """Handle what the socket holds (poll said it is readable), like `Broker.drain`; a
        message from an identity not yet known is a hello, whose frame properties (the
        peer's address, its key from ZAP) are read only then."""
        sock, by_identity, on_message = self.sock, self.by_identity, self.link.on_message
        recv = sock.recv
        for _ in range(DRAIN_BATCH):
            try:
                ident = recv(NOBLOCK)
            except zmq.Again:
                return
            first = frame = recv(NOBLOCK, copy=False)
            frames = [frame.bytes]
            while frame.more:
                frame = recv(NOBLOCK, copy=False)
                frames.append(frame.bytes)
            slot = by_identity.get(ident)
            if slot is not None:
                # a local worker's identity spoken here is not that worker: ignored
                if slot.sock is sock:
                    apply(on_message(ident, frames))
            elif len(frames) == 1:
                self.greet(ident, frames[0], first)
            if not zmq_raw.get(sock, EVENTS) & POLLIN:
                return

    def greet(self, ident: bytes, body: bytes, frame: Any) -> None:
        """A hello from a new remote worker: answer it, and give it a slot if it names a
        domain. Anything else from an unknown identity (a dropped worker still talking, its
        heartbeat socket) is ignored: the worker notices the silence and starts afresh."""
        if len(ident) > MAX_IDENTITY or ident.endswith(HEARTBEAT_SUFFIX):
            return
        try:
            msg = unpack(body, max_bytes=HARD_FRAME_LIMIT)
        except ProtocolError:
            return
        if msg.get("op") != WorkerMsg.HELLO:
            return
        host = _prop(frame, "Peer-Address") or "?"
        z85 = "" if self.plan.insecure else _prop(frame, "User-Id")
        key = "insecure" if self.plan.insecure else (self.allowed.name_of(z85) or "")
        if not self.plan.insecure and not key:  # revoked between its handshake and now
            self.send(ident, {"op": WorkerMsg.REFUSED, "code": "unauthorized",
                              "message": "this worker's key is not allowed"})
            return
        answer = remote_slots.answer_hello(self.cfg, msg)
        self.send(ident, answer)
        if answer["op"] != WorkerMsg.SPEC:
            log.warning("remote worker from %s (key %s) refused: %s", host, key,
                        answer["message"])
            return
        domain = answer["domain_name"]
        slot = remote_slots.new_slot(
            self.cfg, domain, remote_slots.next_index(self.slots, domain), ident, host=host,
            key=key, fingerprint=cluster_keys.fingerprint(z85) if z85 else "",
            sock=self.sock, now=self.clock())
        self.slots.append(slot)
        self.keys[slot] = z85
        remote_slots.join(slot, self.sched, self.by_identity)
        log.info("remote worker %s joined from %s (key %s%s, pid %s)", slot.name, host, key,
                 f", fingerprint {slot.remote['fingerprint']}" if z85 else "", msg.get("pid"))

    # --- liveness --------------------------------------------------------------------------------
    def reap(self, now: float) -> list[Any]:
        """Drop remote workers that went silent, were revoked, or could not be reached; their
        jobs are retried elsewhere through `Scheduler.worker_lost`."""
        if not self.slots:
            return []
        allowed = self.allowed.current() if self.allowed is not None else None
        effects: list[Any] = []
        for slot in list(self.slots):
            reason = remote_slots.lost_reason(slot, now, self.silent_s, allowed,
                                              self.keys.get(slot) or None)
            if reason is not None:
                effects += self.drop(slot, reason)
        return effects

    def drop(self, slot: Slot, reason: str) -> list[Any]:
        log.warning("remote worker %s (%s, key %s) lost: %s; its %d job(s) go back to the "
                    "queue", slot.name, slot.remote["host"], slot.remote["key"], reason,
                    len(slot.jobs))
        # if it still listens, it stops; its service manager starts it afresh, and it says
        # hello again (a revoked key is then refused at the handshake)
        self.send(slot.identity, {"op": WorkerMsg.SHUTDOWN})
        slot.state = SlotState.STOPPED
        effects = self.sched.worker_lost(slot, f"remote worker lost: {reason}")
        remote_slots.leave(slot, self.sched, self.by_identity)
        self.slots.remove(slot)
        self.keys.pop(slot, None)
        return effects

    def heartbeat(self, now: float) -> None:
        """A beat to each remote worker's heartbeat socket, stamped so its echo measures the
        round trip (`rtt_ms`)."""
        beat = pack({"op": WorkerMsg.HEARTBEAT, "t": now})
        for slot in self.slots:
            try:
                self.sock.send_multipart([slot.identity + HEARTBEAT_SUFFIX, beat], NOBLOCK)
            except zmq.ZMQError:
                pass  # not connected: its silence tells `reap`

    # --- out -------------------------------------------------------------------------------------
    def send(self, ident: bytes, msg: dict[str, Any]) -> None:
        try:
            self.sock.send_multipart([ident, pack(msg)], NOBLOCK)
        except zmq.ZMQError:
            pass  # gone already

    def shutdown(self) -> None:
        for slot in self.slots:
            self.send(slot.identity, {"op": WorkerMsg.SHUTDOWN})

    def close(self) -> None:
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()


def _prop(frame: Any, name: str) -> str:
    try:
        value = frame.get(name)
    except (zmq.ZMQError, AttributeError, TypeError):
        return ""
    return value.decode() if isinstance(value, bytes) else (value or "")
