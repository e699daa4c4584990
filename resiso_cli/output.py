"""What the CLI prints and how it exits: data on stdout, everything else on stderr."""
from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

from rich.console import Console

OK, FAILED, USAGE, UNREACHABLE, REJECTED = 0, 1, 2, 3, 4

err = Console(stderr=True, highlight=False)


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=_bytes_free) + "\n")
    sys.stdout.flush()


def _bytes_free(o: Any) -> Any:
    if isinstance(o, bytes):
        return f"<{len(o)} bytes>"
    raise TypeError(type(o).__name__)


def job_json(final: dict[str, Any]) -> dict[str, Any]:
    """The final event as the seed API's field names, without protocol envelope fields."""
    out = {k: v for k, v in final.items() if k not in ("v", "rid", "event", "data")}
    if final.get("event") == "error":
        out = {"task_id": final.get("task_id"), "status": final.get("status", "failed"),
               "error": {"code": final.get("code"), "message": final.get("message")}}
    elif final.get("event") == "cancelled":
        out["status"] = "cancelled"
    return out


def exit_for(final: dict[str, Any]) -> int:
    return OK if final.get("event") == "result" and final.get("status", "completed") == \
        "completed" else FAILED


def fail(code: int, message: str, *, as_json: bool = False, error_code: str = "") -> NoReturn:
    if as_json:
        print_json({"status": "error", "error": {"code": error_code or "error",
                                                 "message": message}})
    err.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True) if not as_json \
        else sys.stderr.write(f"error: {message}\n")
    raise SystemExit(code)


def report_final(final: dict[str, Any], as_json: bool) -> int:
    """Tell how a job ended (diagnostics on stderr) and return the exit code."""
    code = exit_for(final)
    if as_json:
        print_json(job_json(final))
    elif final.get("event") == "error":
        err.print(f"[bold red]{final.get('task_id', '')} failed[/] "
                  f"({final.get('code')}): {final.get('message')}", soft_wrap=True)
    elif final.get("event") == "cancelled":
        err.print(f"{final.get('task_id', '')} cancelled")
    return code
