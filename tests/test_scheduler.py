"""The scheduler's decisions, driven by a fake clock: no processes, no sockets, no sleeps.

Each test feeds the scheduler the events the broker would (admit, worker ready, done,
failed, lost, tick, stop) and checks the effects it returns.
"""
from __future__ import annotations

from typing import Any

import pytest

from resisod import config
from resisod.jobs import failed
from resisod.protocol import Code, JobState, ProtocolError, WorkerMsg
from resisod.scheduler import DomainHealth, Ended, Kill, Requeued, Scheduler, Signal, Start
from resisod.slots import Slot, SlotState


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> float:
        self.t += s
        return self.t


def make(domains: dict[str, dict[str, Any]], *, yields_to: dict[str, list[str]] | None = None,
         ready: bool = True, **daemon: Any) -> tuple[Scheduler, Clock, dict[str, list[Slot]]]:
    cfg = config.build({"domains": domains, "daemon": daemon})
    slots = [Slot(domain=name, index=i, cpus=[], threads=1, sched="normal")
             for name, d in cfg["domains"].items() for i in range(d["workers"])]
    clock = Clock()
    sched = Scheduler(cfg, slots, yields_to=yields_to, clock=clock, wall=clock)
    if ready:
        for s in slots:
            sched.worker_ready(s)
    by_domain = {name: [s for s in slots if s.domain == name] for name in cfg["domains"]}
    return sched, clock, by_domain


def admit(sched: Scheduler, domain: str = "n", priority: str = "normal", **kw: Any):
    return sched.admit(sched.domains[domain], {}, priority, **kw)


def of(effects: list[Any], kind: type) -> list[Any]:
    return [e for e in effects if type(e) is kind]


def started(effects: list[Any]) -> list[str]:
    return [e.job.task_id for e in of(effects, Start)]


def test_dispatch_order_across_priorities_and_fifo_within_a_class():
    sched, _, slots = make({"n": {"kind": "null"}})
    (slot,) = slots["n"]
    blocker = admit(sched)
    assert started(sched.dispatch()) == [blocker.task_id]
    a = admit(sched, priority="normal")
    b = admit(sched, priority="batch")
    c = admit(sched, priority="realtime")
    d = admit(sched, priority="normal")
    e = admit(sched, priority="realtime")
    assert sched.dispatch() == []                      # the only slot is busy
    # position: jobs that must finish first (the running blocker included)
    assert [sched.position(j) for j in (c, e, a, d, b)] == [1, 2, 3, 4, 5]
    order, running = [], blocker
    while True:
        ended = sched.job_done(slot, running.task_id, {})
        assert [x.job for x in of(ended, Ended)] == [running]
        effects = sched.dispatch()
        if not effects:
            break
        (start,) = of(effects, Start)
        assert start.slot is slot and start.job.state == JobState.RUNNING
        running = start.job
        order.append(running)
    assert order == [c, e, a, d, b]
    assert all(j.state == JobState.COMPLETED and j.attempts == 1 for j in order)
    assert sched.domains["n"].completed == 6


def test_a_retried_job_returns_to_its_place_in_its_class():
    sched, _, slots = make({"n": {"kind": "null", "workers": 1}})
    (slot,) = slots["n"]
    first = admit(sched)
    sched.dispatch()
    later = [admit(sched) for _ in range(3)]
    effects = sched.worker_lost(slot, "exited with signal 9")
    assert [(type(e), e.job) for e in effects] == [(Requeued, first)]
    assert "retrying once" in effects[0].reason and first.state == JobState.QUEUED
    assert [j for j in sched.domains["n"].queue] == [first, *later]  # ahead of later arrivals


def test_queue_full_rejects_at_once_and_keeps_the_queue():
    sched, _, _ = make({"n": {"kind": "null", "max_queue": 2}}, ready=False)
    jobs = [admit(sched), admit(sched)]
    with pytest.raises(ProtocolError) as exc:
        admit(sched)
    assert exc.value.code == Code.QUEUE_FULL and "max_queue" in exc.value.message
    assert list(sched.domains["n"].queue) == jobs and len(sched.jobs.live) == 2
    # a realtime job does not jump a full queue either: the bound is on memory, not order
    with pytest.raises(ProtocolError):
        admit(sched, priority="realtime")
    sched.worker_ready(sched.slots[0])
    assert started(sched.dispatch()) == [jobs[0].task_id]
    assert admit(sched).state == JobState.QUEUED   # room again


def test_preemption_pauses_at_once_and_keeps_the_share_floor_over_a_minute():
    sched, clock, slots = make({"rt": {"kind": "null", "priority": "realtime"},
                                "bt": {"kind": "null", "priority": "batch",
                                       "preemptible": True}},
                               yields_to={"bt": ["rt"]})
    (bt_slot,), (rt_slot,) = slots["bt"], slots["rt"]
    image = admit(sched, "bt", "batch", timeout_ms=0)
    effects = sched.dispatch()
    assert started(effects) == [image.task_id] and not of(effects, Signal)
    # a realtime request arrives: the batch job is paused in the same dispatch
    chat = admit(sched, "rt", "realtime")
    effects = sched.dispatch()
    assert started(effects) == [chat.task_id]
    assert [(s.slot, s.job, s.op) for s in of(effects, Signal)] == \
        [(bt_slot, image, WorkerMsg.PAUSE)]
    assert sched.domains["bt"].paused and sched.domains["bt"].preemptions == 1
    # a minute of back-to-back realtime jobs, 10 ms ticks; each chat takes 200 ms
    paused, run_s, paused_s, signals = True, 0.0, 0.0, 0
    chat_ends = clock.t + 0.2
    start = clock.t
    while clock.t < start + 60:
        now = clock.advance(0.01)
        if paused:
            paused_s += 0.01
        else:
            run_s += 0.01
        effects: list[Any] = []
        if now >= chat_ends:
            effects += sched.job_done(rt_slot, chat.task_id, {})
            chat = admit(sched, "rt", "realtime")
            chat_ends = now + 0.2
            effects += sched.dispatch()
        effects += sched.tick(now)
        for s in of(effects, Signal):
            assert s.slot is bt_slot and s.job is image
            paused = s.op == WorkerMsg.PAUSE
            signals += 1
    share = run_s / (run_s + paused_s)
    assert 0.27 <= share <= 0.33, share          # the 30 % floor (gpu_allocation.image)
    assert signals >= 60                          # turns, not one long stretch
    # realtime work stops: the batch job resumes on the next tick
    sched.job_done(rt_slot, chat.task_id, {})
    effects = sched.tick(clock.advance(0.01))
    if paused:
        assert [s.op for s in of(effects, Signal)] == [WorkerMsg.RESUME]
    assert not sched.domains["bt"].paused
    assert image.state == JobState.RUNNING        # never cancelled, only paused


def test_deadlines_of_queued_and_running_jobs():
    sched, clock, slots = make({"n": {"kind": "null"}})
    (slot,) = slots["n"]
    running = admit(sched, timeout_ms=300)
    sched.dispatch()
    queued = admit(sched, timeout_ms=100)
    no_deadline = admit(sched, timeout_ms=0)
    assert sched.tick(clock.advance(0.099)) == []
    effects = sched.tick(clock.advance(0.002))
    assert [e.job for e in of(effects, Ended)] == [queued]
    assert queued.state == JobState.FAILED and queued.error["code"] == Code.TIMEOUT
    assert "waited in the queue" in queued.error["message"]
    assert queued not in sched.domains["n"].queue
    effects = sched.tick(clock.advance(0.2))
    assert [(s.job, s.op) for s in of(effects, Signal)] == [(running, WorkerMsg.CANCEL)]
    assert running.state == JobState.RUNNING      # until the worker confirms
    assert sched.tick(clock.advance(0.05)) == []  # asked once
    # a client's cancel now does not change how the job ends: the deadline came first
    assert sched.cancel(running) == []
    effects = sched.job_failed(slot, running.task_id, Code.CANCELLED, "cancelled")
    assert [e.job for e in of(effects, Ended)] == [running]
    assert running.state == JobState.FAILED and running.error["code"] == Code.TIMEOUT
    assert "ran past its deadline" in running.error["message"]
    assert started(sched.dispatch()) == [no_deadline.task_id]
    assert sched.tick(clock.advance(3600)) == []


def test_a_worker_that_does_not_stop_within_the_grace_is_killed():
    sched, clock, slots = make({"n": {"kind": "null"}}, cancel_grace_s=2.0)
    (slot,) = slots["n"]
    stuck = admit(sched, timeout_ms=300)
    sched.dispatch()
    effects = sched.tick(clock.advance(0.3))      # the deadline: a cancel is sent
    assert [s.op for s in of(effects, Signal)] == [WorkerMsg.CANCEL]
    assert sched.tick(clock.advance(1.99)) == []  # the engine may still reach a checkpoint
    effects = sched.tick(clock.advance(0.02))
    assert [(k.slot, type(k)) for k in effects] == [(slot, Kill)]
    assert stuck.task_id in effects[0].reason and "2s" in effects[0].reason
    assert sched.tick(clock.advance(1.0)) == []   # killed once
    slot.state = SlotState.BACKOFF                # the reaper found the process gone
    effects = sched.worker_lost(slot, effects[0].reason)
    assert [e.job for e in of(effects, Ended)] == [stuck]
    assert stuck.error["code"] == Code.TIMEOUT    # the outcome the deadline decided
    # a worker that confirms within the grace is left alone
    sched.worker_ready(slot)
    quick = admit(sched)
    sched.dispatch()
    sched.cancel(quick)
    clock.advance(1.0)
    sched.job_failed(slot, quick.task_id, Code.CANCELLED, "cancelled")
    assert quick.state == JobState.CANCELLED and quick.stop_by is None
    assert sched.tick(clock.advance(5.0)) == []


def test_default_timeouts_by_priority():
    sched, clock, _ = make({"n": {"kind": "null"}}, ready=False, request_timeout_ms=5000,
                           batch_timeout_ms=60000)
    assert admit(sched).deadline == clock.t + 5
    assert admit(sched, priority="batch").deadline == clock.t + 60


def test_a_worker_lost_mid_job_retries_once_then_fails():
    sched, _, slots = make({"n": {"kind": "null"}})
    (slot,) = slots["n"]
    job = admit(sched)
    sched.dispatch()
    slot.state = SlotState.BACKOFF                # the supervisor scheduled the restart
    effects = sched.worker_lost(slot, "exited with signal 9")
    assert of(effects, Requeued) and slot.job is None and job.slot is None
    assert sched.dispatch() == []                 # no ready slot until the restart
    sched.worker_ready(slot)
    assert started(sched.dispatch()) == [job.task_id] and job.attempts == 2
    slot.state = SlotState.BACKOFF
    effects = sched.worker_lost(slot, "exited with signal 11")
    assert [e.job for e in of(effects, Ended)] == [job]
    assert job.error["code"] == Code.WORKER_CRASHED and "signal 11" in job.error["message"]
    assert sched.domains["n"].failed == 1


def test_a_memory_kill_fails_the_job_without_retry():
    sched, _, slots = make({"n": {"kind": "null"}})
    job = admit(sched)
    sched.dispatch()
    effects = sched.worker_lost(slots["n"][0], "memory_limit", limit=("memory", 150))
    assert [e.job for e in of(effects, Ended)] == [job] and job.attempts == 1
    assert job.error["code"] == Code.MEMORY_LIMIT and "150 MB" in job.error["message"]


def test_a_stray_done_does_not_free_the_slot_of_its_running_job():
    sched, _, slots = make({"n": {"kind": "null"}})
    (slot,) = slots["n"]
    job = admit(sched)
    sched.dispatch()
    assert sched.job_done(slot, "nul_not_this_one", {}) == []
    assert slot.job is job and slot.state == SlotState.BUSY
    assert of(sched.job_done(slot, job.task_id, {"x": 1}), Ended)
    assert job.result["x"] == 1 and "generation_time_ms" in job.result


def test_restart_recovery_requeues_an_interrupted_job_once_then_fails_it():
    sched, _, _ = make({"n": {"kind": "null"}}, ready=False)
    first = sched.admit(sched.domains["n"], {}, "normal")
    store_copy = [first]
    # as read back from the store after a stop cut the job off mid-run
    for job in store_copy:
        job.state = JobState.RUNNING
    sched2, _, _ = make({"n": {"kind": "null"}}, ready=False)
    effects = sched2.restore(first, None)
    assert [type(e) for e in effects] == [Requeued]
    assert first.state == JobState.QUEUED and first.interrupted == 1
    assert list(sched2.domains["n"].queue) == [first]
    first.state = JobState.RUNNING                # interrupted a second time
    sched3, _, _ = make({"n": {"kind": "null"}}, ready=False)
    effects = sched3.restore(first, None)
    assert [type(e) for e in effects] == [Ended]
    assert first.state == JobState.FAILED and first.error["code"] == Code.INTERRUPTED
    assert len(sched3.domains["n"].queue) == 0 and first not in sched3.jobs.live
    # a job of a domain no longer configured fails; queued ones keep their order
    gone = sched.admit(sched.domains["n"], {}, "normal")
    gone.domain = "removed"
    q1, q2 = (sched.admit(sched.domains["n"], {}, "normal") for _ in range(2))
    sched4, _, _ = make({"n": {"kind": "null"}}, ready=False)
    assert of(sched4.restore(gone, None), Ended) and gone.error["code"] == \
        Code.ENGINE_UNAVAILABLE
    for job in (q2, q1):                          # read back in any order
        assert sched4.restore(job, None) == []
    assert list(sched4.domains["n"].queue) == [q1, q2]
    sched4.continue_sequence(q2.seq)
    assert sched4.admit(sched4.domains["n"], {}, "normal").seq == q2.seq + 1


def test_cancel_of_queued_and_running_jobs():
    sched, _, slots = make({"n": {"kind": "null"}})
    (slot,) = slots["n"]
    running, queued = admit(sched), None
    sched.dispatch()
    queued = admit(sched)
    effects = sched.cancel(queued)
    assert [e.job for e in of(effects, Ended)] == [queued]
    assert queued.state == JobState.CANCELLED and len(sched.domains["n"].queue) == 0
    assert sched.cancel(queued) == []             # finished: nothing to do
    effects = sched.cancel(running)
    assert [(s.slot, s.job, s.op) for s in effects] == [(slot, running, WorkerMsg.CANCEL)]
    assert running.state == JobState.RUNNING and slot.job is running
    effects = sched.job_failed(slot, running.task_id, Code.CANCELLED, "cancelled")
    assert [e.job for e in of(effects, Ended)] == [running]
    assert running.state == JobState.CANCELLED and slot.idle
    assert sched.domains["n"].cancelled == 2
    # a cancelled job whose worker dies before confirming still ends cancelled, not retried
    job = admit(sched)
    sched.dispatch()
    sched.cancel(job)
    effects = sched.worker_lost(slot, "exited with signal 9")
    assert of(effects, Ended) and job.state == JobState.CANCELLED


def test_load_failures_declare_a_domain_failed_after_n_and_its_queue_waits_the_hold():
    sched, clock, slots = make({"n": {"kind": "null", "workers": 2}}, ready=False,
                               load_attempts=3, failed_domain_hold_s=60)
    jobs = [admit(sched, timeout_ms=0) for _ in range(3)]
    a, b = slots["n"]
    for _ in range(2):                            # transient failures: retried, jobs wait
        assert sched.worker_load_failed(a, "device busy") == []
        assert sched.worker_load_failed(b, "device busy") == []
    assert sched.worker_load_failed(a, "no such model") == []   # b may still load
    effects = sched.worker_load_failed(b, "no such model")
    assert [type(e) for e in effects] == [DomainHealth]
    assert sched.domains["n"].unavailable_reason == "no such model"
    with pytest.raises(ProtocolError) as exc:
        admit(sched)
    assert exc.value.code == Code.ENGINE_UNAVAILABLE and "no such model" in exc.value.message
    assert all(j.state == JobState.QUEUED for j in jobs)    # held, not failed
    assert sched.tick(clock.advance(59.9)) == []
    # the domain comes back within the hold: its queue runs
    assert of(sched.worker_ready(a), DomainHealth)
    assert started(sched.dispatch()) == [jobs[0].task_id]
    assert admit(sched, timeout_ms=0).state == JobState.QUEUED
    # a second failure spell that outlasts the hold fails what is queued
    sched.job_done(a, jobs[0].task_id, {})
    for _ in range(3):
        sched.worker_load_failed(a, "gone again")
    sched.worker_load_failed(b, "gone again")     # b kept failing since the first spell
    assert sched.domains["n"].unavailable_reason == "gone again"
    assert sched.tick(clock.advance(59.0)) == []
    effects = sched.tick(clock.advance(1.5))
    ended = [e.job for e in of(effects, Ended)]
    assert len(ended) == 3 and all(j.error["code"] == Code.ENGINE_UNAVAILABLE for j in ended)
    assert len(sched.domains["n"].queue) == 0


def test_a_crash_loop_declares_a_domain_failed():
    sched, clock, slots = make({"n": {"kind": "null"}}, failed_domain_hold_s=0)
    (slot,) = slots["n"]
    job = admit(sched)
    sched.dispatch()
    slot.state = SlotState.BACKOFF
    for crashes in range(1, 6):
        slot.crashes = crashes
        effects = sched.worker_lost(slot, "exited with signal 11")
        if crashes < 5:
            assert not of(effects, DomainHealth)
    assert of(effects, DomainHealth)
    assert "keep crashing" in sched.domains["n"].unavailable_reason
    assert job.state == JobState.QUEUED          # its retry waits for a worker...
    effects = sched.tick(clock.advance(0.05))    # ...for the hold (0 s here), then fails
    assert [e.job for e in of(effects, Ended)] == [job]
    assert job.error["code"] == Code.ENGINE_UNAVAILABLE


def test_stop_requeues_batch_work_and_gives_realtime_work_its_grace():
    sched, clock, slots = make({"rt": {"kind": "null", "priority": "realtime"},
                                "bt": {"kind": "null", "priority": "batch"}},
                               shutdown_grace_s=2.0)
    chat, image = admit(sched, "rt", "realtime"), admit(sched, "bt", "batch")
    sched.dispatch()
    waiting = admit(sched, "bt", "batch")
    effects = sched.stop(clock())
    assert [(s.job, s.op) for s in effects] == [(image, WorkerMsg.CANCEL)]
    with pytest.raises(ProtocolError) as exc:
        admit(sched, "rt", "realtime")
    assert exc.value.code == Code.SHUTTING_DOWN
    effects = sched.job_failed(slots["bt"][0], image.task_id, Code.CANCELLED, "cancelled")
    assert [type(e) for e in effects] == [Requeued] and image.state == JobState.QUEUED
    assert sched.dispatch() == [] and waiting.state == JobState.QUEUED   # nothing starts
    assert not sched.drained(clock())             # the chat is still running
    assert sched.tick(clock.advance(1.0)) == []
    effects = sched.tick(clock.advance(1.5))      # past the grace
    assert [(s.job, s.op) for s in effects] == [(chat, WorkerMsg.CANCEL)]
    sched.job_failed(slots["rt"][0], chat.task_id, Code.CANCELLED, "cancelled")
    assert chat.error["code"] == Code.INTERRUPTED and sched.drained(clock())


def test_failures_keep_their_code_and_completed_jobs_teach_the_estimates():
    sched, clock, slots = make({"n": {"kind": "null"}})
    (slot,) = slots["n"]
    job = admit(sched)
    sched.dispatch()
    sched.job_failed(slot, job.task_id, Code.CONTEXT_OVERFLOW, "prompt too long")
    assert job.error == {"code": Code.CONTEXT_OVERFLOW, "message": "prompt too long"}
    for _ in range(3):
        job = admit(sched)
        sched.dispatch()
        clock.advance(0.5)
        sched.job_done(slot, job.task_id, {})
    assert 499 <= sched.domains["n"].estimate(admit(sched)) <= 501
    assert failed("", "x").code == Code.ENGINE_ERROR  # a failure always has a code


def test_the_scheduler_imports_neither_zmq_nor_the_store():
    import subprocess
    import sys
    code = ("import sys, resisod.scheduler; "
            "print(','.join(m for m in ('zmq', 'resisod.store', 'sqlite3') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_a_worker_failing_job_after_job_is_taken_out_then_given_one_trial():
    sched, clock, slots = make({"n": {"kind": "null", "workers": 2}},
                               breaker_failures=3, breaker_cooldown_s=10)
    bad, good = slots["n"]
    for code in (Code.ENGINE_ERROR, Code.WORKER_CRASHED, Code.ENGINE_ERROR):
        job = admit(sched)
        sched.dispatch()
        assert job.slot is bad  # the first idle slot takes the job
        assert bad.breaker.state == "closed"
        sched.job_failed(bad, job.task_id, code, "boom")
    assert bad.breaker.state == "open" and bad.breaker.opened == 1  # three in a row
    # open: new work goes to the good slot only, and waits when that one is busy
    a, b = admit(sched), admit(sched)
    assert started(sched.dispatch()) == [a.task_id] and a.slot is good
    assert b.state == JobState.QUEUED and bad.idle
    clock.advance(9.9)
    assert sched.dispatch() == []
    clock.advance(0.2)                                 # past the cooldown: one trial
    assert started(sched.dispatch()) == [b.task_id] and b.slot is bad
    assert bad.breaker.state == "half-open"
    c = admit(sched)
    assert sched.dispatch() == []                      # one trial at a time
    sched.job_failed(bad, b.task_id, Code.ENGINE_ERROR, "still broken")
    assert bad.breaker.state == "open" and bad.breaker.opened == 2  # reopened at once
    clock.advance(10.1)
    assert started(sched.dispatch()) == [c.task_id] and c.slot is bad
    sched.job_done(bad, c.task_id, {})                 # the trial succeeds: closed
    assert bad.breaker.state == "closed" and bad.breaker.failures == 0
    # a refused request says nothing against the worker
    d = admit(sched)
    sched.dispatch()
    sched.job_failed(d.slot, d.task_id, Code.BAD_REQUEST, "bad input")
    assert bad.breaker.failures == 0 and good.breaker.failures == 0


def batching(capacity: int, workers: int = 1):
    sched, clock, slots = make({"m": {"kind": "llm", "model": "builtin:smollm2-135m-instruct",
                                      "workers": workers}}, ready=False)
    for s in slots["m"]:
        sched.worker_ready(s, None, capacity)
    return sched, clock, slots["m"]


def test_a_batching_worker_takes_up_to_its_capacity_and_a_burst_is_spread():
    sched, _, (a, b) = batching(3, workers=2)
    jobs = [admit(sched, "m") for _ in range(7)]
    effects = sched.dispatch()
    # one job per worker per round: a, b, a, b, a, b; the seventh waits
    assert [(e.slot, e.job) for e in of(effects, Start)] == \
        list(zip([a, b, a, b, a, b], jobs[:6]))
    assert len(a.jobs) == len(b.jobs) == 3 and a.free == b.free == 0
    assert a.state == SlotState.BUSY and sched.position(jobs[6]) >= 0
    # a job ends: its place goes to the queued one, on that worker
    sched.job_done(a, jobs[0].task_id, {})
    assert a.state == SlotState.BUSY and a.free == 1
    assert [(e.slot, e.job) for e in of(sched.dispatch(), Start)] == [(a, jobs[6])]
    # all of a worker's jobs end: it is ready again
    for job in list(b.jobs.values()):
        sched.job_done(b, job.task_id, {})
    assert b.state == SlotState.READY and b.idle


def test_a_worker_crash_retries_every_job_it_held():
    sched, _, (slot,) = batching(4)
    jobs = [admit(sched, "m") for _ in range(4)]
    sched.dispatch()
    effects = sched.worker_lost(slot, "killed")
    assert [e.job for e in of(effects, Requeued)] == jobs
    assert all(j.state == JobState.QUEUED and j.slot is None for j in jobs)
    assert slot.jobs == {} and slot.bumped == 0
    assert not of(effects, Ended)


def test_a_higher_priority_job_takes_the_place_of_the_lowest_running_one():
    sched, _, (slot,) = batching(2)
    normal = admit(sched, "m", priority="normal")
    early, late = admit(sched, "m", priority="batch"), admit(sched, "m", priority="batch")
    sched.dispatch()
    assert set(slot.jobs) == {normal.task_id, early.task_id}
    sched.job_done(slot, normal.task_id, {})
    sched.dispatch()
    assert set(slot.jobs) == {early.task_id, late.task_id}
    # a realtime job arrives at a full slot: the batch job started last pauses for it
    rt = admit(sched, "m", priority="realtime")
    effects = sched.dispatch()
    assert [(s.job, s.op) for s in of(effects, Signal)] == [(late, WorkerMsg.PAUSE)]
    assert started(effects) == [rt.task_id]
    assert late.bumped and slot.bumped == 1 and slot.free == 0 and len(slot.jobs) == 3
    # a job of the same class as the running ones does not bump anyone
    other = admit(sched, "m", priority="batch")
    assert sched.dispatch() == []
    # the realtime job ends: the bumped job resumes before the queued one of its class
    sched.job_done(slot, rt.task_id, {})
    effects = sched.dispatch()
    assert [(s.job, s.op) for s in of(effects, Signal)] == [(late, WorkerMsg.RESUME)]
    assert not of(effects, Start) and not late.bumped and slot.bumped == 0
    sched.job_done(slot, early.task_id, {})
    assert started(sched.dispatch()) == [other.task_id]


def test_a_queued_job_that_outranks_a_bumped_one_keeps_its_place():
    sched, _, (slot,) = batching(1 + 1)
    a, b = admit(sched, "m", priority="batch"), admit(sched, "m", priority="batch")
    sched.dispatch()
    rt1, rt2 = admit(sched, "m", priority="realtime"), admit(sched, "m", priority="realtime")
    effects = sched.dispatch()
    # both places go to the realtime jobs; both batch jobs pause
    assert started(effects) == [rt1.task_id, rt2.task_id]
    assert {s.job for s in of(effects, Signal)} == {a, b} and slot.bumped == 2
    rt3 = admit(sched, "m", priority="realtime")
    assert sched.dispatch() == []            # no more than `capacity` bumped jobs
    sched.job_done(slot, rt1.task_id, {})
    # the queued realtime job outranks the bumped ones: it takes the freed place
    effects = sched.dispatch()
    assert started(effects) == [rt3.task_id] and not of(effects, Signal)
    # a cancelled bumped job leaves its slot's count right
    sched.cancel(a)
    sched.job_failed(slot, a.task_id, Code.CANCELLED, "cancelled")
    assert slot.bumped == 1 and a.state == JobState.CANCELLED


def corun_run(slowdown_at, seconds: float, token_s: float = 0.02, **daemon: Any):
    """A realtime job streaming tokens without end beside a batch job on a shared device,
    under the work-conserving policy, 5 ms ticks. A token takes `token_s` alone and
    `token_s * (1 + slowdown_at(t))` while the batch job runs. Returns the timeline of
    (t, batch running) and the scheduler."""
    sched, clock, slots = make({"rt": {"kind": "null", "priority": "realtime"},
                                "bt": {"kind": "null", "priority": "batch",
                                       "preemptible": True}},
                               yields_to={"bt": ["rt"]})
    image = admit(sched, "bt", "batch", timeout_ms=0)
    sched.dispatch()
    chat = admit(sched, "rt", "realtime", timeout_ms=0)
    start = clock.t
    running = True
    for s in of(sched.dispatch(), Signal):
        running = s.op != WorkerMsg.PAUSE
    timeline, next_token, next_tick = [], clock.t + token_s, clock.t + 0.005
    while clock.t < start + seconds:
        # the next event: a token (at its exact time: its cost is what is measured) or a tick
        now = clock.advance(min(next_token, next_tick) - clock.t)
        if now >= next_tick:
            next_tick += 0.005
        effects: list[Any] = []
        if now >= next_token:
            sched.pacing.paced(chat, "token", {})
            t = now - start
            next_token = now + token_s * (1 + (slowdown_at(t) if running else 0.0))
            effects += sched.dispatch()
        effects += sched.tick(now)
        for s in of(effects, Signal):
            assert s.job is image
            running = s.op == WorkerMsg.RESUME
        timeline.append((now - start, running))
    return timeline, sched


def share(timeline, t0: float, t1: float) -> float:
    part = [r for t, r in timeline if t0 <= t < t1]
    return sum(part) / len(part)


def pauses(timeline, t0: float, t1: float) -> int:
    return sum(1 for (a, ra), (b, rb) in zip(timeline, timeline[1:])
               if ra and not rb and t0 <= b < t1)


def test_harmless_co_running_is_never_paused_once_measured():
    timeline, sched = corun_run(lambda t: 0.03, 60)
    # the first tokens are measured alone (batch paused), then a probe finds no harm
    assert share(timeline, 1, 60) == 1.0 and pauses(timeline, 1, 60) == 0
    assert sched.pacing.view("bt") == {"rt": {"decode": {
        "state": "corun", "slowdown": pytest.approx(0.03, abs=0.02)}}}


def test_harmful_co_running_pauses_at_once_and_keeps_the_floor():
    timeline, sched = corun_run(lambda t: 0.6, 60)
    view = sched.pacing.view("bt")["rt"]["decode"]
    assert view["state"] in ("paused", "probe") and view["slowdown"] > 0.4
    # the 30 % floor, plus the short probes every probe_every_s (5 s)
    assert 0.28 <= share(timeline, 5, 60) <= 0.40
    # a probe that finds harm ends within the few tokens it needs (+ the floor's slice)
    stretches, run_from = [], None
    for t, r in timeline:
        if r and run_from is None:
            run_from = t
        elif not r and run_from is not None:
            stretches.append(t - run_from)
            run_from = None
    assert stretches and max(stretches) <= 0.3 + 0.2


def test_co_running_adapts_when_the_load_changes():
    # harmless for 20 s, harmful for 20 s, harmless again
    timeline, _ = corun_run(lambda t: 0.6 if 20 <= t < 40 else 0.02, 60)
    assert share(timeline, 2, 20) == 1.0
    assert share(timeline, 23, 40) <= 0.45        # paused to near the floor within 3 s
    assert share(timeline, 48, 60) == 1.0          # co-running again after the next probe


def test_preemption_always_pauses_whatever_is_measured():
    sched, clock, slots = make({"rt": {"kind": "null", "priority": "realtime"},
                                "bt": {"kind": "null", "priority": "batch",
                                       "preemptible": True}},
                               yields_to={"bt": ["rt"]})
    assert sched.pacing.adaptive
    cfg = config.build({"domains": {"rt": {"kind": "null", "priority": "realtime"},
                                    "bt": {"kind": "null", "priority": "batch",
                                           "preemptible": True}},
                        "resources": {"preemption": "always"}})
    slots2 = [Slot(domain=n, index=0, cpus=[], threads=1, sched="normal") for n in cfg["domains"]]
    always = Scheduler(cfg, slots2, yields_to={"bt": ["rt"]}, clock=clock, wall=clock)
    assert not always.pacing.adaptive and always.pacing.view("bt") == {}


def test_a_worker_that_computes_on_the_cpu_never_makes_a_gpu_domain_yield():
    """Device truth: the start-up plan pairs an image domain with a realtime domain on the
    same GPU by their configuration; once the realtime worker reports that it runs on the
    CPU (a CPU build, no usable GPU), its work no longer pauses the image."""
    sched, clock, slots = make({"rt": {"kind": "null", "priority": "realtime"},
                                "bt": {"kind": "null", "priority": "batch",
                                       "preemptible": True}},
                               yields_to={"bt": ["rt"]}, ready=False)
    (bt_slot,), (rt_slot,) = slots["bt"], slots["rt"]
    sched.worker_ready(bt_slot, None, 1, {"device": "cuda"})
    sched.worker_ready(rt_slot, None, 1, {"device": "cpu", "build": "llama.cpp (cpu)"})
    image = admit(sched, "bt", "batch", timeout_ms=0)
    sched.dispatch()
    admit(sched, "rt", "realtime")
    effects = sched.dispatch() + sched.tick(clock.advance(0.1))
    assert not of(effects, Signal) and not sched.domains["bt"].paused
    assert image.state == JobState.RUNNING
    # the same pair, both on the GPU: the image yields at once
    sched2, clock2, slots2 = make({"rt": {"kind": "null", "priority": "realtime"},
                                   "bt": {"kind": "null", "priority": "batch",
                                          "preemptible": True}},
                                  yields_to={"bt": ["rt"]}, ready=False)
    for s in (slots2["bt"][0], slots2["rt"][0]):
        sched2.worker_ready(s, None, 1, {"device": "cuda"})
    admit(sched2, "bt", "batch", timeout_ms=0)
    sched2.dispatch()
    admit(sched2, "rt", "realtime")
    assert [s.op for s in of(sched2.dispatch(), Signal)] == [WorkerMsg.PAUSE]


def test_batch_work_pauses_only_while_a_prompt_is_read_when_only_that_is_hurt():
    """Chats on an LLM domain beside a batch job: reading a prompt beside it takes 3x as
    long (two CPU threads of one core), decoding only 2 % longer. The batch job pauses
    while prompts are read and runs while answers decode."""
    sched, clock, slots = make({"rt": {"kind": "llm", "priority": "realtime",
                                       "model": "builtin:smollm2-135m-instruct"},
                                "bt": {"kind": "null", "priority": "batch",
                                       "preemptible": True}},
                               yields_to={"bt": ["rt"]})
    (rt_slot,) = slots["rt"]
    image = admit(sched, "bt", "batch", timeout_ms=0)
    sched.dispatch()
    running, start = True, clock.t
    seen = {"prefill": [], "decode": [], "idle": []}

    def apply(effects):
        nonlocal running
        for s in of(effects, Signal):
            assert s.job is image
            running = s.op == WorkerMsg.RESUME

    def work(seconds, slower, phase):
        """`seconds` of work alone, `slower` times as long while the batch job runs."""
        left = seconds
        while left > 1e-9:
            step = min(0.001, left * (slower if running else 1.0))
            left -= step / (slower if running else 1.0)
            apply(sched.tick(clock.advance(step)))
            if clock.t - start > 15:
                seen[phase].append(running)

    while clock.t - start < 40:
        chat = admit(sched, "rt", "realtime", timeout_ms=0)
        apply(sched.dispatch())
        work(0.1, 3.0, "prefill")                   # 20 prompt tokens
        sched.pacing.paced(chat, "token", {"prefill": 20})
        apply(sched.dispatch())
        for _ in range(30):
            work(0.02, 1.02, "decode")
            sched.pacing.paced(chat, "token", {})
        apply(sched.job_done(rt_slot, chat.task_id, {}) + sched.dispatch())
        work(0.2, 1.0, "idle")
    view = sched.pacing.view("bt")["rt"]
    assert view["decode"]["state"] == "corun" and view["prefill"]["state"] in ("paused", "probe")
    assert view["prefill"]["slowdown"] > 1.0
    decode_share = sum(seen["decode"]) / len(seen["decode"])
    prefill_share = sum(seen["prefill"]) / len(seen["prefill"])
    assert decode_share > 0.95, decode_share
    assert prefill_share < 0.5, prefill_share
