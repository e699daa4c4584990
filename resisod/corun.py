"""Work-conserving preemption: batch work pauses for realtime work only where running beside
it is measured to slow it down.

Whether co-running hurts depends on the device and the engines, not on the config: two CPU
cores that share caches and memory bandwidth halve a decode's speed; an H100 running a
launch-bound decode beside an image loop loses almost nothing, and pausing the image there
throws its throughput away for no gain. So the daemon measures. For each realtime domain it
keeps the cost of a unit of progress (seconds per token; seconds per second of audio) as a
moving average, apart for "alone" (no batch work running on its device) and "beside batch
work", and keyed by how many of its own jobs run at once (a batching worker's tokens come
slower with more sequences, which is not a slowdown).

The policy per batch domain, a pure function of those figures and a clock:
- `learn`: no figure alone yet at this occupancy: pause (as the plain policy does), which is
  how the alone figure is learnt.
- `probe`: co-run for a window to measure the cost beside batch work.
- `corun`: the measured slowdown is within `max_slowdown`: keep co-running, and keep
  measuring; a slowdown past the limit pauses at once.
- `paused`: co-running was harmful; probe again after `probe_every_s`.
While paused, the time-share floor of `preemption.want_paused` still gives the batch work
its share.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ALPHA = 0.25          # weight of a new sample in the moving averages
MIN_SAMPLES = 4       # samples before a figure counts (the first ones are noisy)
MAX_OCCUPANCY = 8     # occupancy keys: 1..8 jobs at once (8 stands for 8 or more)


@dataclass
class Figure:
    value: float = 0.0
    samples: int = 0

    def add(self, cost: float) -> None:
        self.value = cost if self.samples == 0 else self.value + ALPHA * (cost - self.value)
        self.samples += 1

    @property
    def ready(self) -> bool:
        return self.samples >= MIN_SAMPLES


@dataclass
class Pace:
    """A realtime domain's cost per unit of progress, alone and beside batch work."""
    alone: dict[int, Figure] = field(default_factory=dict)
    beside: dict[int, Figure] = field(default_factory=dict)

    def observe(self, cost: float, occupancy: int, corunning: bool) -> None:
        key = max(1, min(occupancy, MAX_OCCUPANCY))
        table = self.beside if corunning else self.alone
        table.setdefault(key, Figure()).add(cost)

    def knows_alone(self, occupancy: int) -> bool:
        fig = self.alone.get(max(1, min(occupancy, MAX_OCCUPANCY)))
        return fig is not None and fig.ready

    def slowdown(self, occupancy: int, since_samples: int = 0) -> float | None:
        """Cost beside batch work over cost alone, minus 1; None until both are known (and
        the figure beside has `since_samples` more samples than it had)."""
        key = max(1, min(occupancy, MAX_OCCUPANCY))
        a, b = self.alone.get(key), self.beside.get(key)
        if a is None or b is None or not a.ready or b.samples < max(MIN_SAMPLES,
                                                                      since_samples):
            return None
        return b.value / a.value - 1.0 if a.value > 0 else None

    def beside_samples(self, occupancy: int) -> int:
        fig = self.beside.get(max(1, min(occupancy, MAX_OCCUPANCY)))
        return fig.samples if fig else 0


LEARN, PROBE, CORUN, PAUSED = "learn", "probe", "corun", "paused"


@dataclass
class Policy:
    """One batch domain's standing toward the realtime work it shares a device with."""
    state: str = LEARN
    probe_at: float = 0.0           # PAUSED: when to probe again
    probe_until: float = 0.0        # PROBE: the window's end
    probe_base: int = 0             # samples beside batch work when the probe began
    slowdown: float | None = None   # the last measured slowdown (status, metrics)


def want_corun(now: float, busy: bool, pace: Pace, occupancy: int, policy: Policy, *,
               max_slowdown: float, probe_every_s: float, probe_for_s: float) -> bool:
    """Whether the batch work may run beside the busy realtime work now. Not busy: it runs
    (the answer is True and nothing changes)."""
    if not busy:
        return True
    if not pace.knows_alone(occupancy):
        policy.state = LEARN
        return False
    if policy.state in (LEARN, PAUSED) and (policy.state == LEARN or now >= policy.probe_at):
        policy.state, policy.probe_until = PROBE, now + probe_for_s
        policy.probe_base = pace.beside_samples(occupancy)
        return True
    if policy.state == PAUSED:
        return False
    # PROBE or CORUN: judge by samples taken beside batch work in this window
    need = policy.probe_base + MIN_SAMPLES if policy.state == PROBE else 0
    slow = pace.slowdown(occupancy, need)
    if slow is not None:
        policy.slowdown = slow
        if slow > max_slowdown:
            policy.state, policy.probe_at = PAUSED, now + probe_every_s
            return False
        policy.state = CORUN
        return True
    if policy.state == PROBE and now >= policy.probe_until:
        # nothing measured in the window (realtime work without progress events): the
        # plain policy's answer, and another try later
        policy.state, policy.probe_at = PAUSED, now + probe_every_s
        return False
    return True
