"""Plain aligned columns for one-shot commands.

`resiso status` must answer at once, and Rich's console and tables (import and drawing)
would cost it as much as the interpreter and Typer together. Plain columns also pipe and
grep as whole lines.
"""
from __future__ import annotations

import unicodedata

GAP = "  "


def width(text: str) -> int:
    """Terminal cells: East Asian wide characters (a Chinese error message) take two."""
    if text.isascii():
        return len(text)
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


class Table:
    """Headers and rows of strings, left-aligned; the last column is not padded."""

    def __init__(self, *headers: str):
        self.headers = list(headers)
        self.rows: list[list[str]] = []

    def add_row(self, *cells: str) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"{len(cells)} cells for {len(self.headers)} columns")
        self.rows.append([" ".join(str(c).split("\n")) for c in cells])

    def __str__(self) -> str:
        lines = [self.headers, *self.rows]
        widths = [max(width(line[i]) for line in lines) for i in range(len(self.headers))]
        out = []
        for line in lines:
            cells = [c + " " * (w - width(c)) for c, w in zip(line[:-1], widths)]
            out.append(GAP.join([*cells, line[-1]]).rstrip())
        return "\n".join(out)


def worker_jobs(w: dict) -> str:
    """A worker's job cell: the task id of a one-job worker; for a batching one, its places
    taken out of its capacity, and the jobs paused to make room ("3/8, 1 paused")."""
    capacity, jobs = w.get("capacity", 1), w.get("jobs") or []
    if capacity <= 1:
        return w.get("job") or "-"
    cell = f"{len(jobs) - w.get('bumped', 0)}/{capacity}"
    return cell + (f", {w['bumped']} paused" if w.get("bumped") else "")


def runs_on(w: dict) -> str:
    """Where a worker's engine computes, as it reported ("cuda", "cpu"; llama.cpp adds its
    offloaded layers: "cuda 24 layers"), else its configured device."""
    r = w.get("runs_on")
    if not r:
        return w.get("device") or "-"
    layers = r.get("gpu_layers")
    if r.get("device") != "cpu" and isinstance(layers, int):
        return f"{r['device']} {'all' if layers < 0 else layers} layers"
    return r.get("device") or "-"
