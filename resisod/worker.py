"""A worker process: one slot of a resource domain.

The main thread owns the job socket: it loads the engine, receives `run`, and the engine
emits its events straight onto that socket (no thread hand-off on the hot path). Control
messages (cancel / pause / resume) are read at the engine's step boundaries. A second thread
with a socket of its own exchanges heartbeats with the daemon, so heartbeats keep flowing
while a model loads or a long step computes; a worker that stops (SIGSTOP, a hang holding
the interpreter) goes silent and is replaced.

Started by the supervisor as `python -m resisod.worker` with its spec in RESISO_WORKER_SPEC,
or on another machine by `resiso-worker` (`remote_worker.py`), whose spec adds `curve` (the
keys for a CURVE connection over TCP) and which has said hello before `serve`.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

import zmq

from . import devices, isolation, zmq_raw
from .engines.base import Cancelled, JobControl, JobError  # the interface only: no model code
from .protocol import (HARD_FRAME_LIMIT, HEARTBEAT_ECHO, HEARTBEAT_SUFFIX, HEARTBEAT_TIME, Code,
                       WorkerMsg, pack, unpack)

PR_SET_PDEATHSIG = 1
DAEMON_SILENCE_S = 10.0
# plain ints: pyzmq's enum constants cost an enum lookup per call at every token
RCVTIMEO = int(zmq.RCVTIMEO)
# How often a running job's checkpoints look for control messages (cancel, pause). Looking
# is a system call inside libzmq; an engine checkpointing faster than this (a short job's
# only checkpoint, a fast token loop) skips it, and a cancel or pause waits at most this.
CONTROL_CHECK_S = 0.001


def _die_with_parent() -> None:
    # a worker must never outlive its daemon (kill -9 of resisod included)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() == 1:
        os._exit(0)


def _socket(ctx: zmq.Context, identity: bytes, endpoint: str,
            curve: dict[str, str] | None = None, connect: bool = True) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, identity)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
    if curve:  # a remote worker: encrypted, and let in by the daemon only for a known key
        s.curve_serverkey = curve["server"].encode()
        s.curve_publickey = curve["public"].encode()
        s.curve_secretkey = curve["secret"].encode()
    if connect:
        s.connect(endpoint)
    return s


def heartbeat_loop(ctx: zmq.Context, identity: bytes, endpoint: str, interval: float,
                   curve: dict[str, str] | None = None, gone_code: int = 0) -> None:
    """Beat every interval; exit the process once the daemon has been silent for
    `daemon_silence_s(interval)`. A stamped beat (remote workers) is echoed at once, so the
    daemon measures the round trip without this thread's interval in it."""
    s = _socket(ctx, identity + HEARTBEAT_SUFFIX, endpoint, curve)
    beat = pack({"op": WorkerMsg.HEARTBEAT})
    last_heard = time.monotonic()
    while True:
        s.send(beat)
        deadline = time.monotonic() + interval
        while (left := deadline - time.monotonic()) > 0:
            if s.poll(left * 1000):
                frame = s.recv()
                last_heard = time.monotonic()
                if len(frame) > len(beat):
                    stamp = unpack(frame, max_bytes=4096).get(HEARTBEAT_TIME)
                    if stamp is not None:
                        s.send(pack({"op": WorkerMsg.HEARTBEAT, HEARTBEAT_ECHO: stamp}))
        if time.monotonic() - last_heard > daemon_silence_s(interval):
            os._exit(gone_code)  # the daemon is gone; nothing of ours outlives it


def daemon_silence_s(interval: float) -> float:
    """How long a worker waits for a silent daemon before it exits. A daemon that dies takes
    its local workers with it at once (PR_SET_PDEATHSIG); this limit is for a daemon that
    stalls, and it is two orders of magnitude above the daemon's stall budget (100 ms), so a
    slow loop iteration never costs the machine its loaded models."""
    return max(3 * interval, DAEMON_SILENCE_S)


class Worker:
    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.ctx = zmq.Context.instance()
        self.identity = spec["identity"].encode()
        self.curve = spec.get("curve")
        # a remote worker connects once it watches the handshake (remote_worker.dial)
        self.sock = _socket(self.ctx, self.identity, spec["endpoint"], self.curve,
                            connect=not spec.get("remote"))
        self.next_control_check = 0.0   # monotonic time a checkpoint next looks at the socket
        self.cache: Any = None          # the shared result cache, reported with each result
        self.stopping = False
        self.greeted = False            # a remote worker says hello before it has a spec

    def send(self, msg: dict[str, Any], *, cache: bool = False) -> None:
        """`cache`: the shared cache's breaker and counters ride along, on messages the daemon
        reads anyway (ready, done, failed): its state changes only while this worker runs a
        job."""
        if cache and self.cache is not None:
            msg["cache"] = self.cache.view()
        zmq_raw.send(self.sock, pack(msg), 0)

    def start_heartbeat(self) -> None:
        # a remote worker's daemon going silent is a failure its service manager restarts
        # it after (EX_TEMPFAIL); a local worker ends quietly with its daemon
        threading.Thread(target=heartbeat_loop, daemon=True, name="heartbeat", args=(
            self.ctx, self.identity, self.spec["endpoint"],
            self.spec["heartbeat_ms"] / 1000.0, self.curve,
            75 if self.spec.get("remote") else 0)).start()

    def serve(self) -> int:
        from .engines import EngineContext, create
        from .batch_worker import BatchLoop
        from .engines.base import BatchEngine, EngineUnavailable

        if not self.greeted:
            self.send({"op": WorkerMsg.HELLO, "pid": os.getpid()})
        spec, domain = self.spec, self.spec["domain"]
        ectx = EngineContext(
            domain_name=spec["domain_name"], state_dir=spec["state_dir"],
            results_dir=os.path.join(spec["state_dir"], "results"),
            device=devices.engine_device(domain["device"]),
            threads=spec["threads"], gpu_share=spec["gpu_share"],
            gpu_budget_mb=spec.get("gpu_budget_mb"))
        os.makedirs(ectx.results_dir, exist_ok=True)
        try:
            t0 = time.monotonic()
            from .engines.result_cache import open_shared
            self.cache = ectx.shared_cache = open_shared(spec["cache"], domain["kind"])
            engine = create(domain, ectx)
            engine.load()
            warm_up = engine.warm_up()
            batched = isinstance(engine, BatchEngine)
        except Exception as exc:  # the reason is shown in `resiso status`
            reason = str(exc) if isinstance(exc, EngineUnavailable) else \
                f"{type(exc).__name__}: {exc}"
            self.send({"op": WorkerMsg.LOAD_FAILED, "reason": reason})
            time.sleep(0.1)  # let the frame leave before the process ends
            return 3
        self.send({"op": WorkerMsg.READY, "capacity": engine.capacity if batched else 1,
                   "warm_up": warm_up, "load_ms": (time.monotonic() - t0) * 1000,
                   "runs_on": engine.runs_on()}, cache=True)
        if batched:
            def reload() -> Any:
                fresh = create(domain, ectx)
                fresh.load()
                return fresh
            return BatchLoop(self, engine, reload).serve()
        keep_alive = domain.get("keep_alive_s") or None
        loaded = True
        sock, rcvtimeo = self.sock, -1
        while not self.stopping:
            # a blocking recv (with a timeout while an unload is due): one wake-up per job
            wait = min(round(keep_alive * 1000), 2**31 - 1) if (loaded and keep_alive) else -1
            if wait != rcvtimeo:
                sock.setsockopt(RCVTIMEO, wait)
                rcvtimeo = wait
            try:
                frame = sock.recv()
            except zmq.Again:
                engine.unload()  # idle past keep_alive_s: give the memory back
                loaded = False
                self.send({"op": WorkerMsg.UNLOADED})
                continue
            msg = unpack(frame, max_bytes=HARD_FRAME_LIMIT)
            op = msg.get("op")
            if op == WorkerMsg.SHUTDOWN:
                break
            if op != WorkerMsg.RUN:
                continue  # cancel/pause for a job that already ended
            if not loaded:
                try:
                    engine = create(domain, ectx)
                    engine.load()
                    loaded = True
                    self.send({"op": WorkerMsg.RELOADED})
                except Exception as exc:
                    self.send({"op": WorkerMsg.FAILED, "task_id": msg["task_id"],
                               "code": Code.ENGINE_UNAVAILABLE,
                               "message": f"reloading the engine failed: {exc}"})
                    continue
            self.run_job(engine, msg)
        return 0

    def run_job(self, engine: Any, msg: dict[str, Any]) -> None:
        task_id = msg["task_id"]
        sock = self.sock

        def emit(event: str, fields: dict[str, Any]) -> None:
            zmq_raw.send(sock, pack({"op": WorkerMsg.PARTIAL, "task_id": task_id,
                                     "event": event, **fields}), 0)

        control = JobControl(task_id, emit, self.poll_control)
        self.next_control_check = time.monotonic() + CONTROL_CHECK_S
        try:
            result = engine.run(msg["params"], control)
            reply = {"op": WorkerMsg.DONE, "task_id": task_id, "result": result}
        except Cancelled:
            reply = {"op": WorkerMsg.FAILED, "task_id": task_id,
                     "code": Code.CANCELLED, "message": "cancelled"}
        except JobError as exc:
            reply = {"op": WorkerMsg.FAILED, "task_id": task_id,
                     "code": exc.code, "message": exc.message}
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                traceback.print_exc(file=sys.stderr)
            reply = {"op": WorkerMsg.FAILED, "task_id": task_id,
                     **os_failure(exc, os.path.join(self.spec["state_dir"], "results"))}
        except Exception as exc:
            if is_gpu_oom(exc):
                reply = {"op": WorkerMsg.FAILED, "task_id": task_id,
                         **gpu_oom_failure(exc, self.spec.get("gpu_budget_mb"))}
                engine.release_memory()  # what the job held goes back; the next one runs
            else:
                traceback.print_exc(file=sys.stderr)
                reply = {"op": WorkerMsg.FAILED, "task_id": task_id, "code": Code.ENGINE_ERROR,
                         "message": f"{type(exc).__name__}: {exc}"}
        self.send(reply, cache=True)

    def poll_control(self, control: Any, wait: float) -> None:
        """Read control messages for the running job; wait up to `wait` s for the first."""
        sock = self.sock
        if not wait:  # the common case at every token/step
            now = time.monotonic()
            if now < self.next_control_check:
                return
            self.next_control_check = now + CONTROL_CHECK_S
            if not zmq_raw.get(sock, zmq_raw.EVENTS) & zmq_raw.POLLIN:
                return  # nothing arrived
        timeout = wait * 1000
        while sock.poll(timeout):
            timeout = 0
            msg = unpack(sock.recv(), max_bytes=HARD_FRAME_LIMIT)
            op = msg.get("op")
            if op == WorkerMsg.SHUTDOWN:
                self.stopping = True
                control.cancel()
            elif msg.get("task_id") != control.task_id:
                continue
            elif op == WorkerMsg.CANCEL:
                control.cancel()
            elif op == WorkerMsg.PAUSE:
                control.pause()
            elif op == WorkerMsg.RESUME:
                control.resume()


def is_gpu_oom(exc: BaseException) -> bool:
    """torch's CUDA out-of-memory error (torch.cuda.OutOfMemoryError, torch.OutOfMemoryError),
    told by name: the worker itself never imports torch."""
    return type(exc).__name__ == "OutOfMemoryError" and \
        type(exc).__module__.split(".")[0] == "torch"


def gpu_oom_failure(exc: BaseException, budget_mb: float | None) -> dict[str, str]:
    """The code and message for a job that ran out of GPU memory: what it asked for (torch's
    own words) and the budget it had, so the user knows to ask for less or give more."""
    asked = str(exc).split("\n")[0].strip()
    budget = f"this worker's VRAM budget is {budget_mb:.0f} MB" if budget_mb else \
        "this worker has no VRAM budget planned (its GPU was not probed at start)"
    return {"code": Code.GPU_OOM, "message": f"out of GPU memory: {asked}; {budget}. Ask for "
            f"less (a smaller size or fewer steps), or raise the domain's gpu_allocation"}


def os_failure(exc: OSError, results_dir: str) -> dict[str, str]:
    """The code and message for a job an OS error stopped: a full disk is the user's to fix,
    and says where."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = exc.filename or results_dir
        return {"code": Code.STORAGE_FULL, "message": f"no space left for the result in "
                f"{where}: free space there, or lower result_ttl_hours so old results go "
                f"sooner"}
    return {"code": Code.ENGINE_ERROR, "message": f"{type(exc).__name__}: {exc}"}


def main() -> int:
    _die_with_parent()
    spec = json.loads(os.environ["RESISO_WORKER_SPEC"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the daemon's terminal is its own
    # isolation first: thread pools and CPU sets must be in place before any engine import;
    # the heartbeat starts between the two steps, so it keeps the normal scheduling class
    isolation.pin_worker(spec["cpus"])
    worker = Worker(spec)
    worker.start_heartbeat()
    isolation.lower_worker_class(spec["sched"])
    code = worker.serve()
    sys.stdout.flush()
    os._exit(code)  # skip interpreter teardown: engine threads may still hold resources


if __name__ == "__main__":
    main()
