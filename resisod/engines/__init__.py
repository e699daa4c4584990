"""Engines: found by (kind, name) in package metadata (`registry`), created inside workers.

An engine's module is imported by `create` only, which runs in worker processes; importing
this package pulls in no model library and no plugin.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import registry
from .base import Engine, EngineContext, EngineUnavailable


def create(domain: dict[str, Any], ctx: EngineContext) -> Engine:
    found = registry.discover()
    info = found.engines.get((domain["kind"], domain["engine"]))
    if info is None:
        raise EngineUnavailable(f"no engine {domain['engine']!r} of kind {domain['kind']!r} is "
                                f"installed; available: {found.listing(domain['kind'])}")
    return engine_class(info)(domain, ctx)


def engine_class(info: registry.EngineInfo) -> type[Engine]:
    """Import an engine's class. Any failure is the engine's, so it becomes EngineUnavailable
    with the cause: the worker reports it and only the domains using this engine fail."""
    what = f"engine {info.name!r} ({info.origin()})"
    module_name, attr = info.target.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # a plugin may fail on import in any way, not only ImportError
        detail = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
        raise EngineUnavailable(f"{what} cannot be imported: {detail}") from exc
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, Engine)):
        raise EngineUnavailable(f"{what}: {info.target} is not a subclass of "
                                f"resisod.engines.base.Engine")
    if obj.kind and obj.kind != info.kind:
        raise EngineUnavailable(f"{what}: {info.target} is an engine of kind {obj.kind!r}, "
                                f"declared as {info.kind!r}")
    return obj
