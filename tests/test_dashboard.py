"""deploy/: the Grafana dashboard queries only metrics (and labels) a real gateway's /metrics
serves, and the Prometheus example scrapes that endpoint."""
from __future__ import annotations

import json
import os
import re
import tomllib

import pytest

from .conftest import ROOT, start_gateway

httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")

DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "resiso.json")
PROMETHEUS = os.path.join(ROOT, "deploy", "prometheus", "prometheus.yml")

GATEWAY_CONFIG = """
[daemon]
heartbeat_ms = 200
[http]
enabled = true
listen = "127.0.0.1:{port}"
[domains.alpha]
kind = "null"
[domains.bravo]
kind = "null"
"""

METRIC = re.compile(r"\bresiso_[A-Za-z0-9_]+")
SELECTOR = re.compile(r"\b(resiso_[A-Za-z0-9_]+)\{([^}]*)\}")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
PROMQL_WORDS = {"le"}  # histogram_quantile's bucket label


@pytest.fixture(scope="module")
def exposition(make_module_daemon) -> str:
    """/metrics of a real gateway after a job and a request, so the histograms and the
    labelled families have samples."""
    d = start_gateway(make_module_daemon, GATEWAY_CONFIG)
    base = d.base
    with d.client() as c:
        assert c.run("null", {"steps": 2}, domain="alpha")["event"] == "result"
    r = httpx.get(base + "/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


def served(text: str) -> dict[str, set[str]]:
    """Every series name a PromQL query can select, with the label names seen on it:
    a histogram family `f` serves f_bucket, f_sum and f_count; a counter, f_total."""
    names: dict[str, set[str]] = {}
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",),
                "gauge": ("",)}
    for fam in parser.text_string_to_metric_families(text):
        for suffix in suffixes.get(fam.type, ("",)):
            names.setdefault(fam.name + suffix, set())
        for s in fam.samples:
            names.setdefault(s.name, set()).update(s.labels)
    return names


def queries(dashboard: dict) -> list[str]:
    out = []
    for panel in dashboard["panels"]:
        out += [t["expr"] for t in panel.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            out.append(q["query"])
    return out


def label_refs(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names) a query relies on: those in its selectors, and those it groups
    by (which must be on one of the metrics it selects)."""
    refs = [(m, {part.split("=")[0].rstrip("!~").strip() for part in body.split(",")
                 if part.strip()}) for m, body in SELECTOR.findall(expr)]
    grouped = {g.strip() for body in BY.findall(expr) for g in body.split(",") if g.strip()}
    refs.append(("*", grouped - PROMQL_WORDS))
    return refs


def load_dashboard() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def test_dashboard_is_well_formed():
    dash = load_dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    data = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(data) >= 12
    for p in data:
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
    exprs = " ".join(queries(dash))
    # what the dashboard is for
    for metric in ("resiso_queue_length", "resiso_llm_ttft_seconds_bucket",
                   "resiso_job_duration_seconds_bucket", "resiso_preemptions_total",
                   "resiso_worker_rss_bytes", "resiso_gpu_memory_used_bytes",
                   "resiso_cache_hits_total"):
        assert metric in exprs, metric


def test_every_queried_metric_and_label_is_served(exposition):
    names = served(exposition)
    assert "resiso_job_duration_seconds_bucket" in names  # the job above was counted
    for expr in queries(load_dashboard()):
        used = METRIC.findall(expr)
        assert used, expr
        missing = [m for m in used if m not in names]
        assert not missing, f"{expr}: not in /metrics: {missing}"
        for metric, labels in label_refs(expr):
            candidates = [names[m] for m in used] if metric == "*" else [names[metric]]
            known = set().union(*candidates)
            if not known:  # a family with no samples here (no GPU, no LLM job)
                continue
            assert labels <= known | PROMQL_WORDS, f"{expr}: unknown labels {labels - known}"


def test_served_names_come_from_the_exposition_not_the_dashboard(exposition):
    """The check above can fail: a name the gateway does not serve is caught."""
    names = served(exposition)
    assert "resiso_queue_lenght" not in names
    assert "resiso_jobs" not in names and "resiso_jobs_total" in names
    assert "resiso_worker_rss_bytes_total" not in names


def test_prometheus_example_scrapes_the_gateway_metrics():
    yaml = pytest.importorskip("yaml")
    with open(PROMETHEUS) as f:
        cfg = yaml.safe_load(f)
    (job,) = cfg["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    with open(os.path.join(ROOT, "config.toml"), "rb") as f:
        listen = tomllib.load(f)["http"]["listen"]
    assert listen in job["static_configs"][0]["targets"]
    with open(PROMETHEUS) as f:
        text = f.read()
    assert "# authorization:" in text and "type: Bearer" in text  # bearer auth, commented
