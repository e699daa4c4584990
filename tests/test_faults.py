"""Faults with real processes: engines stuck between checkpoints, silent workers.

The `null` engine's `block_ms` holds its worker in a sleep without a checkpoint, the way an
engine stuck in native code would: the worker's heartbeat thread keeps beating, so only the
cancel grace can free the slot.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from resiso_cli.client import Rejected

from .conftest import wait_for

CONFIG = """
[daemon]
heartbeat_ms = 100
cancel_grace_s = 1.0
[domains.null]
kind = "null"
workers = 1
"""
GRACE = 1.0


def test_a_deadline_on_a_blocked_job_ends_it_within_the_grace(make_daemon):
    d = make_daemon(CONFIG)
    with d.client() as c:
        t = time.monotonic()
        final = c.submit("null", {"block_ms": 60000}, timeout_ms=300).wait()
        took = time.monotonic() - t
        assert final["event"] == "error" and final["code"] == "timeout", final
        assert took < 0.3 + GRACE + 1.0, took
        # the worker was killed and restarted: the next job runs
        assert c.submit("null", {"steps": 2}).wait()["event"] == "result"
        w = c.status()["domains"]["null"]["workers"][0]
    assert w["restarts"] == 1 and "did not stop" in w["last_error"], w
    assert "killing worker null.0" in d.read_log()


def test_a_cancel_of_a_blocked_job_lands_within_the_grace(make_daemon):
    d = make_daemon(CONFIG)
    with d.client() as c:
        stream = c.submit("null", {"block_ms": 60000})
        wait_for(lambda: c.get(stream.task_id)["status"] == "running", what="running")
        t = time.monotonic()
        answer = c.cancel(stream.task_id)
        took = time.monotonic() - t
        assert answer["cancelled"] is True and answer["status"] == "cancelled", answer
        assert GRACE - 0.1 < took < GRACE + 1.0, took
        final = stream.wait()
        assert final["event"] == "cancelled", final
        assert c.submit("null", {}).wait()["event"] == "result"


def test_a_stopped_worker_is_found_silent_and_its_job_retried(make_daemon):
    d = make_daemon(CONFIG)
    with d.client() as c:
        stream = c.submit("null", {"steps": 20, "delay_ms": 50})
        wait_for(lambda: c.get(stream.task_id)["status"] == "running", what="running")
        pid = c.status()["domains"]["null"]["workers"][0]["pid"]
        os.kill(pid, signal.SIGSTOP)  # no heartbeats, no progress: hung
        try:
            final = stream.wait()
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert final["event"] == "result" and final["attempts"] == 2, final
        w = c.status()["domains"]["null"]["workers"][0]
    assert "no heartbeat" in w["last_error"] and w["pid"] != pid, w


def test_a_daemon_stalled_longer_than_the_silence_limits_keeps_its_workers_and_clients(
        make_daemon):
    """Silence is judged over time the daemon could listen. A daemon held off the CPU (here
    stopped outright) for fifteen heartbeats, longer than a client's silence limit too, finds
    the workers' beats and the client's alive messages waiting in its sockets: nobody is taken
    for hung or gone, and the listened job runs on."""
    d = make_daemon(CONFIG.replace("workers = 1", "workers = 3"))
    wait_for(lambda: [w["state"] for w in d.status()["domains"]["null"]["workers"]]
             == ["ready"] * 3, 60, 0.1, "three workers ready")
    pids = [w["pid"] for w in d.status()["domains"]["null"]["workers"]]
    with d.client() as c:
        stream = c.submit("null", {"steps": 100, "delay_ms": 50})
        wait_for(lambda: c.get(stream.task_id)["status"] == "running", what="running")
        final: dict = {}
        waiter = threading.Thread(target=lambda: final.update(stream.wait()))
        waiter.start()  # waiting, the client says it is alive every heartbeat
        for _ in range(3):
            os.kill(d.proc.pid, signal.SIGSTOP)
            time.sleep(1.5)
            os.kill(d.proc.pid, signal.SIGCONT)
            time.sleep(0.5)
        waiter.join(60)
        assert final.get("event") == "result" and final["attempts"] == 1, final
        workers = c.status()["domains"]["null"]["workers"]
    assert [w["pid"] for w in workers] == pids, workers
    assert all(w["restarts"] == 0 for w in workers), workers
    log = d.read_log()
    assert "hung" not in log and "client is gone" not in log
    assert "the loop was held up for 1." in log


def test_a_run_refused_by_a_vanished_worker_counts_as_a_lost_worker(tmp_path):
    """The worker ROUTER is ROUTER_MANDATORY: a message to a peer that is not connected
    fails at once, and the link hands the slot to the reaper instead of losing the job."""
    import zmq

    from resisod import config
    from resisod.outbox import Outbox
    from resisod.protocol import unpack
    from resisod.scheduler import Requeued, Scheduler, Start
    from resisod.subscriptions import Subscriptions
    from resisod.supervisor import Supervisor
    from resisod.worker_link import WorkerLink

    class Proc:
        pid, returncode = os.getpid(), None

        def poll(self):
            return self.returncode

        def kill(self):
            self.returncode = -9

    cfg = config.build({"domains": {"n": {"kind": "null"}}})
    endpoint = f"ipc://{tmp_path}/w"
    sup = Supervisor(cfg, str(tmp_path), endpoint, spawn=lambda *a, **k: Proc())
    sup.start_all()
    (slot,) = sup.slots
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind(endpoint)
    worker = ctx.socket(zmq.DEALER)
    worker.setsockopt(zmq.IDENTITY, slot.identity)
    worker.connect(endpoint)
    try:
        sched = Scheduler(cfg, sup.slots)
        link = WorkerLink(router, sup, sched, Subscriptions(Outbox(), sched, silence_s=1.0))
        worker.send(b"\x80")  # any frame: the ROUTER learns the peer's identity
        assert router.poll(5000)
        router.recv_multipart()
        sched.worker_ready(slot)
        first = sched.admit(sched.domains["n"], {}, "normal")
        (start,) = [e for e in sched.dispatch() if type(e) is Start]
        link.run(start.slot, start.job)
        assert worker.poll(5000) and unpack(worker.recv())["task_id"] == first.task_id
        sched.job_done(slot, first.task_id, {})
        worker.close(0)  # the worker's connection goes away, its process lingers
        time.sleep(0.3)
        second = sched.admit(sched.domains["n"], {}, "normal")
        (start,) = [e for e in sched.dispatch() if type(e) is Start]
        link.run(start.slot, start.job)
        assert slot.kill_reason.startswith("unreachable"), slot.kill_reason
        (dead,) = sup.reap()
        sup.schedule_restart(slot, dead[1])
        effects = sched.worker_lost(slot, dead[1])
        assert [type(e) for e in effects] == [Requeued] and second.state == "queued"
    finally:
        router.close(0)
        worker.close(0)
        ctx.term()


def test_a_ttl_sweep_of_300k_jobs_never_stalls_the_loop(make_daemon, tmp_path):
    """A busy day expiring at once: the sweep runs in chunks on the store's writer thread,
    jobs keep running meanwhile, no loop iteration reaches 100 ms, no worker is lost."""
    import sqlite3

    from resisod.protocol import pack
    from resisod.store import JobStore

    state = str(tmp_path / "state")
    JobStore(os.path.join(state, "jobs.db")).close()  # the schema, by the store's migrations
    old = time.time() - 3 * 86400
    n = 300_000
    result = pack({"steps": 0, "generation_time_ms": 1.0})
    db = sqlite3.connect(os.path.join(state, "jobs.db"))
    db.executemany("INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", (
        (f"nul_{i:016x}", i, "null", "null", "normal", "completed", pack({}), old + i * 1e-4,
         old + i * 1e-4, old + i * 1e-4, None, 1, 0, 0, result, None) for i in range(1, n + 1)))
    db.commit()
    db.close()
    config = CONFIG.replace("cancel_grace_s = 1.0", "cancel_grace_s = 1.0\nresult_ttl_hours = 24")
    d = make_daemon(config, state_dir=state)
    ran = 0
    with d.client() as c:
        deadline = time.monotonic() + 120
        while "removed" not in d.read_log():
            assert time.monotonic() < deadline, "the sweep did not finish"
            assert c.run("null", {})["event"] == "result"
            ran += 1
        st = c.status()
    assert ran > 10
    assert st["loop"]["max_iteration_ms"] < 100, st["loop"]
    assert st["domains"]["null"]["workers"][0]["restarts"] == 0
    assert f"removed {n} expired jobs" in d.read_log()
    d.stop()
    db = sqlite3.connect(os.path.join(state, "jobs.db"))
    left = db.execute("SELECT COUNT(*) FROM jobs WHERE finished_at < ?", (old + 86400,))
    assert left.fetchone()[0] == 0
    db.close()


def test_transient_load_failures_are_retried_and_queued_jobs_wait(make_daemon):
    d = make_daemon("""
[daemon]
heartbeat_ms = 100
load_attempts = 3
restart_backoff_max_s = 0.2
[domains.null]
kind = "null"
fail_loads = 2
""", start=False).start(wait_ready=False)
    with d.client() as c:
        final = c.submit("null", {"text": "waited"}).wait()  # accepted while loads fail
        assert final["event"] == "result" and final["result"] == "waited", final
        w = c.status()["domains"]["null"]["workers"][0]
    assert w["state"] == "ready" and w["restarts"] == 2, w


def test_a_domain_failing_every_load_holds_its_queue_then_fails_it(make_daemon):
    d = make_daemon("""
[daemon]
heartbeat_ms = 100
load_attempts = 2
failed_domain_hold_s = 1.0
restart_backoff_max_s = 0.2
[domains.null]
kind = "null"
load_ms = 300
fail_loads = 1000
""", start=False).start(wait_ready=False)
    with d.client() as c:
        stream = c.submit("null", {})          # accepted while the first load runs
        t = time.monotonic()
        final = stream.wait()
        assert final["event"] == "error" and final["code"] == "engine_unavailable", final
        assert "fails on purpose" in final["message"]
        assert time.monotonic() - t > 1.0      # held for failed_domain_hold_s first
        st = c.status()["domains"]["null"]
        assert st["state"] == "failed" and "fails on purpose" in st["reason"], st
        try:
            c.submit("null", {})
            raise AssertionError("a failed domain accepted a job")
        except Rejected as exc:
            assert exc.code == "engine_unavailable"


def test_a_client_that_never_reads_is_dropped_before_the_daemon_grows(make_daemon):
    """30,000 requests from a client that reads nothing: once its queue of answers is full
    the daemon drops it, cancels its streaming job and keeps serving everyone else."""
    import zmq

    from resisod.protocol import pack, request

    from resisod.isolation import rss_mb

    d = make_daemon(CONFIG)
    with d.client() as c:
        c.run("null", {})
    before = rss_mb(d.proc.pid)
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.RCVHWM, 10)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{d.socket}")
    try:
        s.send(pack(request("submit", "job", kind="null",
                            params={"steps": 1000, "delay_ms": 10})))
        for i in range(30000):
            s.send(pack(request("ping", i)))
        wait_for(lambda: "stopped reading" in d.read_log(), 60, 0.1, "the client dropped")
        grown = rss_mb(d.proc.pid) - before
        assert grown < 50, f"daemon RSS grew {grown:.1f} MB"
        with d.client() as c:
            assert c.ping()["pong"] is True
            job = wait_for(lambda: next((j for j in c.jobs(limit=5)
                                         if j["status"] == "cancelled"), None), 10, 0.1,
                           "its streaming job cancelled")
            assert job["domain"] == "null" and job["finished_at"] is not None
    finally:
        s.close(0)


def test_a_torn_or_corrupt_journal_tail_is_recovered_up_to_the_last_whole_record(
        make_daemon, tmp_path):
    """Three journal records written, then the daemon died mid-write: the third is cut
    short (or garbled). The next start replays the whole records and runs their jobs."""
    import shutil

    from resisod import config, params as job_params
    from resisod.jobs import Job
    from resisod.store import FRAME, JobStore

    domain = config.build({"domains": {"null": {"kind": "null"}}})["domains"]["null"]
    params = job_params.validate("null", {}, domain)  # as the daemon stores them

    for damage in ("truncate", "garble"):
        src = tmp_path / damage / "src"
        store = JobStore(str(src / "jobs.db"))
        ids = []
        for i in range(3):
            job = Job(f"nul_{damage}{i:04d}", "null", "null", params, "normal", seq=i + 1)
            store.insert(job, None)
            store.commit()  # one journal record per job
            ids.append(job.task_id)
        journal = open(store.journal_path, "rb").read()
        # a fresh state dir: an empty database and the journal as the crash left it
        state = tmp_path / damage / "state"
        JobStore(str(state / "jobs.db")).close()
        pos = 0
        for _ in range(2):
            (n,) = FRAME.unpack_from(journal, pos)
            pos += FRAME.size + n
        first_two = pos
        tail = journal[first_two:]
        tail = tail[:len(tail) // 2] if damage == "truncate" else \
            tail[:FRAME.size] + b"\xc1" * (len(tail) - FRAME.size)
        with open(state / "jobs.db.journal", "wb") as f:
            f.write(journal[:first_two] + tail)
        shutil.rmtree(src, ignore_errors=True)
        d = make_daemon(CONFIG, state_dir=str(state))
        with d.client() as c:
            for task_id in ids[:2]:
                got = wait_for(lambda: (lambda j: j if j["status"] == "completed" else None)(
                    c.get(task_id)), 10, 0.05, f"{task_id} run after replay")
                assert got["attempts"] == 1
            try:
                c.get(ids[2])
                raise AssertionError("a torn record came back")
            except Rejected as exc:
                assert exc.code == "not_found"
        d.stop()


def test_a_worker_killed_by_a_signal_mid_job_is_retried_once_then_reported(make_daemon):
    d = make_daemon(CONFIG)
    with d.client() as c:
        # step 2's progress leaves on the worker's I/O thread: the 100 ms before the crash at
        # step 3 give it time to, on a loaded machine too
        stream = c.submit("null", {"steps": 5, "delay_ms": 100, "crash_at_step": 3,
                                   "crash_signal": 11})
        events = list(stream)
        final = stream.final
        assert final["event"] == "error" and final["code"] == "worker_crashed", final
        assert "signal 11" in final["message"]
        steps = [e["step"] for e in events if e["event"] == "progress"]
        assert steps == [1, 2, 1, 2], steps          # two attempts, each cut at step 3
        assert [e["event"] for e in events].count("started") == 2
        assert c.submit("null", {"steps": 2}).wait()["event"] == "result"


def test_a_full_results_disk_fails_the_job_storage_full_and_nothing_else(make_daemon,
                                                                          tmp_path):
    """A 256 KB tmpfs as the results dir: a real full disk; where mounting is not permitted,
    the null engine's write fails with ENOSPC instead. The job fails with a code that says
    what to do; the worker, the daemon and the store carry on."""
    import subprocess

    state = tmp_path / "state"
    results = state / "results"
    results.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                              str(results)], capture_output=True).returncode == 0
    try:
        d = make_daemon(CONFIG, state_dir=str(state))
        with d.client() as c:
            final = c.submit("null", {"write_mb": 1, "disk_full": not mounted}).wait()
            assert final["event"] == "error" and final["code"] == "storage_full", final
            assert str(results) in final["message"]
            assert c.get(final["task_id"])["error"]["code"] == "storage_full"
            assert os.listdir(results) == []          # no half-written file left
            small = c.submit("null", {"write_file": True}).wait()
            assert small["event"] == "result" and small["size_bytes"] < 1024
            w = c.status()["domains"]["null"]["workers"][0]
            assert w["restarts"] == 0                 # the worker lives on
        d.stop()
    finally:
        subprocess.run(["umount", "-l", str(results)], capture_output=True)


def test_a_large_result_comes_back_in_bounded_chunks(make_daemon):
    d = make_daemon(CONFIG)
    with d.client() as c:
        final = c.submit("null", {"write_mb": 10}).wait()
        path, size = final["result_path"], final["size_bytes"]
        assert size > 10 << 20
        first = c.call("get", task_id=final["task_id"], data=True)
        assert len(first["data"]) == 4 << 20 and first["data_size"] == size
        assert first["data_offset"] == 0
        tail = c.call("get", task_id=final["task_id"], data=True, offset=size - 5)
        assert len(tail["data"]) == 5 and tail["data_offset"] == size - 5
        rec = c.get(final["task_id"], data=True)       # the client joins the chunks
        with open(path, "rb") as f:
            assert rec["data"] == f.read()
        try:
            c.call("get", task_id=final["task_id"], data=True, offset=-1)
            raise AssertionError("a negative offset was accepted")
        except Rejected as exc:
            assert exc.code == "bad_request"


def test_a_full_state_disk_refuses_new_jobs_and_loses_none_it_accepted(make_daemon, tmp_path):
    """The job store's own disk fills up (a 2 MB tmpfs as the state dir, filled by another
    file): the daemon keeps serving, refuses new jobs with storage_full, runs what it had, and
    takes new jobs again once there is space, with everything it accepted in the store."""
    import subprocess

    state = tmp_path / "state"
    state.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(state)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        d = make_daemon(CONFIG, state_dir=str(state))
        with d.client() as c:
            before = c.submit("null", {"steps": 30, "delay_ms": 20}, stream=False).task_id
            filler = state / "filler"
            with open(filler, "wb", buffering=0) as f:  # take every page left
                for chunk in (65536, 4096):
                    try:
                        while True:
                            f.write(b"\0" * chunk)
                    except OSError:
                        pass
            # jobs still fit in the journal's last page for a while; the first one that does
            # not is taken in memory (its journal write fails after it was accepted), and
            # the ones after it are refused
            codes = []
            for _ in range(200):
                try:
                    codes.append(c.submit("null", {"steps": 1, "text": "x" * 200},
                                          stream=False).task_id)
                except Rejected as exc:
                    codes.append(exc.code)
                    if codes.count("storage_full") == 3:
                        break
            assert codes[-3:] == ["storage_full"] * 3, codes
            assert c.ping()  # still serving
            wait_for(lambda: c.get(before)["status"] == "completed", 30, what="job ran on")
            filler.unlink()
            wait_for(lambda: _accepts(c), 10, 0.2, "new jobs accepted again")
            accepted = [x for x in codes if x != "storage_full"]
        assert d.stop() == 0
        d.start()
        with d.client() as c:  # what it accepted while full reached the store after all
            for task_id in [before, *accepted]:
                assert c.get(task_id)["status"] == "completed", task_id
        d.stop()
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True)


def _accepts(c) -> bool:
    try:
        return c.submit("null", {"steps": 1}).wait()["event"] == "result"
    except Rejected:
        return False


def test_a_worker_failing_job_after_job_rests_then_takes_one_trial(make_daemon):
    d = make_daemon(CONFIG.replace("[daemon]", "[daemon]\nbreaker_failures = 2\n"
                                   "breaker_cooldown_s = 1.5"))
    with d.client() as c:
        for _ in range(2):
            assert c.submit("null", {"fail": "engine_error"}).wait()["code"] == "engine_error"
        w = c.status()["domains"]["null"]["workers"][0]
        assert w["breaker"]["state"] == "open" and w["breaker"]["opened"] == 1
        t0 = time.monotonic()
        final = c.submit("null", {"steps": 1}).wait()  # waits out the cooldown, then runs
        waited = time.monotonic() - t0
        assert final["event"] == "result" and 1.0 < waited < 5.0, waited
        assert c.status()["domains"]["null"]["workers"][0]["breaker"]["state"] == "closed"


def test_a_gpu_out_of_memory_fails_the_job_and_the_worker_serves_on(make_daemon):
    """torch's own OutOfMemoryError raised inside a job (the null engine's `oom_mb`, as a
    GPU engine raises it): `gpu_oom` with what was asked for, the same worker runs the
    next job."""
    # importing torch mid-job holds the GIL longer than 3 beats of 100 ms
    d = make_daemon(CONFIG.replace("heartbeat_ms = 100", "heartbeat_ms = 1000"))
    with d.client() as c:
        pid = c.status()["domains"]["null"]["workers"][0]["pid"]
        final = c.submit("null", {"oom_mb": 20480}).wait()
        assert final["event"] == "error" and final["code"] == "gpu_oom", final
        assert "Tried to allocate 20480 MiB" in final["message"]
        assert "VRAM budget" in final["message"] and "gpu_allocation" in final["message"]
        assert c.submit("null", {"steps": 2}).wait()["event"] == "result"
        w = c.status()["domains"]["null"]["workers"][0]
        assert w["pid"] == pid and w["restarts"] == 0
