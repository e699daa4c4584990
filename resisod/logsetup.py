"""Logging: plain lines on stderr (journald-friendly), optional rotating file, optional JSON."""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from typing import Any


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


def configure(cfg: dict[str, Any]) -> None:
    level = getattr(logging, cfg["level"])
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level)
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    plain = logging.Formatter("%(levelname)s %(name)s: %(message)s" if under_journal else
                              "%(asctime)s %(levelname)s %(name)s: %(message)s")
    fmt = JsonLines() if cfg["json"] else plain
    stderr = logging.StreamHandler()
    stderr.setFormatter(fmt)
    root.addHandler(stderr)
    if cfg["file"]:
        os.makedirs(os.path.dirname(os.path.abspath(cfg["file"])), exist_ok=True)
        fh = logging.handlers.RotatingFileHandler(
            cfg["file"], maxBytes=int(cfg["max_size_mb"] * 1024 * 1024),
            backupCount=cfg["backups"])
        fh.setFormatter(fmt if cfg["json"] else logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
