"""Start-up: claim the socket, open the store, plan the machine, and hand it to the broker.

The order is the order of what depends on what, read top to bottom: one daemon per socket
(the claim), its state dir, the worker slots and their CPU layout (supervisor), how GPU
workers share compute (MPS or time-slicing, `gpu_compute`), which domains yield to which
(preemption plan, from the devices), the scheduler, the store and what it recovers, the
daemon's own cores, and last the broker with its sockets.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from . import devices, estimates, gpu_compute, isolation, preemption
from .broker import Broker
from .paths import SocketClaim
from .recovery import recover
from .scheduler import Scheduler
from .store import JobStore
from .supervisor import Gateway, Supervisor

log = logging.getLogger("resisod")

MAX_SOCKET_PATH = 100  # sun_path is 108 bytes; ".workers" is appended for the worker socket


def open_daemon(cfg: dict[str, Any]) -> Broker:
    """Everything up to the first poll; raises SocketBusy, ValueError or OSError."""
    socket_path, state_dir = cfg["daemon"]["socket"], cfg["daemon"]["state_dir"]
    # first, so that every thread and child the daemon starts inherits it
    priority = isolation.raise_daemon_priority() if cfg["resources"]["isolation"] else "as started"
    worker_path = socket_path + ".workers"
    if len(worker_path) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path {socket_path!r} is too long for a Unix socket "
                         f"(keep it under 90 characters)")
    claim = SocketClaim(socket_path, cfg["daemon"]["socket_group"])
    claim.acquire()
    os.makedirs(state_dir, mode=0o750, exist_ok=True)
    gpus = devices.probe()
    supervisor = Supervisor(cfg, state_dir, f"ipc://{worker_path}", gpus=gpus)
    # before any worker starts (they find the MPS pipes in their environment), after the
    # VRAM plan (which says which GPUs the workers use)
    supervisor.compute = gpu_compute.open_compute(cfg, supervisor.vram,
                                                  devices.visible_gpus(gpus))
    try:
        return _open_rest(cfg, supervisor, claim, gpus, priority, worker_path)
    except BaseException:
        supervisor.compute.stop()  # a control daemon outlives us unless told to quit
        raise


def _open_rest(cfg: dict[str, Any], supervisor: Supervisor, claim: SocketClaim,
               gpus: list[dict[str, Any]], priority: str, worker_path: str) -> Broker:
    socket_path, state_dir = cfg["daemon"]["socket"], cfg["daemon"]["state_dir"]
    res = cfg["resources"]
    yields_to = preemption.plan(cfg["domains"], supervisor.layout, gpus=len(gpus),
                                across_cores=res["preempt_across_cores"]) \
        if res["isolation"] else {}
    for batch, rts in yields_to.items():
        log.info("domain %s yields to %s", batch, ", ".join(rts))
    sched = Scheduler(cfg, supervisor.slots, yields_to=yields_to)
    store = JobStore(os.path.join(state_dir, "jobs.db"))
    recover(store, sched)
    estimates.load(state_dir, sched.domains)
    cpus = isolation.available_cpus()
    mine = isolation.daemon_cpus(supervisor.layout, cfg["domains"], cpus)
    if mine != cpus and res["isolation"]:
        os.sched_setaffinity(0, mine)  # workers get their own sets; this is ours
        log.info("daemon pinned to cpus %s", mine)
    log.info("daemon priority: %s", priority)
    gateway = Gateway(cfg["http"], socket_path) if cfg["http"]["enabled"] else None
    return Broker(cfg, claim=claim, sched=sched, store=store, supervisor=supervisor,
                  gateway=gateway, worker_path=worker_path, gpus=bool(gpus))
