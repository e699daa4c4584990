"""The `null` engine: no model. For tests and benchmarks only; never a configured default.

It emits `steps` progress events with `delay_ms` between them, and can be asked to hold
memory (`alloc_mb`), block without checkpoints (`block_ms`), crash the worker (`crash`, or
`crash_signal` at `crash_at_step`), run out of GPU memory (`oom_mb`), write a large result (`write_mb`) or fail with a code
(`fail`), so the daemon's supervision paths can be exercised with real processes.
"""
from __future__ import annotations

import errno
import os
import time
from typing import Any

from .base import Engine, EngineUnavailable, JobControl, JobError


def _discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class NullEngine(Engine):
    kind = "null"

    def load(self) -> None:
        if self.domain.get("crash_on_load"):
            os._exit(71)  # a worker that dies before it is ready, every time
        if self.domain.get("load_ms"):
            time.sleep(self.domain["load_ms"] / 1000.0)
        if self.domain.get("fail_loads"):
            # the first `fail_loads` loads of the domain fail, counted across worker restarts
            # in a file, as a model that is not there yet (or a busy device) would
            path = os.path.join(self.ctx.state_dir, f"null-loads-{self.ctx.domain_name}")
            with open(path, "a+") as f:
                f.write("x")
                f.seek(0)
                tries = len(f.read())
            if tries <= self.domain["fail_loads"]:
                raise EngineUnavailable(f"load {tries} of the domain fails on purpose")

    def run(self, params: dict[str, Any], job: JobControl) -> dict[str, Any]:
        hold = None
        if params["alloc_mb"]:
            hold = bytearray(params["alloc_mb"] * 1024 * 1024)
            for i in range(0, len(hold), 4096):  # touch every page so it counts in RSS
                hold[i] = 1
        if params["crash"]:
            os._exit(70)
        if params["oom_mb"]:
            # torch's own error type, as a GPU engine raises it: the worker's OOM handling is
            # tested without a GPU
            import torch
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {params['oom_mb']} MiB")
        if params["block_ms"]:
            time.sleep(params["block_ms"] / 1000.0)  # no checkpoint: cancels go unheard
        steps, delay = params["steps"], params["delay_ms"] / 1000.0
        for step in range(1, steps + 1):
            job.checkpoint()
            if delay:
                time.sleep(delay)
            if step == params["crash_at_step"] and params["crash_signal"]:
                os.kill(os.getpid(), params["crash_signal"])
            job.emit("progress", step=step, total=steps, progress=step / steps)
        job.checkpoint()
        if params["fail"]:
            raise JobError(params["fail"], "failure requested by the job's parameters")
        del hold
        if params["record"]:  # an execution log, so tests can count how often a job ran
            with open(params["record"], "a") as f:
                f.write(job.task_id + "\n")
        out: dict[str, Any] = {"steps": steps}
        if params["write_file"] or params["write_mb"]:  # a result file, as engines leave one
            path = os.path.join(self.ctx.results_dir, f"{job.task_id}.bin")
            try:
                with open(path, "wb") as f:
                    f.write(b"null result\n")
                    for _ in range(params["write_mb"]):
                        if params["disk_full"]:
                            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                        f.write(bytes(1 << 20))
            except OSError:
                _discard(path)  # no half-written result is left behind
                raise
            out["result_path"] = path
            out["size_bytes"] = os.path.getsize(path)
        if "text" in params:
            out["result"] = params["text"]
        return out
