"""The scheduler's effects: what each of its decisions asks the broker to carry out.

Plain records, built per job on the hot path (a tuple is the cheapest object to make).
`effects.py` carries them out; the scheduler's docstring says what each one means.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .domains import Domain
    from .jobs import Job
    from .slots import Slot


class Start(NamedTuple):
    slot: Slot
    job: Job


class Signal(NamedTuple):
    slot: Slot
    job: Job
    op: str                      # WorkerMsg.PAUSE / RESUME / CANCEL


class Kill(NamedTuple):
    slot: Slot
    reason: str


class Requeued(NamedTuple):
    job: Job
    reason: str


class Ended(NamedTuple):
    job: Job


class DomainHealth(NamedTuple):
    domain: Domain               # its `unavailable_reason` says which way it went
