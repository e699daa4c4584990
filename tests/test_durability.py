"""Durability: the job store across kill -9 and SIGTERM, TTL cleanup, vanished clients,
fuzzed frames, sd_notify. Figures for the closing note are printed (pytest -s shows them)."""
from __future__ import annotations

import collections
import json
import os
import signal
import socket
import sqlite3
import time

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from resiso_cli.client import Rejected
from resisod.protocol import CLIENT_OPS, VERSION

from .conftest import pid_alive, wait_for

DURABLE = """
[daemon]
heartbeat_ms = 200
result_ttl_hours = {ttl}
shutdown_grace_s = 5
[domains.null]
kind = "null"
workers = 2
max_queue = 100
"""


def final_states(c, ids):
    return {t: c.get(t) for t in ids}


def test_kill9_with_queued_and_running_jobs_loses_nothing(make_daemon, tmp_path):
    record = tmp_path / "executions.log"
    d = make_daemon(DURABLE.format(ttl=24))
    with d.client() as c:
        ids = [c.submit("null", {"steps": 10, "delay_ms": 30, "record": str(record)},
                        stream=False).task_id for _ in range(20)]
        wait_for(lambda: sum(c.get(t)["status"] == "completed" for t in ids) >= 2
                 and sum(c.get(t)["status"] == "running" for t in ids) == 2, 30, 0.01,
                 "some done, two running")
        # the workers are frozen first, so a job seen running cannot finish before the kill
        # (the daemon's death still kills them: PR_SET_PDEATHSIG sends SIGKILL)
        worker_pids = {w["pid"] for w in c.status()["domains"]["null"]["workers"]}
        for pid in worker_pids:
            os.kill(pid, signal.SIGSTOP)
        before = final_states(c, ids)
        ran = set(record.read_text().split()) if record.exists() else set()
    # a job whose worker had already finished it may have its result in flight: not counted
    running_at_kill = [t for t, r in before.items() if r["status"] == "running" and t not in ran]
    queued_at_kill = [t for t, r in before.items() if r["status"] == "queued"]
    d.stop(signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(p) for p in worker_pids), 10, what="workers die too")
    d.start()
    with d.client() as c:
        wait_for(lambda: all(c.get(t)["status"] in ("completed", "failed") for t in ids), 60,
                 0.05, "all finished after restart")
        after = final_states(c, ids)
        listed = {j["task_id"] for j in c.jobs(limit=100)}
    runs = collections.Counter(record.read_text().split())
    completed = [t for t, r in after.items() if r["status"] == "completed"]
    interrupted = [t for t, r in after.items()
                   if r["status"] == "failed" and r["error"]["code"] == "interrupted"]
    lost = [t for t in ids if t not in after or t not in listed]
    duplicated = [t for t in completed if runs[t] > 1]
    print(f"\nkill -9 figures: submitted={len(ids)} completed={len(completed)} "
          f"interrupted={len(interrupted)} lost={len(lost)} duplicated={len(duplicated)} "
          f"running_at_kill={len(running_at_kill)} queued_at_kill={len(queued_at_kill)}")
    assert len(completed) + len(interrupted) == 20
    assert lost == [] and duplicated == []
    assert all(runs[t] == 1 for t in completed)
    for t in running_at_kill:  # re-queued once, attempt count kept
        assert after[t]["status"] == "completed" and after[t]["attempts"] == 2
    # queued jobs ran in their original order
    starts = [after[t]["started_at"] for t in queued_at_kill]
    assert starts == sorted(starts)


def test_running_job_interrupted_twice_fails_interrupted(make_daemon):
    d = make_daemon(DURABLE.format(ttl=24))
    with d.client() as c:
        task = c.submit("null", {"steps": 1000, "delay_ms": 10}, stream=False).task_id
        wait_for(lambda: c.get(task)["status"] == "running", what="running")
    d.stop(signal.SIGKILL)
    d.start()
    with d.client() as c:
        wait_for(lambda: c.get(task)["status"] == "running", what="running again")
    d.stop(signal.SIGKILL)
    d.start()
    with d.client() as c:
        rec = c.get(task)
    assert rec["status"] == "failed" and rec["error"]["code"] == "interrupted"


def test_sigterm_finishes_realtime_requeues_batch(make_daemon):
    d = make_daemon("""
[daemon]
heartbeat_ms = 200
shutdown_grace_s = 10
[domains.rt]
kind = "null"
priority = "realtime"
[domains.bt]
kind = "null"
priority = "batch"
""")
    with d.client() as c:
        rt = c.submit("", {"steps": 20, "delay_ms": 50, "text": "finished"}, domain="rt")
        bt_running = c.submit("", {"steps": 1000, "delay_ms": 10}, domain="bt", stream=False)
        bt_queued = c.submit("", {"steps": 2}, domain="bt", stream=False)
        wait_for(lambda: c.get(rt.task_id)["status"] == "running"
                 and c.get(bt_running.task_id)["status"] == "running", what="both running")
        d.proc.send_signal(signal.SIGTERM)
        with pytest.raises(Rejected) as exc:
            wait_for(lambda: c.submit("", {}, domain="rt") and False, 5, 0.05, "rejection")
        assert exc.value.code == "shutting_down"
        final = rt.wait()
    assert final["event"] == "result" and final["result"] == "finished"
    assert d.proc.wait(30) == 0
    d.proc = None
    d.log.close()
    db = sqlite3.connect(os.path.join(d.state_dir, "jobs.db"))
    states = dict(db.execute("SELECT task_id, state FROM jobs"))
    db.close()
    assert states[bt_running.task_id] == "queued" and states[bt_queued.task_id] == "queued"
    d.start()
    with d.client() as c:
        for t in (bt_running.task_id, bt_queued.task_id):
            assert c.watch(t).wait()["status"] == "completed"
        assert c.get(rt.task_id)["status"] == "completed"


def test_result_ttl_removes_rows_and_files(make_daemon):
    d = make_daemon(DURABLE.format(ttl=0.0004))  # 1.44 s
    with d.client() as c:
        final = c.submit("null", {"write_file": True}).wait()
        path = final["result_path"]
        assert os.path.isfile(path)
        wait_for(lambda: not os.path.exists(path), 15, 0.1, "file removed")

        def gone() -> bool:  # the loop forgets the job at its next tick after the sweep
            try:
                c.get(final["task_id"])
            except Rejected as exc:
                assert exc.code == "not_found"
                return True
            return False
        wait_for(gone, 2, 0.02, "job forgotten")


def test_migrations_recorded(null_daemon):
    null_daemon.stop()  # the daemon holds the store exclusively while it runs
    db = sqlite3.connect(os.path.join(null_daemon.state_dir, "jobs.db"))
    rows = list(db.execute("SELECT version, name FROM migrations ORDER BY version"))
    db.close()
    assert rows == [(1, "m001_jobs"), (2, "m002_finish_index")]


def test_vanished_streaming_client_cancels_its_job(null_daemon):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{null_daemon.socket}")
    s.send(msgpack.packb({"v": VERSION, "op": "submit", "rid": 1, "kind": "null",
                          "params": {"steps": 1000, "delay_ms": 10}}))
    accepted = msgpack.unpackb(s.recv(), raw=False)
    task = accepted["task_id"]
    with null_daemon.client() as c:
        wait_for(lambda: c.get(task)["status"] == "running", what="running")
        s.close(0)  # the client vanishes without a word
        t0 = time.monotonic()
        wait_for(lambda: c.get(task)["status"] == "cancelled", 10, 0.05, "cancelled")
        took = time.monotonic() - t0
        # detached jobs are not the client's to lose
        detached = c.submit("null", {"steps": 20, "delay_ms": 20}, stream=False).task_id
        assert c.watch(detached).wait()["status"] == "completed"
    assert took < 6 * 0.2 + 1.0, took


FUZZ_CASES = {"n": 0}


@pytest.fixture(scope="module")
def fuzz_daemon(make_module_daemon):
    return make_module_daemon("""
[daemon]
heartbeat_ms = 200
[domains.null]
kind = "null"
max_queue = 1000
""")


values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() |
    st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4), max_leaves=12)
maps = st.fixed_dictionaries({}, optional={
    "v": st.sampled_from([VERSION, 0, 2, "1"]) | values,
    "op": st.sampled_from(sorted(CLIENT_OPS)) | values,
    "rid": st.integers(0, 10**6) | values,
    "kind": st.sampled_from(["null", "llm", "image"]) | values,
    "domain": st.sampled_from(["null", "nope"]) | values,
    "params": st.fixed_dictionaries({}, optional={
        "steps": st.integers(-5, 3) | values, "delay_ms": st.integers(0, 2) | values,
        "text": values}) | values,
    "task_id": st.text(max_size=30) | values,
    "stream": st.booleans() | values, "priority": st.sampled_from(["batch", "x"]) | values,
    "timeout_ms": st.integers(-1, 5000) | values, "rids": values, "limit": values,
    "data": values, "state": values,
}).map(lambda m: {k: v for k, v in m.items()})
frames = st.one_of(st.binary(max_size=200), maps.map(lambda m: msgpack.packb(m)),
                   st.lists(st.binary(max_size=30), min_size=2, max_size=3))


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(frame=frames)
def test_fuzzed_frames_never_break_the_daemon(fuzz_daemon, frame):
    FUZZ_CASES["n"] += 1
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(f"ipc://{fuzz_daemon.socket}")
    try:
        if isinstance(frame, list):
            s.send_multipart(frame)
        else:
            s.send(frame)
        s.send(msgpack.packb({"v": VERSION, "op": "ping", "rid": "probe"}))
        while True:  # replies to the fuzz frame (if any) come first; then the pong
            reply = msgpack.unpackb(s.recv(), raw=False)
            assert reply.get("event") in ("result", "error", "accepted", "started",
                                          "progress", "queued", "cancelled")
            if reply.get("rid") == "probe":
                break
        assert reply["pong"] is True
    finally:
        s.close(0)


def test_after_fuzzing_a_normal_job_still_runs(fuzz_daemon):
    with fuzz_daemon.client() as c:
        assert c.submit("null", {"text": "still here"}).wait()["result"] == "still here"
    print(f"\nfuzz cases sent: {FUZZ_CASES['n']}")


def test_sd_notify_ready_watchdog_stopping(make_daemon, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    try:
        d = make_daemon(DURABLE.format(ttl=24), env={"NOTIFY_SOCKET": path,
                                                     "WATCHDOG_USEC": "400000"})
        got = []
        while not any("WATCHDOG=1" in g for g in got):
            got.append(sock.recv(4096).decode())
        assert any(g.startswith("READY=1") for g in got)
        d.proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in g for g in got):
            got.append(sock.recv(4096).decode())
        assert d.proc.wait(30) == 0
    finally:
        sock.close()


def test_run_time_estimates_survive_a_restart(make_daemon):
    d = make_daemon(DURABLE.format(ttl=24))
    with d.client() as c:
        c.run("null", {"steps": 10, "delay_ms": 20})
        # a fresh daemon answers with a measured estimate; this one has history
        assert c.submit("null", {"steps": 10, "delay_ms": 20}).accepted[
            "estimated_time_ms"] > 0
    d.stop()
    saved = json.load(open(os.path.join(d.state_dir, "estimates.json")))
    assert saved["null"]["step_ms"] > 10 and saved["null"]["key"] == "null:null:"
    # started again, and asked before any worker is ready: the estimate is not 0
    d.start(wait_ready=False)
    with d.client() as c:
        accepted = c.submit("null", {"steps": 10, "delay_ms": 20}).accepted
        assert accepted["estimated_time_ms"] >= 100, accepted


def test_recovered_jobs_are_validated_again(make_daemon):
    """Queued jobs outlive the code and configuration that accepted them: at start-up their
    params pass the checks again, so a parameter a newer engine expects gets its default, and
    a job over a limit that was lowered fails with a reason instead of reaching the engine."""
    from resisod.store import _pack, _unpack
    d = make_daemon(DURABLE.format(ttl=24).replace("workers = 2", "workers = 1"))
    with d.client() as c:
        c.submit("null", {"steps": 60, "delay_ms": 50}, stream=False)  # holds the worker
        old = c.submit("null", {"steps": 2}, stream=False).task_id
        over = c.submit("null", {"steps": 3}, stream=False).task_id
    assert d.stop() == 0
    db = sqlite3.connect(os.path.join(d.state_dir, "jobs.db"))
    rows = dict(db.execute("SELECT task_id, params FROM jobs WHERE task_id IN (?, ?)",
                           (old, over)).fetchall())
    params = _unpack(rows[old])
    del params["block_ms"]           # what an older version stored, without a newer key
    db.execute("UPDATE jobs SET params = ? WHERE task_id = ?", (_pack(params), old))
    params = _unpack(rows[over])
    params["steps"] = 2_000_000      # over today's limit of 1,000,000
    db.execute("UPDATE jobs SET params = ? WHERE task_id = ?", (_pack(params), over))
    db.commit()
    db.close()
    d.start()
    with d.client() as c:
        wait_for(lambda: c.get(old)["status"] == "completed", 30, what="old job ran")
        rec = c.get(over)
        assert rec["status"] == "failed" and rec["error"]["code"] == "bad_request"
        assert "'steps' must be between 0 and 1000000" in rec["error"]["message"]
