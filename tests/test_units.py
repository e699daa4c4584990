"""Pure pieces of the daemon that have exact answers: queue bookkeeping, histograms, logs."""
from __future__ import annotations

import io
import logging

from resisod import logsetup
from resisod.domains import BUCKETS, Histogram
from resisod.jobs import DomainQueue, Job


def job(seq: int, priority: str = "normal", ms: float = 10.0) -> Job:
    j = Job(f"nul_{seq}", "null", "null", {}, priority, seq=seq)
    j.estimate_ms = ms
    return j


def walk_ahead(q: DomainQueue, target: Job) -> float:
    total = 0.0
    for j in q:
        if j is target:
            return total
        total += j.estimate_ms
    raise AssertionError("not queued")


def test_queue_positions_and_wait_sums_match_a_walk():
    q = DomainQueue()
    jobs = [job(1, "normal", 10), job(2, "batch", 100), job(3, "realtime", 1),
            job(4, "normal", 20), job(5, "realtime", 2), job(6, "batch", 200)]
    for j in jobs:
        q.push(j)
        for k in jobs[:jobs.index(j) + 1]:
            assert q.position(k) == [x for x in q].index(k)
            assert q.estimate_ahead_ms(k) == walk_ahead(q, k)
    assert [j.seq for j in q] == [3, 5, 1, 4, 2, 6]
    assert q.remove(jobs[0]) and not q.remove(jobs[0])
    assert q.estimate_ahead_ms(jobs[3]) == 3.0  # two realtime jobs ahead, the normal one gone
    assert q.pop() is jobs[2]
    assert q.estimate_ahead_ms(jobs[5]) == walk_ahead(q, jobs[5]) == 2 + 20 + 100
    while q.pop() is not None:
        pass
    assert len(q) == 0 and q.position(jobs[1]) == -1
    late = job(7, "batch", 5)
    q.push(late)
    assert q.estimate_ahead_ms(late) == 0.0  # sums reset with an empty class


def test_histogram_exports_cumulative_buckets():
    h = Histogram()
    for s in (0.001, 0.005, 0.02, 0.02, 3.0, 1000.0):
        h.observe(s)
    out = h.export()
    expect = [sum(1 for s in (0.001, 0.005, 0.02, 0.02, 3.0, 1000.0) if s <= b)
              for b in BUCKETS]
    assert out["cumulative"] == expect
    assert out["count"] == 6 and abs(out["sum"] - 1003.046) < 1e-9


def test_deferred_log_keeps_order_and_formats_at_flush():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogRecordFactory(), logging._srcfile)
    buf = io.StringIO()
    logsetup.configure({"level": "INFO", "file": "", "max_size_mb": 1, "backups": 1,
                        "json": False}, batched=True)
    try:
        for h in logsetup._targets:
            h.setStream(buf)
        log = logging.getLogger("resisod")
        lines = logsetup.JobLines(log)
        state = {"n": 1}
        lines.info("job %s accepted n=%d", "nul_a", state["n"])
        log.warning("between")
        lines.info("job %s completed", "nul_a")
        log.debug("hidden")
        assert buf.getvalue() == ""  # nothing formatted or written before the flush
        logsetup.flush()
        out = buf.getvalue().splitlines()
        assert [line.split(" ", 2)[2] for line in out] == [
            "INFO resisod: job nul_a accepted n=1", "WARNING resisod: between",
            "INFO resisod: job nul_a completed"]
    finally:  # the daemon's logging setup is global: give pytest its own back
        logsetup.configure({"level": "WARNING", "file": "", "max_size_mb": 1, "backups": 1,
                            "json": False})
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.setLogRecordFactory(saved[2])
        logging._srcfile = saved[3]


def test_loop_watch_keeps_the_longest_iteration_and_names_a_stall(caplog):
    from resisod.loop_health import LoopWatch
    now, cpu = [0.0], [0.0]
    w = LoopWatch(clock=lambda: now[0], cpu_clock=lambda: cpu[0])
    w.mark_cpu()
    w.began()
    w.busy(0.0, 0.001, 0.002, 0.004, 0.005)           # 5 ms: a new maximum, no stall
    assert w.report()["max_iteration_ms"] == 5.0 and w.report()["stalls"] == 0
    assert w.notice_s == 0.005
    cpu[0] = 0.01
    w.mark_cpu()                                       # the last tick's iteration ended here
    w.began()
    # a 40 ms generation-2 collection inside the iteration, reported by the collector
    now[0] = 1.05
    w._on_gc("start", {"generation": 2})
    now[0] = 1.09
    w._on_gc("stop", {"generation": 2})
    cpu[0] = 0.07                                      # 60 ms on a CPU since, of 153 ms
    with caplog.at_level(logging.WARNING, logger="resisod"):
        w.busy(1.0, 1.001, 1.002, 1.152, 1.153)       # 153 ms, 150 of them in the tick
    assert w.report() == {"max_iteration_ms": 153.0, "stalls": 1, "max_gc_pause_ms": 40.0,
                          "max_gc_pause_generation": 2} and w.notice_s == 0.1
    assert "took 153 ms (tick 150 ms; gc 40 ms; on cpu at most 60 ms)" in caplog.text
    w.began()                                          # a new iteration starts its own count
    assert w.gc_since == 0.0
    w.busy(2.0, 2.12, 2.12, 2.12, 2.12)               # a shorter stall still counts
    assert w.report()["stalls"] == 2 and w.report()["max_iteration_ms"] == 153.0


def test_worker_vram_sums_what_nvml_reports_for_its_pid():
    from resisod import devices
    gpus = [{"index": 0, "processes": {10: 100.0, 11: 3.0}}, {"index": 1, "processes": {10: 50.5}}]
    assert devices.vram_mb(gpus, 10) == 150.5
    assert devices.vram_mb(gpus, 12) is None and devices.vram_mb([], 10) is None


def test_prompt_cache_stream_choice():
    from types import SimpleNamespace

    from resisod.engines.batch_plan import COPY_MIN_TOKENS, Stream, pick_stream, worth_waiting
    system = list(range(100, 130))             # a shared system prompt, 30 tokens
    a, b, c = Stream(0), Stream(1), Stream(2)
    a.release(system + [1, 2, 3])              # freed first
    b.release(system + [4, 5])
    busy = SimpleNamespace(history=system + [7] * 20 + [9, 9], n_past=50)
    c.take(busy)
    streams = [a, b, c]
    # a free stream sharing the prefix is reused as it is (the oldest freed on a tie)
    assert pick_stream(streams, [a, b], system + [6]) == (a, None, 30)
    assert pick_stream(streams, [a, b], system + [4, 5, 6]) == (b, None, 32)
    # a busy stream holding 8+ more tokens is copied, into the oldest free one
    dst, src, shared = pick_stream(streams, [a, b], system + [7] * 20 + [1])
    assert (dst, src, shared) == (a, c, 50)
    # ... but not for less than COPY_MIN_TOKENS
    short = system + [7] * (COPY_MIN_TOKENS - 1) + [1]
    assert pick_stream(streams, [a, b], short) == (a, None, 30)
    # a busy stream counts only what its KV holds (n_past), not its whole history
    assert c.shared(system + [7] * 20 + [9, 9]) == 50
    # requests sent together: wait for a prefix someone is reading, unless it is short
    reading = SimpleNamespace(history=list(range(500, 700)), n_past=0)
    assert worth_waiting(streams, [reading], list(range(500, 690)) + [1])
    assert not worth_waiting(streams, [reading], list(range(500, 505)) + [1])
    assert not worth_waiting(streams, [], system + [1])


def test_config_toml_shows_every_key_with_its_default():
    """The repository's config.toml is the reference of every setting: each section and
    each default domain lists every key, at its default value."""
    import os
    import tomllib

    from resisod import config
    built = config.build({})
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "config.toml"),
              "rb") as f:
        doc = tomllib.load(f)
    for section in ("daemon", "logging", "resources", "http", "cache", "cluster"):
        want = {k: v for k, v in built[section].items() if k != "gpu_allocation"}
        got = {k: v for k, v in doc[section].items() if k != "gpu_allocation"}
        assert got == want, section
    assert doc["resources"]["gpu_allocation"] == built["resources"]["gpu_allocation"]
    assert set(doc["domains"]) == set(built["domains"])
    for name, d in doc["domains"].items():
        assert d == built["domains"][name], name


def test_status_shows_where_a_worker_really_computes():
    from resiso_cli.columns import runs_on
    assert runs_on({"device": "auto"}) == "auto"            # not ready yet: configured
    assert runs_on({"device": "auto", "runs_on": {"device": "cpu"}}) == "cpu"
    assert runs_on({"runs_on": {"device": "cuda", "gpu_layers": -1}}) == "cuda all layers"
    assert runs_on({"runs_on": {"device": "cuda", "gpu_layers": 12}}) == "cuda 12 layers"
