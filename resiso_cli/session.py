"""Connecting to the daemon from a CLI command, with the CLI's exit codes for failures."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

from . import output

if TYPE_CHECKING:
    from .client import Client


@contextlib.contextmanager
def connected(as_json: bool = False) -> Iterator[Client]:
    from .client import Client, DaemonUnreachable, Rejected
    try:
        with Client() as client:
            yield client
    except DaemonUnreachable as exc:
        output.fail(output.UNREACHABLE, str(exc), as_json=as_json, error_code="unreachable")
    except Rejected as exc:
        output.fail(output.REJECTED, f"{exc.message} ({exc.code})", as_json=as_json,
                    error_code=exc.code)
