"""What each domain has learned about its run times, kept across restarts.

A daemon that starts again would otherwise answer the first requests with an estimate of 0
until a worker has loaded, warmed up and run a job. The figures are kept per domain with
the engine and model they were measured on; a domain whose engine or model changed starts
from nothing again.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from .domains import Domain

log = logging.getLogger("resisod")

FILE = "estimates.json"
SAVE_EVERY_S = 60.0


def _key(d: Domain) -> str:
    return f"{d.cfg['kind']}:{d.cfg['engine']}:{d.cfg['model']}"


def snapshot(domains: dict[str, Domain]) -> dict[str, Any]:
    return {name: {"key": _key(d), "job_ms": d.job_ms, "step_ms": d.step_ms}
            for name, d in domains.items() if d.job_ms is not None or d.step_ms is not None}


def restore(domains: dict[str, Domain], saved: Any) -> list[str]:
    """Give each domain the figures saved for it, if it still runs the same engine and
    model and has measured nothing itself yet; returns the domains restored."""
    restored = []
    if not isinstance(saved, dict):
        return restored
    for name, d in domains.items():
        s = saved.get(name)
        if not isinstance(s, dict) or s.get("key") != _key(d):
            continue
        for field in ("job_ms", "step_ms"):
            v = s.get(field)
            if getattr(d, field) is None and isinstance(v, (int, float)) and v > 0:
                setattr(d, field, float(v))
        restored.append(name)
    return restored


def load(state_dir: str, domains: dict[str, Domain]) -> None:
    path = os.path.join(state_dir, FILE)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:  # a torn file costs the estimates, nothing else
        log.warning("ignoring %s: %s", path, exc)
        return
    names = restore(domains, saved)
    if names:
        log.info("run-time estimates restored for %s", ", ".join(names))


def save(state_dir: str, domains: dict[str, Domain]) -> None:
    data = snapshot(domains)
    if not data:
        return
    path = os.path.join(state_dir, FILE)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)  # a reader never sees half a file
    except OSError as exc:  # a full disk must not stop the daemon over an estimate
        log.warning("could not save run-time estimates: %s", exc)
