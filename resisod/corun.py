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
Each phase (reading a prompt, decoding) has its own figures and its own policy: batch work
may keep running while a chat decodes, and pause only while a new prompt is read.
- `probe`: co-run for a window to measure the cost beside batch work.
- `corun`: the measured slowdown is within `max_slowdown`: keep co-running, and keep
  measuring; a slowdown past the limit pauses at once.
- `paused`: co-running was harmful; probe again after `probe_every_s` (four times that for
  prompts), doubled after each harmful verdict in a row.
While paused, the time-share floor of `preemption.want_paused` still gives the batch work
its share.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ALPHA = 0.25          # weight of a new sample in the moving averages
MAX_OCCUPANCY = 8     # occupancy keys: 1..8 jobs at once (8 stands for 8 or more)
# Two phases are paced apart, since co-running hurts them differently (on two CPU cores that
# share a physical core's units, reading a prompt slows beside an image step far more than
# decoding does): "prefill" is a job's first token per prompt token evaluated, one sample
# per request; "decode" is each later token or audio chunk.
PREFILL, DECODE = "prefill", "decode"
# samples before a figure counts: token intervals are noisy one by one; a prefill sample
# averages a whole prompt and comes once per request
MIN_SAMPLES = {DECODE: 4, PREFILL: 2}
# A prompt probe costs a whole request a slow first token, so prompts are probed less
# often than decoding, one harmful prompt sample is enough to pause, and each harmful
# verdict in a row doubles the wait before the next prompt probe (up to 8x). A decoding
# probe costs a few slower tokens: it keeps its pace, so a change of load is seen soon.
PROBE_EVERY_FACTOR = {DECODE: 1, PREFILL: 4}
HARMFUL_AFTER = {DECODE: MIN_SAMPLES[DECODE], PREFILL: 1}
MAX_BACKOFF = {DECODE: 0, PREFILL: 3}


@dataclass
class Figure:
    value: float = 0.0
    samples: int = 0

    def add(self, cost: float) -> None:
        self.value = cost if self.samples == 0 else self.value + ALPHA * (cost - self.value)
        self.samples += 1


def _key(phase: str, occupancy: int) -> tuple[str, int]:
    return phase, max(1, min(occupancy, MAX_OCCUPANCY))


@dataclass
class Pace:
    """A realtime domain's cost per unit of progress, alone and beside batch work, per phase
    and per number of its jobs running at once."""
    alone: dict[tuple[str, int], Figure] = field(default_factory=dict)
    beside: dict[tuple[str, int], Figure] = field(default_factory=dict)

    def observe(self, cost: float, occupancy: int, corunning: bool,
                phase: str = DECODE) -> None:
        table = self.beside if corunning else self.alone
        table.setdefault(_key(phase, occupancy), Figure()).add(cost)

    def knows_alone(self, occupancy: int, phase: str = DECODE) -> bool:
        fig = self.alone.get(_key(phase, occupancy))
        return fig is not None and fig.samples >= MIN_SAMPLES[phase]

    def slowdown(self, occupancy: int, phase: str = DECODE) -> float | None:
        """Cost beside batch work over cost alone, minus 1; None until both were measured."""
        a, b = self.alone.get(_key(phase, occupancy)), self.beside.get(_key(phase, occupancy))
        if a is None or b is None or not b.samples or a.value <= 0:
            return None
        return b.value / a.value - 1.0

    def beside_samples(self, occupancy: int, phase: str = DECODE) -> int:
        fig = self.beside.get(_key(phase, occupancy))
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
    strikes: int = 0                # harmful verdicts in a row (the probe backoff)


def want_corun(now: float, busy: bool, pace: Pace, occupancy: int, policy: Policy, *,
               max_slowdown: float, probe_every_s: float, probe_for_s: float,
               phase: str = DECODE) -> bool:
    """Whether the batch work may run beside the busy realtime work's `phase` now. Not
    busy: it runs (the answer is True and nothing changes). A prefill probe has no time
    limit: its samples come one per request, and without requests it costs nothing."""
    if not busy:
        return True
    if not pace.knows_alone(occupancy, phase):
        policy.state = LEARN
        return False
    if policy.state in (LEARN, PAUSED) and (policy.state == LEARN or now >= policy.probe_at):
        policy.state = PROBE
        policy.probe_until = now + probe_for_s if phase == DECODE else float("inf")
        policy.probe_base = pace.beside_samples(occupancy, phase)
        return True
    if policy.state == PAUSED:
        return False
    # PROBE or CORUN: judge by what was measured beside batch work
    slow = pace.slowdown(occupancy, phase)
    fresh = pace.beside_samples(occupancy, phase) - policy.probe_base
    if policy.state == PROBE:
        if slow is None or fresh < 1:
            if now >= policy.probe_until:
                # nothing measured in the window (realtime work without progress events):
                # the plain policy's answer, and another try later
                return _pause(policy, now, probe_every_s, phase)
            return True
        if slow > max_slowdown and fresh >= HARMFUL_AFTER[phase]:
            policy.slowdown = slow
            return _pause(policy, now, probe_every_s, phase)
        if fresh < MIN_SAMPLES[phase]:
            return True
        policy.slowdown = slow
        if slow > max_slowdown:
            return _pause(policy, now, probe_every_s, phase)
        policy.state, policy.strikes = CORUN, 0
        return True
    # CORUN: the moving average beside batch work keeps being watched
    if slow is not None:
        policy.slowdown = slow
        if slow > max_slowdown:
            return _pause(policy, now, probe_every_s, phase)
    return True


def _pause(policy: Policy, now: float, probe_every_s: float, phase: str) -> bool:
    policy.strikes += 1
    wait = probe_every_s * PROBE_EVERY_FACTOR[phase] * \
        2 ** min(policy.strikes - 1, MAX_BACKOFF[phase])
    policy.state, policy.probe_at = PAUSED, now + wait
    return False
