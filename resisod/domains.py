"""A resource domain at run time: its queue, its running jobs, its numbers."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from .jobs import DomainQueue, Job


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


@dataclass(eq=False)
class Domain:
    name: str
    cfg: dict[str, Any]
    queue: DomainQueue = field(default_factory=DomainQueue)
    running: set[Job] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    preemptions: int = 0
    latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))
    # running averages that feed the estimates given to clients
    job_ms: float | None = None
    step_ms: float | None = None
    unavailable_reason: str = ""         # set while no worker of the domain can load its engine
    paused: bool = False                 # preempted by realtime work on a shared device

    @property
    def kind(self) -> str:
        return self.cfg["kind"]

    @property
    def stepped(self) -> bool:
        """Jobs of this kind report steps, so estimates scale with the step count."""
        return self.kind in ("image", "null")

    def learn(self, job: Job, duration_ms: float) -> None:
        self.latencies_ms.append(duration_ms)
        self.job_ms = duration_ms if self.job_ms is None else 0.8 * self.job_ms + 0.2 * duration_ms
        steps = job.params.get("steps") if self.stepped else None
        if steps:
            per = duration_ms / steps
            self.step_ms = per if self.step_ms is None else 0.8 * self.step_ms + 0.2 * per

    def learn_step(self, step_ms: float) -> None:
        self.step_ms = step_ms if self.step_ms is None else 0.9 * self.step_ms + 0.1 * step_ms

    def estimate(self, job: Job) -> float:
        """Expected run time of a job in ms (0 while nothing has been measured)."""
        steps = job.params.get("steps") if self.stepped else None
        if steps and self.step_ms is not None:
            return self.step_ms * steps
        return self.job_ms or 0.0

    def remaining(self, job: Job, now: float) -> float:
        est = self.estimate(job)
        if job.progress and job.progress.get("total"):
            done = job.progress["step"] / job.progress["total"]
            return max(0.0, est * (1 - done))
        if job.started_at is not None:
            return max(0.0, est - (now - job.started_at) * 1000)
        return est

    def wait_estimate(self, job: Job, now: float, workers: int) -> float:
        """Time until `job` finishes: the work ahead of it shared over the workers, plus its own."""
        ahead = sum(self.remaining(j, now) for j in self.running)
        for j in self.queue:
            if j is job:
                break
            ahead += j.estimate_ms
        return ahead / max(1, workers) + self.estimate(job)

    def stats(self) -> dict[str, Any]:
        lat = list(self.latencies_ms)
        return {
            "queue": self.queue.depth_by_class(), "queued": len(self.queue),
            "running": len(self.running), "completed": self.completed, "failed": self.failed,
            "cancelled": self.cancelled, "preemptions": self.preemptions,
            "p50_ms": _percentile(lat, 0.5), "p95_ms": _percentile(lat, 0.95),
        }
