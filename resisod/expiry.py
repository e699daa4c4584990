"""The results TTL: finished jobs older than `result_ttl_hours` leave the store, with the
result files (WAV, PNG) they point to under the state dir."""
from __future__ import annotations

import logging
import os
import time

from .jobs import JobTable
from .store import JobStore

log = logging.getLogger("resisod")


def sweep_interval_s(ttl_hours: float) -> float:
    """Sweep a quarter of the TTL apart, within [0.5 s, 60 s]."""
    return min(60.0, max(0.5, ttl_hours * 3600 / 4))


def sweep(store: JobStore, table: JobTable, *, ttl_hours: float, state_dir: str) -> int:
    """Delete the expired jobs; returns how many."""
    expired = store.expired(time.time() - ttl_hours * 3600)
    for job in expired:
        for key, value in (job.result or {}).items():
            if key.endswith("_path") and isinstance(value, str) and \
                    value.startswith(state_dir):
                try:
                    os.unlink(value)
                except FileNotFoundError:
                    pass
        table.forget(job.task_id)
    if expired:
        store.delete([j.task_id for j in expired])
        log.info("removed %d expired jobs and their files", len(expired))
    store.checkpoint()
    return len(expired)
