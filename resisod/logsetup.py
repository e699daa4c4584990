"""Logging: plain lines on stderr (journald-friendly), optional rotating file, optional JSON."""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from typing import Any


class PlainLines(logging.Formatter):
    """`<time> LEVEL logger: message`, with the time text built once per second."""

    def __init__(self, with_time: bool = True):
        super().__init__()
        self.with_time = with_time
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if not self.with_time:  # journald stamps lines itself
            return f"{record.levelname} {record.name}: {msg}"
        sec = int(record.created)
        if sec != self._second:
            self._second = sec
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
        return f"{self._stamp},{int(record.msecs):03d} {record.levelname} {record.name}: {msg}"


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "msg": record.getMessage(),
        }
        msg = out["msg"]
        # job lines start with "job <task_id>": lift the id into its own field for filtering
        if msg.startswith("job ") and " " in msg[4:]:
            out["task_id"] = msg[4:].split(" ", 1)[0]
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _BatchedHandler:
    """Handlers that write into a buffer the daemon flushes once per tick.

    A flush per record is a syscall per job transition; batching them keeps per-job
    logging off the scheduling hot path while every line still goes out within one tick.
    """

    def flush(self) -> None:  # called by logging after each record: defer
        pass

    def flush_now(self) -> None:
        stream = getattr(self, "stream", None)
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


class BatchedStreamHandler(_BatchedHandler, logging.StreamHandler):
    pass


class BatchedRotatingFileHandler(_BatchedHandler, logging.handlers.RotatingFileHandler):
    def close(self) -> None:
        self.flush_now()
        super().close()


# Records (and raw job lines) waiting for the next flush, in the order they were logged.
# Formatting them is left to the flush so a job's request path only appends to a list.
_pending: list[Any] = []
_targets: list[Any] = []
_deferring = False


class Deferred(logging.Handler):
    """The daemon's only root handler: keeps records for `flush()` to format and write."""

    def handle(self, record: logging.LogRecord) -> bool:  # no lock: list.append is atomic
        _pending.append(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        _pending.append(record)


def flush() -> None:
    """Format and write everything logged since the last flush (the daemon calls this per tick)."""
    if _pending:
        records = _pending[:]
        del _pending[:len(records)]
        # only this function touches the target handlers, from the daemon's loop: their
        # filters and locks would be per-record overhead for nothing
        for item in records:
            record = LeanRecord(*item) if type(item) is tuple else item
            for h in _targets:
                if record.levelno >= h.level:
                    h.emit(record)
    for h in _targets:
        h.flush_now()


class JobLines:
    """Job transition lines (started and ended: two per job), cheap enough for thousands of
    jobs a second.

    In the daemon the line is kept raw and formatted at the next flush, like every other
    record; elsewhere it is an ordinary logger call.
    """

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def info(self, msg: str, *args: Any) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            if _deferring:
                _pending.append((self.logger.name, logging.INFO, "", 0, msg, args, None,
                                 None, None, time.time()))
            else:
                self.logger.info(msg, *args)


class LeanRecord(logging.LogRecord):
    """A log record without the source-file bookkeeping nobody reads in this daemon.

    The stock record costs ~10 us (path splitting, process and thread lookups); the daemon
    writes one per job transition, thousands per second under load.
    """

    def __init__(self, name: str, level: int, pathname: str, lineno: int, msg: Any,
                 args: Any, exc_info: Any, func: str | None = None, sinfo: str | None = None,
                 created: float | None = None, **_: Any):
        self.name, self.msg, self.args = name, msg, args
        self.levelno, self.levelname = level, logging.getLevelName(level)
        self.pathname, self.filename, self.module = pathname, "", ""
        self.exc_info, self.exc_text, self.stack_info = exc_info, None, sinfo
        self.lineno, self.funcName = lineno, func
        self.created = time.time() if created is None else created
        self.msecs = (self.created - int(self.created)) * 1000
        self.relativeCreated = 0.0
        self.thread = self.threadName = self.processName = self.taskName = None
        self.process = None


def configure(cfg: dict[str, Any], *, batched: bool = False) -> None:
    level = getattr(logging, cfg["level"])
    # the daemon logs every job transition: skip the per-record work nobody reads
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.setLogRecordFactory(LeanRecord)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level)
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    plain = PlainLines(with_time=not under_journal)
    fmt = JsonLines() if cfg["json"] else plain
    global _deferring
    _targets.clear()
    _deferring = batched
    handlers: list[logging.Handler] = []
    if batched:
        stream = os.fdopen(os.dup(2), "w", buffering=1 << 16)
        stderr: logging.Handler = BatchedStreamHandler(stream)
    else:
        stderr = logging.StreamHandler()
    stderr.setFormatter(fmt)
    handlers.append(stderr)
    if cfg["file"]:
        os.makedirs(os.path.dirname(os.path.abspath(cfg["file"])), exist_ok=True)
        cls = BatchedRotatingFileHandler if batched else logging.handlers.RotatingFileHandler
        fh = cls(cfg["file"], maxBytes=int(cfg["max_size_mb"] * 1024 * 1024),
                 backupCount=cfg["backups"])
        fh.setFormatter(fmt if cfg["json"] else PlainLines())
        handlers.append(fh)
    if batched:
        _targets.extend(handlers)
        root.addHandler(Deferred())
    else:
        for h in handlers:
            root.addHandler(h)
