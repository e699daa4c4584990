"""Prometheus metrics: the gateway's own HTTP numbers plus the daemon's, read at scrape time.

Job counts, durations, TTFT, queues, RSS, preemptions and cache hits come from the daemon's
status, so jobs submitted through the CLI count as well as those that came over HTTP.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)


class DaemonCollector:
    def __init__(self) -> None:
        self.status: dict[str, Any] | None = None

    def collect(self) -> Any:
        st = self.status
        up = GaugeMetricFamily("resiso_daemon_up", "1 when resisod answered this scrape")
        up.add_metric([], 1.0 if st else 0.0)
        yield up
        if not st:
            return
        jobs = CounterMetricFamily("resiso_jobs", "finished jobs by domain and outcome",
                                   labels=["domain", "kind", "outcome"])
        queue = GaugeMetricFamily("resiso_queue_length", "queued jobs",
                                  labels=["domain", "priority"])
        running = GaugeMetricFamily("resiso_running_jobs", "running jobs", labels=["domain"])
        preempt = CounterMetricFamily("resiso_preemptions", "times batch work was paused",
                                      labels=["domain"])
        cache = CounterMetricFamily("resiso_cache_hits", "results served from cache",
                                    labels=["domain"])
        breaker = GaugeMetricFamily("resiso_cache_breaker_open", "1 while the shared cache's "
                                    "circuit breaker is open (local cache only)",
                                    labels=["domain"])
        rss = GaugeMetricFamily("resiso_worker_rss_bytes", "worker resident memory",
                                labels=["domain", "worker"])
        slowdown = GaugeMetricFamily("resiso_corun_slowdown", "realtime work's measured "
                                     "slowdown beside a batch domain (0.1 = 10 % slower)",
                                     labels=["batch", "realtime", "phase"])
        corun_s = CounterMetricFamily("resiso_batch_seconds", "time a yielding batch domain's "
                                      "jobs spent paused or running beside realtime work",
                                      labels=["domain", "how"])
        runs_on = GaugeMetricFamily("resiso_worker_device", "1 for the device each ready "
                                    "worker reports its engine computes on",
                                    labels=["domain", "worker", "device"])
        places = GaugeMetricFamily("resiso_worker_batch_places", "jobs a worker runs at once "
                                   "(its capacity), and how many are taken",
                                   labels=["domain", "worker", "use"])
        dur = HistogramMetricFamily("resiso_job_duration_seconds", "run time of completed "
                                    "jobs", labels=["domain"])
        ttft = HistogramMetricFamily("resiso_llm_ttft_seconds", "time to first token",
                                     labels=["domain"])
        for name, d in st["domains"].items():
            for outcome in ("completed", "failed", "cancelled"):
                jobs.add_metric([name, d["kind"], outcome], d[outcome])
            for prio, n in d["queue"].items():
                queue.add_metric([name, prio], n)
            running.add_metric([name], d["running"])
            preempt.add_metric([name], d["preemptions"])
            cache.add_metric([name], d.get("cache_hits", 0))
            if d.get("cache"):
                breaker.add_metric([name], 1.0 if d["cache"]["breaker"] == "open" else 0.0)
            for rt, phases in (d.get("corun") or {}).items():
                for phase, view in phases.items():
                    if view["slowdown"] is not None:
                        slowdown.add_metric([name, rt, phase], view["slowdown"])
            if "corun" in d:
                corun_s.add_metric([name, "paused"], d.get("paused_s", 0.0))
                corun_s.add_metric([name, "co_running"], d.get("co_running_s", 0.0))
            for w in d["workers"]:
                if w["rss_mb"] is not None:
                    rss.add_metric([name, w["name"]], w["rss_mb"] * 2**20)
                if w.get("runs_on"):
                    runs_on.add_metric([name, w["name"], str(w["runs_on"].get("device"))], 1.0)
                if w.get("capacity", 1) > 1:
                    taken = len(w.get("jobs") or []) - w.get("bumped", 0)
                    places.add_metric([name, w["name"], "capacity"], w["capacity"])
                    places.add_metric([name, w["name"], "taken"], taken)
            for family, key in ((dur, "duration_hist"), (ttft, "ttft_hist")):
                h = d.get(key)
                if h and h["count"]:
                    buckets = [(str(b), c) for b, c in zip(h["bounds"], h["cumulative"])]
                    buckets.append(("+Inf", h["count"]))
                    family.add_metric([name], buckets, h["sum"])
        yield from (jobs, queue, running, preempt, cache, breaker, rss, places, runs_on, slowdown,
                    corun_s, dur, ttft)
        gpu = GaugeMetricFamily("resiso_gpu_memory_used_bytes", "GPU memory in use",
                                labels=["gpu", "name"])
        for g in st.get("gpus", []):
            gpu.add_metric([str(g["index"]), g["name"]], g["used_mb"] * 2**20)
        yield gpu
        compute = st.get("gpu_compute")
        if compute:
            mps = GaugeMetricFamily("resiso_gpu_compute_mps", "1 while GPU workers share their "
                                    "cards under NVIDIA MPS, 0 under time-slicing")
            mps.add_metric([], 1.0 if compute["mode"] == "mps" else 0.0)
            yield mps


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("resiso_http_requests", "HTTP requests",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("resiso_http_request_duration_seconds", "HTTP request time",
                                 ["route"], registry=self.registry)
        self.gateway_jobs = Counter("resiso_gateway_jobs", "jobs finished through the gateway",
                                    ["kind", "outcome"], registry=self.registry)
        self.daemon = DaemonCollector()
        self.registry.register(self.daemon)

    def http(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def job(self, kind: str, final: dict[str, Any]) -> None:
        outcome = {"result": "completed", "cancelled": "cancelled"}.get(final.get("event"),
                                                                       "failed")
        self.gateway_jobs.labels(kind, outcome).inc()

    def submitted(self, kind: str) -> None:
        self.gateway_jobs.labels(kind, "submitted").inc()

    def render(self, status: dict[str, Any] | None) -> tuple[bytes, str]:
        self.daemon.status = status
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
