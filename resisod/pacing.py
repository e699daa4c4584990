"""The scheduler's side of work-conserving preemption: what realtime work's progress events
say about co-running, and whether batch work on the same device should pause now.

`corun.py` holds the decisions on figures and a clock; this module feeds them from jobs and
domains (each realtime domain's `Pace`, a `Policy` per (batch, realtime, phase)) and says,
from where workers report computing, which paired domains really share a device. No I/O:
the scheduler calls it from `dispatch`/`tick` and the worker link for progress events.
"""
from __future__ import annotations

from typing import Any, Callable

from . import corun
from .domains import Domain
from .jobs import Job
from .protocol import Event
from .slots import Slot


class Pacing:
    def __init__(self, resources: dict[str, Any], domains: dict[str, Domain],
                 slots_of: dict[str, list[Slot]], yields_to: dict[str, list[Domain]],
                 clock: Callable[[], float]):
        self.domains, self.slots_of, self.yields_to, self.clock = \
            domains, slots_of, yields_to, clock
        self.adaptive = resources["preemption"] == "adaptive"
        self.limits = {"max_slowdown": resources["max_slowdown"],
                       "probe_every_s": resources["probe_every_s"],
                       "probe_for_s": max(1.0, resources["probe_every_s"] / 5)}
        self.paces = {r.name: corun.Pace() for rts in yields_to.values() for r in rts}
        self.yielders = {r: [domains[b] for b, rts in yields_to.items()
                             if any(x.name == r for x in rts)] for r in self.paces}
        self.policies = {(b, r.name, ph): corun.Policy() for b, rts in yields_to.items()
                         for r in rts for ph in (corun.PREFILL, corun.DECODE)}

    def pressure(self, now: float, batch: str, busy_rts: list[Domain]) -> bool:
        """Whether busy realtime work should make `batch` pause: with the adaptive policy,
        unless every busy realtime domain is measured unhurt in each phase its jobs are in."""
        if not busy_rts:
            return False
        if not self.adaptive:
            return True
        return not all([corun.want_corun(
            now, True, self.paces[r.name], len(r.running) or 1,
            self.policies[(batch, r.name, ph)], phase=ph, **self.limits)
            for r in busy_rts for ph in phases(r)])

    def paced(self, job: Job, name: str, fields: dict[str, Any]) -> None:
        """A token or an audio chunk of a realtime job whose device batch work shares: its
        cost per unit goes into the domain's pace, as measured alone or beside batch work.
        A job's first token measures the prompt's reading, per token of it the engine
        evaluated (`prefill` in the event; without it, the sample is left out)."""
        pace = self.paces.get(job.domain)
        if pace is None or job.bumped:
            return
        now = self.clock()
        phase = corun.DECODE
        if name == Event.TOKEN:
            units = 1.0
            if not job.units:  # the first: per prompt token the engine evaluated
                phase, prefill = corun.PREFILL, fields.get("prefill")
                units = float(prefill) if isinstance(prefill, int) and prefill > 0 else 0.0
        elif name == Event.AUDIO:
            pcm, rate = fields.get("pcm"), fields.get("sample_rate")
            units = len(pcm) / 2 / rate if isinstance(pcm, bytes) and rate else 0.0
        else:
            return
        if units > 0:
            corunning = any(b.running and not b.paused for b in self.yielders[job.domain])
            pace.observe((now - job.step_mark) / units,
                         len(self.domains[job.domain].running), corunning, phase)
        job.units += 1
        job.step_mark = now

    def view(self, batch: str) -> dict[str, Any] | None:
        """What the policy decided for a batch domain, per realtime domain it yields to and
        phase (`status`, `/metrics`); None for a domain that yields to nothing."""
        if batch not in self.yields_to:
            return None
        if not self.adaptive:
            return {}
        out: dict[str, Any] = {}
        for r in self.yields_to[batch]:
            for ph in ((corun.PREFILL, corun.DECODE) if r.kind == "llm" else (corun.DECODE,)):
                p = self.policies[(batch, r.name, ph)]
                out.setdefault(r.name, {})[ph] = {
                    "state": p.state,
                    "slowdown": None if p.slowdown is None else round(p.slowdown, 3)}
        return out

    def contends(self, batch: str, realtime: str) -> bool:
        """Whether two domains the start-up plan paired really share a device, by where
        their workers report computing: a realtime domain that fell back to the CPU (no
        GPU build, no GPU) does not make a GPU batch domain yield, nor the other way round.
        Until both have reported, the plan (from the configuration) stands."""
        a, b = self._runs_on(batch), self._runs_on(realtime)
        return a is None or b is None or bool(a & b)

    def _runs_on(self, domain: str) -> set[str] | None:
        """"cpu" and/or "gpu": where the domain's ready workers compute; None: none said."""
        kinds = {"cpu" if s.runs_on.get("device", "cpu") == "cpu" else "gpu"
                 for s in self.slots_of[domain] if s.runs_on is not None}
        return kinds or None


def phases(domain: Domain) -> list[str]:
    """The phases a busy realtime domain's jobs are in: reading a prompt (queued, or running
    without a first token yet) and decoding. Speech is all decoding."""
    if domain.kind != "llm":
        return [corun.DECODE]
    out = []
    if len(domain.queue) or any(not j.units for j in domain.running):
        out.append(corun.PREFILL)
    if any(j.units for j in domain.running):
        out.append(corun.DECODE)
    return out
