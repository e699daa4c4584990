"""The VRAM plan: each GPU's memory split into budgets, one per local worker process, at start.

Why a plan and not a fraction per kind: `torch.cuda.set_per_process_memory_fraction` caps only
the caching allocator, and each process's CUDA context (0.5-0.7 GiB, measured on an H100) comes
on top of it, so fractions of 70 % and 30 % overcommit the card as soon as two processes run,
and a domain with two workers at 70 % each asks for 140 %. The plan reserves the contexts and a
safety margin first, splits what is left by `[resources.gpu_allocation]`, and within a domain
divides its share among its workers (more workers never enlarge a domain's share).

Rules (each one a decision; the daemon refuses a plan it cannot keep rather than shrinking it):
- A domain on the CPU, or served only by remote workers (workers = 0), takes nothing here.
- A domain's share is its explicit `share_pct` when given, else its kind's allocation, split
  evenly among the domains of that kind on the same GPU (two LLM domains share "llm = 70").
- A kind with no allocation (tts, null) alone on its GPU gets all of it (as before the plan);
  beside other domains it must give an explicit share_pct, or the plan is refused: guessing
  would take memory the allocations promised to the others.
- A share of 0 on a GPU is refused: the domain would get no memory; put it on the CPU.
- Shares on one GPU summing over 100 % are refused; under 100 %, the rest stays free.
- Percentages are of the card less the reserves (contexts + margin), so the plan never
  exceeds the card: sum(budgets) + contexts + margin <= total.
- A worker's budget below `floor_mb` is refused: no model runs in it, and failing at start
  with the numbers beats an out-of-memory error in a worker later.
Priority buys no memory: it orders time on the device (the scheduler), not space.

Pure: GPU sizes come in (from `devices.probe()` through `devices.visible_gpus`, or a test).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

CONTEXT_MB = 700.0        # one CUDA context per process (0.5-0.7 GiB on an H100, MODELS.md)
MARGIN_PCT = 5.0          # of the card: fragmentation, driver growth, other programs
MARGIN_MIN_MB = 512.0
FLOOR_MB = 256.0
# engines whose memory is bounded by how many layers they offload (engines/gguf_fit.py),
# not by torch's allocator fraction
LAYER_CAPPED_ENGINES = frozenset({"llama_cpp"})


class PlanError(ValueError):
    """A plan that cannot fit its card; the message names every number that went into it."""


@dataclass(frozen=True)
class WorkerBudget:
    domain: str
    worker: int
    gpu: int             # the domain's cuda:N
    budget_mb: float     # what the worker's model, activations and caches may take
    fraction: float      # budget / card total: for set_per_process_memory_fraction
    cap: str             # how the engine keeps to it: "fraction" (torch) or "layers" (GGUF)


@dataclass
class GpuPlan:
    index: int
    total_mb: float
    processes: int
    context_mb: float    # all its worker processes' contexts together
    margin_mb: float
    shares_pct: dict[str, float] = field(default_factory=dict)
    budgets_mb: float = 0.0

    @property
    def free_mb(self) -> float:
        return self.total_mb - self.context_mb - self.margin_mb - self.budgets_mb


@dataclass
class VramPlan:
    workers: dict[tuple[str, int], WorkerBudget] = field(default_factory=dict)
    gpus: dict[int, GpuPlan] = field(default_factory=dict)

    def budget(self, domain: str, worker: int) -> WorkerBudget | None:
        """A local worker's budget; None for one on the CPU (or a machine without GPU)."""
        return self.workers.get((domain, worker))


def domain_gpu(device: str, have_gpus: bool) -> int | None:
    """Which GPU a domain's workers use: "auto" falls back to the CPU without GPUs."""
    if device == "cpu" or (device == "auto" and not have_gpus):
        return None
    if device.startswith("cuda:"):
        return int(device[5:])
    return 0


def plan(gpus: list[dict[str, Any]], domains: dict[str, dict[str, Any]],
         allocation: dict[str, float], *, context_mb: float = CONTEXT_MB,
         margin_pct: float = MARGIN_PCT, margin_min_mb: float = MARGIN_MIN_MB,
         floor_mb: float = FLOOR_MB) -> VramPlan:
    """The budgets. `gpus`: [{"index": cuda:N, "total_mb"}]; `domains`: name -> {device,
    kind, workers, engine?, share_pct?}; `allocation`: kind -> percent (gpu_allocation)."""
    sizes = {int(g["index"]): float(g["total_mb"]) for g in gpus}
    on_gpu: dict[int, list[str]] = {}
    for name, d in domains.items():
        index = domain_gpu(d["device"], bool(sizes))
        if index is None or not d.get("workers", 1):
            continue
        if index not in sizes:
            # no probe (no GPU, no NVML): nothing to size, the workers fall back as before
            if not sizes:
                continue
            raise PlanError(f"domains.{name}.device = {d['device']!r}: no such GPU; the "
                            f"daemon sees cuda:{', cuda:'.join(map(str, sorted(sizes)))}")
        on_gpu.setdefault(index, []).append(name)
    out = VramPlan()
    for index, names in sorted(on_gpu.items()):
        gp = _plan_gpu(index, sizes[index], {n: domains[n] for n in names}, allocation,
                       context_mb, _margin(sizes[index], margin_pct, margin_min_mb), floor_mb)
        out.gpus[index] = gp
        for name in names:
            d = domains[name]
            workers = d.get("workers", 1)
            each = _mb(gp.shares_pct[name] / 100 * _usable(gp) / workers)
            for w in range(workers):
                out.workers[(name, w)] = WorkerBudget(
                    name, w, index, each, each / gp.total_mb,
                    "layers" if d.get("engine") in LAYER_CAPPED_ENGINES else "fraction")
            gp.budgets_mb += each * workers
    return out


def _margin(total: float, pct: float, min_mb: float) -> float:
    return float(math.ceil(max(min_mb, total * pct / 100)))  # whole MB, rounded up


def _usable(gp: GpuPlan) -> float:
    return gp.total_mb - gp.context_mb - gp.margin_mb


def _mb(v: float) -> float:
    return float(int(v))  # whole MB, rounded down: rounding never lifts a sum over the card


def _plan_gpu(index: int, total: float, domains: dict[str, dict[str, Any]],
              allocation: dict[str, float], context_mb: float, margin: float,
              floor_mb: float) -> GpuPlan:
    processes = sum(d.get("workers", 1) for d in domains.values())
    gp = GpuPlan(index, total, processes, processes * context_mb, margin)
    gp.shares_pct = _shares(index, domains, allocation)
    usable = _usable(gp)
    asks = [(n, gp.shares_pct[n], d.get("workers", 1)) for n, d in domains.items()]
    head = (f"GPU cuda:{index} ({total:.0f} MB): {processes} worker process(es) x "
            f"{context_mb:.0f} MB CUDA context + {margin:.0f} MB margin leave {usable:.0f} MB; "
            + "; ".join(f"{n} asks {p:g} % = {p / 100 * usable:.0f} MB over {w} worker(s)"
                        for n, p, w in asks))
    total_pct = sum(gp.shares_pct.values())
    if total_pct > 100:
        raise PlanError(f"{head}: shares sum to {total_pct:g} %, over 100 %")
    if usable <= 0:
        raise PlanError(f"{head}: the reserves alone exceed the card")
    low = [f"{n} ({p / 100 * usable / w:.0f} MB each)" for n, p, w in asks
           if p / 100 * usable / w < floor_mb]
    if low:
        raise PlanError(f"{head}: under the {floor_mb:.0f} MB floor per worker: "
                        f"{', '.join(low)}; give fewer workers, a larger share, or the CPU")
    return gp


def _shares(index: int, domains: dict[str, dict[str, Any]],
            allocation: dict[str, float]) -> dict[str, float]:
    """Each domain's percent of the GPU's usable memory (the rules in the module doc)."""
    shares: dict[str, float] = {}
    by_kind: dict[str, list[str]] = {}
    for name, d in domains.items():
        if d.get("share_pct") is not None:
            if d["share_pct"] <= 0:
                raise PlanError(f"GPU cuda:{index}: {name} has a share of {d['share_pct']:g} %; "
                                f"run it on the CPU instead")
            shares[name] = float(d["share_pct"])
        else:
            by_kind.setdefault(d["kind"], []).append(name)
    for kind, names in by_kind.items():
        pct = allocation.get(kind)
        if pct is None:
            if len(domains) > 1:
                raise PlanError(
                    f"GPU cuda:{index}: {', '.join(names)} (kind {kind!r}) has no "
                    f"gpu_allocation and shares the card with "
                    f"{', '.join(n for n in domains if n not in names)}; give it an explicit "
                    f"share, or run it on the CPU")
            pct = 100.0
        if pct <= 0:
            raise PlanError(f"GPU cuda:{index}: {', '.join(names)} would get 0 % of the card "
                            f"(gpu_allocation.{kind} = {pct:g}); run it on the CPU or give it "
                            f"a share")
        for name in names:
            shares[name] = float(pct) / len(names)
    return shares


def describe(p: VramPlan) -> list[str]:
    """One log line per GPU, for the daemon's start-up log and `status`."""
    lines = []
    for gp in p.gpus.values():
        per = ", ".join(f"{b.domain}#{b.worker} {b.budget_mb:.0f} MB ({b.fraction:.3f})"
                        for b in p.workers.values() if b.gpu == gp.index)
        lines.append(f"cuda:{gp.index} {gp.total_mb:.0f} MB: contexts {gp.context_mb:.0f}, "
                     f"margin {gp.margin_mb:.0f}, budgets {gp.budgets_mb:.0f}, free "
                     f"{gp.free_mb:.0f} MB; {per}")
    return lines


def plan_for(cfg: dict[str, Any], gpus: list[dict[str, Any]]) -> VramPlan:
    """The plan for a daemon's configuration (its local workers) on the GPUs it sees."""
    res = cfg["resources"]
    domains = {name: {**d, "share_pct": d.get("gpu_percentage") or None}
               for name, d in cfg["domains"].items()}
    return plan(gpus, domains, res["gpu_allocation"], context_mb=res["gpu_context_mb"],
                margin_pct=res["gpu_margin_pct"], margin_min_mb=res["gpu_margin_min_mb"],
                floor_mb=res["gpu_min_worker_mb"])
