"""Cross-domain preemption: batch work yields to realtime work on a device it shares.

While a realtime domain has work running or waiting on a device (GPU, or CPU cores) that a
preemptible batch domain shares, the batch worker pauses at its next step boundary. A
time-share floor keeps batch work moving under continuous realtime load: while paused the
batch side earns run time at floor / (1 - floor) seconds per second; once it is owed a full
slice it runs until the credit is spent, then pauses again. A realtime arrival after a quiet
spell finds no credit left, so it pauses the batch work at once.

The decision is a pure function of (now, realtime busy, the turn state) so it is tested
without processes or sleeps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import isolation

SLICE_S = 0.3   # run time a preempted batch job gets per turn under continuous realtime load
QUIET_S = 1.0   # realtime idle this long: the batch side's unspent credit lapses


@dataclass
class Turn:
    paused: bool = False
    credit: float = 0.0             # seconds of run time owed to the batch side
    last: float | None = None       # time of the previous decision
    idle_since: float | None = 0.0   # when realtime work last went idle (None: busy)


def want_paused(now: float, realtime_busy: bool, turn: Turn, floor: float,
                slice_s: float = SLICE_S, quiet_s: float = QUIET_S) -> bool:
    """Should the batch side be paused now? Updates the turn's credit; `apply` the answer."""
    # credit moves only over intervals that were already under realtime load
    dt = 0.0 if turn.last is None or turn.idle_since is not None else max(0.0, now - turn.last)
    turn.last = now
    if not realtime_busy:
        if turn.idle_since is None:
            turn.idle_since = now
        if now - turn.idle_since >= quiet_s:
            turn.credit = 0.0
        return False
    turn.idle_since = None
    if floor <= 0:
        return True
    if floor >= 1:
        return False
    if turn.paused:
        turn.credit = min(slice_s, turn.credit + dt * floor / (1 - floor))
        return turn.credit < slice_s - 1e-9
    turn.credit = max(0.0, turn.credit - dt)
    return turn.credit <= 0


def apply(turn: Turn, paused: bool) -> bool:
    """Record the decision; True when it changed (a pause or resume must be sent)."""
    if paused == turn.paused:
        return False
    turn.paused = paused
    return True


def shares_device(batch: dict[str, Any], realtime: dict[str, Any], batch_cpus: list[int],
                  realtime_cpus: list[int], *, gpus: int, across_cores: bool) -> bool:
    """Whether two domains contend for the same device."""
    b_gpu = isolation.gpu_index(batch["device"]) if gpus else None
    r_gpu = isolation.gpu_index(realtime["device"]) if gpus else None
    if b_gpu is not None and r_gpu is not None:
        return b_gpu == r_gpu
    if b_gpu is not None or r_gpu is not None:
        return False  # one on a GPU, the other on CPU cores
    if across_cores:
        return True   # cores share caches and memory bandwidth
    return bool(set(batch_cpus or range(1024)) & set(realtime_cpus or range(1024)))
