"""Worker slots as data: what the supervisor starts and the scheduler hands jobs to.

A slot is one worker place of a domain. Its process comes and goes (restarts bump the
generation and the identity); the slot stays. Who writes what:
- the supervisor: process, generation, identity, backoff and the STARTING / BACKOFF / FAILED
  / STOPPED states;
- the worker link: LOADING, liveness (`last_seen`), `loaded`;
- the scheduler: READY / BUSY, `jobs`, `bumped` and `breaker`; `capacity` as the worker
  reported it when ready.

A remote slot (a worker on another machine, `resisod/cluster.py`) has no process: `remote`
holds its host, key name and round-trip time, `sock` the TCP ROUTER that reaches it. It is
made when the worker says hello and dropped when it goes silent; nothing restarts it.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Any


class SlotState:
    STARTING = "starting"   # process spawned, not heard from yet
    LOADING = "loading"     # connected, engine loading
    READY = "ready"         # idle, can take a job
    BUSY = "busy"           # running one job or more (a batching worker may take more)
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
    jobs: dict[str, Any] = field(default_factory=dict)  # task_id -> the Jobs it runs
    capacity: int = 1                    # jobs it runs at once (a batching engine's places)
    bumped: int = 0                      # of its jobs, those paused to give a place away
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
    vram_budget_mb: float | None = None  # its share of its GPU under the VRAM plan
    runs_on: dict[str, Any] | None = None  # where its engine computes, as it reported
    compute: Any = None                  # the gpu_compute.ComputePlan its process started under
    remote: dict[str, Any] | None = None  # a remote worker: host, key, rtt_ms (None: local)
    sock: Any = None                     # the socket reaching a remote worker (None: local)

    @property
    def name(self) -> str:
        if self.remote is not None:
            return f"{self.domain}.r{self.index}"
        return f"{self.domain}.{self.index}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def job(self) -> Any:
        """The job of a one-job worker (the oldest one of a batching worker)."""
        return next(iter(self.jobs.values()), None)

    @property
    def free(self) -> int:
        """Places for more jobs: a job paused to give its place away holds none."""
        return self.capacity - len(self.jobs) + self.bumped

    @property
    def idle(self) -> bool:
        return self.state == SlotState.READY and not self.jobs
