"""A resource domain at run time: its queue, its running jobs, its numbers, and which domain
a request names."""
from __future__ import annotations

import bisect
import collections
import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from .jobs import DomainQueue, Job
from .protocol import Code, ProtocolError


BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
           300.0)


@dataclass
class Histogram:
    """Per-bucket counts (one increment per observation), exported cumulative as
    Prometheus wants them."""
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    count: int = 0
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1  # the last slot is +Inf

    def export(self) -> dict[str, Any]:
        return {"bounds": BUCKETS, "cumulative": list(itertools.accumulate(self.counts[:-1])),
                "count": self.count, "sum": self.total}


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
    cache_hits: int = 0
    duration_hist: Histogram = field(default_factory=Histogram)
    ttft_hist: Histogram = field(default_factory=Histogram)
    unavailable_reason: str = ""         # set while no worker of the domain can load its engine
    unavailable_since: float = 0.0       # monotonic; its queued jobs fail after the hold
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
        self.duration_hist.observe(duration_ms / 1000)
        result = job.result or {}
        if result.get("ttft_ms") is not None:
            self.ttft_hist.observe(result["ttft_ms"] / 1000)
        if result.get("cached"):
            self.cache_hits += 1
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

    @property
    def workers(self) -> int:
        return self.cfg["workers"]

    def position(self, job: Job) -> int:
        """How many jobs must finish before this queued one starts (0 = it starts next)."""
        ahead = self.queue.position(job) + len(self.running)
        return max(0, ahead - self.workers + 1)

    def wait_estimate(self, job: Job, now: float) -> float:
        """Time until `job` finishes: the work ahead of it shared over the workers, plus its own."""
        ahead = sum(self.remaining(j, now) for j in self.running)
        ahead += self.queue.estimate_ahead_ms(job)
        return ahead / max(1, self.workers) + self.estimate(job)

    def stats(self) -> dict[str, Any]:
        lat = list(self.latencies_ms)
        return {
            "queue": self.queue.depth_by_class(), "queued": len(self.queue),
            "running": len(self.running), "completed": self.completed, "failed": self.failed,
            "cancelled": self.cancelled, "preemptions": self.preemptions,
            "cache_hits": self.cache_hits, "duration_hist": self.duration_hist.export(),
            "ttft_hist": self.ttft_hist.export(),
            "p50_ms": _percentile(lat, 0.5), "p95_ms": _percentile(lat, 0.95),
        }


def served_names(domain_cfg: dict[str, Any]) -> list[str]:
    """Names a client may use in `model` to pick this domain."""
    names = [domain_cfg["model"]]
    if domain_cfg.get("model_name"):
        names.append(domain_cfg["model_name"])
    model = domain_cfg["model"]
    if model.startswith("builtin:"):
        names.append(model[len("builtin:"):])
    else:
        names.append(os.path.basename(model.rstrip("/")))
    return names


def pick(domains: dict[str, Domain], name: str | None, kind: str | None,
         model: Any) -> Domain:
    """The domain a request names: by `domain`, else the first of its `kind` serving `model`."""
    if name is not None:
        if name not in domains:
            raise ProtocolError(Code.BAD_REQUEST, f"no domain {name!r}; configured: "
                                f"{', '.join(sorted(domains)) or 'none'}")
        return domains[name]
    if kind is None:
        raise ProtocolError(Code.BAD_REQUEST, "field 'kind' is required")
    candidates = [d for d in domains.values() if d.kind == kind]
    if not candidates:
        raise ProtocolError(Code.BAD_REQUEST, f"no domain serves kind {kind!r}; served "
                            f"kinds: {', '.join(sorted({d.kind for d in domains.values()}))}")
    if model:
        if not isinstance(model, str):
            raise ProtocolError(Code.BAD_REQUEST, "'model' must be a string")
        for d in candidates:
            if model in served_names(d.cfg):
                return d
        names = sorted(n for d in candidates for n in served_names(d.cfg))
        raise ProtocolError(Code.BAD_REQUEST, f"model {model!r} is not served; served "
                            f"{kind} models: {', '.join(names)}")
    return candidates[0]
