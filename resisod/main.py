"""`resisod`: parse arguments, load the configuration, run the daemon."""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__, config, logsetup, paths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="resisod", description="resiso daemon: runs LLM, TTS and "
                                 "image jobs in isolated resource domains")
    ap.add_argument("--config", default=os.environ.get("RESISO_CONFIG"),
                    help="config file (TOML); env RESISO_CONFIG")
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
    if args.check_config:
        json.dump(cfg, sys.stdout, indent=2)
        print()
        return 0
    logsetup.configure(cfg["logging"], batched=True)
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
        logsetup.flush()  # what was logged before a crash still reaches the log
