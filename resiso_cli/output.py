"""What the CLI prints and how it exits: data on stdout, everything else on stderr."""
from __future__ import annotations

import codecs
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from rich.console import Console

OK, FAILED, USAGE, UNREACHABLE, REJECTED = 0, 1, 2, 3, 4


def __getattr__(name: str) -> Any:
    # `err` is made on first use: importing Rich's console takes about as long as the
    # client and pyzmq together, and a command that prints only data (`resiso llm`
    # streaming tokens, `resiso status`) need not wait for it
    if name == "err":
        return _err()
    raise AttributeError(name)


def _err() -> Console:
    console = globals().get("err")
    if console is None:
        from rich.console import Console
        console = globals()["err"] = Console(stderr=True, highlight=False)
    return console


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


def utf8_text() -> None:
    """Prompts and answers are UTF-8 text whatever the locale claims.

    Python follows the locale's encoding unless it runs in UTF-8 mode, and under an ASCII
    one (LC_ALL=C with PYTHONUTF8=0, or a legacy locale) a Chinese answer would end the
    command with UnicodeEncodeError half-way through, and a Chinese argument would reach
    the daemon as lone surrogates it cannot carry. So pipes and files get UTF-8, a terminal
    keeps its own encoding but shows what it cannot encode as '?', and arguments the locale
    could not decode are read as the UTF-8 they almost always are. An explicit
    PYTHONIOENCODING is the user's choice and stands."""
    sys.argv[:] = [os.fsencode(a).decode("utf-8", "replace") if _has_surrogates(a) else a
                   for a in sys.argv]
    if os.environ.get("PYTHONIOENCODING"):
        return
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if stream is None or not hasattr(stream, "reconfigure") or \
                codecs.lookup(stream.encoding).name == "utf-8":
            continue
        try:
            tty = stream.isatty()
        except ValueError:  # closed
            continue
        if not tty:
            stream.reconfigure(encoding="utf-8",
                               errors="replace" if stream is sys.stdin else stream.errors)
        elif stream is not sys.stdin:
            stream.reconfigure(errors="replace")


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def print_json(obj: Any) -> None:
    import json  # only --json output needs it
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
    _err().print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True) if not as_json \
        else sys.stderr.write(f"error: {message}\n")
    raise SystemExit(code)


def report_final(final: dict[str, Any], as_json: bool) -> int:
    """Tell how a job ended (diagnostics on stderr) and return the exit code."""
    code = exit_for(final)
    if as_json:
        print_json(job_json(final))
    elif final.get("event") == "error":
        _err().print(f"[bold red]{final.get('task_id', '')} failed[/] "
                     f"({final.get('code')}): {final.get('message')}", soft_wrap=True)
    elif final.get("event") == "cancelled":
        _err().print(f"{final.get('task_id', '')} cancelled")
    return code
