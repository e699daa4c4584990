"""`python -m resisod.http` (also `resiso serve-http`): run the HTTP gateway with uvicorn."""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys

from .. import config, paths


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="resiso serve-http", description="HTTP gateway "
                                 "(seed REST API, OpenAI-compatible API, /metrics) to resisod")
    ap.add_argument("--config", default=os.environ.get("RESISO_CONFIG"))
    ap.add_argument("--socket", default=None)
    ap.add_argument("--listen", default=None, help="HOST:PORT (default from [http].listen)")
    a = ap.parse_args(argv)
    try:
        cfg = config.load(a.config)
    except config.ConfigError as exc:
        print("resiso serve-http: invalid configuration:\n  " + "\n  ".join(exc.errors),
              file=sys.stderr)
        return 2
    http = cfg["http"]
    if os.environ.get("RESISO_HTTP"):  # handed down by resisod when it starts the gateway
        http.update(json.loads(os.environ["RESISO_HTTP"]))
    # a key from the environment (a Kubernetes Secret, deploy/k8s/) keeps it out of the
    # config file, which may be a ConfigMap anyone in the namespace can read
    if os.environ.get("RESISO_API_KEY"):
        http["api_key"] = os.environ["RESISO_API_KEY"]
    listen = a.listen or http["listen"]
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        print(f"resiso serve-http: listen must be HOST:PORT, got {listen!r}", file=sys.stderr)
        return 2
    if not is_loopback(host) and not http["api_key"]:
        print(f"resiso serve-http: refusing to listen on {host} (not loopback) without "
              f"[http].api_key; set one, or listen on 127.0.0.1", file=sys.stderr)
        return 2
    socket_path = a.socket or os.environ.get("RESISO_SOCKET") or cfg["daemon"]["socket"] or \
        paths.default_socket()
    import uvicorn

    from .app import create_app
    app = create_app(socket_path, http)
    # the console's live feed never ends by itself: an open tab must not hold up a stop
    uvicorn.run(app, host=host.strip("[]") or "127.0.0.1", port=int(port), log_level="warning",
                limit_concurrency=cfg["daemon"]["max_clients"], timeout_keep_alive=5,
                timeout_graceful_shutdown=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
