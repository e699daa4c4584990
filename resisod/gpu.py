"""GPU inventory for `resiso status`, from NVML (nvidia-ml-py) when it finds a GPU.

NVML is a thin driver binding, not a model library: the daemon may use it.
"""
from __future__ import annotations

from typing import Any


def probe() -> list[dict[str, Any]]:
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
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                        "used_mb": mem.used / 2**20, "total_mb": mem.total / 2**20})
    except Exception:
        pass
    return out
