"""The worker loop of a batching engine: several jobs at once, advanced step by step.

Between two steps the loop reads every message that arrived (new jobs join the next step;
cancel, pause and resume set flags the engine reads), then runs one step and reports the
jobs that ended. With nothing to step it blocks on the socket, so an idle worker costs no
CPU; an engine idle past `keep_alive_s` unloads its model, as in the one-job loop.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import zmq

from . import zmq_raw
from .engines.base import BatchEngine, Cancelled, JobControl, JobError
from .protocol import HARD_FRAME_LIMIT, Code, WorkerMsg, pack, unpack
from .worker import is_gpu_oom

RCVTIMEO, NOBLOCK = int(zmq.RCVTIMEO), int(zmq.NOBLOCK)


def failure(task_id: str, exc: BaseException, results_dir: str,
            budget_mb: float | None = None) -> dict[str, Any]:
    """The `failed` message for a job an exception ended."""
    from .worker import gpu_oom_failure, os_failure
    if is_gpu_oom(exc):
        return {"op": WorkerMsg.FAILED, "task_id": task_id,
                **gpu_oom_failure(exc, budget_mb)}
    if isinstance(exc, Cancelled):
        return {"op": WorkerMsg.FAILED, "task_id": task_id, "code": Code.CANCELLED,
                "message": "cancelled"}
    if isinstance(exc, JobError):
        return {"op": WorkerMsg.FAILED, "task_id": task_id, "code": exc.code,
                "message": exc.message}
    if isinstance(exc, OSError):
        return {"op": WorkerMsg.FAILED, "task_id": task_id, **os_failure(exc, results_dir)}
    return {"op": WorkerMsg.FAILED, "task_id": task_id, "code": Code.ENGINE_ERROR,
            "message": f"{type(exc).__name__}: {exc}"}


class BatchLoop:
    def __init__(self, worker: Any, engine: BatchEngine, reload: Any):
        self.worker, self.engine, self.reload = worker, engine, reload
        self.sock = worker.sock
        self.controls: dict[str, JobControl] = {}
        self.results_dir = os.path.join(worker.spec["state_dir"], "results")
        self.loaded = True
        self.budget_mb = worker.spec.get("gpu_budget_mb")

    def serve(self) -> int:
        keep_alive = self.worker.spec["domain"].get("keep_alive_s") or None
        sock, rcvtimeo = self.sock, None
        while not self.worker.stopping:
            if self.engine.pending():
                frames = self._drain()
            else:
                # nothing to step: block for the next message (with a timeout while an
                # unload is due)
                idle = self.loaded and keep_alive and not self.controls
                wait = min(round(keep_alive * 1000), 2**31 - 1) if idle else -1
                if wait != rcvtimeo:
                    sock.setsockopt(RCVTIMEO, wait)
                    rcvtimeo = wait
                try:
                    frames = [sock.recv()]
                except zmq.Again:
                    self.engine.unload()  # idle past keep_alive_s: give the memory back
                    self.loaded = False
                    self.worker.send({"op": WorkerMsg.UNLOADED})
                    continue
                frames += self._drain()
            for frame in frames:
                self._handle(unpack(frame, max_bytes=HARD_FRAME_LIMIT))
            if self.engine.pending():
                self._step()
        for control in self.controls.values():  # shutdown: nothing of ours outlives it
            control.cancel()
        return 0

    def _drain(self) -> list[bytes]:
        frames = []
        while True:
            try:
                frames.append(self.sock.recv(NOBLOCK))
            except zmq.Again:
                return frames

    def _handle(self, msg: dict[str, Any]) -> None:
        op, task_id = msg.get("op"), msg.get("task_id")
        if op == WorkerMsg.SHUTDOWN:
            self.worker.stopping = True
        elif op == WorkerMsg.RUN:
            self._add(task_id, msg["params"], msg.get("priority", "normal"))
        elif (control := self.controls.get(task_id)) is not None:
            if op == WorkerMsg.CANCEL:
                control.cancel()
            elif op == WorkerMsg.PAUSE:
                control.pause()
            elif op == WorkerMsg.RESUME:
                control.resume()

    def _add(self, task_id: str, params: dict[str, Any], priority: str) -> None:
        if not self.loaded:
            try:
                self.engine = self.reload()
                self.loaded = True
                self.worker.send({"op": WorkerMsg.RELOADED})
            except Exception as exc:
                self.worker.send({"op": WorkerMsg.FAILED, "task_id": task_id,
                                  "code": Code.ENGINE_UNAVAILABLE,
                                  "message": f"reloading the engine failed: {exc}"})
                return
        sock = self.sock

        def emit(event: str, fields: dict[str, Any]) -> None:
            zmq_raw.send(sock, pack({"op": WorkerMsg.PARTIAL, "task_id": task_id,
                                     "event": event, **fields}), 0)

        control = JobControl(task_id, emit, priority=priority)
        try:
            self.engine.add(params, control)
        except Exception as exc:  # refused (context_overflow, ...): the others go on
            if not isinstance(exc, (JobError, Cancelled)):
                traceback.print_exc(file=sys.stderr)
            self.worker.send(failure(task_id, exc, self.results_dir, self.budget_mb),
                             cache=True)
            return
        self.controls[task_id] = control

    def _step(self) -> None:
        # a step that raises ends the process: the engine's state is unknown, and the
        # daemon retries every job the worker held, as for any worker crash
        for control, outcome in self.engine.step():
            self.controls.pop(control.task_id, None)
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, (JobError, Cancelled, OSError)) and \
                        not is_gpu_oom(outcome):
                    print("".join(traceback.format_exception(outcome)), file=sys.stderr)
                reply = failure(control.task_id, outcome, self.results_dir, self.budget_mb)
                if is_gpu_oom(outcome):
                    self.engine.release_memory()
            else:
                reply = {"op": WorkerMsg.DONE, "task_id": control.task_id, "result": outcome}
            self.worker.send(reply, cache=True)
