"""The small interface every engine implements, and the job handle it runs against.

Only worker processes import engine modules; this one stays free of model libraries so the
interface can be read (and type-checked) anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


class JobError(Exception):
    """A job-level failure with a stable code (bad input the daemon could not check, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Cancelled(Exception):
    """Raised at a step boundary once the job has been cancelled."""


class EngineUnavailable(Exception):
    """The engine cannot run on this machine (library missing, model unreadable)."""


@dataclass
class EngineContext:
    domain_name: str
    state_dir: str
    results_dir: str
    device: str          # "cpu" or "cuda" (the visible GPU, after CUDA_VISIBLE_DEVICES)
    threads: int
    gpu_share: float     # fraction of the GPU's memory this process may use
    # the cache shared between daemons ([cache] backend = "redis"): a result_cache.SharedCache,
    # None when results are cached locally only
    shared_cache: Any = None
    # this worker's VRAM budget from the daemon's plan (MB; None off a GPU or unplanned);
    # torch engines are capped through gpu_share, llama.cpp by how many layers it offloads
    gpu_budget_mb: float | None = None


class Flag:
    """A cancel flag with `threading.Event`'s `set` / `is_set`, without its condition and
    lock: a job's flag is set and read on the worker's one thread, and nothing waits on it.
    One is built per job, which an Event makes a few microseconds dearer."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class JobControl:
    """What an engine sees of its running job: emit events, honour cancel and pause.

    `checkpoint()` is called by engines at every token / step / sentence boundary; that is
    where control messages from the daemon are read and where cancellation and preemption
    take effect. `poll` is the worker's reader of those messages (None in isolation).
    """

    def __init__(self, task_id: str, emit: Callable[[str, dict[str, Any]], None],
                 poll: Callable[["JobControl", float], None] | None = None,
                 priority: str = "normal"):
        self.task_id = task_id
        self.priority = priority  # a batching engine serves higher classes first
        self._emit = emit
        self._poll = poll
        self.cancelled = Flag()
        self.paused = False

    def emit(self, event: str, **fields: Any) -> None:
        self._emit(event, fields)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def cancel(self) -> None:
        self.cancelled.set()

    def poll(self, wait: float = 0.0) -> None:
        """Apply control messages that arrived (cancel / pause / resume)."""
        if self._poll is not None:
            self._poll(self, wait)

    def checkpoint(self) -> None:
        self.poll()
        if self.cancelled.is_set():
            raise Cancelled()
        if self.paused:
            self.emit("paused")
            while self.paused and not self.cancelled.is_set():
                self.poll(0.05)
            if self.cancelled.is_set():
                raise Cancelled()
            self.emit("resumed")


class Engine:
    """Base of all engines. Subclasses set `kind` and implement load/run."""

    kind = ""

    def __init__(self, domain: dict[str, Any], ctx: EngineContext):
        self.domain = domain
        self.ctx = ctx

    def load(self) -> None:
        """Load the model; raise EngineUnavailable with a reason the user can act on."""

    def warm_up(self) -> dict[str, float] | None:
        """Run once after `load`, before the first job: a small job that pays the first-run
        costs (kernel selection, caches) and measures what the daemon's first estimates need,
        e.g. {"step_ms": ...} per step at the domain's default size. None: nothing measured."""
        return None

    def run(self, params: dict[str, Any], job: JobControl) -> dict[str, Any]:
        raise NotImplementedError

    def unload(self) -> None:
        """Free the model (idle unload); `load` is called again before the next job."""

    def runs_on(self) -> dict[str, Any]:
        """Where the loaded engine really computes, reported to the daemon when ready:
        {"device": "cpu" or "cuda", ...}. The configured device is only a wish ("auto" on a
        machine without a usable GPU, a CPU build of a library): preemption and status go
        by this. Torch engines set `self.device`; others run on the CPU unless they say."""
        return {"device": getattr(self, "device", "cpu")}

    def release_memory(self) -> None:
        """After a job ran out of GPU memory: give back what it held, so the next job runs.
        Torch keeps freed blocks cached for itself; empty that cache."""
        import sys
        torch = sys.modules.get("torch")  # only if the engine already uses it
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


Outcome = Any  # a result dict, or the exception that ended the job (Cancelled, JobError, ...)


class BatchEngine(Engine):
    """An engine that runs several jobs at once (continuous batching).

    The worker owns the loop: between two `step()` calls it reads the daemon's messages,
    hands new jobs to `add` and sets the cancel / pause flags of running ones on their
    `JobControl`. The engine reads those flags at each step and never polls the socket
    itself (`JobControl.checkpoint` is for one-job engines). One step advances every job
    that is neither paused nor ended by one unit (a token for an LLM), so a job added
    between steps joins the very next one.

    Pause frees a place: a paused job keeps what it needs to go on (its token history, its
    KV state where memory allows), and the engine emits `paused` when it has stopped it and
    `resumed` when it runs again. `capacity` bounds the jobs that are not paused.
    """

    capacity = 1

    def add(self, params: dict[str, Any], job: JobControl) -> None:
        """Take a new job; it starts at the next step. Raise JobError to refuse it (the
        worker reports the error; the other jobs are untouched)."""
        raise NotImplementedError

    def step(self) -> list[tuple[JobControl, Outcome]]:
        """Advance the running jobs by one unit; return those that ended, each with its
        result dict or the exception that ended it (Cancelled for a cancel)."""
        raise NotImplementedError

    def pending(self) -> bool:
        """Whether `step()` has anything to do now: a job to advance, a cancel or a pause
        to act on. False while every job is paused (the worker then waits for messages)."""
        raise NotImplementedError

    def jobs(self) -> int:
        """Jobs held, paused ones included."""
        raise NotImplementedError

    def run(self, params: dict[str, Any], job: JobControl) -> dict[str, Any]:
        """One job on its own, through the batch loop (warm-up, tools)."""
        self.add(params, job)
        while True:
            for control, outcome in self.step():
                if control is job:
                    if isinstance(outcome, BaseException):
                        raise outcome
                    return outcome
