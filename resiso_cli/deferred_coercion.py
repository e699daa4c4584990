"""Typer coerces parameter values through pydantic TypeAdapters, and it builds one for every
parameter it processes, absent ones included (`--help`, `--install-completion` and
`--show-completion` on every run). Importing pydantic for that costs more than the rest of
`resiso status` together, so the adapter is built only for a value that needs one: an absent
value (None) comes back as Typer's own coercion returns it, and a value that already has its
parameter's plain type (a `str` argument, an `int` default) comes back unchanged, which is
what pydantic's adapter would return for it.

Typer versions without `typer.core.build_runtime_param` (no pydantic coercion) are left alone.
"""
from __future__ import annotations

from typing import Any, Callable

_PLAIN = (str, int, float)


def install() -> None:
    from typer import core
    build = getattr(core, "build_runtime_param", None)
    if build is None or getattr(build, "deferred", False):
        return

    def deferred(descriptor: Any) -> "DeferredParam":
        return DeferredParam(build, descriptor)

    deferred.deferred = True  # type: ignore[attr-defined]
    core.build_runtime_param = deferred


class DeferredParam:
    """Stands in for Typer's RuntimeParam; builds the real one on the first value that
    needs it."""

    def __init__(self, build: Callable[[Any], Any], descriptor: Any):
        self._build = build
        self.descriptor = descriptor
        self._real: Any = None

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        multi = param.multiple or param.nargs == -1
        if value is None:
            return () if multi else None
        if not multi and self._unchanged(value):
            return value
        if self._real is None:
            self._real = self._build(self.descriptor)
        return self._real.coerce(value, param=param, ctx=ctx)

    def _unchanged(self, value: Any) -> bool:
        d = self.descriptor
        info = d.parameter_info
        return (d.annotation in _PLAIN and type(value) is d.annotation
                and d.file_annotation is None and info.parser is None
                and info.min is None and info.max is None)
