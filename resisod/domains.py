"""A resource domain at run time: its queue, its running jobs, its numbers, and which domain
a request names."""
from __future__ import annotations

import bisect
import collections
import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from . import voices
from .jobs import DomainQueue, Job
from .protocol import Code, ProtocolError


BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
           300.0)


@dataclass
class Histogram:
    """Per-bucket counts (one increment per observation), exported cumulative as
    Prometheus wants them."""
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    count: int = 0
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1  # the last slot is +Inf

    def export(self) -> dict[str, Any]:
        return {"bounds": BUCKETS, "cumulative": list(itertools.accumulate(self.counts[:-1])),
                "count": self.count, "sum": self.total}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


@dataclass(eq=False)
class Domain:
    name: str
    cfg: dict[str, Any]
    queue: DomainQueue = field(default_factory=DomainQueue)
    running: set[Job] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    preemptions: int = 0
    latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))
    # running averages that feed the estimates given to clients
    job_ms: float | None = None
    step_ms: float | None = None
    cache_hits: int = 0
    duration_hist: Histogram = field(default_factory=Histogram)
    ttft_hist: Histogram = field(default_factory=Histogram)
    unavailable_reason: str = ""         # set while no worker of the domain can load its engine
    unavailable_since: float = 0.0       # monotonic; its queued jobs fail after the hold
    paused: bool = False                 # preempted by realtime work on a shared device
    paused_s: float = 0.0                # time its running jobs spent paused for realtime work
    co_running_s: float = 0.0            # time its jobs ran beside busy realtime work (turns)
    accounted_at: float | None = None

    def __post_init__(self) -> None:
        # a domain's kind is fixed by its config; read on every submit and estimate
        self.kind: str = self.cfg["kind"]
        # jobs of these kinds report steps, so estimates scale with the step count
        self.stepped: bool = self.kind in ("image", "null")

    def account(self, now: float, realtime_busy: bool) -> None:
        """Add the time since the last call to paused or co-running time (batch domains that
        yield, once per tick)."""
        if self.accounted_at is not None and self.running:
            dt = now - self.accounted_at
            if self.paused:
                self.paused_s += dt
            elif realtime_busy:
                self.co_running_s += dt
        self.accounted_at = now

    def scale(self, job: Job) -> float:
        """A job's work per step relative to a step at the domain's default size: image
        steps cost in proportion to their pixels, so `step_ms` is kept per default-sized
        step and scaled per job."""
        if self.kind != "image":
            return 1.0
        p = job.params
        return (p.get("width", 1) * p.get("height", 1)) / \
            max(1, self.cfg["default_width"] * self.cfg["default_height"])

    def learn(self, job: Job, duration_ms: float) -> None:
        self.latencies_ms.append(duration_ms)
        self.duration_hist.observe(duration_ms / 1000)
        result = job.result or {}
        if result.get("ttft_ms") is not None:
            self.ttft_hist.observe(result["ttft_ms"] / 1000)
        if result.get("cached"):
            self.cache_hits += 1
        self.job_ms = duration_ms if self.job_ms is None else 0.8 * self.job_ms + 0.2 * duration_ms
        steps = job.params.get("steps") if self.stepped else None
        if steps:
            per = duration_ms / steps / self.scale(job)
            self.step_ms = per if self.step_ms is None else 0.8 * self.step_ms + 0.2 * per

    def learn_step(self, step_ms: float, job: Job | None = None) -> None:
        per = step_ms / (self.scale(job) if job is not None else 1.0)
        self.step_ms = per if self.step_ms is None else 0.9 * self.step_ms + 0.1 * per

    def warmed_up(self, figures: Any) -> None:
        """What a worker measured at load (a warm-up job): the first estimates, before any
        job has run here."""
        if isinstance(figures, dict) and self.step_ms is None:
            step_ms = figures.get("step_ms")
            if isinstance(step_ms, (int, float)) and step_ms > 0:
                self.step_ms = float(step_ms)

    def estimate(self, job: Job) -> float:
        """Expected run time of a job in ms (0 while nothing has been measured)."""
        steps = job.params.get("steps") if self.stepped else None
        if steps and self.step_ms is not None:
            return self.step_ms * steps * self.scale(job)
        return self.job_ms or 0.0

    def remaining(self, job: Job, now: float) -> float:
        est = self.estimate(job)
        if job.progress and job.progress.get("total"):
            done = job.progress["step"] / job.progress["total"]
            return max(0.0, est * (1 - done))
        if job.started_at is not None:
            return max(0.0, est - (now - job.started_at) * 1000)
        return est

    @staticmethod
    def countdown(job: Job, ms: float) -> float:
        """The remaining time to tell about a running job: estimates are revised as steps
        are timed, but what a client sees only counts down."""
        if job.eta_ms is not None and ms > job.eta_ms:
            ms = job.eta_ms
        job.eta_ms = ms
        return ms

    @property
    def workers(self) -> int:
        return self.cfg["workers"]

    def position(self, job: Job) -> int:
        """How many jobs must finish before this queued one starts (0 = it starts next)."""
        ahead = self.queue.position(job) + len(self.running)
        return max(0, ahead - self.workers + 1)

    def wait_estimate(self, job: Job, now: float) -> float:
        """Time until `job` finishes: the work ahead of it shared over the workers, plus its own."""
        ahead = sum(self.remaining(j, now) for j in self.running)
        ahead += self.queue.estimate_ahead_ms(job)
        return ahead / max(1, self.workers) + self.estimate(job)

    def stats(self) -> dict[str, Any]:
        lat = list(self.latencies_ms)
        return {
            "queue": self.queue.depth_by_class(), "queued": len(self.queue),
            "running": len(self.running), "completed": self.completed, "failed": self.failed,
            "cancelled": self.cancelled, "preemptions": self.preemptions,
            "paused_s": round(self.paused_s, 2), "co_running_s": round(self.co_running_s, 2),
            "cache_hits": self.cache_hits, "duration_hist": self.duration_hist.export(),
            "ttft_hist": self.ttft_hist.export(),
            "p50_ms": _percentile(lat, 0.5), "p95_ms": _percentile(lat, 0.95),
        }


def served_names(domain_cfg: dict[str, Any]) -> list[str]:
    """Names a client may use in `model` to pick this domain."""
    names = [domain_cfg["model"]]
    if domain_cfg.get("model_name"):
        names.append(domain_cfg["model_name"])
    model = domain_cfg["model"]
    if model.startswith("builtin:"):
        names.append(model[len("builtin:"):])
    elif model:
        names.append(os.path.basename(model.rstrip("/")))
        if names[-1].endswith(".onnx"):  # a Piper voice file is known by its name
            names.append(names[-1][:-len(".onnx")])
    return [n for n in dict.fromkeys(names) if n]


def speech_language(cfg: dict[str, Any]) -> str | None:
    """The language a TTS domain speaks: configured, else read from its voice or model name
    (espeak with no voice speaks its default, English)."""
    if cfg.get("language"):
        return cfg["language"]
    for name in (cfg["voice"], *served_names(cfg)):
        lang = voices.language_of_name(name)
        if lang:
            return lang
    return "en" if cfg["engine"] == "espeak" and not cfg["voice"] else None


def _own_voices(cfg: dict[str, Any]) -> set[str]:
    """Normalised names that stand for the domain's default voice: its voice, its model
    names, and the names of its language."""
    names = {cfg["voice"], *served_names(cfg)}
    lang = speech_language(cfg)
    if lang:
        names.update(voices.names_of(lang))
    return {voices.norm(n) for n in names if n}


def served_voices(cfg: dict[str, Any]) -> list[str]:
    """What `voice` may name to reach this domain (shown in `status` and offered by the
    console), as people write them: the voice, the voice file's name, the domain's language,
    then the names in `voices`."""
    names = [cfg["voice"], *(n for n in served_names(cfg) if ":" not in n and "/" not in n)]
    lang = speech_language(cfg)
    if lang:
        names.append(lang)
    return [n for n in dict.fromkeys([*names, *cfg["voices"]]) if n]


def _not_found(kind: str, model: str, candidates: list[Domain],
               aliases: dict[str, str]) -> ProtocolError:
    names = sorted(n for d in candidates for n in served_names(d.cfg))
    names += sorted(a for a, t in aliases.items() if t == kind or
                    any(d.name == t for d in candidates))
    return ProtocolError(Code.MODEL_NOT_FOUND, f"model {model!r} is not served; served "
                         f"{kind} models: {', '.join(names) or 'none'}")


def _route_voice(candidates: list[Domain], params: dict[str, Any],
                 voice_aliases: dict[str, str]) -> tuple[Domain, dict[str, Any]]:
    """The TTS domain for a request: the one that serves its voice, else one of its text's
    language, else the first. A voice that names a domain as a whole (a locale, a language,
    the voice file) becomes that domain's default voice; other names go to the engine."""
    voice = params.get("voice") or ""
    if not isinstance(voice, str):
        raise ProtocolError(Code.BAD_REQUEST, "'voice' must be a string")
    voice = voice_aliases.get(voice, voice)
    if voice:
        n = voices.norm(voice)
        for d in candidates:
            if n in _own_voices(d.cfg):
                return d, {"voice": ""}
        for d in candidates:
            if voice in d.cfg["voices"]:
                return d, {"voice": voice}
    text = params.get("text")
    lang = voices.detect_language(text) if isinstance(text, str) else None
    if lang:
        for d in candidates:
            if speech_language(d.cfg) == lang:
                return d, {"voice": voice}
    return candidates[0], {"voice": voice}


def pick(domains: dict[str, Domain], name: str | None, kind: str | None, params: Any,
         aliases: dict[str, dict[str, str]] | None = None) -> tuple[Domain, dict[str, Any]]:
    """The domain a request names, and what routing changed in its params.

    By `domain`, else among the domains of its `kind`: the one serving its `model` (a served
    name, a domain's name, the kind's name, or an alias naming a kind or a domain); for speech, the one serving its `voice` or
    its text's language; else the first of the kind."""
    aliases = aliases or {"models": {}, "voices": {}}
    params = params if isinstance(params, dict) else {}
    if name is not None:
        if name not in domains:
            raise ProtocolError(Code.BAD_REQUEST, f"no domain {name!r}; configured: "
                                f"{', '.join(sorted(domains)) or 'none'}")
        return domains[name], {}
    if kind is None:
        raise ProtocolError(Code.BAD_REQUEST, "field 'kind' is required")
    model = params.get("model")
    if not model and kind != "tts":  # the common case: the first domain of the kind
        for d in domains.values():
            if d.kind == kind:
                return d, {}
    candidates = [d for d in domains.values() if d.kind == kind]
    if not candidates:
        raise ProtocolError(Code.BAD_REQUEST, f"no domain serves kind {kind!r}; served "
                            f"kinds: {', '.join(sorted({d.kind for d in domains.values()}))}")
    if model:
        if not isinstance(model, str):
            raise ProtocolError(Code.BAD_REQUEST, "'model' must be a string")
        serving = [d for d in candidates if model in served_names(d.cfg)]
        # an alias, else the model may be a domain's or the kind's own name
        target = aliases["models"].get(model, model)
        if serving:
            candidates = serving
        elif target == kind:
            pass  # the kind as a whole (`tts-1`): voice and text choose among its domains
        elif target in domains and domains[target].kind == kind:
            candidates = [domains[target]]
        else:
            raise _not_found(kind, model, candidates, aliases["models"])
    if kind == "tts":
        return _route_voice(candidates, params, aliases["voices"])
    return candidates[0], {}
