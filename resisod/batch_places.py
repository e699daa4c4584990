"""Places in a batching worker, as decisions over its jobs: which running job gives its place
to a queued one of higher priority, and which paused ones take places back. Pure; the
scheduler applies them (pause / resume signals, the start of the newcomer)."""
from __future__ import annotations

from typing import Any

from .protocol import PRIORITY_ORDER

RANK = {p: i for i, p in enumerate(PRIORITY_ORDER)}  # lower is more urgent


def victim(slot: Any, head: Any) -> Any:
    """The running job of a full slot that the queue head takes the place of: its
    lowest-priority one (the latest started of that class: it has the least work to lose),
    if the head outranks it; None otherwise, or when the slot holds `capacity` bumped jobs."""
    if head is None or slot.bumped >= slot.capacity:
        return None
    running = [j for j in slot.jobs.values() if not j.bumped]
    job = max(running, key=lambda j: (RANK[j.priority], j.seq), default=None)
    return job if job is not None and RANK[job.priority] > RANK[head.priority] else None


def next_back(slot: Any, head: Any) -> Any:
    """The bumped job that takes a free place back now: the most urgent, oldest one, unless
    the queue head outranks it (a queued job it yields to goes first)."""
    if slot.free <= 0:
        return None
    bumped = [j for j in slot.jobs.values() if j.bumped]
    job = min(bumped, key=lambda j: (RANK[j.priority], j.seq), default=None)
    if job is None or (head is not None and RANK[head.priority] < RANK[job.priority]):
        return None
    return job
