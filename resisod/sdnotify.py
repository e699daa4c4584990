"""systemd's notify protocol (sd_notify) without libsystemd: one datagram per state change."""
from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self) -> None:
        path = os.environ.get("NOTIFY_SOCKET", "")
        self.addr = ("\0" + path[1:]) if path.startswith("@") else path
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        # ping at half the watchdog period, as sd_watchdog_enabled(3) advises
        self.watchdog_s = int(usec) / 2e6 if usec.isdigit() and (not pid or
                                                                  pid == str(os.getpid())) else 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self.addr else None

    def notify(self, state: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto(state.encode(), self.addr)
        except OSError:
            pass  # systemd gone or not listening: nothing to tell

    def ready(self) -> None:
        self.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving")

    def stopping(self) -> None:
        self.notify("STOPPING=1\nSTATUS=shutting down")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")
