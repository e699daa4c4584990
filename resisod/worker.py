"""A worker process: one slot of a resource domain.

The main thread owns the DEALER socket to the daemon (heartbeats, run/cancel/pause, events);
the engine thread loads the model and runs jobs. Splitting them keeps heartbeats flowing
while a model loads or a long step computes, so only a truly hung or dead worker goes silent.

Started by the supervisor as `python -m resisod.worker` with its spec in RESISO_WORKER_SPEC.
"""
from __future__ import annotations

import ctypes
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any

import zmq

from . import isolation
from .protocol import Code, WorkerMsg, pack, unpack, HARD_FRAME_LIMIT

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # a worker must never outlive its daemon (kill -9 of resisod included)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() == 1:
        os._exit(0)


class Worker:
    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.hb = spec["heartbeat_ms"] / 1000.0
        self.ctx = zmq.Context.instance()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.IDENTITY, spec["identity"].encode())
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
        self.dealer.connect(spec["endpoint"])
        self.pipe = self.ctx.socket(zmq.PAIR)
        self.pipe.bind(f"inproc://engine-{id(self)}")
        self.jobs: queue.Queue = queue.Queue()
        self.control = None          # JobControl of the running job
        self.control_lock = threading.Lock()
        self.stopping = False

    # --- main thread: I/O --------------------------------------------------------------------
    def serve(self) -> int:
        engine_thread = threading.Thread(target=self._engine_main, name="engine", daemon=True)
        self._send({"op": WorkerMsg.HELLO.value, "pid": os.getpid()})
        engine_thread.start()
        poller = zmq.Poller()
        poller.register(self.dealer, zmq.POLLIN)
        poller.register(self.pipe, zmq.POLLIN)
        last_heard = last_sent = time.monotonic()
        while not self.stopping:
            timeout = max(0.0, last_sent + self.hb - time.monotonic())
            ready = dict(poller.poll(timeout * 1000))
            now = time.monotonic()
            if self.dealer in ready:
                while True:
                    try:
                        frame = self.dealer.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    last_heard = now
                    self._on_daemon(unpack(frame, max_bytes=HARD_FRAME_LIMIT))
            if self.pipe in ready:
                while True:
                    try:
                        frame = self.pipe.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.dealer.send(frame)
                    last_sent = now
            if now - last_sent >= self.hb:
                self._send({"op": WorkerMsg.HEARTBEAT.value})
                last_sent = now
            if now - last_heard > 3 * self.hb:
                return 0  # the daemon is gone; nothing of ours outlives it
        return 0

    def _send(self, msg: dict[str, Any]) -> None:
        self.dealer.send(pack(msg))

    def _on_daemon(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == WorkerMsg.RUN.value:
            self.jobs.put(msg)
        elif op in (WorkerMsg.CANCEL.value, WorkerMsg.PAUSE.value, WorkerMsg.RESUME.value):
            with self.control_lock:
                c = self.control
                if c is not None and c.task_id == msg.get("task_id"):
                    {WorkerMsg.CANCEL.value: c.cancel, WorkerMsg.PAUSE.value: c.pause,
                     WorkerMsg.RESUME.value: c.resume}[op]()
        elif op == WorkerMsg.SHUTDOWN.value:
            self.stopping = True
            with self.control_lock:
                if self.control is not None:
                    self.control.cancel()

    # --- engine thread: compute --------------------------------------------------------------
    def _engine_main(self) -> None:
        from .engines import EngineContext, create
        from .engines.base import Cancelled, EngineUnavailable, JobControl, JobError

        out = self.ctx.socket(zmq.PAIR)
        out.connect(f"inproc://engine-{id(self)}")
        send = lambda m: out.send(pack(m))  # noqa: E731
        spec, domain = self.spec, self.spec["domain"]
        device = domain["device"]
        ctx = EngineContext(
            domain_name=spec["domain_name"], state_dir=spec["state_dir"],
            results_dir=os.path.join(spec["state_dir"], "results"),
            device="cpu" if device == "cpu" else ("auto" if device == "auto" else "cuda"),
            threads=spec["threads"], gpu_share=spec["gpu_share"])
        os.makedirs(ctx.results_dir, exist_ok=True)
        keep_alive = domain.get("keep_alive_s") or None

        def load() -> Any:
            t0 = time.monotonic()
            eng = create(domain, ctx)
            eng.load()
            send({"op": WorkerMsg.READY.value, "capacity": 1,
                  "load_ms": (time.monotonic() - t0) * 1000})
            return eng

        try:
            engine = load()
        except Exception as exc:  # the reason is shown in `resiso status`
            reason = str(exc) if isinstance(exc, EngineUnavailable) else \
                f"{type(exc).__name__}: {exc}"
            send({"op": WorkerMsg.LOAD_FAILED.value, "reason": reason})
            time.sleep(0.2)  # let the main thread flush it before the process exits
            os._exit(3)

        loaded = True
        while True:
            try:
                msg = self.jobs.get(timeout=keep_alive if loaded else None)
            except queue.Empty:
                engine.unload()
                loaded = False
                send({"op": WorkerMsg.UNLOADED.value})
                continue
            task_id = msg["task_id"]

            def emit(event: str, fields: dict[str, Any], _t=task_id) -> None:
                send({"op": WorkerMsg.PARTIAL.value, "task_id": _t, "event": event, **fields})

            control = JobControl(task_id, emit)
            with self.control_lock:
                self.control = control
            try:
                if not loaded:
                    engine = create(domain, ctx)
                    engine.load()
                    loaded = True
                result = engine.run(msg["params"], control)
                reply = {"op": WorkerMsg.DONE.value, "task_id": task_id, "result": result}
            except Cancelled:
                reply = {"op": WorkerMsg.FAILED.value, "task_id": task_id,
                         "code": Code.CANCELLED.value, "message": "cancelled"}
            except JobError as exc:
                reply = {"op": WorkerMsg.FAILED.value, "task_id": task_id,
                         "code": exc.code, "message": exc.message}
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                reply = {"op": WorkerMsg.FAILED.value, "task_id": task_id,
                         "code": Code.ENGINE_ERROR.value,
                         "message": f"{type(exc).__name__}: {exc}"}
            with self.control_lock:
                self.control = None
            send(reply)


def main() -> int:
    _die_with_parent()
    spec = json.loads(os.environ["RESISO_WORKER_SPEC"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the daemon's terminal is its own
    # isolation first: thread pools and CPU sets must be in place before any engine import
    isolation.apply_in_worker(spec["cpus"], spec["sched"])
    return Worker(spec).serve()


if __name__ == "__main__":
    sys.exit(main())
