"""Kernel-level isolation of a resource domain: CPU sets, thread counts, scheduling class
(devices and GPU shares are `devices.py`'s).

The supervisor computes a layout and the environment before it starts a worker; the worker
applies the rest to itself before it imports any model library (thread pools read their
sizes at import time).
"""
from __future__ import annotations

import os
from typing import Any

from . import devices

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def auto_layout(domains: dict[str, dict[str, Any]], cpus: list[int],
                isolate: bool = True) -> dict[str, list[int]]:
    """CPU sets for domains whose `cpus` is empty.

    Realtime domains that run on the CPU-heavy path (llm) get the first core(s); batch domains
    get the rest; other realtime domains (tts) share the batch cores, where their normal
    scheduling class wins over the batch domain's SCHED_IDLE. On one core everyone shares.
    A realtime domain with more workers than there are batch cores (tts with 2 workers on 2
    cores) floats over every core, so that its workers can run side by side: while the LLM
    decodes, the kernel puts a lone speech job on the other core, and only a second concurrent
    one shares the LLM's core (both realtime; each gets about half of it).
    With 2 cores: llm -> [0], image -> [1], tts (2 workers) -> [0, 1], tts-zh -> [1]; the
    first tts worker keeps to [1] (`worker_cpus`).
    """
    layout: dict[str, list[int]] = {}
    if len(cpus) < 2 or not isolate:
        # isolation off: every domain floats over every core, like separate servers would
        return {name: list(d["cpus"]) if isolate and d["cpus"] else list(cpus)
                for name, d in domains.items()}
    llm_like = [n for n, d in domains.items() if d["priority"] == "realtime" and d["kind"] == "llm"]
    n_front = max(1, len(cpus) // 2) if len(cpus) > 2 else 1
    front, back = cpus[:n_front], cpus[n_front:]
    for name, d in domains.items():
        if d["cpus"]:
            layout[name] = list(d["cpus"])
        elif name in llm_like:
            layout[name] = list(front)
        elif d["kind"] == "null":
            layout[name] = list(cpus)
        elif d["priority"] == "realtime" and d.get("workers", 1) > len(back):
            layout[name] = list(cpus)
        else:
            layout[name] = list(back)
    return layout


def worker_cpus(domains: dict[str, dict[str, Any]], layout: dict[str, list[int]], name: str,
                index: int) -> list[int]:
    """One worker's CPU set: its domain's, except the first worker of a realtime domain the
    auto layout spread over the LLM's cores (speech with more workers than other cores):
    that one stays off them. The scheduler gives a lone job to the first free worker, so a
    lone speech request never lands on the LLM's core; only concurrent ones spread there."""
    d, cpus = domains[name], layout[name]
    if index > 0 or d["cpus"] or d["kind"] == "llm" or d["priority"] != "realtime":
        return cpus
    llm = {c for n, o in domains.items() if o["kind"] == "llm" and o["priority"] == "realtime"
           for c in layout.get(n, [])}
    own = [c for c in cpus if c not in llm]
    return own if own and len(own) < len(cpus) else cpus


def daemon_cpus(layout: dict[str, list[int]], domains: dict[str, dict[str, Any]],
                cpus: list[int]) -> list[int]:
    """Cores for the daemon itself: off the LLM's cores where any are left.

    The daemon wakes for every streamed token; on the LLM's own core that wake-up preempts
    the decode loop it is relaying.
    """
    taken = {c for n, d in domains.items() if d["kind"] == "llm" for c in layout.get(n, [])}
    rest = [c for c in cpus if c not in taken]
    return rest or list(cpus)


# The daemon relays every token and progress step; when the cores are busy with inference
# a runnable daemon waiting for a time slice is a stall for every client at once. At nice -5
# the kernel weighs it about three times a nice-0 worker. Workers go back to nice 0.
DAEMON_NICE = -5


def raise_daemon_priority() -> str:
    """Give the calling thread (and the threads and children it starts) DAEMON_NICE, if the
    daemon runs at the default nice 0 and may raise it (root, CAP_SYS_NICE, or the systemd
    unit's Nice=). Returns what happened, for the start-up log."""
    now = os.getpriority(os.PRIO_PROCESS, 0)
    if now != 0:
        return f"nice {now} (as started)"  # someone chose a nice value; it stands
    try:
        os.setpriority(os.PRIO_PROCESS, 0, DAEMON_NICE)
    except PermissionError:
        return "nice 0 (raising it needs CAP_SYS_NICE)"
    return f"nice {DAEMON_NICE}"


def thread_count(domain: dict[str, Any], cpuset: list[int], cpu_threads: int) -> int:
    if domain["threads"]:
        return domain["threads"]
    n = len(cpuset) or (os.cpu_count() or 1)
    return max(1, min(n, cpu_threads) if cpu_threads else n)


def scheduling_class(domain: dict[str, Any], isolate: bool = True) -> str:
    if not isolate:
        return "normal"
    return {"realtime": "normal", "normal": "normal", "batch": "idle"}[domain["priority"]]


def worker_env(domain: dict[str, Any], threads: int) -> dict[str, str]:
    env = {name: str(threads) for name in THREAD_ENV}
    env.update(devices.visible_devices_env(domain["device"]))
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def pin_worker(cpuset: list[int]) -> None:
    """Pin the calling worker to its cores, at nice 0: before its first thread starts, so that
    every thread inherits both."""
    if cpuset:
        os.sched_setaffinity(0, cpuset)
    if os.getpriority(os.PRIO_PROCESS, 0) < 0:
        os.setpriority(os.PRIO_PROCESS, 0, 0)  # the daemon's boost is the daemon's alone


def lower_worker_class(sched: str) -> None:
    """Give the calling thread, and the threads it starts from now on, its domain's
    scheduling class. On Linux the class and nice value are per thread: a worker's heartbeat
    thread, started before this, keeps the normal class, so a batch worker that busy cores
    starve under SCHED_IDLE still answers heartbeats and is not taken for hung."""
    if sched == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    elif sched == "batch":
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, 19)


def describe_policy(pid: int) -> str:
    try:
        policy = os.sched_getscheduler(pid)
    except OSError:
        return "?"
    return {os.SCHED_OTHER: "normal", os.SCHED_BATCH: "batch",
            getattr(os, "SCHED_IDLE", -1): "idle"}.get(policy, str(policy))


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None
