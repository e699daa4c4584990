"""Start-up recovery: the store's jobs back into the scheduler.

Finished jobs return to the job table (so `get`, `jobs` and `watch` find them); unfinished
ones have their params checked again, then go to the scheduler, which decides per job
(`Scheduler.restore`): queued jobs go back in their order, a job a stop cut off mid-run is
re-queued once and failed the second time, and a job whose params no longer pass fails.
"""
from __future__ import annotations

import logging

from . import params as job_params
from .jobs import Job
from .protocol import ProtocolError
from .scheduler import Scheduler
from .scheduler_effects import Ended
from .store import JobStore

log = logging.getLogger("resisod")


def revalidate(job: Job, sched: Scheduler) -> str | None:
    """Check an unfinished job's params again under today's configuration and code: a new
    version's engines may expect a parameter the old one did not fill in (validation fills
    its default), and a limit may have been lowered. Returns why they are refused, if so."""
    domain = sched.domains.get(job.domain)
    if domain is None or job.finished:
        return None
    try:
        job.params = job_params.validate(domain.kind, job.params, domain.cfg)
    except ProtocolError as exc:
        return exc.message
    return None


def recover(store: JobStore, sched: Scheduler) -> None:
    for job in store.recent_finished(sched.jobs.keep_finished):
        sched.jobs.add(job)
    requeued = failed = 0
    for job, deadline_at in store.unfinished():
        effects = sched.restore(job, deadline_at, refused=revalidate(job, sched))
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
