"""`resiso status|jobs|show|watch|wait|cancel|get`: look at and steer jobs."""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Optional

import typer

from . import output
from .generate import follow_image, save_result
from .session import connected

if TYPE_CHECKING:
    from rich.console import Console


def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Domains, their workers, queues and numbers."""
    with connected(as_json) as client:
        st = client.status()
    body = {k: v for k, v in st.items() if k not in ("v", "rid", "event")}
    if as_json:
        output.print_json(body)
        return
    from .columns import Table, runs_on, worker_jobs
    print(f"resisod {st['version']} pid {st['pid']} up {st['uptime_s']:.0f}s "
          f"socket {st['socket']}\n")
    table = Table("domain", "kind", "engine", "state", "queue r/n/b", "running", "done",
                  "failed", "p50 ms", "p95 ms", "preempt")
    for name, d in st["domains"].items():
        q = d["queue"]
        state = d["state"]
        table.add_row(name, d["kind"], d["engine"], state,
                      f"{q['realtime']}/{q['normal']}/{q['batch']}", str(d["running"]),
                      str(d["completed"]), str(d["failed"]), _ms(d["p50_ms"]), _ms(d["p95_ms"]),
                      str(d["preemptions"]))
    print(table)
    for name, d in st["domains"].items():
        if d["reason"]:
            print(f"domain {name} {d['state']}: {d['reason']}")
    gpu = any(w.get("vram_budget_mb") or w.get("vram_mb") for d in st["domains"].values()
              for w in d["workers"])
    workers = Table("worker", "pid", "state", "cpus", "threads", "sched", "device", "rss MB",
                    *(["vram MB (budget)"] if gpu else []), "job", "restarts", "last error")
    for d in st["domains"].values():
        for w in d["workers"]:
            cpus = "remote" if w.get("remote") else ",".join(map(str, w["cpus"])) or "all"
            vram = [f"{_ms(w.get('vram_mb'))} ({_ms(w.get('vram_budget_mb'))})"] if gpu else []
            workers.add_row(w["name"], str(w["pid"] or "-"), w["state"], cpus,
                            str(w["threads"]), w["sched"], runs_on(w), _ms(w["rss_mb"]),
                            *vram, worker_jobs(w), str(w["restarts"]), w["last_error"] or "")
    print()
    print(workers)
    remote = [w for d in st["domains"].values() for w in d["workers"] if w.get("remote")]
    if remote:  # workers on other machines ([cluster] listen)
        table = Table("remote worker", "host", "key", "fingerprint", "rtt ms", "state")
        for w in remote:
            r = w["remote"]
            rtt = r.get("rtt_ms")
            table.add_row(w["name"], str(r.get("host") or "-"), str(r.get("key") or "-"),
                          str(r.get("fingerprint") or "-"),
                          "-" if rtt is None else f"{rtt:.1f}", w["state"])
        print()
        print(table)
    print()
    for kind, engines in (st.get("engines") or {}).items():
        if engines:
            print(f"engines {kind}: " + ", ".join(
                f"{name} ({_origin(e)})" for name, e in engines.items()))
    if st.get("gpus"):
        for g in st["gpus"]:
            print(f"GPU {g['index']} {g['name']}: {g['used_mb']:.0f}/{g['total_mb']:.0f} MB")
    compute = st.get("gpu_compute")
    if compute and (compute["mode"] == "mps" or compute["asked"] == "mps" or st.get("gpus")):
        print(f"GPU compute: {_compute_line(compute)}")


def _compute_line(c: dict[str, Any]) -> str:
    """How GPU workers share their cards: MPS with each domain's SM cap, or why not."""
    if c["mode"] == "mps":
        gpus = ", ".join(f"cuda:{g['index']}" for g in c["gpus"])
        caps = ", ".join(f"{d} {p} %" for d, p in c.get("percentages", {}).items())
        return f"mps on {gpus}; SM caps {caps}"
    return f"timeslice ({c['reason']})"


def _console() -> Console:
    from rich.console import Console
    # piped output keeps whole columns instead of the 80-column default
    return Console() if sys.stdout.isatty() else Console(width=220)


def _origin(engine: dict[str, Any]) -> str:
    if engine["source"] == "built-in":
        return "built-in"
    return f"plugin {engine['distribution']} {engine['version']}"


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}"


def jobs(limit: int = typer.Option(20, "--limit", "-n"),
         state: Optional[str] = typer.Option(None, "--state"),
         as_json: bool = typer.Option(False, "--json")) -> None:
    """Recent jobs, newest first."""
    with connected(as_json) as client:
        rows = client.jobs(limit=limit, state=state)
    if as_json:
        output.print_json({"jobs": rows})
        return
    from rich.table import Table
    table = Table("task_id", "domain", "status", "created", "time ms", "error")
    import time
    for j in rows:
        took = j.get("generation_time_ms")
        table.add_row(j["task_id"], j["domain"], j["status"],
                      time.strftime("%H:%M:%S", time.localtime(j["created_at"])),
                      _ms(took), (j.get("error") or {}).get("code", ""))
    _console().print(table)


def show(task_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One job's record."""
    with connected(as_json) as client:
        rec = client.get(task_id)
    body = {k: v for k, v in rec.items() if k not in ("v", "rid", "event")}
    if as_json:
        output.print_json(body)
    else:
        for k, v in body.items():
            print(f"{k}: {v}")


def watch(task_id: str, out: Optional[str] = typer.Option(None, "--out", "-o",
                                                          help="Save the result file here."),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Attach to a job from any terminal and follow it to the end."""
    with connected(as_json) as client:
        stream = client.watch(task_id)
        if task_id.startswith("llm_"):
            for ev in stream:
                if ev["event"] == "token" and not as_json:
                    sys.stdout.write(ev.get("text", ""))
                    sys.stdout.flush()
            raise SystemExit(output.report_final(stream.final, as_json))
        raise SystemExit(follow_image(client, stream, out, output.stderr_is_tty(), as_json,
                                      save=out is not None))


def wait(task_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Block until a job finishes; exit 0 if it completed."""
    with connected(as_json) as client:
        final = client.watch(task_id).wait()
    if not as_json and final.get("event") == "result":
        print(final.get("status", "completed"))
    raise SystemExit(output.report_final(final, as_json))


def cancel(task_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Cancel a queued or running job (returns once it has stopped)."""
    with connected(as_json) as client:
        res = client.cancel(task_id)
    body = {"task_id": res.get("task_id"), "status": res.get("status"),
            "cancelled": res.get("cancelled")}
    if as_json:
        output.print_json(body)
    elif res.get("cancelled"):
        print(f"{task_id} cancelled")
    else:
        output.err.print(f"{task_id} was already {res.get('status')}")
    raise SystemExit(output.OK if res.get("cancelled") else output.FAILED)


def get(task_id: str,
        out: Optional[str] = typer.Option(None, "--out", "-o",
                                          help="File to write ('-' = stdout)."),
        as_json: bool = typer.Option(False, "--json")) -> None:
    """Fetch a finished job's result: the image/audio file, or the text."""
    with connected(as_json) as client:
        rec = client.get(task_id)
        body: dict[str, Any] = {k: v for k, v in rec.items() if k not in ("v", "rid", "event")}
        if rec.get("status") != "completed":
            if as_json:
                output.print_json(body)
            else:
                output.err.print(f"{task_id} is {rec.get('status')}")
            raise SystemExit(output.FAILED)
        if rec.get("image_path") or rec.get("audio_path"):
            ext = ".png" if rec.get("image_path") else ".wav"
            body["out"] = save_result(client, task_id, out or f"./{task_id}{ext}")
            if not as_json and body["out"] != "-":
                print(body["out"])
        elif out and out != "-":
            with open(out, "w") as f:
                f.write(str(rec.get("result", "")))
            body["out"] = os.path.abspath(out)
        elif not as_json:
            print(rec.get("result", ""))
    if as_json:
        output.print_json(body)
