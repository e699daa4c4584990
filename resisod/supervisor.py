"""Child processes: start, watch and restart every domain's workers and the HTTP gateway.

Liveness is deadlines and counters checked from the broker's tick, not threads: a slot is
dead when its process exited, when it has been silent for `SILENT_BEATS` heartbeat intervals,
or when its RSS passed the domain's memory budget.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import devices, isolation, vram_plan
from .gpu_compute import GpuCompute
from .protocol import HEARTBEAT_SUFFIX
from .slots import Slot, SlotState

log = logging.getLogger("resisod.supervisor")

SILENT_BEATS = 3           # heartbeat intervals of silence after which a worker is hung
BACKOFF_BASE_S = 0.1       # first restart delay; doubles per consecutive crash
STABLE_AFTER_S = 60.0      # ready this long before dying: not a crash loop, backoff resets
VRAM_EVERY_S = 2.0         # NVML's process list costs milliseconds: sampled this often
LOAD_SILENCE_S = 10.0      # silence a starting/loading worker is allowed (see reap)
LOADING_STATES = (SlotState.STARTING, SlotState.LOADING)
GATEWAY_MIN_UP_S = 1.0     # a gateway that dies sooner is not restarted in a tight loop
GATEWAY_CONFIG_EXIT = 2    # the gateway's exit status for a configuration it refuses


@dataclass
class Supervisor:
    cfg: dict[str, Any]
    state_dir: str
    endpoint: str
    clock: Callable[[], float] = time.monotonic
    spawn: Callable[..., subprocess.Popen] = subprocess.Popen
    slots: list[Slot] = field(default_factory=list)
    by_identity: dict[bytes, Slot] = field(default_factory=dict)
    layout: dict[str, list[int]] = field(default_factory=dict)
    gpus: list[dict[str, Any]] = field(default_factory=list)   # devices.probe(), at start
    probe: Callable[[], list[dict[str, Any]]] = devices.probe  # NVML, for the VRAM watchdog
    # MPS or time-slicing for GPU workers, set by the daemon before the first start; stopped
    # (its control daemon told to quit) after the workers at shutdown
    compute: GpuCompute | None = None
    next_vram: float = 0.0

    def __post_init__(self) -> None:
        # raises vram_plan.PlanError (a ValueError): a plan that cannot hold stops the start
        self.vram = vram_plan.plan_for(self.cfg, devices.visible_gpus(self.gpus))
        for line in vram_plan.describe(self.vram):
            log.info("VRAM plan: %s", line)
        isolate = self.cfg["resources"]["isolation"]
        self.layout = layout = isolation.auto_layout(self.cfg["domains"],
                                                     isolation.available_cpus(), isolate)
        cpu_threads = self.cfg["resources"]["cpu_threads"]
        for name, d in self.cfg["domains"].items():
            for i in range(d["workers"]):
                cpus = isolation.worker_cpus(self.cfg["domains"], layout, name, i)
                budget = self.vram.budget(name, i)
                self.slots.append(Slot(domain=name, index=i, cpus=cpus,
                                       threads=isolation.thread_count(d, cpus, cpu_threads),
                                       sched=isolation.scheduling_class(d, isolate),
                                       vram_budget_mb=budget.budget_mb if budget else None))

    @property
    def heartbeat(self) -> float:
        return self.cfg["daemon"]["heartbeat_ms"] / 1000.0

    def start_all(self) -> None:
        for slot in self.slots:
            self.start(slot)

    def start(self, slot: Slot) -> None:
        d = self.cfg["domains"][slot.domain]
        slot.generation += 1
        slot.identity = f"{slot.name}#{slot.generation}".encode()
        spec = {
            "identity": slot.identity.decode(), "endpoint": self.endpoint,
            "domain_name": slot.domain, "domain": d, "state_dir": self.state_dir,
            "heartbeat_ms": self.cfg["daemon"]["heartbeat_ms"], "cpus": slot.cpus,
            "sched": slot.sched, "threads": slot.threads,
            "gpu_share": self.gpu_share(slot),
            "gpu_budget_mb": slot.vram_budget_mb,
            "cache": self.cfg["cache"],
        }
        env = dict(os.environ)
        env.update(isolation.worker_env(d, slot.threads))
        if self.compute is not None:
            env.update(self.compute.plan.worker_env(slot.domain))
            slot.compute = self.compute.plan
        env["RESISO_WORKER_SPEC"] = json.dumps(spec)
        slot.proc = self.spawn([sys.executable, "-m", "resisod.worker"], env=env,
                               stdin=subprocess.DEVNULL, start_new_session=False)
        slot.state = SlotState.STARTING
        slot.started_at = slot.last_seen = self.clock()
        slot.ready_since = None
        slot.kill_reason = ""
        slot.rss_mb = None
        # kept in place, not rebuilt: remote workers' slots (cluster.py) are in it too
        self.by_identity[slot.identity] = self.by_identity[slot.identity + HEARTBEAT_SUFFIX] = slot
        mps = slot.compute.percentage(slot.domain) if slot.compute is not None else None
        log.info("worker %s started pid=%d cpus=%s threads=%d sched=%s%s", slot.name,
                 slot.proc.pid, slot.cpus or "all", slot.threads, slot.sched,
                 f" mps={mps}%" if mps is not None else "")

    def gpu_share(self, slot: Slot) -> float:
        """The allocator cap of a torch worker: its planned budget over the card; without
        a plan (no GPU seen at start) the domain's allocation, as a worker on a GPU the
        daemon could not probe still needs some cap."""
        budget = self.vram.budget(slot.domain, slot.index)
        if budget is not None:
            return budget.fraction
        return devices.memory_share(self.cfg, self.cfg["domains"][slot.domain])

    def kill(self, slot: Slot, reason: str) -> None:
        if slot.remote is not None:
            # no process here: the cluster drops the slot at its next reap (and tells the
            # worker to stop, if it still listens)
            slot.kill_reason = slot.kill_reason or reason
            return
        if slot.proc and slot.proc.poll() is None:
            slot.kill_reason = slot.kill_reason or reason
            slot.proc.kill()

    def reap(self) -> list[tuple[Slot, str]]:
        """Find dead workers; return (slot, reason) for each that died since the last call."""
        dead = []
        now = self.clock()
        hb = self.heartbeat
        for slot in self.slots:
            if slot.proc is None:
                continue
            # a starting or loading worker imports model libraries and initialises a device,
            # which can hold the interpreter for a second (torch + CUDA: 340 ms measured):
            # its silence is judged against a limit of its own, not the steady beat
            limit = SILENT_BEATS * hb if slot.state not in LOADING_STATES else \
                max(LOAD_SILENCE_S, SILENT_BEATS * hb)
            if slot.state != SlotState.FAILED and now - slot.last_seen > limit:
                self.kill(slot, f"no heartbeat for {now - slot.last_seen:.1f}s (hung)")
            code = slot.proc.poll()
            if code is None:
                continue
            reason = slot.kill_reason or (f"exited with signal {-code}" if code < 0
                                          else f"exited with status {code}")
            dead.append((slot, reason))
        return dead

    def schedule_restart(self, slot: Slot, reason: str, *, load_failed: bool = False) -> float:
        """Exponential backoff, capped; returns the delay chosen. The slot's job is the
        scheduler's to settle (`Scheduler.worker_lost`)."""
        if slot.ready_since is not None and self.clock() - slot.ready_since > STABLE_AFTER_S:
            slot.crashes = 0  # it ran fine for a while: this is not a crash loop
        slot.crashes += 1
        cap = self.cfg["daemon"]["restart_backoff_max_s"]
        delay = min(cap, BACKOFF_BASE_S * (2 ** (slot.crashes - 1)))
        slot.restart_at = self.clock() + delay
        slot.last_error = reason
        slot.state = SlotState.FAILED if load_failed else SlotState.BACKOFF
        if slot.proc is not None:
            slot.last_pid = slot.proc.pid
            slot.proc = None
        self.by_identity.pop(slot.identity, None)
        self.by_identity.pop(slot.identity + HEARTBEAT_SUFFIX, None)
        return delay

    def restart_due(self) -> None:
        now = self.clock()
        for slot in self.slots:
            if slot.state in (SlotState.BACKOFF, SlotState.FAILED) and now >= slot.restart_at \
                    and slot.proc is None:
                self.start(slot)

    def memory_budget(self, slot: Slot) -> int:
        """MB of RSS a slot's worker may use (0: unlimited)."""
        return self.cfg["domains"][slot.domain]["max_memory_mb"] or \
            self.cfg["resources"]["max_memory_mb"]

    def vram_budget(self, slot: Slot) -> float | None:
        """MB of GPU memory (as NVML counts a process: its CUDA context included) a slot's
        worker may hold; None: not watched (not on a planned GPU, and no max_vram_mb)."""
        given = self.cfg["domains"][slot.domain]["max_vram_mb"]
        if given:
            return float(given)
        if slot.vram_budget_mb is None:
            return None
        return slot.vram_budget_mb + self.cfg["resources"]["gpu_context_mb"]

    def check_memory(self) -> list[Slot]:
        """Sample RSS (host memory only), and every VRAM_EVERY_S the GPU memory NVML reports
        per process; kill workers over either budget. Returns the slots killed."""
        killed = []
        now = self.clock()
        vram = None
        if self.vram.workers and now >= self.next_vram:
            self.next_vram = now + VRAM_EVERY_S
            vram = self.probe()
        for slot in self.slots:
            if slot.proc is None or slot.proc.poll() is not None:
                continue
            slot.rss_mb = isolation.rss_mb(slot.proc.pid)
            budget = self.memory_budget(slot)
            reason = ""
            if budget and slot.rss_mb is not None and slot.rss_mb > budget:
                reason = "memory_limit"
            if vram is not None:
                used, limit = devices.vram_mb(vram, slot.proc.pid), self.vram_budget(slot)
                if used is not None and limit is not None and used > limit:
                    reason = "vram_limit"
            if reason:
                slot.kill_reason = reason
                self.kill(slot, reason)
                killed.append(slot)
        return killed

    def shutdown(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            if slot.proc and slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGTERM)
        for slot in self.slots:
            if slot.proc is None:
                continue
            try:
                slot.proc.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                slot.proc.kill()
                slot.proc.wait()
            slot.state = SlotState.STOPPED
        if self.compute is not None:  # last: MPS clients are gone, its servers can go too
            self.compute.stop()


class Gateway:
    """The HTTP gateway as a child process: a client of the daemon like any other."""

    def __init__(self, http_cfg: dict[str, Any], socket_path: str,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg, self.socket_path, self.clock = http_cfg, socket_path, clock
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> None:
        env = {**os.environ, "RESISO_HTTP": json.dumps(self.cfg),
               "RESISO_SOCKET": self.socket_path}
        self.proc = subprocess.Popen([sys.executable, "-m", "resisod.http"], env=env,
                                     stdin=subprocess.DEVNULL)
        self.started = self.clock()
        log.info("HTTP gateway started on %s (pid %d)", self.cfg["listen"], self.proc.pid)

    def check(self, *, stopping: bool) -> None:
        """Restart a gateway that died, unless it refused its configuration."""
        if self.proc is None or self.proc.poll() is None:
            return
        code = self.proc.returncode
        if code == GATEWAY_CONFIG_EXIT:  # restarting would not help
            log.error("HTTP gateway refused to start (see above); not restarting")
            self.proc = None
        elif self.clock() - self.started > GATEWAY_MIN_UP_S and not stopping:
            log.warning("HTTP gateway exited with %s; restarting", code)
            self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
