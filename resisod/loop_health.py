"""Loop health: how long the broker's iterations take.

Every client and worker waits on the loop, so an iteration that takes long is a latency for
all of them. The broker times each iteration's phases (poll excluded) and hands the long ones
here: the longest is kept for `status`, and any over STALL_WARN_S is logged with its slowest
phase, so a stall names its cause.
"""
from __future__ import annotations

import logging

log = logging.getLogger("resisod")

STALL_WARN_S = 0.1


class LoopWatch:
    """The longest iteration, the count of stalls, and a log line for each stall."""

    def __init__(self) -> None:
        self.max_s = 0.0
        self.stalls = 0
        self.notice_s = 0.0       # iterations longer than this are looked at: a new maximum
                                  # or a stall

    def busy(self, t0: float, t1: float, t2: float, t3: float, t4: float) -> None:
        took = t4 - t0
        self.max_s = max(self.max_s, took)
        self.notice_s = min(self.max_s, STALL_WARN_S)
        if took > STALL_WARN_S:
            self.stalls += 1
            phases = {"requests": t1 - t0, "dispatch": t2 - t1, "tick": t3 - t2,
                      "commit": t4 - t3}
            worst = max(phases, key=phases.__getitem__)
            log.warning("loop iteration took %.0f ms (%s %.0f ms)", took * 1000, worst,
                        phases[worst] * 1000)

    def report(self) -> dict[str, float | int]:
        return {"max_iteration_ms": round(self.max_s * 1000, 2), "stalls": self.stalls}
