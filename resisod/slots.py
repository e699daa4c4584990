"""Worker slots as data: what the supervisor starts and the scheduler hands jobs to.

A slot is one worker place of a domain. Its process comes and goes (restarts bump the
generation and the identity); the slot stays. Who writes what:
- the supervisor: process, generation, identity, backoff and the STARTING / BACKOFF / FAILED
  / STOPPED states;
- the worker link: LOADING, liveness (`last_seen`), `loaded`;
- the scheduler: READY / BUSY, `job` and `breaker`.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any


class SlotState:
    STARTING = "starting"   # process spawned, not heard from yet
    LOADING = "loading"     # connected, engine loading
    READY = "ready"         # idle, can take a job
    BUSY = "busy"           # running a job
    BACKOFF = "backoff"     # died; waiting before the next start
    FAILED = "failed"       # engine could not load; retried after backoff
    STOPPED = "stopped"


@dataclass(eq=False)
class Slot:
    domain: str
    index: int
    cpus: list[int]
    threads: int
    sched: str
    state: str = SlotState.STOPPED
    proc: subprocess.Popen | None = None
    generation: int = 0
    identity: bytes = b""
    last_seen: float = 0.0
    started_at: float = 0.0
    ready_since: float | None = None
    job: Any = None                      # the Job it runs
    crashes: int = 0                     # consecutive, reset once it stays ready a while
    load_failures: int = 0               # consecutive failed engine loads, reset when ready
    restart_at: float = 0.0
    last_error: str = ""
    rss_mb: float | None = None
    kill_reason: str = ""                # why the supervisor killed it (memory_limit, hung)
    loaded: bool = True
    last_pid: int | None = None
    cache: dict[str, Any] | None = None  # its shared cache's breaker and counters, last reported
    breaker: Any = None                  # its circuit breaker (breakers.Breaker), the scheduler's

    @property
    def name(self) -> str:
        return f"{self.domain}.{self.index}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def idle(self) -> bool:
        return self.state == SlotState.READY and self.job is None
