"""The CURVE key files of a daemon that takes remote workers: no sockets, no model code.

Layout of the keys directory (`[cluster] keys_dir`, default `<state_dir>/keys`), in the
certificate format of `zmq.auth` (ZPL text, keys in Z85), so `zmq.auth.load_certificate`
and libzmq's own tools read them:

    server.key           the daemon's public key (give it to remote workers)
    server.key_secret    the daemon's key pair (mode 0600)
    allowed/NAME.key     one public key per remote worker allowed in; NAME shows in status

A worker is let in while its file is in `allowed/`; `revoke` removes the file, which the
daemon notices at the next handshake and within a second for connected workers.
Errors carry a stable `code` (and the CLI an exit status per code): scripts match on them.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Iterator

SERVER = "server"
ALLOWED = "allowed"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


class KeysError(Exception):
    """A refused key operation. `code` is stable: bad_key, bad_name, duplicate_name,
    duplicate_key, unknown_name, no_server_key."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def default_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "keys")


def keys_dir(cfg: dict) -> str:
    """The keys directory a configuration names."""
    return cfg["cluster"]["keys_dir"] or default_dir(cfg["daemon"]["state_dir"])


def decode_public(z85_key: str | bytes) -> bytes:
    """The 32 raw bytes of a Z85 public key, or KeysError(bad_key)."""
    from zmq.utils import z85
    text = z85_key.decode("ascii", "replace") if isinstance(z85_key, bytes) else z85_key
    text = text.strip()
    if len(text) != 40:
        raise KeysError("bad_key", f"a CURVE public key is 40 Z85 characters, got "
                        f"{len(text)}: {text[:48]!r}")
    try:
        raw = z85.decode(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError, KeyError, IndexError):
        raise KeysError("bad_key", f"not a Z85 key: {text!r}")
    if z85.encode(raw).decode("ascii") != text:  # Z85 has one spelling per key
        raise KeysError("bad_key", f"not a Z85 key: {text!r}")
    return raw


def fingerprint(z85_key: str | bytes) -> str:
    """The first 8 bytes of SHA-256 of the raw public key, in hex: short enough for a log
    line, and never the key itself."""
    try:
        raw = decode_public(z85_key)
    except KeysError:
        raw = z85_key if isinstance(z85_key, bytes) else z85_key.encode()
    return hashlib.sha256(raw).digest()[:8].hex()


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise KeysError("bad_name", f"a key name is 1 to 64 letters, digits, '.', '_' or '-', "
                        f"starting with a letter or digit; got {name!r}")


# --- the daemon's key pair -------------------------------------------------------------------
def server_pair(directory: str) -> tuple[bytes, bytes] | None:
    """(public, secret) in Z85, or None when there is none yet."""
    path = os.path.join(directory, SERVER + ".key_secret")
    if not os.path.exists(path):
        return None
    import zmq.auth
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise KeysError("no_server_key", f"{path} holds no secret key")
    return public, secret


def init_server(directory: str) -> tuple[str, bool]:
    """Make the daemon's key pair if absent; return (its public key, made now)."""
    pair = server_pair(directory)
    if pair is not None:
        return pair[0].decode("ascii"), False
    import zmq.auth
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.makedirs(os.path.join(directory, ALLOWED), mode=0o700, exist_ok=True)
    old = os.umask(0o077)  # the secret file is born private
    try:
        public_file, secret_file = zmq.auth.create_certificates(directory, SERVER)
    finally:
        os.umask(old)
    os.chmod(public_file, 0o644)
    return zmq.auth.load_certificate(public_file)[0].decode("ascii"), True


# --- allowed worker keys ---------------------------------------------------------------------
def _allowed_files(directory: str) -> Iterator[tuple[str, str]]:
    folder = os.path.join(directory, ALLOWED)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return
    for entry in names:
        if entry.endswith(".key") and not entry.startswith("."):
            yield entry[:-4], os.path.join(folder, entry)


def allowed(directory: str) -> dict[str, str]:
    """Z85 public key -> name, for every readable file in allowed/ (a damaged file is
    skipped: it lets nobody in)."""
    import zmq.auth
    out: dict[str, str] = {}
    for name, path in _allowed_files(directory):
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError):
            continue
        if public:
            out[public.decode("ascii")] = name
    return out


def add(directory: str, name: str, public: str) -> str:
    """Allow a worker's key under `name`; returns its fingerprint."""
    check_name(name)
    decode_public(public)
    public = public.strip()
    path = os.path.join(directory, ALLOWED, name + ".key")
    if os.path.exists(path):
        raise KeysError("duplicate_name", f"a key named {name!r} is already allowed; revoke "
                        f"it first to replace it")
    held = allowed(directory)
    if public in held:
        raise KeysError("duplicate_key", f"this key is already allowed as {held[public]!r}")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"#   resiso remote worker {name}\n"
                "#   ZeroMQ CURVE Public Certificate\n"
                "#   Exchange securely, or use a secure mechanism to verify the contents\n"
                "#   of this file after exchange. Store public certificates in your home\n"
                "#   directory, in the .curve subdirectory.\n\n"
                "metadata\n"
                "curve\n"
                f'    public-key = "{public}"\n')
    os.replace(tmp, path)  # whole or absent: the daemon may read the folder at any time
    return fingerprint(public)


def listing(directory: str) -> list[dict[str, str]]:
    return [{"name": name, "fingerprint": fingerprint(key), "key": key}
            for key, name in sorted(allowed(directory).items(), key=lambda kv: kv[1])]


def revoke(directory: str, name: str) -> str:
    """Remove a worker's key; returns its fingerprint."""
    check_name(name)
    path = os.path.join(directory, ALLOWED, name + ".key")
    held = {n: k for k, n in allowed(directory).items()}
    if not os.path.exists(path):
        raise KeysError("unknown_name", f"no key named {name!r} is allowed"
                        + (f" (allowed: {', '.join(sorted(held))})" if held else ""))
    os.unlink(path)
    return fingerprint(held.get(name, ""))


# --- a remote worker's own key pair ----------------------------------------------------------
def default_worker_key_file() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "resiso-worker", "worker.key_secret")


def worker_pair(path: str) -> tuple[str, str, bool]:
    """(public, secret, made now) in Z85 from a `.key_secret` file, made if absent."""
    made = False
    if not os.path.exists(path):
        if not path.endswith(".key_secret"):
            raise KeysError("bad_key", f"a new key file's name must end in .key_secret "
                            f"(the public half goes beside it as .key), got {path!r}")
        import zmq.auth
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        old = os.umask(0o077)
        try:
            zmq.auth.create_certificates(folder, os.path.basename(path)[:-len(".key_secret")])
        finally:
            os.umask(old)
        made = True
    import zmq.auth
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise KeysError("bad_key", f"{path} holds no secret key (a .key file is only the "
                        f"public half)")
    return public.decode("ascii"), secret.decode("ascii"), made
