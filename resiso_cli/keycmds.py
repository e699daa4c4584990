"""`resiso keys init|add|list|revoke`: the CURVE keys of remote workers (issue 17).

These edit files in the daemon's keys directory (`resisod/cluster_keys.py`); the daemon
reads `allowed/` again within a second, so add and revoke need no restart. The directory is
`--keys-dir`, else the config's [cluster] keys_dir, else `<state dir>/keys` (the config's
[daemon] state_dir, $RESISO_STATE_DIR, or the default state dir).

Exit statuses: 0 done; 2 bad input (bad_key, bad_name) or a bad config; 5 a name or key
already allowed (duplicate_name, duplicate_key); 6 no such name (unknown_name). With
`--json`, errors are `{"status": "error", "error": {"code", "message"}}` on stdout.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import typer

from . import output

app = typer.Typer(name="keys", no_args_is_help=True, rich_markup_mode=None,
                  help="CURVE keys of remote workers (resiso-worker) for [cluster] listen.")

DUPLICATE, UNKNOWN = 5, 6
EXIT = {"bad_key": output.USAGE, "bad_name": output.USAGE, "no_server_key": output.FAILED,
        "duplicate_name": DUPLICATE, "duplicate_key": DUPLICATE, "unknown_name": UNKNOWN,
        "bad_config": output.USAGE}

KEYS_DIR = typer.Option(None, "--keys-dir", help="The daemon's keys directory.")
CONFIG = typer.Option(None, "--config", envvar="RESISO_CONFIG",
                      help="The daemon's config file, for [cluster] keys_dir and state_dir.")
JSON = typer.Option(False, "--json")


def _directory(keys_dir: Optional[str], config: Optional[str], as_json: bool) -> str:
    from resisod import cluster_keys, paths
    if keys_dir:
        return keys_dir
    state_dir = os.environ.get("RESISO_STATE_DIR") or ""
    if config:
        import tomllib
        try:
            with open(config, "rb") as f:
                raw = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            _fail("bad_config", f"cannot read {config}: {exc}", as_json)
        given = (raw.get("cluster") or {}).get("keys_dir")
        if given:
            return given
        state_dir = state_dir or (raw.get("daemon") or {}).get("state_dir") or ""
    return cluster_keys.default_dir(state_dir or paths.default_state_dir())


def _fail(code: str, message: str, as_json: bool) -> Any:
    output.fail(EXIT.get(code, output.FAILED), message, as_json=as_json, error_code=code)


def _run(fn: Any, as_json: bool) -> Any:
    from resisod.cluster_keys import KeysError
    try:
        return fn()
    except KeysError as exc:
        _fail(exc.code, exc.message, as_json)
    except OSError as exc:
        _fail("io_error", str(exc), as_json)


@app.command()
def init(keys_dir: Optional[str] = KEYS_DIR, config: Optional[str] = CONFIG,
         as_json: bool = JSON) -> None:
    """Make the daemon's key pair if absent; print its public key (for --server-key)."""
    from resisod import cluster_keys
    directory = _directory(keys_dir, config, as_json)
    public, made = _run(lambda: cluster_keys.init_server(directory), as_json)
    if as_json:
        output.print_json({"public_key": public, "made": made, "keys_dir": directory})
    else:
        print(public)


@app.command()
def add(name: str, public_key: str, keys_dir: Optional[str] = KEYS_DIR,
        config: Optional[str] = CONFIG, as_json: bool = JSON) -> None:
    """Let the remote worker with this public key (Z85) in, under NAME."""
    from resisod import cluster_keys
    directory = _directory(keys_dir, config, as_json)
    fp = _run(lambda: cluster_keys.add(directory, name, public_key), as_json)
    if as_json:
        output.print_json({"name": name, "fingerprint": fp})
    else:
        print(f"{name} {fp}")


@app.command("list")
def list_keys(keys_dir: Optional[str] = KEYS_DIR, config: Optional[str] = CONFIG,
              as_json: bool = JSON) -> None:
    """The allowed worker keys: name and fingerprint."""
    from resisod import cluster_keys
    directory = _directory(keys_dir, config, as_json)
    rows = _run(lambda: cluster_keys.listing(directory), as_json)
    if as_json:
        output.print_json({"keys": rows})
        return
    from .columns import Table
    table = Table("name", "fingerprint")
    for r in rows:
        table.add_row(r["name"], r["fingerprint"])
    print(table)


@app.command()
def revoke(name: str, keys_dir: Optional[str] = KEYS_DIR, config: Optional[str] = CONFIG,
           as_json: bool = JSON) -> None:
    """Refuse this worker's key from now on; a connected worker with it is dropped within a
    second and its jobs go to other workers."""
    from resisod import cluster_keys
    directory = _directory(keys_dir, config, as_json)
    fp = _run(lambda: cluster_keys.revoke(directory, name), as_json)
    if as_json:
        output.print_json({"name": name, "fingerprint": fp, "revoked": True})
    else:
        print(f"revoked {name} {fp}")
