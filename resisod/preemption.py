"""Cross-domain preemption: batch work yields to realtime work on a device it shares.

While a realtime domain has work running or waiting on a device (GPU, or CPU cores) that a
preemptible batch domain shares, the batch worker pauses at its next step boundary. A
time-share floor keeps batch work moving under continuous realtime load: while paused the
batch side earns run time at floor / (1 - floor) seconds per second; once it is owed a full
slice it runs until the credit is spent, then pauses again. A realtime arrival after a quiet
spell finds no credit left, so it pauses the batch work at once.

The decision is a pure function of (now, realtime busy, the turn state) so it is tested
without processes or sleeps; the scheduler asks it on every dispatch and tick. Which domains
contend at all is `plan`, from where `devices` says each domain runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import devices

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


def plan(domains: dict[str, dict[str, Any]], layout: dict[str, list[int]], *, gpus: int,
         across_cores: bool) -> dict[str, list[str]]:
    """Which realtime domains each preemptible batch domain yields to."""
    out: dict[str, list[str]] = {}
    for b, bc in domains.items():
        if not (bc["preemptible"] and bc["priority"] == "batch"):
            continue
        rts = [r for r, rc in domains.items() if rc["priority"] == "realtime" and
               devices.shares_device(bc, rc, layout[b], layout[r], gpus=gpus,
                                     across_cores=across_cores)]
        if rts:
            out[b] = rts
    return out
