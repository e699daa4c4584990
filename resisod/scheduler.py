"""The scheduler: queues, dispatch order, preemption turns, deadlines, retries, how jobs end.

Pure decisions. It opens no socket, touches no store and starts no process. The broker feeds
it events (a job admitted, a worker ready or lost, a partial, done or failed, a cancel, a
tick, a stop) and applies the effects each call returns, in order:

    Start(slot, job)        send the job to that worker; its watchers hear `started`
    Signal(slot, job, op)   tell the worker running the job to pause, resume or cancel
    Kill(slot, reason)      the worker did not stop a cancelled job in time: kill it
    Requeued(job, reason)   the job went back to its queue (a retry)
    Ended(job)              the job reached a finished state; tell its watchers
    DomainHealth(domain)    the domain became unavailable, or recovered

The clocks are parameters (`clock` monotonic, `wall` for timestamps people read), so the
tests drive every decision with a fake clock, without processes or sleeps.

A job ends in one place, `end(job, outcome)`, and its outcome is decided where the cause is
known: a cancel stores the outcome the job gets once its worker confirms the stop (or dies).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import batch_places, preemption
from .breakers import WORKER_FAULTS, Breaker
from .domains import Domain
from .pacing import Pacing
from .jobs import CANCELLED, JobTable, Job, Outcome, completed, failed, new_task_id, retry
from .protocol import Code, Event, JobState, ProtocolError, WorkerMsg
from .scheduler_effects import DomainHealth, Ended, Kill, Requeued, Signal, Start
from .slots import Slot, SlotState


@dataclass(frozen=True)
class RetryPolicy:
    """How often a job is run again after something other than itself cut it off."""
    crash_attempts: int = 2      # runs a job gets when its worker dies under it (retry once)
    interruptions: int = 1       # daemon stops a running job survives (re-queued at start)
    crash_loop: int = 5          # consecutive crashes of every slot: the domain is unavailable


# slots that can take jobs (a busy batching worker may have places left)
ACCEPTING = (SlotState.READY, SlotState.BUSY)

SHUTDOWN_RETRY = retry("resisod is shutting down")
SHUTDOWN_FAIL = failed(Code.INTERRUPTED, "resisod shut down before the job finished")
RAN_PAST_DEADLINE = failed(Code.TIMEOUT, "the job ran past its deadline")
WAITED_PAST_DEADLINE = failed(Code.TIMEOUT, "the job waited in the queue past its deadline")


class Scheduler:
    def __init__(self, cfg: dict[str, Any], slots: list[Slot], *,
                 yields_to: dict[str, list[str]] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 policy: RetryPolicy = RetryPolicy(), keep_finished: int = 10000):
        self.cfg = cfg
        self.clock, self.wall, self.policy = clock, wall, policy
        self.domains = {name: Domain(name, d) for name, d in cfg["domains"].items()}
        self.jobs = JobTable(keep_finished)
        self.slots = slots
        self.slots_of = {name: [s for s in slots if s.domain == name] for name in self.domains}
        self.seq = itertools.count(1)
        self.stopping = False
        self.stop_deadline = 0.0
        # set whenever a job is queued or a worker frees up; the broker dispatches only then
        self.dispatch_due = True
        self.yields_to = {b: [self.domains[r] for r in rts]
                          for b, rts in (yields_to or {}).items()}
        self.turns = {b: preemption.Turn() for b in self.yields_to}
        self.floor = cfg["resources"]["gpu_allocation"]["image"] / 100.0
        # work-conserving preemption: measured paces, the policy per pair (pacing.py)
        self.pacing = Pacing(cfg["resources"], self.domains, self.slots_of, self.yields_to, clock)
        # a cancel is a request: an engine stuck between checkpoints (native code, a hung
        # device) never reads it, so past this grace its worker process is killed
        self.cancel_grace = cfg["daemon"]["cancel_grace_s"]
        # one failed load may be transient (a device still busy, a file being written): a
        # domain is declared failed after this many in a row on every worker, and its queued
        # jobs then wait `hold` for it to come back
        self.load_attempts = cfg["daemon"]["load_attempts"]
        self.hold = cfg["daemon"]["failed_domain_hold_s"]
        # the owner part of task ids, for load balancers in front of several daemons
        self.node = cfg["daemon"]["node"]
        for slot in slots:  # a worker failing job after job is taken out of dispatch a while
            slot.breaker = Breaker(cfg["daemon"]["breaker_failures"],
                                   cfg["daemon"]["breaker_cooldown_s"])
        self._out: list[Any] = []

    def _take(self) -> list[Any]:
        out, self._out = self._out, []
        return out

    # --- admission ---------------------------------------------------------------------------
    def refuse(self, domain: Domain) -> None:
        """Raise the reason `domain` takes no new job now, if there is one."""
        if self.stopping:
            raise ProtocolError(Code.SHUTTING_DOWN,
                                "resisod is shutting down; submit again once it is back")
        if domain.unavailable_reason:
            raise ProtocolError(Code.ENGINE_UNAVAILABLE, f"domain {domain.name!r} cannot run "
                                f"jobs: {domain.unavailable_reason}")

    def admit(self, domain: Domain, params: dict[str, Any], priority: str, *,
              timeout_ms: int | None = None, detached: bool = False) -> Job:
        """Queue a new job, or raise `queue_full` / `shutting_down` / `engine_unavailable`."""
        self.refuse(domain)
        if len(domain.queue) >= domain.cfg["max_queue"]:
            raise ProtocolError(Code.QUEUE_FULL, f"domain {domain.name!r} has "
                                f"{len(domain.queue)} jobs queued (max_queue); retry later")
        job = Job(new_task_id(domain.kind, self.node), domain.name, domain.kind, params, priority,
                  created_at=self.wall(), seq=next(self.seq), detached=detached)
        if timeout_ms is None:
            timeout_ms = domain.cfg["timeout_ms"] or (
                self.cfg["daemon"]["batch_timeout_ms"] if priority == "batch"
                else self.cfg["daemon"]["request_timeout_ms"])
        job.deadline = self.clock() + timeout_ms / 1000.0 if timeout_ms else None
        job.estimate_ms = domain.estimate(job)
        self.jobs.add(job)
        domain.queue.push(job)
        self.dispatch_due = True
        return job

    def restore(self, job: Job, deadline_at: float | None, *,
                refused: str | None = None) -> list[Any]:
        """A job read back from the store at start-up. Queued jobs return to their queue in
        their old order; a job a stop cut off mid-run returns once more, then fails; a job
        whose params no longer pass (`refused` says why) fails."""
        self.jobs.add(job)
        if job.finished:
            return []
        domain = self.domains.get(job.domain)
        if domain is None:
            self.end(job, failed(Code.ENGINE_UNAVAILABLE,
                                 f"domain {job.domain!r} is no longer configured"))
            return self._take()
        if refused is not None:
            self.end(job, failed(Code.BAD_REQUEST, f"its parameters do not pass under the "
                                 f"current configuration: {refused}"))
            return self._take()
        job.deadline = None if deadline_at is None else \
            self.clock() + (deadline_at - self.wall())
        job.estimate_ms = domain.estimate(job)
        if job.state == JobState.RUNNING:
            job.interrupted += 1
            if job.interrupted > self.policy.interruptions:
                self.end(job, failed(Code.INTERRUPTED, "the job was cut off by a daemon stop "
                                     f"{job.interrupted} times; not retried"))
            else:
                self.end(job, retry("a daemon stop cut it off mid-run"))
        else:
            domain.queue.push(job)
        return self._take()

    def continue_sequence(self, last_seq: int) -> None:
        """New jobs queue after every job the store already holds."""
        self.seq = itertools.count(last_seq + 1)

    # --- dispatch ----------------------------------------------------------------------------
    def dispatch(self) -> list[Any]:
        """Give queued jobs to free places (highest priority first, FIFO within a class); a
        full batching slot gives a running job's place to a queued one that outranks it."""
        self.dispatch_due = False
        if not self.stopping:
            now = self.clock()
            ready = []
            domains = self.domains
            for slot in self.slots:
                if slot.state not in ACCEPTING:
                    continue
                domain = domains[slot.domain]
                # nothing queued and no job of its own to resume: nothing to decide (the
                # common case after a job ends, once per slot)
                if not (domain.queue or slot.bumped) or not slot.breaker.allows(now):
                    continue
                if slot.bumped:
                    self._resume_bumped(slot, domain)
                if slot.free > 0:
                    ready.append(slot)
                elif slot.capacity > 1 and len(domain.queue):
                    self._bump(slot, domain)
            # rounds of one job per slot spread a burst over a domain's batching workers,
            # instead of filling the first one
            while ready:
                ready = [slot for slot in ready if self._start_next(slot, now)]
        if self.yields_to:
            self._preempt(self.clock())
        return self._take()

    def _start_next(self, slot: Slot, now: float) -> bool:
        """Start the slot's domain's next queued job; whether the slot could take another."""
        domain = self.domains[slot.domain]
        if not len(domain.queue) or not slot.breaker.allows(now):
            return False
        self._start(slot, domain, domain.queue.pop())
        return slot.free > 0

    def _start(self, slot: Slot, domain: Domain, job: Job) -> None:
        slot.state = SlotState.BUSY
        slot.jobs[job.task_id] = job
        slot.breaker.started()
        job.state, job.slot = JobState.RUNNING, slot
        job.started_at = self.wall()
        job.attempts += 1
        job.progress = None
        job.step_mark = self.clock()
        job.eta_ms = None
        domain.running.add(job)
        self._out.append(Start(slot, job))
        if domain.paused:
            self._out.append(Signal(slot, job, WorkerMsg.PAUSE))
            domain.preemptions += 1

    def _bump(self, slot: Slot, domain: Domain) -> None:
        """A full batching slot: each queue head that outranks a running job takes the
        place of the one `batch_places.victim` picks, which pauses (bumped)."""
        while not domain.paused and (job := batch_places.victim(
                slot, domain.queue.peek())) is not None:
            job.bumped = True
            slot.bumped += 1
            self._out.append(Signal(slot, job, WorkerMsg.PAUSE))
            self._start(slot, domain, domain.queue.pop())

    def _resume_bumped(self, slot: Slot, domain: Domain) -> None:
        """Bumped jobs take free places back before queued jobs they do not yield to."""
        while not domain.paused and (job := batch_places.next_back(
                slot, domain.queue.peek())) is not None:
            job.bumped = False
            slot.bumped -= 1
            self._out.append(Signal(slot, job, WorkerMsg.RESUME))

    def _preempt(self, now: float) -> None:
        """Pause or resume batch work so realtime work on a shared device runs alone."""
        for name, rts in self.yields_to.items():
            batch, turn = self.domains[name], self.turns[name]
            busy_rts = [r for r in rts if (r.running or len(r.queue)) and
                        self.pacing.contends(name, r.name)]
            batch.account(now, bool(busy_rts))
            pressure = self.pacing.pressure(now, name, busy_rts)
            paused = preemption.want_paused(now, pressure, turn, self.floor)
            if not preemption.apply(turn, paused):
                continue
            batch.paused = paused
            op = WorkerMsg.PAUSE if paused else WorkerMsg.RESUME
            for job in batch.running:
                if job.slot is not None and not job.bumped:
                    self._out.append(Signal(job.slot, job, op))
            if paused and batch.running:
                batch.preemptions += 1

    # --- worker events -----------------------------------------------------------------------
    def worker_ready(self, slot: Slot, warm_up: Any = None, capacity: Any = 1,
                     runs_on: Any = None) -> list[Any]:
        slot.state, slot.ready_since, slot.loaded = SlotState.READY, self.clock(), True
        slot.runs_on = runs_on if isinstance(runs_on, dict) else None
        slot.capacity = capacity if isinstance(capacity, int) and capacity >= 1 else 1
        slot.load_failures = 0
        self.dispatch_due = True
        domain = self.domains[slot.domain]
        domain.warmed_up(warm_up)
        if domain.unavailable_reason:
            domain.unavailable_reason = ""
            self._out.append(DomainHealth(domain))
        return self._take()

    def worker_load_failed(self, slot: Slot, reason: str) -> list[Any]:
        slot.state, slot.last_error = SlotState.FAILED, reason
        slot.load_failures += 1
        self._check_health(self.domains[slot.domain])
        return self._take()

    def partial(self, job: Job, name: str, fields: dict[str, Any]) -> None:
        """Keep what late watchers and estimates need from a progress / paused / resumed
        event; a progress event gains `estimated_time_remaining_ms`."""
        domain = self.domains[job.domain]
        if name == Event.PROGRESS:
            now = self.clock()
            if fields.get("step", 0) > 0:
                domain.learn_step((now - job.step_mark) * 1000, job)
            job.step_mark = now
            left = max(0, fields.get("total", 0) - fields.get("step", 0))
            fields["estimated_time_remaining_ms"] = round(domain.countdown(
                job, (domain.step_ms or 0.0) * domain.scale(job) * left))
            job.progress = fields
        elif name == Event.PAUSED:
            job.paused = True
        elif name == Event.RESUMED:
            job.paused = False
            job.step_mark = self.clock()  # time spent paused is not step time

    def running_job(self, slot: Slot, task_id: Any) -> Job | None:
        """The job a worker's message is about; None for a stray one (an ended job's id)."""
        return slot.jobs.get(task_id) if isinstance(task_id, str) else None

    def job_done(self, slot: Slot, task_id: Any, result: dict[str, Any] | None) -> list[Any]:
        job = self._release(slot, task_id)
        if job is not None:
            slot.breaker.succeeded()
            result = dict(result or {})
            if "generation_time_ms" not in result:  # to 0.1 ms
                result["generation_time_ms"] = \
                    int((self.wall() - job.started_at) * 10000 + 0.5) / 10
            self.end(job, completed(result))
        return self._take()

    def job_failed(self, slot: Slot, task_id: Any, code: str, message: str) -> list[Any]:
        job = self._release(slot, task_id)
        if job is not None:
            if code in WORKER_FAULTS:
                slot.breaker.failed(self.clock())
            else:
                slot.breaker.neither()
            if code == Code.CANCELLED:
                self.end(job, job.on_cancel or CANCELLED)
            else:
                self.end(job, failed(code, message))
        return self._take()

    def _release(self, slot: Slot, task_id: Any) -> Job | None:
        # a stray message (not about the slot's job) must not free the slot under its job
        job = slot.jobs.pop(task_id, None) if isinstance(task_id, str) else None
        if job is not None:
            if job.bumped:
                slot.bumped -= 1
            if slot.state == SlotState.BUSY:
                if not slot.jobs:
                    slot.state = SlotState.READY
                self.dispatch_due = True
        return job

    def worker_lost(self, slot: Slot, reason: str, *,
                    limit: tuple[str, float | None] | None = None) -> list[Any]:
        """A worker process died or was killed (`limit`: by the memory watchdog, which
        memory and its budget). Its supervisor already scheduled the restart."""
        jobs = [j for j in slot.jobs.values() if not j.finished]
        slot.jobs, slot.bumped = {}, 0
        if jobs:
            slot.breaker.failed(self.clock())
        for job in jobs:  # a batching worker takes all of its jobs with it, each retried
            if limit is not None:
                outcome = failed(Code.MEMORY_LIMIT, f"the worker passed its {limit[0]} budget "
                                 f"of {limit[1]:.0f} MB and was restarted")
            elif job.on_cancel is not None:
                outcome = job.on_cancel
            elif job.attempts < self.policy.crash_attempts and not self.stopping:
                outcome = retry(f"worker {slot.name} died ({reason}); retrying once")
            else:
                outcome = failed(Code.WORKER_CRASHED,
                                 f"the worker running this job died ({reason})")
            self.end(job, outcome)
        self._check_health(self.domains[slot.domain])
        return self._take()

    def _check_health(self, domain: Domain) -> None:
        """A domain none of whose workers can load (`load_attempts` times in a row), or
        that crash-loops, is declared failed: new jobs are refused, queued ones wait."""
        slots = self.slots_of[domain.name]
        if any(s.state in (SlotState.READY, SlotState.BUSY) for s in slots):
            return
        load_failed = all(s.load_failures >= self.load_attempts for s in slots)
        crash_loop = all(s.crashes >= self.policy.crash_loop for s in slots)
        if not (load_failed or crash_loop):
            return
        last = next((s.last_error for s in slots if s.last_error), "unknown error")
        reason = last if load_failed else f"workers keep crashing: {last}"
        if domain.unavailable_reason != reason:
            if not domain.unavailable_reason:
                domain.unavailable_since = self.clock()
            domain.unavailable_reason = reason
            self._out.append(DomainHealth(domain))

    def _fail_held(self, domain: Domain, now: float) -> None:
        """A failed domain that has not come back within the hold fails its queued jobs."""
        if now - domain.unavailable_since < self.hold or not len(domain.queue):
            return
        outcome = failed(Code.ENGINE_UNAVAILABLE,
                         f"domain {domain.name!r} cannot run jobs: {domain.unavailable_reason}")
        for job in list(domain.queue):  # in queue order: end() takes each from the head
            self.end(job, outcome)

    # --- cancels, deadlines, stop --------------------------------------------------------------
    def cancel(self, job: Job, outcome: Outcome = CANCELLED) -> list[Any]:
        """Stop a job. A queued one ends now with `outcome`; a running one is told to stop and
        ends with `outcome` once its worker confirms (or dies). The first cancel decides."""
        self._cancel(job, outcome)
        return self._take()

    def _cancel(self, job: Job, outcome: Outcome) -> None:
        if job.finished:
            return
        if job.state == JobState.QUEUED:
            self.end(job, outcome)
        elif job.on_cancel is None:
            job.on_cancel = outcome
            if job.slot is not None:
                job.stop_by = self.clock() + self.cancel_grace
                self._out.append(Signal(job.slot, job, WorkerMsg.CANCEL))

    def tick(self, now: float) -> list[Any]:
        """Deadlines, cancels past their grace, preemption turns, the shutdown deadline."""
        self.dispatch_due = True  # a cheap safety net: no state change can strand a job
        for job in [j for j in self.jobs.live if j.deadline is not None and now >= j.deadline]:
            if job.state == JobState.QUEUED:
                self.end(job, WAITED_PAST_DEADLINE)
            else:
                self._cancel(job, RAN_PAST_DEADLINE)
        for job in [j for j in self.jobs.live if j.stop_by is not None and now >= j.stop_by]:
            job.stop_by = None  # killed once; the reaper settles the job with its on_cancel
            if job.slot is not None:
                self._out.append(Kill(job.slot, f"it did not stop job {job.task_id} within "
                                                f"{self.cancel_grace:g}s of a cancel"))
        for domain in self.domains.values():
            if domain.unavailable_reason:
                self._fail_held(domain, now)
        if self.yields_to:
            self._preempt(now)
        if self.stopping and now >= self.stop_deadline:
            for job in self.running():
                self._cancel(job, SHUTDOWN_FAIL)
        return self._take()

    def stop(self, now: float) -> list[Any]:
        """Take no new jobs. Batch jobs stop now and go back to the queue (the store keeps
        them for the next start); realtime jobs get `shutdown_grace_s` to finish."""
        if not self.stopping:
            self.stopping = True
            self.stop_deadline = now + self.cfg["daemon"]["shutdown_grace_s"]
            for job in self.running():
                if self.domains[job.domain].cfg["priority"] == "batch":
                    self._cancel(job, SHUTDOWN_RETRY)
        return self._take()

    def drained(self, now: float) -> bool:
        """Stopping and nothing left running, or the workers had their chance to confirm."""
        if not self.stopping:  # asked every loop iteration
            return False
        hb = self.cfg["daemon"]["heartbeat_ms"] / 1000.0
        return now >= self.stop_deadline + 2 * hb or \
            not any(d.running for d in self.domains.values())

    def running(self) -> list[Job]:
        return [j for d in self.domains.values() for j in d.running]

    # --- the end of a job ---------------------------------------------------------------------
    def end(self, job: Job, outcome: Outcome) -> None:
        """The one place an attempt ends: finished for good, or (a retry) back in the queue."""
        domain = self.domains.get(job.domain)
        if domain is not None:
            domain.running.discard(job)
            if job.state == JobState.QUEUED:
                domain.queue.remove(job)
        job.slot, job.on_cancel, job.stop_by, job.paused = None, None, None, False
        job.bumped = False
        if outcome.retry:
            job.state, job.progress = JobState.QUEUED, None
            domain.queue.push(job)
            self.dispatch_due = True
            self._out.append(Requeued(job, outcome.message))
            return
        job.state, job.finished_at = outcome.state, self.wall()
        job.result, job.error = outcome.result, outcome.error
        self.jobs.finish(job)
        if domain is not None:
            if outcome.state == JobState.COMPLETED:
                domain.completed += 1
                domain.learn(job, (job.finished_at - job.started_at) * 1000)
            elif outcome.state == JobState.FAILED:
                domain.failed += 1
            else:
                domain.cancelled += 1
        self._out.append(Ended(job))

    # --- questions -----------------------------------------------------------------------------
    def position(self, job: Job) -> int:
        return self.domains[job.domain].position(job)

    def wait_estimate(self, job: Job, now: float) -> float:
        return self.domains[job.domain].wait_estimate(job, now)
