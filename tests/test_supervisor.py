"""The supervisor's decisions with an injected clock and process starter: liveness, restart
backoff, the memory watchdog. The processes are stand-ins for what `subprocess.Popen` returns;
the daemon-level tests run the real ones."""
from __future__ import annotations

import json
import os
from typing import Any

import pytest

from resisod import config
from resisod.slots import SlotState
from resisod.supervisor import Supervisor


class Clock:
    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


class Proc:
    """What the supervisor needs of a started process: pid, poll, kill."""

    def __init__(self, env: dict[str, str]):
        self.pid = os.getpid()           # a live pid, so RSS sampling reads a real process
        self.env = env
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.returncode = -9


def make(domains: dict[str, Any], **daemon: Any) -> tuple[Supervisor, Clock, list[Proc]]:
    cfg = config.build({"domains": domains, "daemon": {"heartbeat_ms": 100, **daemon}})
    started: list[Proc] = []

    def spawn(argv: list[str], *, env: dict[str, str], **_: Any) -> Proc:
        assert argv[1:] == ["-m", "resisod.worker"]
        started.append(Proc(env))
        return started[-1]

    clock = Clock()
    sup = Supervisor(cfg, "/tmp/state", "ipc:///tmp/w.sock", clock=clock, spawn=spawn)
    return sup, clock, started


def test_start_gives_each_slot_its_identity_spec_and_environment():
    sup, _, started = make({"n": {"kind": "null", "workers": 2, "threads": 3}})
    sup.start_all()
    assert [s.state for s in sup.slots] == [SlotState.STARTING] * 2
    assert [s.identity for s in sup.slots] == [b"n.0#1", b"n.1#1"]
    assert set(sup.by_identity) == {b"n.0#1", b"n.0#1/hb", b"n.1#1", b"n.1#1/hb"}
    spec = json.loads(started[0].env["RESISO_WORKER_SPEC"])
    assert spec["identity"] == "n.0#1" and spec["threads"] == 3 and spec["domain_name"] == "n"
    assert started[0].env["OMP_NUM_THREADS"] == "3"


def test_a_silent_worker_is_killed_after_three_heartbeats():
    sup, clock, _ = make({"n": {"kind": "null"}})
    sup.start_all()
    (slot,) = sup.slots
    # while it starts and loads (importing model libraries can hold the interpreter a
    # while), its silence is judged against LOAD_SILENCE_S
    for state in (SlotState.STARTING, SlotState.LOADING):
        slot.state = state
        clock.t += 5.0
        assert sup.reap() == []
        slot.last_seen = clock.t
    slot.state = SlotState.READY
    clock.t += 0.29
    assert sup.reap() == []
    clock.t += 0.02
    (dead,) = sup.reap()
    assert dead[0] is slot and "no heartbeat for 0.3s (hung)" in dead[1]


def test_restart_backoff_doubles_is_capped_and_resets_after_a_stable_run():
    sup, clock, started = make({"n": {"kind": "null"}}, restart_backoff_max_s=1.0)
    sup.start_all()
    (slot,) = sup.slots
    delays = []
    for _ in range(6):
        slot.proc.kill()
        (dead,) = sup.reap()
        delays.append(sup.schedule_restart(slot, dead[1]))
        assert slot.state == SlotState.BACKOFF and slot.proc is None
        assert slot.identity not in sup.by_identity
        clock.t += delays[-1] - 0.001
        sup.restart_due()
        assert slot.proc is None                  # not before its time
        clock.t += 0.002
        sup.restart_due()
        assert slot.state == SlotState.STARTING and slot.proc is started[-1]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert slot.generation == 7 and slot.identity == b"n.0#7" and slot.crashes == 6
    slot.ready_since = clock.t                    # then it ran fine for over a minute
    clock.t += 61
    slot.proc.kill()
    sup.reap()
    assert sup.schedule_restart(slot, "exited with signal 9") == 0.1 and slot.crashes == 1
    assert slot.last_pid == os.getpid()


def test_a_load_failure_waits_in_failed_and_is_retried():
    sup, clock, _ = make({"n": {"kind": "null"}})
    sup.start_all()
    (slot,) = sup.slots
    slot.state = SlotState.FAILED                 # the worker said load_failed, then exited
    clock.t += 10                                 # a failed slot is not "silent"
    slot.proc.returncode = 3
    (dead,) = sup.reap()
    assert dead[1] == "exited with status 3"
    sup.schedule_restart(slot, "no such model", load_failed=True)
    assert slot.state == SlotState.FAILED and slot.last_error == "no such model"
    clock.t += 0.1
    sup.restart_due()
    assert slot.state == SlotState.STARTING


def test_the_memory_watchdog_kills_a_worker_over_its_budget():
    sup, _, _ = make({"big": {"kind": "null", "max_memory_mb": 1},
                      "free": {"kind": "null"}})
    sup.start_all()
    big, free = sup.slots
    assert sup.check_memory() == [big]            # this test process holds more than 1 MB
    assert big.kill_reason == "memory_limit" and big.proc.poll() == -9
    assert big.rss_mb > 1 and free.proc.poll() is None
    assert sup.memory_budget(big) == 1 and sup.memory_budget(free) == 0


def test_gpu_workers_get_their_budget_from_the_vram_plan():
    """A 24 GB card seen by an injected probe: LLM 70 % / image 30 % of what the contexts and
    margin leave, split over the image domain's two workers; the speech domain on the CPU
    takes nothing."""
    cfg = config.build({"domains": {
        "llm": {"kind": "llm", "model": "builtin:smollm2-135m-instruct", "device": "cuda:0"},
        "image": {"kind": "image", "device": "cuda:0", "workers": 2},
        "tts": {"kind": "tts", "device": "cpu"}}})
    started: list[Proc] = []

    def spawn(argv: list[str], *, env: dict[str, str], **_: Any) -> Proc:
        started.append(Proc(env))
        return started[-1]

    gpus = [{"index": 0, "name": "card", "total_mb": 24576.0, "used_mb": 0.0,
             "processes": {}}]
    sup = Supervisor(cfg, "/tmp/state", "ipc:///tmp/w.sock", spawn=spawn, gpus=gpus)
    sup.start_all()
    specs = {json.loads(p.env["RESISO_WORKER_SPEC"])["identity"]:
             json.loads(p.env["RESISO_WORKER_SPEC"]) for p in started}
    llm, img0, img1, tts = (specs[k] for k in ("llm.0#1", "image.0#1", "image.1#1", "tts.0#1"))
    usable = 24576 - 3 * 700 - 0.05 * 24576           # three GPU processes, 5 % margin
    assert llm["gpu_budget_mb"] == pytest.approx(0.7 * usable, abs=2)
    assert img0["gpu_budget_mb"] == img1["gpu_budget_mb"] == pytest.approx(0.15 * usable, abs=2)
    assert img0["gpu_share"] == pytest.approx(img0["gpu_budget_mb"] / 24576)
    assert tts["gpu_budget_mb"] is None
    total = sum(s["gpu_budget_mb"] for s in (llm, img0, img1)) + 3 * 700 + 0.05 * 24576
    assert total <= 24576
    # the same in status
    assert [s.vram_budget_mb for s in sup.slots if s.domain == "image"] == \
        [img0["gpu_budget_mb"]] * 2


def test_an_impossible_vram_plan_stops_the_start_with_its_numbers():
    cfg = config.build({"domains": {
        "image": {"kind": "image", "device": "cuda:0", "workers": 4}}})
    gpus = [{"index": 0, "total_mb": 4096.0, "used_mb": 0.0, "processes": {}}]
    with pytest.raises(ValueError, match=r"4096"):
        Supervisor(cfg, "/tmp/state", "ipc:///tmp/w.sock", spawn=lambda *a, **k: None,
                   gpus=gpus)


def test_the_vram_watchdog_restarts_a_worker_past_its_gpu_budget():
    """NVML's per-process figure (an injected probe) against the plan's budget plus the
    CUDA context; RSS is host memory only and is judged apart."""
    cfg = config.build({"domains": {
        "image": {"kind": "image", "device": "cuda:0"},
        "big": {"kind": "image", "model": "builtin:tiny-sd", "device": "cuda:0",
                "max_vram_mb": 50000,
                "gpu_percentage": 10}},
        "resources": {"gpu_allocation": {"llm": 70, "image": 20}}})
    started: list[Proc] = []
    pids = iter(range(40000, 40100))

    def spawn(argv: list[str], *, env: dict[str, str], **_: Any) -> Proc:
        started.append(Proc(env))
        started[-1].pid = next(pids)
        return started[-1]

    used: dict[int, float] = {}
    card = {"index": 0, "total_mb": 24576.0, "used_mb": 0.0, "processes": used}
    clock = Clock()
    sup = Supervisor(cfg, "/tmp/state", "ipc:///tmp/w.sock", clock=clock, spawn=spawn,
                     gpus=[card], probe=lambda: [card])
    sup.start_all()
    image, big = sup.slots
    limit = sup.vram_budget(image)
    assert limit == image.vram_budget_mb + 700 and sup.vram_budget(big) == 50000
    used[image.proc.pid] = limit - 1
    used[big.proc.pid] = 40000                    # over its plan, under its max_vram_mb
    assert sup.check_memory() == []
    used[image.proc.pid] = limit + 1
    assert sup.check_memory() == []               # sampled every 2 s, not every beat
    clock.t += 2.0
    assert sup.check_memory() == [image] and image.kill_reason == "vram_limit"
