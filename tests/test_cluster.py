"""Remote workers over TCP with CURVE (resisod/cluster.py, resiso-worker): real daemons, real
worker processes, a real network namespace for the remote host; nothing mocked."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from resisod import cluster_keys

from .conftest import BIN, ROOT, free_port, wait_for

RESISO = os.path.join(BIN, "resiso")
HOST_IP, PEER_IP = "10.77.0.1", "10.77.0.2"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RESISO, *args], capture_output=True, text=True, timeout=60)


def worker_key(path: str) -> str:
    r = subprocess.run([sys.executable, "-m", "resisod.remote_worker", "--print-key",
                        "--key-file", path], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def config(listen: str, *, local: int = 0, insecure: bool = False) -> str:
    return f"""
    [daemon]
    heartbeat_ms = 250
    [cluster]
    listen = "{listen}"
    insecure = {'true' if insecure else 'false'}
    [domains.null]
    kind = "null"
    workers = {local}
    """


class Remote:
    """A resiso-worker process, in a network namespace when `netns` is given."""

    def __init__(self, connect: str, key_file: str, server_key: str | None, *,
                 netns: str | None = None, domain: str = "null", extra: tuple = ()):
        cmd = [sys.executable, "-m", "resisod.remote_worker", "--connect", connect,
               "--domain", domain, "--key-file", key_file, *extra]
        if server_key:
            cmd += ["--server-key", server_key]
        if netns:  # `ip netns exec` execs the command: the pid is the worker's own
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.log_path = key_file + ".log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def read_log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


def remote_ready(d, remote: "Remote", timeout: float = 60.0) -> None:
    """Wait for a remote worker to be ready; on a timeout, say what both sides logged."""
    try:
        wait_for(lambda: any(w["state"] == "ready" for w in remote_workers(d)), timeout, 0.2,
                 "the remote worker ready")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- worker (exit {remote.proc.poll()}):\n"
                             f"{remote.read_log()[-3000:]}\n--- daemon:\n"
                             f"{d.read_log()[-3000:]}") from None


@pytest.fixture
def remotes():
    started: list[Remote] = []
    yield started
    for r in started:
        r.kill()


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair: HOST_IP here, PEER_IP there.
    Removed at the end whatever happened (its veth end goes with it)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2's `ip` for a network namespace")
    tag = f"{os.getpid() % 100000}"
    ns, here, there = f"rsns{tag}", f"rsv{tag}a", f"rsv{tag}b"
    steps = [["ip", "netns", "add", ns],
             ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
             ["ip", "link", "set", there, "netns", ns],
             ["ip", "addr", "add", f"{HOST_IP}/24", "dev", here],
             ["ip", "link", "set", here, "up"],
             ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{PEER_IP}/24", "dev", there],
             ["ip", "netns", "exec", ns, "ip", "link", "set", there, "up"],
             ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]]
    try:
        for step in steps:
            r = subprocess.run(step, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                pytest.skip(f"network namespaces or veth pairs are not permitted here: "
                            f"`{' '.join(step)}` said {r.stderr.strip()!r}")
        yield ns
    finally:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        for pid in pids.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def secure_daemon(make_daemon, host: str, *, local: int = 0, allow: dict[str, str] = {}):
    """A daemon listening for remote workers on `host`, its key pair made (and `allow`ed
    worker keys added) before it starts; returns (daemon, its public key, the endpoint)."""
    listen = f"tcp://{host}:{free_port()}"
    d = make_daemon(config(listen, local=local), start=False)
    keys = os.path.join(d.state_dir, "keys")
    r = cli("keys", "init", "--keys-dir", keys)
    assert r.returncode == 0, r.stderr
    for name, key in allow.items():
        assert cli("keys", "add", name, key, "--keys-dir", keys).returncode == 0
    d.start(wait_ready=False)
    return d, r.stdout.strip(), listen


def remote_workers(d) -> list[dict]:
    """From a daemon handle, or from a client: a client's calls keep its open streams alive."""
    return [w for dom in d.status()["domains"].values() for w in dom["workers"]
            if w.get("remote")]


# --- (1) the keys CLI -----------------------------------------------------------------------
def test_keys_cli_round_trip_and_bad_input(tmp_path):
    keys = str(tmp_path / "keys")
    init = cli("keys", "init", "--keys-dir", keys)
    assert init.returncode == 0, init.stderr
    server = init.stdout.strip()
    assert len(server) == 40
    assert oct(os.stat(os.path.join(keys, "server.key_secret")).st_mode & 0o777) == "0o600"
    again = cli("keys", "init", "--keys-dir", keys)  # idempotent: the same pair
    assert again.returncode == 0 and again.stdout.strip() == server

    key = worker_key(str(tmp_path / "w" / "w1.key_secret"))
    added = cli("keys", "add", "w1", key, "--keys-dir", keys, "--json")
    assert added.returncode == 0, added.stderr
    fp = cluster_keys.fingerprint(key)
    assert f'"fingerprint": "{fp}"' in added.stdout and len(fp) == 16
    listed = cli("keys", "list", "--keys-dir", keys)
    assert listed.returncode == 0 and "w1" in listed.stdout and fp in listed.stdout
    assert key not in listed.stdout  # fingerprints only

    # bad input: stable codes and exit statuses
    cases = [(("add", "w1", key), 5, "duplicate_name"),
             (("add", "w2", key), 5, "duplicate_key"),
             (("add", "w3", "not-a-key"), 2, "bad_key"),
             (("add", "w3", "x" * 39 + "~"), 2, "bad_key"),
             (("add", "../evil", key), 2, "bad_name"),
             (("revoke", "nobody"), 6, "unknown_name")]
    for args, status, code in cases:
        r = cli("keys", *args, "--keys-dir", keys, "--json")
        assert r.returncode == status, (args, r.stdout, r.stderr)
        assert f'"code": "{code}"' in r.stdout, (args, r.stdout)

    revoked = cli("keys", "revoke", "w1", "--keys-dir", keys)
    assert revoked.returncode == 0 and fp in revoked.stdout
    assert "w1" not in cli("keys", "list", "--keys-dir", keys).stdout
    assert cli("keys", "revoke", "w1", "--keys-dir", keys).returncode == 6


# --- (2) a remote worker in another network namespace ------------------------------------------
def test_remote_worker_in_a_netns_runs_jobs_over_curve(make_daemon, netns, remotes, tmp_path):
    key_file = str(tmp_path / "w1.key_secret")
    d, server, listen = secure_daemon(make_daemon, HOST_IP, allow={"edge1": worker_key(key_file)})
    remotes.append(Remote(listen, key_file, server, netns=netns))
    remote_ready(d, remotes[-1])
    with d.client() as c:
        for _ in range(20):
            assert c.run("null", {})["status"] == "completed"
        stream = c.submit("null", {"steps": 5, "delay_ms": 10, "text": "over tcp"})
        events = [e["event"] for e in stream]
        assert events.count("progress") == 5 and stream.final["event"] == "result"
    (w,) = wait_for(lambda: [w for w in remote_workers(d) if w["remote"]["rtt_ms"]], 10, 0.2,
                    "a round-trip time")
    assert w["remote"]["host"] == PEER_IP and w["remote"]["key"] == "edge1"
    assert 0 < w["remote"]["rtt_ms"] < 1000
    assert w["pid"] is None and w["sched"] == "remote"
    st = d.cli("status")
    assert st.returncode == 0 and "edge1" in st.stdout.decode() and PEER_IP in st.stdout.decode()

    # revoking its key drops it (no restart of the daemon), and it is told to stop
    assert cli("keys", "revoke", "edge1", "--keys-dir",
               os.path.join(d.state_dir, "keys")).returncode == 0
    wait_for(lambda: not remote_workers(d), 10, 0.2, "the revoked worker dropped")
    assert "its key was revoked" in d.read_log()
    wait_for(lambda: remotes[0].proc.poll() is not None, 10, 0.2, "the revoked worker to stop")


# --- (3) an unknown key is refused ---------------------------------------------------------------
def test_unknown_key_is_refused_and_logged_once_with_its_fingerprint(make_daemon, remotes,
                                                                      tmp_path):
    d, server, listen = secure_daemon(make_daemon, "127.0.0.1")
    key_file = str(tmp_path / "stranger.key_secret")
    fp = cluster_keys.fingerprint(worker_key(key_file))
    remotes.append(Remote(listen, key_file, server))
    wait_for(lambda: fp in d.read_log(), 30, 0.2, "the refusal logged")
    time.sleep(4.5)  # the worker connects afresh every 2 s meanwhile
    assert not remote_workers(d)
    assert d.read_log().count(fp) == 1  # once per key per minute, not per retry
    assert remotes[0].proc.poll() is None  # it keeps trying, and says why it waits
    # adding its key lets it in, without a restart of either
    assert cli("keys", "add", "late", worker_key(key_file), "--keys-dir",
               os.path.join(d.state_dir, "keys")).returncode == 0
    wait_for(lambda: any(w["remote"]["key"] == "late" and w["state"] == "ready"
                         for w in remote_workers(d)), 30, 0.2, "the late worker in")
    with d.client() as c:
        assert c.run("null", {})["status"] == "completed"
    # a worker the daemon does not know is told so at once: an unknown domain
    key2 = str(tmp_path / "known.key_secret")
    assert cli("keys", "add", "known", worker_key(key2), "--keys-dir",
               os.path.join(d.state_dir, "keys")).returncode == 0
    lost = Remote(listen, key2, server, domain="nosuch")
    remotes.append(lost)
    assert lost.proc.wait(30) == 2
    assert "unknown_domain" in lost.read_log()
    assert [w["remote"]["key"] for w in remote_workers(d)] == ["late"]


# --- (4) kill -9 of a remote worker mid-job ------------------------------------------------------
def test_remote_worker_killed_mid_job_its_job_finishes_on_a_local_worker(make_daemon, remotes,
                                                                          tmp_path):
    key_file = str(tmp_path / "w.key_secret")
    d, server, listen = secure_daemon(make_daemon, "127.0.0.1", local=1,
                                      allow={"w": worker_key(key_file)})
    remotes.append(Remote(listen, key_file, server))
    remote_ready(d, remotes[-1])
    # the domain is ready once any worker is: wait for the local one too, or the first job
    # lands on the remote worker while the local one still loads
    wait_for(lambda: [w["state"] for w in d.status()["domains"]["null"]["workers"]]
             == ["ready", "ready"], 60, 0.1, "the local and the remote worker ready")
    with d.client() as c:
        # the local worker comes first in dispatch order: keep it busy, so the next job
        # goes to the remote one
        first = c.submit("null", {"steps": 30, "delay_ms": 50}, partials=False)
        wait_for(lambda: c.get(first.task_id)["status"] == "running", 10, 0.05, "first runs")
        assert not any(w["job"] == first.task_id for w in remote_workers(c))
        job = c.submit("null", {"steps": 40, "delay_ms": 50})
        # polled through `c`, whose calls keep both streams alive: a client silent for a
        # second would see its jobs cancelled
        wait_for(lambda: any(w["job"] == job.task_id for w in remote_workers(c)), 10, 0.05,
                 "the job on the remote worker")
        wait_for(lambda: (c.get(job.task_id).get("step") or 0) >= 3, 10, 0.05, "under way")
        os.kill(remotes[0].proc.pid, signal.SIGKILL)
        final = job.wait()
        assert first.wait()["event"] == "result"
    assert final["event"] == "result", final
    assert final["attempts"] == 2
    # log lines leave within a tick of the event
    log = wait_for(lambda: (lambda t: t if f"job {job.task_id} completed" in t else "")(
        d.read_log()), 5, 0.1, "the completion logged")
    assert "lost: no heartbeat" in log
    assert log.count(f"job {job.task_id} completed") == 1
    assert f"job {job.task_id} started domain=null worker=null.0 attempt=2" in log
    assert not remote_workers(d)


# --- (5) secure by default -----------------------------------------------------------------------
def test_curve_without_keys_refuses_to_start_and_insecure_warns(make_daemon, remotes, tmp_path):
    port = free_port()
    d = make_daemon(config(f"tcp://127.0.0.1:{port}", local=1), start=False)
    r = subprocess.run([sys.executable, "-m", "resisod", "--config", d.config_path, "--socket",
                        d.socket, "--state-dir", d.state_dir], capture_output=True, text=True,
                       timeout=60, cwd=ROOT, env=d.env)
    assert r.returncode == 1, r.stderr
    assert "resiso keys init" in r.stderr and "insecure = true" in r.stderr

    port2 = free_port()
    plain = make_daemon(config(f"tcp://127.0.0.1:{port2}", local=0, insecure=True),
                        start=False).start(wait_ready=False)
    wait_for(lambda: "plain TCP (insecure = true)" in plain.read_log(), 10, 0.1, "the warning")
    assert "WARNING" in plain.read_log()
    remotes.append(Remote(f"tcp://127.0.0.1:{port2}", str(tmp_path / "i.key_secret"), None,
                          extra=("--insecure",)))
    wait_for(lambda: any(w["state"] == "ready" for w in remote_workers(plain)), 60, 0.2,
             "the plain-TCP worker ready")
    with plain.client() as c:
        assert c.run("null", {})["status"] == "completed"
    assert remote_workers(plain)[0]["remote"]["key"] == "insecure"


def test_cluster_config_is_checked():
    from resisod import config
    with pytest.raises(config.ConfigError) as e:
        config.build({"cluster": {"listen": "ipc:///tmp/x"}})
    assert "tcp://HOST:PORT" in str(e.value)
    with pytest.raises(config.ConfigError) as e:
        config.build({"domains": {"n": {"kind": "null", "workers": 0}}})
    assert "must be between 1 and 64 (0, remote workers only, needs [cluster] listen)" \
        in str(e.value)
    cfg = config.build({"cluster": {"listen": "tcp://0.0.0.0:5557"},
                        "domains": {"n": {"kind": "null", "workers": 0}}})
    assert cfg["cluster"] == {"listen": "tcp://0.0.0.0:5557", "insecure": False, "keys_dir": ""}


# --- the decisions, without sockets ----------------------------------------------------------
def test_refusals_are_logged_once_per_key_per_minute():
    from resisod.cluster_auth import RefusalLog
    r = RefusalLog(every_s=60.0)
    assert r.due("k1", 0.0) and not r.due("k1", 1.0) and not r.due("k1", 59.9)
    assert r.due("k2", 1.0)  # another key is its own line
    assert r.due("k1", 60.0)


def test_remote_slot_decisions():
    from resisod import config, remote_slots
    from resisod.protocol import Code, WorkerMsg
    cfg = config.build({"cluster": {"listen": "tcp://127.0.0.1:5557"},
                        "domains": {"n": {"kind": "null", "workers": 0}}})
    refused = remote_slots.answer_hello(cfg, {"op": "hello", "domain": "nosuch"})
    assert refused["op"] == WorkerMsg.REFUSED and refused["code"] == Code.UNKNOWN_DOMAIN
    spec = remote_slots.answer_hello(cfg, {"op": "hello", "domain": "n"})
    assert spec["op"] == WorkerMsg.SPEC and spec["domain"]["kind"] == "null"
    assert spec["heartbeat_ms"] == cfg["daemon"]["heartbeat_ms"]
    slot = remote_slots.new_slot(cfg, "n", 1, b"remote/x", host="10.0.0.2", key="k",
                                 fingerprint="ab", sock=object(), now=100.0)
    assert slot.name == "n.r1" and slot.breaker is not None
    assert remote_slots.lost_reason(slot, 100.5, 1.0, {"Z": "k"}, "Z") is None
    assert "no heartbeat" in remote_slots.lost_reason(slot, 101.5, 1.0, None, None)
    assert remote_slots.lost_reason(slot, 100.5, 1.0, {}, "Z") == "its key was revoked"
    remote_slots.note_rtt(slot, 0.010)
    remote_slots.note_rtt(slot, 0.020)
    assert slot.remote["rtt_ms"] == pytest.approx(13.0)
    assert remote_slots.next_index([slot], "n") == 2
