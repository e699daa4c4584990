"""The results TTL: finished jobs older than `result_ttl_hours` leave the store, with the
result files (WAV, PNG) they point to under the state dir.

The loop only asks and collects: the store's writer thread selects, deletes and unlinks a
chunk at a time (`JobStore.sweep`), so a day-old busy minute of 300k jobs expires in many
small passes instead of one stall. While chunks come back full, the next is asked for at the
next tick; otherwise at the sweep interval.
"""
from __future__ import annotations

import logging
import queue
import time

from .jobs import JobTable
from .store import JobStore

log = logging.getLogger("resisod")


def sweep_interval_s(ttl_hours: float) -> float:
    """Sweep a quarter of the TTL apart, within [0.5 s, 60 s]."""
    return min(60.0, max(0.5, ttl_hours * 3600 / 4))


class Expiry:
    def __init__(self, store: JobStore, table: JobTable, *, ttl_hours: float, state_dir: str):
        self.store, self.table = store, table
        self.ttl_s = ttl_hours * 3600
        self.interval = sweep_interval_s(ttl_hours)
        self.state_dir = state_dir
        self.next_at = 0.0
        self.asked = False        # a sweep is with the writer
        self.removed = 0          # since the last log line

    def tick(self, now: float) -> None:
        self.collect(now)
        if not self.asked and now >= self.next_at:
            self.store.sweep(time.time() - self.ttl_s, self.state_dir)
            self.asked = True

    def collect(self, now: float) -> None:
        while True:
            try:
                task_ids, more = self.store.swept.get_nowait()
            except queue.Empty:
                return
            for task_id in task_ids:
                self.table.forget(task_id)
            self.removed += len(task_ids)
            self.asked = False
            self.next_at = now if more else now + self.interval
            if self.removed and not more:
                log.info("removed %d expired jobs and their files", self.removed)
                self.removed = 0
