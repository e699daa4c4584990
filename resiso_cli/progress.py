"""Showing a stepped job (image) on stderr: queue position, then steps with ETA."""
from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from .output import err


class StepProgress:
    """A Rich progress bar fed with the daemon's events; ETA comes from the daemon."""

    def __init__(self, label: str):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"), console=err, transient=False)
        self.task = self.progress.add_task(label, total=None, note="connecting")

    def __enter__(self) -> "StepProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def update(self, ev: dict[str, Any]) -> None:
        name = ev.get("event")
        if name in ("accepted", "queued"):
            eta = ev.get("estimated_time_ms")
            note = f"queued, position {ev.get('position', 0)}"
            if eta:
                note += f", ~{eta / 1000:.1f}s"
            self.progress.update(self.task, note=note)
        elif name == "started":
            self.progress.update(self.task, note="running")
        elif name == "progress":
            left = ev.get("estimated_time_remaining_ms")
            note = f"ETA {left / 1000:.1f}s" if left is not None else ""
            self.progress.update(self.task, total=ev.get("total"), completed=ev.get("step"),
                                 note=note)
        elif name == "paused":
            self.progress.update(self.task, note="paused (yielding to realtime work)")
        elif name == "resumed":
            self.progress.update(self.task, note="resumed")
        elif name == "result":
            self.progress.update(self.task, note="done")
