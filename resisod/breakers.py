"""Circuit breakers for worker slots: a worker that fails job after job stops getting jobs.

A slot whose jobs fail `threshold` times in a row (engine errors, crashes, memory limits:
failures of the worker, not of the request) is *open*: taken out of dispatch for `cooldown_s`,
so its domain's other workers take the queue, or the queue waits instead of burning through
jobs on a broken worker. Then it is *half-open*: one trial job. A success closes it; a failure
opens it again for another cooldown.

A library breaker (pybreaker) wraps a call and times it itself; here a job is started in one
loop iteration and ends many later, and the scheduler's decisions run on an injected clock,
so the states are kept by hand, as plain data the scheduler updates.
"""
from __future__ import annotations

from dataclasses import dataclass

from .protocol import Code

# codes that say the worker failed, not the request
WORKER_FAULTS = frozenset({Code.ENGINE_ERROR, Code.WORKER_CRASHED, Code.MEMORY_LIMIT})

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


@dataclass
class Breaker:
    threshold: int           # failures in a row that open it; 0 = never opens
    cooldown_s: float
    state: str = CLOSED
    failures: int = 0        # in a row
    opened_at: float = 0.0
    trial: bool = False      # the half-open trial job is running
    opened: int = 0          # times it opened, for `status`

    def allows(self, now: float) -> bool:
        """May the slot take a job now? Moves an open breaker past its cooldown to
        half-open."""
        if self.state == OPEN and now - self.opened_at >= self.cooldown_s:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN:
            return not self.trial
        return self.state == CLOSED

    def started(self) -> None:
        if self.state == HALF_OPEN:
            self.trial = True

    def succeeded(self) -> None:
        self.state, self.failures, self.trial = CLOSED, 0, False

    def failed(self, now: float) -> None:
        self.failures += 1
        self.trial = False
        if self.threshold and (self.state == HALF_OPEN or self.failures >= self.threshold):
            if self.state != OPEN:
                self.opened += 1
            self.state, self.opened_at = OPEN, now

    def neither(self) -> None:
        """A job that ended without saying anything about the worker (cancelled, refused
        input): a half-open trial may be tried again."""
        self.trial = False

    def view(self) -> dict[str, object]:
        return {"state": self.state, "failures": self.failures, "opened": self.opened}
