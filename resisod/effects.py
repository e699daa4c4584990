"""Carrying out the scheduler's decisions: each effect it returns becomes I/O here.

The scheduler decides and returns effects (`Start`, `Ended`, `Signal`, `Kill`, `Requeued`,
`DomainHealth`); this module is the one place they touch the outside world: the worker
link sends, the store records, the subscriptions tell listeners (through the outbox, so
after the commit), the supervisor kills, and the job log gets its line. The broker calls
`apply` with every batch of effects, whoever produced them.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from . import logsetup
from .scheduler_effects import DomainHealth, Ended, Kill, Requeued, Signal, Start
from .store import JobStore
from .subscriptions import Subscriptions
from .supervisor import Supervisor
from .worker_link import WorkerLink

log = logging.getLogger("resisod")
jlog = logsetup.JobLines(log)  # job transitions: formatted at the tick's flush, not inline


class Effects:
    def __init__(self, *, link: WorkerLink, store: JobStore, subs: Subscriptions,
                 supervisor: Supervisor, clock: Callable[[], float]):
        self.link, self.store, self.subs = link, store, subs
        self.supervisor, self.clock = supervisor, clock

    def apply(self, effects: Iterable[Any]) -> None:
        """Carry out the scheduler's decisions, in order. A `Start` goes to its worker
        first: the job's record and listeners are seen to while the worker already runs."""
        for e in effects:
            kind = type(e)
            if kind is Ended:
                self.ended(e.job)
            elif kind is Start:
                slot, job = e
                self.link.run(slot, job)
                self.store.update(job)
                self.subs.started(job, slot.name, self.clock())
                jlog.info("job %s started domain=%s worker=%s attempt=%d priority=%s "
                          "waited_ms=%.0f", job.task_id, job.domain, slot.name, job.attempts,
                          job.priority, (job.started_at - job.created_at) * 1000)
            elif kind is Signal:
                self.link.signal(*e)
            elif kind is Kill:
                log.warning("killing worker %s: %s", e.slot.name, e.reason)
                self.supervisor.kill(e.slot, e.reason)
            elif kind is Requeued:
                self.store.update(e.job)
                self.subs.requeued(e.job, e.reason)
                log.warning("job %s re-queued: %s", e.job.task_id, e.reason)
            elif kind is DomainHealth:
                if e.domain.unavailable_reason:
                    log.error("domain %s unavailable: %s", e.domain.name,
                              e.domain.unavailable_reason)
                else:
                    log.info("domain %s recovered", e.domain.name)

    def ended(self, job: Any) -> None:
        self.store.update(job)
        self.subs.ended(job)
        took = (job.finished_at - job.created_at) * 1000
        if job.error:
            jlog.info("job %s %s domain=%s code=%s total_ms=%.0f", job.task_id, job.state,
                      job.domain, job.error["code"], took)
        else:
            jlog.info("job %s %s domain=%s total_ms=%.0f", job.task_id, job.state,
                      job.domain, took)
