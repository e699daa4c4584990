"""Decisions about remote workers, apart from the sockets (`cluster.py`) that carry them.

A remote worker says hello naming a domain; `answer_hello` decides what it is told (the
domain's settings, or a refusal). Its slot is a `Slot` like a local one, so dispatch treats
it the same; `join` and `leave` keep the scheduler's and the supervisor's maps in step. A
remote slot is lost when it has been silent past `SILENT_BEATS` heartbeats, its key was
revoked, or a send to it failed (`lost_reason`); it is then removed at once (its jobs are
retried through `Scheduler.worker_lost`), and a worker that comes back says hello again
and gets a new slot.
"""
from __future__ import annotations

from typing import Any

from . import devices
from .breakers import Breaker
from .protocol import HEARTBEAT_SUFFIX, Code, WorkerMsg
from .slots import Slot, SlotState

RTT_WEIGHT = 0.3             # of a new sample in the smoothed round-trip time


def answer_hello(cfg: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
    """What a remote worker's hello is answered with: SPEC with its domain's settings, or
    REFUSED with a stable code."""
    name = msg.get("domain")
    domains = cfg["domains"]
    if not isinstance(name, str) or name not in domains:
        return {"op": WorkerMsg.REFUSED, "code": Code.UNKNOWN_DOMAIN,
                "message": f"no domain {name!r} here; configured: "
                           f"{', '.join(sorted(domains)) or 'none'}"}
    d = domains[name]
    return {"op": WorkerMsg.SPEC, "domain_name": name, "domain": d,
            "heartbeat_ms": cfg["daemon"]["heartbeat_ms"],
            "gpu_share": devices.memory_share(cfg, d), "cache": cfg["cache"]}


def new_slot(cfg: dict[str, Any], domain: str, index: int, identity: bytes, *, host: str,
             key: str, fingerprint: str, sock: Any, now: float) -> Slot:
    slot = Slot(domain=domain, index=index, cpus=[], threads=0, sched="remote",
                state=SlotState.LOADING, identity=identity, last_seen=now, started_at=now,
                remote={"host": host, "key": key, "fingerprint": fingerprint, "rtt_ms": None},
                sock=sock)
    slot.breaker = Breaker(cfg["daemon"]["breaker_failures"], cfg["daemon"]["breaker_cooldown_s"])
    return slot


def join(slot: Slot, sched: Any, by_identity: dict[bytes, Slot]) -> None:
    sched.slots.append(slot)
    sched.slots_of[slot.domain].append(slot)
    by_identity[slot.identity] = by_identity[slot.identity + HEARTBEAT_SUFFIX] = slot


def leave(slot: Slot, sched: Any, by_identity: dict[bytes, Slot]) -> None:
    for group in (sched.slots, sched.slots_of[slot.domain]):
        if slot in group:
            group.remove(slot)
    for ident in (slot.identity, slot.identity + HEARTBEAT_SUFFIX):
        if by_identity.get(ident) is slot:
            del by_identity[ident]


def lost_reason(slot: Slot, now: float, silent_s: float, allowed: dict[str, str] | None,
                key: str | None) -> str | None:
    """Why a remote slot is to be dropped now, or None. `allowed` is the current allowed keys
    (None when the endpoint is insecure) and `key` the slot's Z85 key."""
    if slot.kill_reason:
        return slot.kill_reason
    if now - slot.last_seen > silent_s:
        return f"no heartbeat for {now - slot.last_seen:.1f}s"
    if allowed is not None and key is not None and key not in allowed:
        return "its key was revoked"
    return None


def note_rtt(slot: Slot, seconds: float) -> None:
    """Smooth the round-trip time a heartbeat echo measured."""
    remote = slot.remote
    if remote is None or seconds < 0:
        return
    ms = seconds * 1000.0
    prev = remote["rtt_ms"]
    remote["rtt_ms"] = round(ms if prev is None else prev + RTT_WEIGHT * (ms - prev), 3)


def next_index(slots: list[Slot], domain: str) -> int:
    """The lowest free remote index of a domain: names stay short as workers come and go."""
    taken = {s.index for s in slots if s.remote is not None and s.domain == domain}
    i = 1
    while i in taken:
        i += 1
    return i
