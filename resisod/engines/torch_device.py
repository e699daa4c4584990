"""Where a torch engine runs: device, dtype, threads and the domain's share of the GPU."""
from __future__ import annotations

from typing import Any

from .base import EngineContext


def place(torch: Any, ctx: EngineContext, dtype_name: str) -> tuple[str, Any]:
    """Pick the device and dtype (fp16 on CUDA, fp32 on CPU unless configured) and cap this
    process at the domain's share of the GPU's memory ([resources.gpu_allocation])."""
    torch.set_num_threads(ctx.threads)
    cuda = ctx.device in ("cuda", "auto") and torch.cuda.is_available()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        dtype_name, torch.float16 if cuda else torch.float32)
    if cuda:
        # CUDA_VISIBLE_DEVICES already narrowed the process to its domain's GPU: index 0
        torch.cuda.set_per_process_memory_fraction(ctx.gpu_share, 0)
    return ("cuda" if cuda else "cpu"), dtype
