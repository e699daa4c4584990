"""`resiso-worker`: one worker of a daemon's domain, on another machine, over TCP with CURVE.

    resiso-worker --connect tcp://HOST:5557 --domain llm --server-key <daemon's public key>

It runs the same worker code as a local slot (`worker.Worker`), with this host's CPU set,
thread counts and scheduling class applied here before any engine import. On first run it
makes its key pair (`--key-file`, default ~/.local/state/resiso-worker/worker.key_secret)
and prints the public key, which an admin lets in on the daemon's machine with
`resiso keys add NAME KEY`. Until then the daemon refuses the handshake; libzmq does not
retry a connection refused by authentication, so this worker watches its socket's
handshake events and connects afresh every RETRY_S (saying why once).

The domain's settings come from the daemon's answer to the hello, or from `--config FILE`
when given (the same TOML as the daemon's; its [domains.NAME] is used). The heartbeat
interval is always the daemon's: both sides time each other's silence by it.

Exit statuses: 0 told to stop by the daemon; 2 bad arguments, keys or a refused domain;
3 the engine failed to load; 75 the daemon went silent (run it under a service manager that
restarts it: systemd `Restart=always`, a Kubernetes Deployment).
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import sys
import time
from typing import Any

USAGE = 2
HINT_EVERY_S = 10.0
RETRY_S = 2.0                # after a refused handshake: the key may be added any moment
REFUSED = "refused"
SILENT = "silent"
# a hello unanswered this long is tried again on a fresh connection under a fresh identity:
# a daemon that registered the first one (its answer lost) drops that slot when it stays
# silent, and a hello lost before it was read is simply sent again
ANSWER_TIMEOUT_S = 15.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="resiso-worker", description="Serve one domain of a "
                                 "remote resisod from this machine.")
    ap.add_argument("--connect", help="the daemon's [cluster] listen address, tcp://HOST:PORT")
    ap.add_argument("--domain", help="the domain to serve, as named in the daemon's config")
    ap.add_argument("--config", help="take the domain's settings from this TOML file instead "
                    "of from the daemon")
    ap.add_argument("--server-key", default=os.environ.get("RESISO_SERVER_KEY"),
                    help="the daemon's public key (Z85; `resiso keys init` prints it); env "
                         "RESISO_SERVER_KEY")
    ap.add_argument("--key-file", default=None,
                    help="this worker's key pair, made if absent (default "
                         "~/.local/state/resiso-worker/worker.key_secret)")
    ap.add_argument("--state-dir", default=None,
                    help="where results are written (default: the key file's directory)")
    ap.add_argument("--insecure", action="store_true",
                    help="plain TCP without CURVE, for a daemon with [cluster] insecure = true")
    ap.add_argument("--print-key", action="store_true",
                    help="print this worker's public key (making the pair if absent) and exit")
    return ap.parse_args(argv)


def fail(message: str, code: int = USAGE) -> int:
    print(f"resiso-worker: {message}", file=sys.stderr)
    return code


def local_spec(path: str, domain: str) -> dict[str, Any]:
    """The domain's settings from a config file, shaped like the daemon's SPEC answer."""
    from . import config, devices
    cfg = config.load(path)
    if domain not in cfg["domains"]:
        raise config.ConfigError([f"{path} has no [domains.{domain}]; it has "
                                  f"{', '.join(sorted(cfg['domains'])) or 'none'}"])
    d = cfg["domains"][domain]
    return {"domain": d, "gpu_share": devices.memory_share(cfg, d), "cache": cfg["cache"],
            "cpu_threads": cfg["resources"]["cpu_threads"]}


def dial(sock: Any, endpoint: str) -> Any:
    """Connect `sock`, watching its handshake from before the first one; returns the
    monitor socket."""
    import zmq
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH |
                                      zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    sock.connect(endpoint)
    return monitor


def await_answer(sock: Any, monitor: Any, endpoint: str) -> dict[str, Any] | str | None:
    """The daemon's answer to the hello; REFUSED when the handshake was refused (the key is
    not allowed there); None on Ctrl-C. A daemon not up yet is silence: libzmq retries the
    connection itself, and a hint says so every HINT_EVERY_S."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message
    from .protocol import HARD_FRAME_LIMIT, unpack
    failed = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    started = hint = time.monotonic()
    try:
        while True:
            ready = dict(poller.poll(1000))
            if sock in ready:
                return unpack(sock.recv(), max_bytes=HARD_FRAME_LIMIT)
            if monitor in ready and recv_monitor_message(monitor)["event"] & failed:
                return REFUSED
            if time.monotonic() - started >= ANSWER_TIMEOUT_S:
                return SILENT
            if time.monotonic() - hint >= HINT_EVERY_S:
                hint = time.monotonic()
                print(f"resiso-worker: no answer from {endpoint} after "
                      f"{hint - started:.0f}s: is the daemon up and its [cluster] listen "
                      f"reachable from here?", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        return None
    finally:
        sock.disable_monitor()
        monitor.close(0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from . import cluster_keys
    key_file = args.key_file or cluster_keys.default_worker_key_file()
    curve = None
    if not args.insecure or args.print_key:
        try:
            public, secret, made = cluster_keys.worker_pair(key_file)
        except (cluster_keys.KeysError, OSError, ValueError) as exc:
            return fail(f"key file {key_file}: {exc}")
        if args.print_key:
            print(public)
            return 0
        if made:
            print(f"resiso-worker: made this worker's key pair in {key_file}. Let it in on "
                  f"the daemon's machine with:\n  resiso keys add NAME {public}",
                  file=sys.stderr)
        print(f"resiso-worker: public key {public} (fingerprint "
              f"{cluster_keys.fingerprint(public)})", file=sys.stderr, flush=True)
        if not args.server_key:
            return fail("--server-key is required: the daemon's public key, which "
                        "`resiso keys init` prints on its machine")
        try:
            cluster_keys.decode_public(args.server_key)
        except cluster_keys.KeysError as exc:
            return fail(f"--server-key: {exc.message}")
        curve = {"server": args.server_key.strip(), "public": public, "secret": secret}
    if not args.connect or not args.connect.startswith("tcp://"):
        return fail(f"--connect must be the daemon's tcp://HOST:PORT, got {args.connect!r}")
    if not args.domain:
        return fail("--domain is required")
    own = None
    if args.config:
        from . import config
        try:
            own = local_spec(args.config, args.domain)
        except config.ConfigError as exc:
            return fail("invalid configuration: " + "; ".join(exc.errors))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    return serve(args, curve, own, key_file)


def fresh_identity() -> str:
    return f"remote/{socket.gethostname()[:64]}/{os.getpid()}/{secrets.token_hex(4)}"


def serve(args: argparse.Namespace, curve: dict[str, str] | None, own: dict[str, Any] | None,
          key_file: str) -> int:
    from . import cluster_keys, isolation
    from .protocol import WorkerMsg
    from .worker import Worker, _socket
    identity = fresh_identity()
    state_dir = args.state_dir or os.path.dirname(os.path.abspath(key_file))
    spec: dict[str, Any] = {"identity": identity, "endpoint": args.connect, "curve": curve,
                            "remote": True, "domain_name": args.domain, "state_dir": state_dir}
    worker = Worker(spec)
    hello = {"op": WorkerMsg.HELLO, "domain": args.domain, "pid": os.getpid(),
             "host": socket.gethostname()}
    told = False
    while True:
        monitor = dial(worker.sock, args.connect)
        worker.send(hello)
        answer = await_answer(worker.sock, monitor, args.connect)
        if answer == SILENT:
            print(f"resiso-worker: no answer from {args.connect} in {ANSWER_TIMEOUT_S:g}s; "
                  f"saying hello again on a fresh connection", file=sys.stderr, flush=True)
            worker.sock.close(0)
            worker.identity = fresh_identity().encode()
            worker.spec["identity"] = worker.identity.decode()
            worker.sock = _socket(worker.ctx, worker.identity, args.connect, curve,
                                  connect=False)
            continue
        if answer != REFUSED:
            break
        if not told:
            told = True
            print(f"resiso-worker: {args.connect} refused this worker's key (fingerprint "
                  f"{cluster_keys.fingerprint(curve['public']) if curve else '-'}); let it "
                  f"in there with `resiso keys add NAME KEY`. Retrying every {RETRY_S:g}s.",
                  file=sys.stderr, flush=True)
        time.sleep(RETRY_S)
        # the refused connection is not retried by libzmq: a new socket, the same identity
        # (the daemon never registered it)
        worker.sock.close(0)
        worker.sock = _socket(worker.ctx, worker.identity, args.connect, curve, connect=False)
    worker.greeted = True
    if answer is None or answer == REFUSED:
        return 130
    if answer.get("op") != WorkerMsg.SPEC:
        return fail(f"the daemon refused this worker: {answer.get('message')} "
                    f"({answer.get('code')})")
    given = own or answer
    d = given["domain"]
    # this host's cores: a remote machine serving one domain gives it every core it has,
    # unless the domain names its own
    cpus = list(d["cpus"]) or isolation.available_cpus()
    threads = isolation.thread_count(d, cpus, (own or {}).get("cpu_threads", 0))
    spec.update(domain=d, heartbeat_ms=answer["heartbeat_ms"], gpu_share=given["gpu_share"],
                cache=given["cache"], cpus=cpus, threads=threads,
                sched=isolation.scheduling_class(d))
    # thread pools and the device list are read by the engine's libraries at import
    os.environ.update(isolation.worker_env(d, threads))
    os.makedirs(os.path.join(state_dir, "results"), exist_ok=True)
    isolation.pin_worker(cpus)
    worker.start_heartbeat()
    isolation.lower_worker_class(spec["sched"])
    print(f"resiso-worker: serving domain {args.domain} for {args.connect} "
          f"(cpus {cpus}, {threads} threads)", file=sys.stderr, flush=True)
    code = worker.serve()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # engine threads may still hold resources


if __name__ == "__main__":
    sys.exit(main())
