"""`status`: the machine as clients see it: domains, their workers, queues and numbers."""
from __future__ import annotations

import os
import time
from typing import Any

from . import __version__, devices, isolation
from .domains import served_names, served_voices, speech_language
from .engines import registry as engine_registry
from .scheduler import Scheduler
from .slots import Slot, SlotState


def describe_sched(slot: Slot) -> str:
    """The scheduling class the kernel reports for a live worker, else the one it was given."""
    pid = slot.pid
    return isolation.describe_policy(pid) if pid else slot.sched


def worker_view(slot: Slot, device: str, gpus: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": slot.name, "pid": slot.pid or slot.last_pid, "state": slot.state,
        "cpus": slot.cpus, "threads": slot.threads, "sched": describe_sched(slot),
        "device": device,
        "rss_mb": round(slot.rss_mb, 1) if slot.rss_mb is not None else None,
        "vram_mb": devices.vram_mb(gpus, slot.pid) if gpus else None,
        "vram_budget_mb": slot.vram_budget_mb,
        # its SM cap under MPS (None: on the CPU, or GPU time-slicing)
        "mps_percentage": slot.compute.percentage(slot.domain) if slot.compute else None,
        "runs_on": slot.runs_on,
        "breaker": slot.breaker.view() if slot.breaker is not None else None,
        "job": slot.job.task_id if slot.job else None,
        # a batching worker: its places, and the jobs it holds (bumped ones paused)
        "capacity": slot.capacity, "jobs": list(slot.jobs), "bumped": slot.bumped,
        "restarts": slot.generation - 1, "last_error": slot.last_error, "loaded": slot.loaded,
    } if slot.remote is None else remote_view(slot)


def remote_view(slot: Slot) -> dict[str, Any]:
    """A worker on another machine: no pid, cores or memory of its own here; where it is,
    which key let it in, and the heartbeat round trip."""
    r = slot.remote or {}
    return {
        "name": slot.name, "pid": None, "state": slot.state, "cpus": [], "threads": 0,
        "sched": "remote", "device": "remote", "rss_mb": None, "vram_mb": None,
        "breaker": slot.breaker.view() if slot.breaker is not None else None,
        "job": slot.job.task_id if slot.job else None,
        "capacity": slot.capacity, "jobs": list(slot.jobs), "bumped": slot.bumped,
        "restarts": 0, "last_error": slot.last_error, "loaded": slot.loaded,
        "remote": {"host": r.get("host"), "key": r.get("key"),
                   "fingerprint": r.get("fingerprint"), "rtt_ms": r.get("rtt_ms")},
    }


BREAKER_ORDER = ("closed", "half-open", "open")


def cache_view(slots: list[Slot]) -> dict[str, Any] | None:
    """A domain's shared cache as its workers last reported it: the breaker of the worker
    furthest from closed (one open breaker means some jobs run without the shared cache),
    counters summed. None when none of them uses a shared cache."""
    views = [s.cache for s in slots if s.cache]
    if not views:
        return None
    breaker = max((v.get("breaker", "closed") for v in views),
                  key=lambda b: BREAKER_ORDER.index(b) if b in BREAKER_ORDER else 0)
    return {"backend": views[0].get("backend", "redis"), "breaker": breaker,
            "hits": sum(v.get("hits", 0) for v in views),
            "errors": sum(v.get("errors", 0) for v in views)}


def compute_view(slots: list[Slot]) -> dict[str, Any] | None:
    """How the local workers share their GPUs (MPS or time-slicing, and why not MPS), from
    the plan they were started under: one per daemon. None: no local worker started yet."""
    plan = next((s.compute for s in slots if s.compute is not None), None)
    return plan.view() if plan is not None else None


def snapshot(sched: Scheduler, *, socket_path: str, state_dir: str, started: float,
             gpus: bool, loop: dict[str, Any],
             aliases: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    gpu_list = devices.probe() if gpus else []
    domains = {}
    for name, d in sched.domains.items():
        workers = [worker_view(s, d.cfg["device"], gpu_list) for s in sched.slots_of[name]]
        states = {w["state"] for w in workers}
        if d.unavailable_reason:
            state = "failed"
        elif states & {SlotState.READY, SlotState.BUSY}:
            state = "ready"
        else:
            state = "loading"
        domains[name] = {"kind": d.kind, "engine": d.cfg["engine"], "model": d.cfg["model"],
                         "models": served_names(d.cfg), "priority": d.cfg["priority"],
                         "state": state, "reason": d.unavailable_reason, "paused": d.paused,
                         "workers": workers, **d.stats()}
        corun = sched.pacing.view(name)
        if corun is not None:  # a batch domain that yields: what co-running was measured to do
            domains[name]["corun"] = corun
        if d.kind == "tts":
            domains[name].update(voices=served_voices(d.cfg), language=speech_language(d.cfg))
        cache = cache_view(sched.slots_of[name])
        if cache is not None:
            domains[name]["cache"] = cache
    compute = compute_view(sched.slots)
    under_mps = {g["uuid"] for g in compute["gpus"]} if compute and compute["mode"] == "mps" \
        else set()
    return {"version": __version__, "pid": os.getpid(), "socket": socket_path,
            "state_dir": state_dir, "uptime_s": round(time.time() - started, 1),
            "stopping": sched.stopping, "loop": loop, "domains": domains,
            "engines": engine_registry.discover().view(),
            "aliases": aliases or {},
            "gpu_compute": compute,
            # per-process memory went into the workers' vram_mb (its pid keys are not names)
            "gpus": [{**{k: v for k, v in g.items() if k != "processes"},
                      "compute": "mps" if g.get("uuid") in under_mps else "timeslice"}
                     for g in gpu_list]}
