"""Devices: what a domain's `device` string means on this machine, and its share of a GPU.

Every other module asks here: the supervisor (which GPU a worker may see, its memory share),
the scheduler's preemption plan (which domains contend for one device), `status` (the GPU
inventory) and the torch engines inside workers (device, dtype, memory cap). NVML is a thin
driver binding, not a model library, so the daemon may probe with it; torch is only ever
passed in by a worker that already imported it.
"""
from __future__ import annotations

import os
from typing import Any


def gpu_index(device: str) -> int | None:
    """The GPU a device string names, among the daemon's visible GPUs; None for CPU."""
    if device == "cpu":
        return None
    if device.startswith("cuda:"):
        return int(device[5:])
    return 0  # "cuda" and "auto" take the first GPU; a worker without one falls back to CPU


class DeviceError(ValueError):
    """A domain names a GPU its daemon was not given (CUDA_VISIBLE_DEVICES)."""


def inherited_visible(inherited: str | None = None) -> list[str] | None:
    """The GPUs the daemon itself may use, as CUDA_VISIBLE_DEVICES entries (indices, GPU-
    UUIDs or MIG- ids); None when it inherited no restriction, [] when it was given none.
    Parsed as CUDA does: entries up to the first malformed one (so "-1" hides every GPU)."""
    if inherited is None:
        inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is None:
        return None
    out = []
    for entry in inherited.split(","):
        entry = entry.strip()
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        out.append(entry)
    return out


def visible_entry(device: str, inherited: str | None = None) -> str | None:
    """The CUDA_VISIBLE_DEVICES entry a domain's device means: `cuda:N` is the daemon's N-th
    visible GPU, not a physical index, so a daemon started on "3,5" gives cuda:1 GPU 5.
    None: no GPU (a CPU domain, or a daemon given no GPU: its workers fall back to the CPU as
    on a machine without one)."""
    index = gpu_index(device)
    if index is None:
        return None
    visible = inherited_visible(inherited)
    if visible is None:
        return str(index)
    if not visible:
        return None
    if index >= len(visible):
        raise DeviceError(f"device {device!r} is GPU {index} of the daemon's visible GPUs, but "
                          f"it was started with CUDA_VISIBLE_DEVICES={','.join(visible)!r} "
                          f"({len(visible)} GPU{'s' if len(visible) != 1 else ''}: cuda:0.."
                          f"cuda:{len(visible) - 1})")
    return visible[index]


def visible_devices_env(device: str, inherited: str | None = None) -> dict[str, str]:
    """Hide the GPUs a domain must not touch; set before torch is ever imported. `inherited`
    is the daemon's own CUDA_VISIBLE_DEVICES (default: its environment). PCI bus order makes
    CUDA's indices agree with NVML's (`probe`), which the VRAM plan sizes cards by."""
    entry = visible_entry(device, inherited)
    return {"CUDA_VISIBLE_DEVICES": "" if entry is None else entry,
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def visible_device_errors(domains: dict[str, dict[str, Any]],
                          inherited: str | None = None) -> list[str]:
    """Check every domain's device against the inherited GPUs at start, so a bad index is a
    configuration error, not a worker that fails to spawn."""
    errors = []
    for name, d in domains.items():
        try:
            visible_entry(d["device"], inherited)
        except DeviceError as exc:
            errors.append(f"domains.{name}.device: {exc}")
    return errors


def visible_gpus(gpus: list[dict[str, Any]], inherited: str | None = None) -> list[dict[str, Any]]:
    """`probe()`'s GPUs (NVML, physical order) as the daemon's domains number them: the
    inherited CUDA_VISIBLE_DEVICES picks and orders them, each entry's "index" becomes its
    cuda:N and "physical" keeps NVML's. A MIG instance is left out: NVML sizes its parent."""
    visible = inherited_visible(inherited)
    if visible is None:
        return [{**g, "physical": g["index"]} for g in gpus]
    out = []
    for n, entry in enumerate(visible):
        match = [g for g in gpus if (str(g["index"]) == entry if entry.isdigit()
                                     else g.get("uuid") == entry)]
        if match:
            out.append({**match[0], "index": n, "physical": match[0]["index"]})
    return out


def engine_device(device: str) -> str:
    """The device an engine is told: the one visible GPU is always index 0 inside a worker."""
    return device if device in ("cpu", "auto") else "cuda"


def memory_share(cfg: dict[str, Any], domain: dict[str, Any]) -> float:
    """Fraction of a GPU's memory a domain's process may take (gpu_allocation by kind)."""
    pct = cfg["resources"]["gpu_allocation"].get(domain["kind"])
    return (pct if pct is not None else 100) / 100.0


def shares_device(batch: dict[str, Any], realtime: dict[str, Any], batch_cpus: list[int],
                  realtime_cpus: list[int], *, gpus: int, across_cores: bool) -> bool:
    """Whether two domains contend for the same device."""
    b_gpu = gpu_index(batch["device"]) if gpus else None
    r_gpu = gpu_index(realtime["device"]) if gpus else None
    if b_gpu is not None and r_gpu is not None:
        return b_gpu == r_gpu
    if b_gpu is not None or r_gpu is not None:
        return False  # one on a GPU, the other on CPU cores
    if across_cores:
        return True   # cores share caches and memory bandwidth
    return bool(set(batch_cpus or range(1024)) & set(realtime_cpus or range(1024)))


def probe() -> list[dict[str, Any]]:
    """The machine's GPUs from NVML; empty on a machine without one (or without the driver)."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # no package, no driver, no GPU: a CPU-only machine
        return []
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            out.append({"index": i, "name": _text(name),
                        "uuid": _text(pynvml.nvmlDeviceGetUUID(h)),
                        "used_mb": mem.used / 2**20, "total_mb": mem.total / 2**20,
                        "compute_mode": _compute_mode(pynvml, h),
                        "processes": _process_memory(pynvml, h)})
    except Exception:
        pass
    return out


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


COMPUTE_MODES = {0: "default", 1: "exclusive_thread", 2: "prohibited", 3: "exclusive_process"}


def _compute_mode(pynvml: Any, handle: Any) -> str | None:
    """Whether the card admits several processes (what MPS needs: `gpu_compute.decide`)."""
    try:
        return COMPUTE_MODES.get(pynvml.nvmlDeviceGetComputeMode(handle), "unknown")
    except Exception:
        return None


def _process_memory(pynvml: Any, handle: Any) -> dict[int, float]:
    """MB of this GPU's memory held by each process (what `status` shows per worker). The
    driver may withhold it (no permission, MIG): then nothing."""
    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        return {}
    return {p.pid: p.usedGpuMemory / 2**20 for p in procs
            if getattr(p, "usedGpuMemory", None) is not None}


def vram_mb(gpus: list[dict[str, Any]], pid: int | None) -> float | None:
    """GPU memory a process holds over all GPUs; None where NVML reports nothing for it."""
    used = [g["processes"][pid] for g in gpus if pid in g.get("processes", {})]
    return round(sum(used), 1) if used else None


def place_torch(torch: Any, device: str, threads: int, share: float,
                dtype_name: str) -> tuple[str, Any]:
    """Inside a worker: pick the torch device and dtype (fp16 on CUDA, fp32 on CPU unless
    configured) and cap this process at its domain's share of the GPU's memory."""
    torch.set_num_threads(threads)
    cuda = device in ("cuda", "auto") and torch.cuda.is_available()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        dtype_name, torch.float16 if cuda else torch.float32)
    if cuda:
        # CUDA_VISIBLE_DEVICES already narrowed the process to its domain's GPU: index 0
        torch.cuda.set_per_process_memory_fraction(share, 0)
    return ("cuda" if cuda else "cpu"), dtype
