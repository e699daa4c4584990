"""Where the daemon's socket and state live, and how they are claimed safely."""
from __future__ import annotations

import errno
import fcntl
import grp
import os
import socket


def default_socket() -> str:
    if os.geteuid() == 0:
        return "/run/resiso/resisod.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/resiso-{os.getuid()}"
    return os.path.join(runtime, "resiso", "resisod.sock")


def default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/resiso"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "resiso")


def client_socket() -> str:
    """The socket a client connects to: $RESISO_SOCKET, else the daemon's default."""
    return os.environ.get("RESISO_SOCKET") or default_socket()


class SocketBusy(Exception):
    pass


class SocketClaim:
    """Exclusive ownership of a socket path for the daemon's lifetime.

    A lock file beside the socket is held with flock; a second daemon fails to take it and
    refuses to start, while a socket left by a daemon that died (its lock released by the
    kernel) is simply replaced.
    """

    def __init__(self, path: str, group: str = ""):
        self.path = path
        self.group = group
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        directory = os.path.dirname(self.path) or "."
        gid = grp.getgrnam(self.group).gr_gid if self.group else -1
        mode = 0o750 if self.group else 0o700
        os.makedirs(directory, mode=mode, exist_ok=True)
        # makedirs honours umask and leaves an existing directory alone: set the mode explicitly
        # so other users cannot reach the socket, whatever was there before.
        os.chmod(directory, mode)
        if gid >= 0:
            os.chown(directory, -1, gid)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SocketBusy(f"another resisod is already serving {self.path} "
                                 f"(stop it first, or pass --socket for a second instance)")
            raise
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        if os.path.exists(self.path):
            if _answers(self.path):
                raise SocketBusy(f"a process is listening on {self.path} without holding its "
                                 f"lock; refusing to replace it")
            os.unlink(self.path)  # stale: left by a daemon that died

    def after_bind(self) -> None:
        os.chmod(self.path, 0o660 if self.group else 0o600)

    def release(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
