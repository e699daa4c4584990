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
        "job": slot.job.task_id if slot.job else None,
        "restarts": slot.generation - 1, "last_error": slot.last_error, "loaded": slot.loaded,
    }


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
        if d.kind == "tts":
            domains[name].update(voices=served_voices(d.cfg), language=speech_language(d.cfg))
    return {"version": __version__, "pid": os.getpid(), "socket": socket_path,
            "state_dir": state_dir, "uptime_s": round(time.time() - started, 1),
            "stopping": sched.stopping, "loop": loop, "domains": domains,
            "engines": engine_registry.discover().view(),
            "aliases": aliases or {},
            # per-process memory went into the workers' vram_mb (its pid keys are not names)
            "gpus": [{k: v for k, v in g.items() if k != "processes"} for g in gpu_list]}
