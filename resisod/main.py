"""`resisod`: parse arguments, load the configuration, run the daemon."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import __version__, config, logsetup, paths
from .engines import registry as engine_registry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="resisod", description="resiso daemon: runs LLM, TTS and "
                                 "image jobs in isolated resource domains")
    ap.add_argument("--config",
                    default=os.environ.get("RESISO_CONFIG") or os.environ.get("CONFIG_PATH"),
                    help="config file: TOML, or the original design's config.json; env "
                         "RESISO_CONFIG or CONFIG_PATH")
    ap.add_argument("--port", type=int, default=None,
                    help="serve the HTTP gateway on this port (on the configured host, "
                         "127.0.0.1 by default)")
    ap.add_argument("--socket", default=os.environ.get("RESISO_SOCKET"),
                    help="client socket path; env RESISO_SOCKET")
    ap.add_argument("--state-dir", default=os.environ.get("RESISO_STATE_DIR"),
                    help="state directory (job store, results, built-in models); "
                         "env RESISO_STATE_DIR")
    ap.add_argument("--check-config", action="store_true",
                    help="print the effective configuration (or the errors) and exit")
    ap.add_argument("--version", action="version", version=f"resisod {__version__}")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        print(f"resisod: invalid configuration{' in ' + args.config if args.config else ''}:",
              file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 2
    socket_path = args.socket or cfg["daemon"]["socket"] or paths.default_socket()
    state_dir = args.state_dir or cfg["daemon"]["state_dir"] or paths.default_state_dir()
    cfg["daemon"]["socket"], cfg["daemon"]["state_dir"] = socket_path, state_dir
    if args.port is not None:
        if not 1 <= args.port <= 65535:
            print(f"resisod: --port must be between 1 and 65535, got {args.port}",
                  file=sys.stderr)
            return 2
        host = cfg["http"]["listen"].rsplit(":", 1)[0]
        cfg["http"].update(enabled=True, listen=f"{host}:{args.port}")
    engines = engine_registry.discover()
    if args.check_config:
        for line in engines.warnings:
            print(f"resisod: warning: {line}", file=sys.stderr)
        json.dump({**cfg, "engines": engines.view(), "engine_warnings": list(engines.warnings)},
                  sys.stdout, indent=2)
        print()
        return 0
    logsetup.configure(cfg["logging"], batched=True)
    for line in engines.warnings:  # a clash or a malformed plugin entry point, never fatal
        logging.getLogger("resisod").warning("engines: %s", line)
    from .daemon import open_daemon
    try:
        broker = open_daemon(cfg)
    except (paths.SocketBusy, ValueError, OSError) as exc:
        logsetup.flush()
        print(f"resisod: {exc}", file=sys.stderr)
        return 1
    try:
        return broker.run()
    finally:
        # a crash skips the broker's shutdown, and an MPS control daemon is no child of ours:
        # told to quit here, or it outlives the daemon (a no-op once stopped)
        if broker.supervisor.compute is not None:
            broker.supervisor.compute.stop()
        logsetup.flush()  # what was logged before a crash still reaches the log
