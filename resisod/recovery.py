"""Start-up recovery: the store's jobs back into the scheduler.

Finished jobs return to the job table (so `get`, `jobs` and `watch` find them); unfinished
ones go to the scheduler, which decides per job (`Scheduler.restore`): queued jobs go back in
their order, a job a stop cut off mid-run is re-queued once and failed the second time.
"""
from __future__ import annotations

import logging

from .scheduler import Ended, Scheduler
from .store import JobStore

log = logging.getLogger("resisod")


def recover(store: JobStore, sched: Scheduler) -> None:
    for job in store.recent_finished(sched.jobs.keep_finished):
        sched.jobs.add(job)
    requeued = failed = 0
    for job, deadline_at in store.unfinished():
        effects = sched.restore(job, deadline_at)
        for e in effects:  # nobody watches yet: the store is all there is to tell
            store.update(e.job)
        if any(type(e) is Ended for e in effects):
            failed += 1
        else:
            requeued += 1
    sched.continue_sequence(store.max_seq())
    store.commit()
    if requeued or failed:
        log.info("recovered %d queued jobs from the store (%d failed as interrupted)",
                 requeued, failed)
