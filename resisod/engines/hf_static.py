"""A lone job's decode on a static KV cache with a compiled step (the transformers engine).

Decoding one token of a small model is mostly overhead: Python walking the modules and, on
a GPU, one kernel launch per operation. A KV cache of fixed shape lets `torch.compile` trace
the step once (shapes never change, so it never recompiles per token) and, with CUDA graphs,
replay it as one launch. The engine runs a job here while it is the only one decoding; jobs
decoding together use the batched dynamic cache, and the lane's KV state moves in and out
of it as jobs join and leave.

Compiled code computes in another order than eager code, so a job's logits on the lane can
differ from the same job's in the batch in the last bits: greedy choices agree unless two
tokens are that close to a tie.
"""
from __future__ import annotations

import os
from typing import Any

CACHE_DIR = "compile-cache"


def compile_wanted(setting: str, device: str) -> bool:
    """`compile` of an llm domain: "auto" compiles on CUDA only, "on" everywhere, "off"
    never. On a CPU the plain forward is memory-bound and the compiled step was slower
    (SmolLM2-135M fp32, one thread: 9.7 tok/s compiled, 15 eager), so it is opt-in there."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    return device == "cuda"


def compile_cache_dir(state_dir: str) -> str:
    """Inductor's (and Triton's) caches under the daemon's state dir, so a restarted worker
    loads the compiled step instead of compiling it again."""
    return os.path.join(state_dir, CACHE_DIR)


def use_cache_dir(torch: Any, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(path, "triton"))
    import torch._inductor.config as inductor
    inductor.fx_graph_cache = True


class StaticLane:
    """One sequence's KV state in a `StaticCache` of `max_len` tokens, decoded one token at a
    time by a compiled forward of fixed shape. `owner` is the job it holds (None: free)."""

    def __init__(self, torch: Any, model: Any, device: str, max_len: int) -> None:
        from transformers import StaticCache
        self.torch, self.model, self.device = torch, model, device
        self.max_len = max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.owner: Any = None
        self.length = 0
        mode = "reduce-overhead" if device == "cuda" else None  # CUDA graphs on a GPU
        self._step = torch.compile(self._forward, mode=mode, dynamic=False)

    def _forward(self, ids: Any, positions: Any) -> Any:
        out = self.model(input_ids=ids, position_ids=positions, past_key_values=self.cache,
                         use_cache=True)
        return out.logits[:, -1, :]

    def load(self, owner: Any, kv: Any, length: int) -> None:
        """Take a sequence's dynamic KV state (`length` tokens)."""
        for layer, own in zip(self.cache.layers, kv.layers):
            keys, values = own.keys[:, :, :length], own.values[:, :, :length]
            if not layer.is_initialized:
                layer.lazy_initialization(keys, values)
            layer.keys[:, :, :length].copy_(keys)
            layer.values[:, :, :length].copy_(values)
            layer.cumulative_length.fill_(length)
        self.owner, self.length = owner, length

    def take(self) -> Any:
        """Give the held sequence's KV state back as a dynamic cache, and free the lane."""
        from transformers import DynamicCache
        n = self.length
        kv = DynamicCache(ddp_cache_data=[
            (layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone())
            for layer in self.cache.layers])
        self.owner, self.length = None, 0
        return kv

    def release(self) -> None:
        self.owner, self.length = None, 0

    def decode(self, token: int, position: int) -> Any:
        """The next token's logits ([1, vocab]) after `token` at `position`."""
        torch = self.torch
        if self.length >= self.max_len:
            raise RuntimeError("the static cache is full")
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        positions = torch.tensor([[position]], dtype=torch.long, device=self.device)
        if self.device == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        logits = self._step(ids, positions)
        self.length += 1
        # a CUDA graph's output is overwritten by its next replay
        return logits.clone() if self.device == "cuda" else logits
