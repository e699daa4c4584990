"""[resources] gpu_compute: the MPS-or-time-slicing decision, the control daemon's lifecycle,
and a real daemon on this GPU-less machine falling back with its reason in `status`.

The lifecycle tests run a stand-in `nvidia-cuda-mps-control` put first on PATH: the real one
is NVIDIA's, ships with the driver, and cannot run (or even be installed) on a machine
without an NVIDIA GPU. The stand-in is the external tool only; everything of this project
around it (the decision, `MpsControl`, the supervisor's worker environments and shutdown)
is the real code.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import stat
import subprocess
import tempfile
from typing import Any

import pytest

from resisod import config, devices, gpu_compute, vram_plan
from resisod.gpu_compute import MpsControl, decide, gpus_in_use, open_compute
from resisod.supervisor import Supervisor

CARD = {"index": 0, "name": "card", "uuid": "GPU-aaaa-0000", "total_mb": 81559.0,
        "used_mb": 0.0, "compute_mode": "default", "processes": {}}
CARD1 = {**CARD, "index": 1, "uuid": "GPU-bbbb-1111"}

LLM = {"kind": "llm", "model": "builtin:smollm2-135m-instruct", "device": "cuda:0"}
IMAGE = {"kind": "image", "device": "cuda:0"}
TTS = {"kind": "tts", "device": "cpu"}


def build(compute: str, domains: dict[str, Any], **resources: Any) -> dict[str, Any]:
    return config.build({"resources": {"gpu_compute": compute, **resources},
                         "domains": domains,
                         "daemon": {"socket": "/run/user/1000/resiso/resisod.sock",
                                    "state_dir": "/var/lib/resiso"}})


def plan_of(cfg: dict[str, Any], gpus: list[dict[str, Any]], *, binary: str | None,
            inherited: str | None = None) -> gpu_compute.ComputePlan:
    visible = devices.visible_gpus(gpus, inherited)
    used = gpus_in_use(vram_plan.plan_for(cfg, visible), visible)
    return decide(cfg, used, binary=binary,
                  pipe_dir=gpu_compute.pipe_dir(cfg["daemon"]["socket"]),
                  log_dir=os.path.join(cfg["daemon"]["state_dir"], "mps"))


# -- the decision ----------------------------------------------------------------------------

SHARED = {"llm": LLM, "image": IMAGE, "tts": TTS}
CPU_ONLY = {"llm": {**LLM, "device": "cpu"}, "tts": TTS}


@pytest.mark.parametrize("asked,binary,domains,mode,reason", [
    ("auto", "/usr/bin/nvidia-cuda-mps-control", SHARED, "mps", ""),
    ("mps", "/usr/bin/nvidia-cuda-mps-control", SHARED, "mps", ""),
    ("timeslice", "/usr/bin/nvidia-cuda-mps-control", SHARED, "timeslice", '"timeslice"'),
    ("auto", None, SHARED, "timeslice", "nvidia-cuda-mps-control not found on PATH"),
    ("mps", None, SHARED, "timeslice", "nvidia-cuda-mps-control not found on PATH"),
    ("timeslice", None, SHARED, "timeslice", '"timeslice"'),
    ("auto", "/usr/bin/nvidia-cuda-mps-control", CPU_ONLY, "timeslice", gpu_compute.NO_GPU),
    ("mps", "/usr/bin/nvidia-cuda-mps-control", CPU_ONLY, "timeslice", gpu_compute.NO_GPU),
    ("timeslice", "/usr/bin/nvidia-cuda-mps-control", CPU_ONLY, "timeslice", '"timeslice"'),
    ("auto", None, CPU_ONLY, "timeslice", gpu_compute.NO_GPU),
    ("mps", None, CPU_ONLY, "timeslice", gpu_compute.NO_GPU),
])
def test_the_mode_follows_the_setting_the_binary_and_the_gpus_in_use(asked, binary, domains,
                                                                    mode, reason):
    plan = plan_of(build(asked, domains), [CARD], binary=binary)
    assert plan.mode == mode
    assert reason in plan.reason and (plan.reason == "") == (mode == "mps")


def test_no_gpu_on_the_machine_means_time_slicing_even_where_domains_say_auto():
    """device = "auto" on a machine whose probe found nothing: the workers run on the CPU."""
    cfg = build("mps", {"llm": {**LLM, "device": "auto"}, "image": {**IMAGE, "device": "auto"}})
    plan = plan_of(cfg, [], binary="/usr/bin/nvidia-cuda-mps-control")
    assert (plan.mode, plan.reason) == ("timeslice", gpu_compute.NO_GPU)
    assert plan.worker_env("llm") == {} and plan.percentage("llm") is None


def test_auto_skips_mps_for_one_process_per_gpu_but_mps_asked_gets_it():
    domains = {"llm": LLM, "image": {**IMAGE, "device": "cuda:1"}}
    auto = plan_of(build("auto", domains), [CARD, CARD1], binary="/bin/mps")
    assert auto.mode == "timeslice" and "nothing to share" in auto.reason
    asked = plan_of(build("mps", domains), [CARD, CARD1], binary="/bin/mps")
    assert asked.mode == "mps"
    assert asked.gpus == ((0, CARD["uuid"]), (1, CARD1["uuid"]))
    # two workers of one domain on a card are two processes to share it
    two = plan_of(build("auto", {"image": {**IMAGE, "workers": 2}}), [CARD], binary="/bin/mps")
    assert two.mode == "mps"


def test_default_shares_give_llm_70_and_image_30_percent_of_the_sms():
    plan = plan_of(build("mps", SHARED), [CARD], binary="/bin/mps")
    assert plan.percentage("llm") == 70 and plan.percentage("image") == 30
    assert plan.percentage("tts") is None                  # on the CPU
    env = plan.worker_env("image")
    assert env == {"CUDA_VISIBLE_DEVICES": CARD["uuid"],
                   "CUDA_MPS_PIPE_DIRECTORY": "/run/user/1000/resiso/resisod.sock.mps",
                   "CUDA_MPS_LOG_DIRECTORY": "/var/lib/resiso/mps",
                   "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}
    assert plan.worker_env("llm")["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "70"
    assert plan.worker_env("tts") == {}
    # the pipes sit in the daemon's runtime directory, not in /tmp/nvidia-mps
    assert plan.pipe_dir.startswith("/run/user/1000/resiso/")
    assert plan.control_env() == {"CUDA_VISIBLE_DEVICES": CARD["uuid"],
                                  "CUDA_MPS_PIPE_DIRECTORY": plan.pipe_dir,
                                  "CUDA_MPS_LOG_DIRECTORY": "/var/lib/resiso/mps"}


def test_percentages_come_from_gpu_allocation_or_the_domains_gpu_percentage():
    cfg = build("mps", {"llm": LLM, "image": {**IMAGE, "gpu_percentage": 25, "workers": 2},
                        "image2": {**IMAGE, "model": "builtin:tiny-sd", "gpu_percentage": 15}},
                gpu_allocation={"llm": 55, "image": 20})
    plan = plan_of(cfg, [CARD], binary="/bin/mps")
    assert plan.view()["percentages"] == {"llm": 55, "image": 25, "image2": 15}
    # a cap per process, not a split: both image workers get the domain's 25 %
    assert plan.worker_env("image")["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"


def test_workers_and_the_control_daemon_name_gpus_by_uuid_not_by_index():
    """The MPS server renumbers the GPUs it was given: with the daemon on "3,5", cuda:1 is
    physical GPU 5, which a client would have to call 1, or better its UUID."""
    gpus = [{**CARD, "index": i, "uuid": f"GPU-{i}"} for i in range(6)]
    cfg = build("mps", {"llm": {**LLM, "device": "cuda:1"},
                        "image": {**IMAGE, "device": "cuda:1"}})
    plan = plan_of(cfg, gpus, binary="/bin/mps", inherited="3,5")
    assert plan.gpus == ((1, "GPU-5"),)
    assert plan.control_env()["CUDA_VISIBLE_DEVICES"] == "GPU-5"
    assert plan.worker_env("llm")["CUDA_VISIBLE_DEVICES"] == "GPU-5"


@pytest.mark.parametrize("mode", ["prohibited", "exclusive_process"])
def test_a_gpu_that_admits_no_second_process_means_time_slicing(mode):
    plan = plan_of(build("mps", SHARED), [{**CARD, "compute_mode": mode}], binary="/bin/mps")
    assert plan.mode == "timeslice" and f"cuda:0 is in {mode} compute mode" in plan.reason


def test_a_pipe_directory_too_long_for_unix_sockets_means_time_slicing():
    cfg = build("mps", SHARED)
    cfg["daemon"]["socket"] = "/tmp/" + "d" * 80 + "/s.sock"
    plan = plan_of(cfg, [CARD], binary="/bin/mps")
    assert plan.mode == "timeslice" and "too long" in plan.reason


def test_how_loudly_each_outcome_is_logged():
    level = gpu_compute.log_level
    cpu = plan_of(build("auto", CPU_ONLY), [], binary=None)
    assert level(cpu) == logging.DEBUG                      # a CPU machine: not news
    assert level(plan_of(build("mps", CPU_ONLY), [], binary=None)) == logging.WARNING
    missing = plan_of(build("auto", SHARED), [CARD], binary=None)
    assert level(missing) == logging.INFO
    started = plan_of(build("mps", SHARED), [CARD], binary="/bin/mps")
    assert level(started) == logging.INFO
    assert level(started.fall_back("x"), start_failed=True) == logging.ERROR
    auto = plan_of(build("auto", SHARED), [CARD], binary="/bin/mps")
    assert level(auto.fall_back("x"), start_failed=True) == logging.WARNING


@pytest.mark.parametrize("value,problem", [
    ("fast", "resources.gpu_compute: must be one of 'auto', 'mps', 'timeslice', got 'fast'"),
    ("MPS", "resources.gpu_compute: must be one of 'auto', 'mps', 'timeslice', got 'MPS'"),
    (1, "resources.gpu_compute: must be a string, got int"),
])
def test_a_bad_gpu_compute_is_refused_with_the_key_and_the_choices(value, problem):
    with pytest.raises(config.ConfigError) as exc:
        config.build({"resources": {"gpu_compute": value}})
    assert exc.value.errors == [problem]


# -- the control daemon, with a stand-in for NVIDIA's binary ---------------------------------

STANDIN = """#!/bin/sh
# stand-in for nvidia-cuda-mps-control: records each call with the MPS variables it saw
rec="$MPS_STANDIN_RECORD"
if [ "$1" = "-d" ]; then
    echo "start dev=$CUDA_VISIBLE_DEVICES pipe=$CUDA_MPS_PIPE_DIRECTORY" \\
         "log=$CUDA_MPS_LOG_DIRECTORY pct=${CUDA_MPS_ACTIVE_THREAD_PERCENTAGE:-unset}" >> "$rec"
    case "$MPS_STANDIN_MODE" in
        fail) echo "An instance of this daemon is already running" >&2; exit 1 ;;
        silent) exit 0 ;;
    esac
    : > "$CUDA_MPS_PIPE_DIRECTORY/control"
    exit 0
fi
read -r cmd
echo "$cmd pipe=$CUDA_MPS_PIPE_DIRECTORY dev=$CUDA_VISIBLE_DEVICES" >> "$rec"
[ -e "$CUDA_MPS_PIPE_DIRECTORY/control" ] || { echo "Cannot find MPS control daemon" >&2; exit 1; }
[ "$cmd" = quit ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
exit 0
"""


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """PATH starts with a directory holding the stand-in; returns its call record."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / gpu_compute.CONTROL_BINARY
    exe.write_text(STANDIN)
    exe.chmod(0o755)
    record = tmp_path / "calls"
    record.write_text("")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MPS_STANDIN_RECORD", str(record))
    # a cap in the daemon's own environment would become every server's default
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "99")
    return record


@pytest.fixture
def short_dir():
    """A short directory: MPS binds Unix sockets in its pipe directory (108-byte paths)."""
    path = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def daemon_cfg(where, compute: str = "mps", domains: dict[str, Any] = SHARED):
    cfg = build(compute, domains)
    (where / "run").mkdir(exist_ok=True)
    cfg["daemon"]["socket"] = str(where / "run" / "d.sock")
    cfg["daemon"]["state_dir"] = str(where / "state")
    return cfg


def calls(record) -> list[str]:
    return record.read_text().splitlines()


def test_mps_starts_with_its_pipes_under_the_runtime_dir_and_quits_once(short_dir, standin):
    cfg = daemon_cfg(short_dir)
    compute = open_compute(cfg, vram_plan.plan_for(cfg, [CARD]), [CARD])
    pipe, logs = str(short_dir / "run" / "d.sock.mps"), str(short_dir / "state" / "mps")
    assert compute.plan.mode == "mps", compute.plan.reason
    assert calls(standin) == [f"start dev={CARD['uuid']} pipe={pipe} log={logs} pct=unset",
                              f"get_server_list pipe={pipe} dev={CARD['uuid']}"]
    assert stat.S_IMODE(os.stat(pipe).st_mode) == 0o700
    assert os.path.exists(os.path.join(pipe, "control"))
    compute.stop()
    compute.stop()
    assert calls(standin)[2:] == [f"quit pipe={pipe} dev={CARD['uuid']}"]
    assert not os.path.exists(os.path.join(pipe, "control"))


def test_the_supervisor_gives_gpu_workers_mps_and_quits_it_at_shutdown(short_dir, standin):
    """The daemon's own path: the supervisor plans the GPUs, `open_compute` starts MPS, each
    worker's environment carries it, and the supervisor's shutdown (the daemon's exit) tells
    the control daemon to quit after the workers are gone. The workers are real processes
    (`sleep`), since only their environment matters here."""
    cfg = daemon_cfg(short_dir)
    envs: dict[str, dict[str, str]] = {}

    def spawn(argv: list[str], *, env: dict[str, str], **kw: Any) -> subprocess.Popen:
        envs[json.loads(env["RESISO_WORKER_SPEC"])["domain_name"]] = env
        return subprocess.Popen(["sleep", "30"], env=env, **kw)

    sup = Supervisor(cfg, cfg["daemon"]["state_dir"], "ipc:///tmp/unused.sock", spawn=spawn,
                     gpus=[CARD])
    sup.compute = open_compute(cfg, sup.vram, devices.visible_gpus([CARD]))
    sup.start_all()
    try:
        assert envs["llm"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "70"
        assert envs["image"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
        assert envs["image"]["CUDA_VISIBLE_DEVICES"] == CARD["uuid"]
        assert envs["image"]["CUDA_MPS_PIPE_DIRECTORY"] == str(short_dir / "run" / "d.sock.mps")
        assert "CUDA_MPS_PIPE_DIRECTORY" not in envs["tts"]
        assert envs["tts"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "99"  # inherited, unused
        assert envs["tts"]["CUDA_VISIBLE_DEVICES"] == ""
        assert [s.compute.percentage(s.domain) for s in sup.slots] == [70, 30, None, None]
        assert not any(c.startswith("quit") for c in calls(standin))
    finally:
        sup.shutdown()
    assert calls(standin)[-1].startswith("quit ")
    assert all(s.proc.poll() is not None for s in sup.slots)


@pytest.mark.parametrize("compute,level", [("mps", logging.ERROR), ("auto", logging.WARNING)])
def test_a_control_daemon_that_fails_to_start_means_time_slicing(short_dir, standin, monkeypatch,
                                                                 caplog, compute, level):
    monkeypatch.setenv("MPS_STANDIN_MODE", "fail")
    cfg = daemon_cfg(short_dir, compute)
    with caplog.at_level(logging.DEBUG, logger="resisod"):
        result = open_compute(cfg, vram_plan.plan_for(cfg, [CARD]), [CARD])
    assert result.plan.mode == "timeslice" and result.control is None
    assert result.plan.reason == ("MPS did not start: nvidia-cuda-mps-control -d exited with "
                                  "status 1: An instance of this daemon is already running")
    assert result.plan.worker_env("llm") == {} and result.plan.percentage("image") is None
    said = [r for r in caplog.records if "GPU compute: time-slicing" in r.getMessage()]
    assert [r.levelno for r in said] == [level]
    assert result.plan.reason in said[0].getMessage()
    assert ('gpu_compute = "mps" asked for MPS' in said[0].getMessage()) == (compute == "mps")


def test_a_control_daemon_whose_pipe_never_appears_means_time_slicing(short_dir, standin,
                                                                      monkeypatch):
    monkeypatch.setenv("MPS_STANDIN_MODE", "silent")
    cfg = daemon_cfg(short_dir)
    result = open_compute(cfg, vram_plan.plan_for(cfg, [CARD]), [CARD], timeout_s=0.3)
    assert result.plan.mode == "timeslice"
    assert "control pipe" in result.plan.reason and "did not appear" in result.plan.reason
    assert "no control.log" in result.plan.reason


def test_a_control_daemon_left_by_a_killed_resisod_is_told_to_quit_first(short_dir, tmp_path,
                                                                        standin):
    cfg = daemon_cfg(short_dir)
    plan = plan_of(cfg, [CARD], binary=str(tmp_path / "bin" / gpu_compute.CONTROL_BINARY))
    os.makedirs(plan.pipe_dir)
    open(os.path.join(plan.pipe_dir, "control"), "w").close()
    control = MpsControl(plan)
    assert control.start() == ""
    assert [c.split()[0] for c in calls(standin)] == ["quit", "start", "get_server_list"]
    control.stop()


def test_without_the_binary_nothing_is_started(short_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))               # no nvidia-cuda-mps-control
    cfg = daemon_cfg(short_dir)
    with caplog.at_level(logging.DEBUG, logger="resisod"):
        result = open_compute(cfg, vram_plan.plan_for(cfg, [CARD]), [CARD])
    assert result.plan.reason == "nvidia-cuda-mps-control not found on PATH"
    assert result.control is None and not os.path.exists(result.plan.pipe_dir)
    assert [r.levelno for r in caplog.records if "GPU compute" in r.getMessage()] == \
        [logging.WARNING]


# -- a real daemon on this machine (no GPU) --------------------------------------------------

MPS_ASKED = """
[daemon]
heartbeat_ms = 200
[resources]
gpu_compute = "mps"
[domains.null]
kind = "null"
workers = 1
"""


def test_a_daemon_asked_for_mps_without_a_gpu_falls_back_and_serves(make_daemon, tmp_path):
    """The stand-in is on the daemon's PATH too: with no GPU in use it must not be called."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / gpu_compute.CONTROL_BINARY).write_text(STANDIN)
    (bindir / gpu_compute.CONTROL_BINARY).chmod(0o755)
    record = tmp_path / "calls"
    record.write_text("")
    d = make_daemon(MPS_ASKED, env={"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
                                    "MPS_STANDIN_RECORD": str(record)})
    st = d.status()
    assert st["gpu_compute"] == {"asked": "mps", "mode": "timeslice",
                                 "reason": gpu_compute.NO_GPU, "gpus": []}
    assert st["domains"]["null"]["workers"][0]["mps_percentage"] is None
    with d.client() as c:
        assert c.run("null", {"steps": 2})["event"] == "result"
    out = d.cli("status")
    assert out.returncode == 0, out.stderr
    assert f"GPU compute: timeslice ({gpu_compute.NO_GPU})" in out.stdout.decode()
    from resisod.http.metrics import GatewayMetrics
    body, _ = GatewayMetrics().render(st)
    assert "resiso_gpu_compute_mps 0.0" in body.decode()
    assert d.stop() == 0
    lines = [ln for ln in d.read_log().splitlines() if "GPU compute" in ln]
    assert len(lines) == 1 and " WARNING " in lines[0], lines
    assert 'time-slicing (gpu_compute = "mps" asked for MPS): no local worker uses a GPU' \
        in lines[0]
    assert record.read_text() == ""


def test_a_daemon_left_at_auto_on_a_cpu_machine_says_nothing_above_debug(null_daemon):
    st = null_daemon.status()
    assert st["gpu_compute"]["mode"] == "timeslice" and st["gpu_compute"]["asked"] == "auto"
    out = null_daemon.cli("status")
    assert out.returncode == 0 and b"GPU compute" not in out.stdout
    null_daemon.stop()
    assert "GPU compute" not in null_daemon.read_log()
