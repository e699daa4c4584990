"""Who may connect to the cluster endpoint: ZAP over the allowed keys directory.

libzmq asks the ZAP handler (pyzmq's `ThreadAuthenticator`, a thread of the daemon) about
every CURVE handshake; the handler asks `AllowedKeys.callback`, which reads `allowed/` again
when it is older than `REREAD_S`, so `resiso keys add` / `revoke` take effect without a
restart. A refused key is logged with its fingerprint once per key per `REFUSAL_LOG_S`: a
refused worker reconnects every few hundred milliseconds, and the log must not fill up.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from . import cluster_keys

log = logging.getLogger("resisod.cluster")

REREAD_S = 1.0
REFUSAL_LOG_S = 60.0
ZAP_DOMAIN = "resiso"


class RefusalLog:
    """Decides whether a refusal of `key` is logged now: once per key per interval."""

    def __init__(self, every_s: float = REFUSAL_LOG_S, limit: int = 4096):
        self.every_s, self.limit = every_s, limit
        self.last: dict[str, float] = {}

    def due(self, key: str, now: float) -> bool:
        if now - self.last.get(key, -1e18) < self.every_s:
            return False
        if len(self.last) >= self.limit:  # a flood of fresh keys must not grow the daemon
            self.last = {k: t for k, t in self.last.items() if now - t < self.every_s}
        self.last[key] = now
        return True


class AllowedKeys:
    """The allowed keys directory as a map Z85 key -> name, re-read at most every REREAD_S."""

    def __init__(self, directory: str, clock: Callable[[], float] = time.monotonic):
        self.directory, self.clock = directory, clock
        self.read_at = -1e18
        self.keys: dict[str, str] = {}
        self.refusals = RefusalLog()
        self.lock = threading.Lock()  # the ZAP thread and the loop both ask

    def current(self) -> dict[str, str]:
        with self.lock:
            now = self.clock()
            if now - self.read_at >= REREAD_S:
                self.keys = cluster_keys.allowed(self.directory)
                self.read_at = now
            return self.keys

    def name_of(self, z85_key: str) -> str | None:
        return self.current().get(z85_key)

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials provider hook: `key` is the client's public key in Z85."""
        z85_key = key.decode("ascii", "replace")
        if z85_key in self.current():
            return True
        with self.lock:
            due = self.refusals.due(z85_key, self.clock())
        if due:
            log.warning("refused a remote worker: unknown or revoked key, fingerprint %s; "
                        "`resiso keys add NAME KEY` lets it in",
                        cluster_keys.fingerprint(z85_key))
        return False


def start_authenticator(ctx: Any, allowed: AllowedKeys) -> Any:
    """Start the ZAP handler on `ctx` for CURVE clients checked by `allowed`."""
    from zmq.auth.thread import ThreadAuthenticator
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("resisod.zap"))
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=allowed)
    return auth
