"""Loop health: how long the broker's iterations take, and why the long ones were long.

Every client and worker waits on the loop, so an iteration that takes long is a latency for
all of them. The broker times each iteration's phases (poll excluded) and hands the long ones
here: the longest is kept for `status`, and any over STALL_WARN_S is logged with its slowest
phase, the garbage-collector pauses inside it, and at most how much of it the loop thread
spent on a CPU. Wall time far above CPU time means the thread was runnable but not running
(the kernel gave the cores to other processes), not that the daemon's code was slow.

The CPU clock is read once per tick, after the iteration that ran it, not per iteration: it
is a system call, and a quiet loop runs two iterations per job. A stall's CPU time is counted
from that last reading, so it is an upper bound that takes in the light iterations since.
"""
from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("resisod")

STALL_WARN_S = 0.1


class LoopWatch:
    """The longest iteration, the count of stalls, the longest GC pause, and a log line for
    each stall."""

    def __init__(self, clock=time.monotonic, cpu_clock=time.thread_time) -> None:
        self.clock, self.cpu_clock = clock, cpu_clock
        self.max_s = 0.0
        self.stalls = 0
        self.notice_s = 0.0       # iterations longer than this are looked at: a new maximum
                                  # or a stall
        self.gc_max_s = 0.0       # longest collection, any generation
        self.gc_max_gen = -1
        self.gc_since = 0.0       # collection time since the last `began`
        self._gc_t0 = 0.0
        self.cpu_mark = 0.0       # the loop thread's CPU time at the last `mark_cpu`

    # --- garbage collection: a collector callback, on whichever thread collects ----------
    def watch_gc(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = self.clock()
            return
        took = self.clock() - self._gc_t0
        self.gc_since += took
        if took > self.gc_max_s:
            self.gc_max_s, self.gc_max_gen = took, info.get("generation", -1)

    # --- iterations -------------------------------------------------------------------
    def began(self) -> None:
        """Called after poll returns: the iteration's own work starts here."""
        self.gc_since = 0.0

    def mark_cpu(self) -> None:
        """Called at the end of an iteration that ran the tick: where a later stall's CPU
        time is counted from."""
        self.cpu_mark = self.cpu_clock()

    def busy(self, t0: float, t1: float, t2: float, t3: float, t4: float) -> None:
        took = t4 - t0
        self.max_s = max(self.max_s, took)
        self.notice_s = min(self.max_s, STALL_WARN_S)
        if took > STALL_WARN_S:
            self.stalls += 1
            phases = {"requests": t1 - t0, "dispatch": t2 - t1, "tick": t3 - t2,
                      "commit": t4 - t3}
            worst = max(phases, key=phases.__getitem__)
            on_cpu = self.cpu_clock() - self.cpu_mark
            log.warning("loop iteration took %.0f ms (%s %.0f ms; gc %.0f ms; on cpu at most "
                        "%.0f ms)",
                        took * 1000, worst, phases[worst] * 1000, self.gc_since * 1000,
                        on_cpu * 1000)

    def report(self) -> dict[str, float | int]:
        return {"max_iteration_ms": round(self.max_s * 1000, 2), "stalls": self.stalls,
                "max_gc_pause_ms": round(self.gc_max_s * 1000, 2),
                "max_gc_pause_generation": self.gc_max_gen}
