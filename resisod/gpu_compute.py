"""How GPU worker processes share a card's compute: NVIDIA MPS with SM caps, or time-slicing.

Under CUDA's default time-slicing two processes on one GPU take turns: measured on an H100,
an LLM beside an image loop lost a third of its decode speed. Under MPS their kernels run at
once, and capping the image worker at 30 % of the SMs (`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`)
kept the LLM at 0.94x of its speed alone and the image at ~93 % of its rate.

`decide` is pure: from the configuration, the GPUs the local workers use (the VRAM plan's),
and whether the control binary is on PATH, it picks the mode and each worker's environment.
`MpsControl` is the I/O: a per-user control daemon whose pipes live under the daemon's
runtime directory (next to its socket) and whose logs live under its state directory, so
it is neither shared with other users' MPS in /tmp/nvidia-mps nor with another resisod.

What MPS does not do: isolate faults or memory. A fatal GPU fault in one client (an illegal
memory access) can take down the other clients of the same MPS server, and SM percentages
bound compute only; memory stays the VRAM plan's job (`vram_plan.py`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from .vram_plan import VramPlan

log = logging.getLogger("resisod.gpu_compute")

MODES = ("auto", "mps", "timeslice")
CONTROL_BINARY = "nvidia-cuda-mps-control"
START_TIMEOUT_S = 5.0
NO_GPU = "no local worker uses a GPU"
# MPS binds Unix sockets in its pipe directory ("control_privileged" the longest name), and
# sun_path holds 107 bytes and a NUL
PIPE_NAME_ROOM = len("/control_privileged")
SUN_PATH_MAX = 107
# compute modes in which a per-user MPS server cannot be added beside what already runs:
# prohibited admits no context at all; exclusive modes admit one process (an administrator's
# system-wide MPS server, or one program), which would leave the workers without a device
UNSHAREABLE = ("prohibited", "exclusive_process", "exclusive_thread")


@dataclass(frozen=True)
class ComputePlan:
    asked: str                      # [resources] gpu_compute
    mode: str                       # "mps" or "timeslice": what the workers get
    reason: str = ""                # why not MPS ("" under MPS)
    binary: str = ""                # the control binary's path
    pipe_dir: str = ""
    log_dir: str = ""
    # the GPUs the control daemon is given, as (cuda:N, UUID); a UUID because the MPS server
    # renumbers the devices it was given, so an index in a client's CUDA_VISIBLE_DEVICES
    # would name another card
    gpus: tuple[tuple[int, str], ...] = ()
    # GPU domain -> (its GPU's UUID, its SM percentage)
    clients: dict[str, tuple[str, int]] = field(default_factory=dict)

    def fall_back(self, reason: str) -> ComputePlan:
        return dataclasses.replace(self, mode="timeslice", reason=reason)

    def percentage(self, domain: str) -> int | None:
        """A worker's SM cap under MPS; None on the CPU or under time-slicing."""
        client = self.clients.get(domain) if self.mode == "mps" else None
        return client[1] if client else None

    def control_env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(uuid for _, uuid in self.gpus),
                "CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir,
                "CUDA_MPS_LOG_DIRECTORY": self.log_dir}

    def worker_env(self, domain: str) -> dict[str, str]:
        """What a worker of `domain` adds to its environment (nothing on the CPU)."""
        if self.mode != "mps" or domain not in self.clients:
            return {}
        uuid, pct = self.clients[domain]
        return {**self.control_env(), "CUDA_VISIBLE_DEVICES": uuid,
                "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(pct)}

    def view(self) -> dict[str, Any]:
        """For `status`."""
        out: dict[str, Any] = {"asked": self.asked, "mode": self.mode, "reason": self.reason,
                               "gpus": [{"index": i, "uuid": u} for i, u in self.gpus]}
        if self.mode == "mps":
            out.update(pipe_dir=self.pipe_dir, log_dir=self.log_dir,
                       percentages={d: pct for d, (_, pct) in self.clients.items()})
        return out


def gpus_in_use(vram: VramPlan, gpus: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Domain -> the GPU its local workers run on (`devices.visible_gpus` entries), from the
    VRAM plan: it already leaves out CPU domains, remote-only ones and GPUs not present."""
    by_index = {g["index"]: g for g in gpus}
    return {b.domain: by_index[b.gpu] for b in vram.workers.values() if b.gpu in by_index}


def decide(cfg: dict[str, Any], on_gpu: dict[str, dict[str, Any]], *, binary: str | None,
           pipe_dir: str, log_dir: str) -> ComputePlan:
    """The mode before anything is started; `binary` is the control program's path (None:
    not installed)."""
    asked = cfg["resources"]["gpu_compute"]
    base = ComputePlan(asked, "timeslice", binary=binary or "", pipe_dir=pipe_dir,
                       log_dir=log_dir)
    if asked == "timeslice":
        return base.fall_back('gpu_compute = "timeslice"')
    if not on_gpu:
        return base.fall_back(NO_GPU)
    domains = cfg["domains"]
    processes: dict[int, int] = {}
    for name, g in on_gpu.items():
        processes[g["index"]] = processes.get(g["index"], 0) + domains[name]["workers"]
    if asked == "auto" and max(processes.values()) < 2:
        # with one process on a card there is nothing to share, and MPS would only add its
        # server (and its shared fault domain)
        return base.fall_back("one worker process per GPU: nothing to share")
    gpus = sorted({g["index"]: g for g in on_gpu.values()}.items())
    for index, g in gpus:
        mode = g.get("compute_mode")
        if mode in UNSHAREABLE:
            admits = "no CUDA process" if mode == "prohibited" else \
                "one process (an administrator's MPS server, or one program), not ours beside it"
            return base.fall_back(f"GPU cuda:{index} is in {mode} compute mode, which admits "
                                  f"{admits}")
        if not g.get("uuid"):
            return base.fall_back(f"NVML gave no UUID for GPU cuda:{index}")
    if binary is None:
        return base.fall_back(f"{CONTROL_BINARY} not found on PATH")
    if len(pipe_dir) + PIPE_NAME_ROOM > SUN_PATH_MAX:
        return base.fall_back(f"the MPS pipe directory {pipe_dir!r} is too long for Unix "
                              f"sockets; use a shorter socket path")
    allocation = cfg["resources"]["gpu_allocation"]
    clients = {}
    for name, g in on_gpu.items():
        d = domains[name]
        # a cap on each process's SMs, not a split: each worker of a domain gets the whole
        # percentage, so a lone busy worker is not slowed by an idle sibling
        pct = d["gpu_percentage"] or allocation.get(d["kind"]) or 100
        clients[name] = (g["uuid"], int(pct))
    return dataclasses.replace(base, mode="mps", gpus=tuple((i, g["uuid"]) for i, g in gpus),
                               clients=clients)


def log_level(plan: ComputePlan, *, start_failed: bool = False) -> int:
    """How loudly to say which mode is in effect: a machine without GPUs under "auto" is
    not news; MPS asked for and not had is."""
    if plan.mode == "mps" or plan.asked == "timeslice":
        return logging.INFO
    if plan.asked == "mps":
        return logging.ERROR if start_failed else logging.WARNING
    if start_failed:
        return logging.WARNING
    return logging.DEBUG if plan.reason == NO_GPU else logging.INFO


class MpsControl:
    """One per-user MPS control daemon: `-d` at start, `quit` at exit, with the same
    environment each time (the pipe directory is how the two find each other)."""

    def __init__(self, plan: ComputePlan, *, timeout_s: float = START_TIMEOUT_S):
        self.plan, self.timeout_s = plan, timeout_s
        self.running = False
        self.env = {k: v for k, v in os.environ.items()
                    if k != "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"}  # the daemon's default cap
        self.env.update(plan.control_env())

    @property
    def control_pipe(self) -> str:
        return os.path.join(self.plan.pipe_dir, "control")

    def start(self) -> str:
        """Start it and check that it answers; "" when it does, else why not (and nothing
        is left running)."""
        for d in (self.plan.pipe_dir, self.plan.log_dir):
            try:
                os.makedirs(d, mode=0o700, exist_ok=True)
                os.chmod(d, 0o700)  # other users must not reach this user's MPS server
            except OSError as exc:
                return f"cannot make {d}: {exc}"
        if os.path.exists(self.control_pipe):
            # ours by the socket claim: a control daemon left by a resisod that was killed
            self._ask("quit")
            self._wait(lambda: not os.path.exists(self.control_pipe))
        try:
            r = subprocess.run([self.plan.binary, "-d"], env=self.env, capture_output=True,
                               text=True, timeout=self.timeout_s, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{CONTROL_BINARY} -d did not run: {exc}"
        if r.returncode != 0:
            return f"{CONTROL_BINARY} -d exited with status {r.returncode}: " \
                   f"{_tail(r.stderr or r.stdout) or self._log_tail()}"
        if not self._wait(lambda: os.path.exists(self.control_pipe)):
            self._ask("quit")  # it may be up without its pipe where we look
            return f"its control pipe {self.control_pipe} did not appear within " \
                   f"{self.timeout_s:g} s; {self._log_tail()}"
        r = self._ask("get_server_list")
        if r is None or r.returncode != 0:
            self._ask("quit")
            return "it did not answer get_server_list" + \
                (f" (status {r.returncode}: {_tail(r.stderr or r.stdout)})" if r else "")
        self.running = True
        return ""

    def stop(self) -> None:
        """Tell it to quit once; its servers go with it (the workers have stopped by now)."""
        if not self.running:
            return
        self.running = False
        r = self._ask("quit")
        if r is None or r.returncode != 0:
            log.warning("MPS control daemon did not take quit (pipe %s)%s", self.plan.pipe_dir,
                        f": {_tail(r.stderr or r.stdout)}" if r else "")
        else:
            log.info("MPS control daemon stopped")

    def _ask(self, command: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run([self.plan.binary], input=command + "\n", env=self.env,
                                  capture_output=True, text=True, timeout=self.timeout_s)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.debug("%s %s: %s", CONTROL_BINARY, command, exc)
            return None

    def _wait(self, done: Any) -> bool:
        deadline = time.monotonic() + self.timeout_s
        while not done():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _log_tail(self) -> str:
        path = os.path.join(self.plan.log_dir, "control.log")
        try:
            with open(path, errors="replace") as f:
                last = _tail(f.read())
        except OSError:
            return "no control.log"
        return f"control.log: {last}" if last else "control.log is empty"


@dataclass
class GpuCompute:
    """The plan in effect, and the control daemon to stop at exit when there is one."""
    plan: ComputePlan
    control: MpsControl | None = None

    def stop(self) -> None:
        if self.control is not None:
            self.control.stop()
            self.control = None


def open_compute(cfg: dict[str, Any], vram: VramPlan, gpus: list[dict[str, Any]], *,
                 timeout_s: float = START_TIMEOUT_S) -> GpuCompute:
    """Decide, start MPS when chosen, fall back to time-slicing when it does not start, and
    say which mode is in effect. `gpus`: `devices.visible_gpus(devices.probe())`."""
    plan = decide(cfg, gpus_in_use(vram, gpus), binary=shutil.which(CONTROL_BINARY),
                  pipe_dir=pipe_dir(cfg["daemon"]["socket"]),
                  log_dir=os.path.join(cfg["daemon"]["state_dir"], "mps"))
    control = None
    failed = False
    if plan.mode == "mps":
        control = MpsControl(plan, timeout_s=timeout_s)
        why = control.start()
        if why:
            plan, control, failed = plan.fall_back(f"MPS did not start: {why}"), None, True
    if plan.mode == "mps":
        log.info("GPU compute: MPS on %s (pipes %s, logs %s); SM caps: %s",
                 ", ".join(f"cuda:{i}" for i, _ in plan.gpus), plan.pipe_dir, plan.log_dir,
                 ", ".join(f"{d} {pct} %" for d, (_, pct) in plan.clients.items()))
    else:
        asked = f' (gpu_compute = "{plan.asked}" asked for MPS)' if plan.asked == "mps" else ""
        log.log(log_level(plan, start_failed=failed), "GPU compute: time-slicing%s: %s",
                asked, plan.reason)
    return GpuCompute(plan, control)


def pipe_dir(socket_path: str) -> str:
    """Next to the client socket, in the daemon's runtime directory (mode 0700 or 0750)."""
    return socket_path + ".mps"


def _tail(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""
