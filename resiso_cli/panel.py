"""The machine panel of `resiso top`: a daemon `status` snapshot (with its `jobs`) as Rich
renderables. Pure: no terminal, no socket, no clock unless given one, so tests render it
into a string."""
from __future__ import annotations

import os
import time
from typing import Any, Iterable, Optional

from rich import box
from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .columns import worker_jobs

# domain, worker (slot) and job states
STATE_STYLE = {"ready": "green", "loading": "yellow", "failed": "bold red",
               "starting": "yellow", "busy": "cyan", "backoff": "red", "stopped": "dim",
               "running": "cyan", "queued": "yellow", "completed": "green",
               "cancelled": "magenta"}
BAR_WIDTH = 14
CELL_BAR_WIDTH = 8
TABLE_FRAME_LINES = 3  # title, column names, their rule


def render(snapshot: dict[str, Any], *, height: Optional[int] = None,
           footer: Optional[str] = None, now: Optional[float] = None) -> Group:
    """The whole panel. `height` (terminal rows) trims the job list to what fits;
    `now` (epoch seconds) is the clock for running jobs' elapsed time."""
    now = time.time() if now is None else now
    domains: dict[str, Any] = snapshot.get("domains") or {}
    jobs: list[dict[str, Any]] = list(snapshot.get("jobs") or [])
    running = _running_by_domain(jobs)
    lines: list[RenderableType] = [  # one line each
        *(Text(f"domain {name} {d.get('state')}: {d['reason']}", style="red")
          for name, d in domains.items() if d.get("reason")),
        *(Text(f"GPU {g['index']} {g['name']}: {g['used_mb']:.0f}/{g['total_mb']:.0f} MB")
          for g in snapshot.get("gpus") or [])]
    if height is not None:
        rows = sum(max(1, sum(j.get("progress") is not None for j in running.get(name, [])))
                   for name in domains) + sum(
            len(d.get("workers") or []) for d in domains.values())
        used = 1 + 3 * TABLE_FRAME_LINES + rows + len(lines) + (1 if footer else 0)
        jobs = jobs[:max(1, height - used)]
    return Group(header(snapshot), domain_table(domains, running), *lines,
                 worker_table(domains), job_table(jobs, now),
                 *([Text(footer, style="dim")] if footer else []))


def header(st: dict[str, Any]) -> Text:
    loop = st.get("loop") or {}
    text = Text.assemble(
        ("resisod ", "bold"), f"{st.get('version', '?')}  pid {st.get('pid', '?')}  "
        f"up {duration(st.get('uptime_s'))}  socket {st.get('socket', '?')}  "
        f"loop max {_num(loop.get('max_iteration_ms'))} ms, {loop.get('stalls', 0)} stalls")
    if st.get("stopping"):
        text.append("  STOPPING", style="bold red")
    return text


def domain_table(domains: dict[str, Any], running: dict[str, list[dict[str, Any]]]) -> Table:
    table = _table("domains", "domain", "kind", "engine", "model", "state", "queue r/n/b",
                   "running", "done", "failed", "p50 ms", "p95 ms", "preempt", "paused",
                   give=("model",))
    for name, d in domains.items():
        q = d.get("queue") or {}
        table.add_row(
            name, d.get("kind", ""), d.get("engine", ""), _cut(_model(d.get("model", ""))),
            Text(d.get("state", "?"), style=STATE_STYLE.get(d.get("state", ""), "")),
            f"{q.get('realtime', 0)}/{q.get('normal', 0)}/{q.get('batch', 0)}",
            _running_cell(d.get("running", 0), running.get(name, [])),
            str(d.get("completed", 0)), str(d.get("failed", 0)), _num(d.get("p50_ms")),
            _num(d.get("p95_ms")), str(d.get("preemptions", 0)),
            Text("yes", style="yellow") if d.get("paused") else "no")
    return table


def worker_table(domains: dict[str, Any]) -> Table:
    workers = [w for d in domains.values() for w in d.get("workers") or []]
    vram = any(w.get("vram_mb") is not None for w in workers)
    columns = ["worker", "pid", "state", "cpus", "sched", "device", "rss MB",
               *(["vram MB"] if vram else []), "job", "restarts", "last error"]
    table = _table("workers", *columns, give=("job", "last error"))
    for w in workers:
        cpus = ",".join(map(str, w.get("cpus") or [])) or "all"
        table.add_row(
            w.get("name", "?"), str(w.get("pid") or "-"),
            Text(w.get("state", "?"), style=STATE_STYLE.get(w.get("state", ""), "")),
            cpus, w.get("sched", ""), w.get("device", ""), _num(w.get("rss_mb")),
            *([_num(w.get("vram_mb"))] if vram else []), _cut(worker_jobs(w)),
            str(w.get("restarts", 0)), _cut(w.get("last_error") or ""))
    return table


def job_table(jobs: Iterable[dict[str, Any]], now: float) -> Table:
    table = _table("jobs (live first, then recent)", "task", "domain", "state", "progress",
                   "ETA", "time", "error", give=("error",))
    for j in jobs:
        state = j.get("status", "?")
        label = Text(state, style=STATE_STYLE.get(state, ""))
        if state == "queued" and j.get("position") is not None:
            label.append(f" #{j['position']}")
        if j.get("paused"):
            label.append(" paused", style="yellow")
        error = (j.get("error") or {}).get("code", "") if isinstance(j.get("error"), dict) \
            else str(j.get("error") or "")
        table.add_row(j.get("task_id", "?"), j.get("domain", ""), label, _progress(j),
                      _eta(j), _took(j, now), _cut(error, style="red"))
    return table


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _table(title: str, *columns: str, give: tuple[str, ...] = ()) -> Table:
    """Rules under the header only, one line per row: the panel's height is known before
    it is drawn, so the job list can be cut to what the terminal shows. On a narrow
    terminal the columns in `give` (long text, filled with `_cut`) are shortened first, so
    that pids, states and numbers stay whole."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, title=title, title_justify="left",
                  title_style="bold", header_style="bold")
    for name in columns:
        table.add_column(name, no_wrap=name not in give, overflow="ellipsis")
    return table


def _cut(text: str, style: str = "") -> Text:
    """One line, cut with an ellipsis where its column is narrower."""
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


def _running_by_domain(jobs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for j in jobs:
        if j.get("status") == "running":
            out.setdefault(j.get("domain", ""), []).append(j)
    return out


def _running_cell(count: int, jobs: list[dict[str, Any]]) -> RenderableType:
    """The count, and a short bar per running job that reports progress (the jobs table
    names them)."""
    grid = Table.grid(padding=(0, 1))
    bars = [j for j in jobs if j.get("progress") is not None]
    if not bars:
        return str(count)
    for i, j in enumerate(bars):
        p = max(0.0, min(1.0, float(j["progress"])))
        grid.add_row(str(count) if i == 0 else "",
                     ProgressBar(total=1.0, completed=p, width=CELL_BAR_WIDTH), f"{p * 100:.0f}%")
    return grid


def _progress(j: dict[str, Any]) -> RenderableType:
    """A bar with the fraction done for stepped jobs; a state word for the others."""
    p = j.get("progress")
    if p is None:
        return Text("-" if j.get("status") != "running" else "…", style="dim")
    grid = Table.grid(padding=(0, 1))
    steps = f"{j['step']}/{j['total']}" if j.get("total") else f"{p * 100:.0f}%"
    grid.add_row(ProgressBar(total=1.0, completed=max(0.0, min(1.0, float(p))),
                             width=BAR_WIDTH), steps)
    return grid


def _eta(j: dict[str, Any]) -> str:
    state = j.get("status")
    if state == "running" and j.get("estimated_time_remaining_ms") is not None:
        return duration(j["estimated_time_remaining_ms"] / 1000)
    if state == "queued" and j.get("estimated_time_ms") is not None:
        return duration(j["estimated_time_ms"] / 1000)
    return "-"


def _took(j: dict[str, Any], now: float) -> str:
    if j.get("generation_time_ms") is not None:
        return duration(j["generation_time_ms"] / 1000)
    if j.get("status") == "running" and j.get("started_at"):
        return duration(max(0.0, now - j["started_at"]))
    return "-"


def _model(model: str) -> str:
    if not model:
        return "-"
    if model.startswith("builtin:"):
        return model
    return os.path.basename(model.rstrip("/")) or model


def _num(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}"
