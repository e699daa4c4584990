"""Which engines exist: entry points of the group `resiso.engines` in installed package metadata.

An entry point is named `kind:name` and points at `module:Class`, e.g.
`llm:echo = echoplug:EchoEngine`. This project declares its own engines the same way in its
pyproject.toml; any other installed distribution may add more (a plugin).

Discovery reads metadata only and never imports an engine module: the daemon and the CLI must
stay free of model libraries, and a plugin that cannot be imported must cost only the domains
that use it (their workers report the import error when they load).
"""
from __future__ import annotations

import functools
import os
import re
import tomllib
from dataclasses import dataclass
from importlib import metadata

from ..protocol import KIND_PREFIX

GROUP = "resiso.engines"
OWN_DIST = "resiso"  # [project] name in pyproject.toml: the distribution of the built-in engines
KINDS = tuple(KIND_PREFIX)  # the job kinds the protocol knows
_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


@dataclass(frozen=True)
class EngineInfo:
    kind: str
    name: str
    target: str   # "module:Class", imported only inside a worker
    dist: str     # the distribution that declares it
    version: str

    @property
    def builtin(self) -> bool:
        return _norm(self.dist) == OWN_DIST

    @property
    def source(self) -> str:
        return "built-in" if self.builtin else "plugin"

    def origin(self) -> str:
        """Where the engine comes from, as messages name it: `built-in` or
        `plugin <distribution> <version>`."""
        return "built-in" if self.builtin else f"plugin {self.dist} {self.version}"

    def view(self) -> dict[str, str]:
        return {"source": self.source, "distribution": self.dist, "version": self.version,
                "target": self.target}


@dataclass(frozen=True)
class Discovery:
    engines: dict[tuple[str, str], EngineInfo]
    warnings: tuple[str, ...]   # clashes and malformed entry points, each skipped, never fatal

    def of_kind(self, kind: str) -> list[EngineInfo]:
        """A kind's engines: built-in ones first, then plugins, each group by name."""
        found = [e for (k, _), e in self.engines.items() if k == kind]
        return sorted(found, key=lambda e: (not e.builtin, e.name))

    def names(self, kind: str, default: str | None = None) -> tuple[str, ...]:
        """A kind's engine names, `default` first when it is installed."""
        names = [e.name for e in self.of_kind(kind)]
        if default in names:
            names.remove(default)
            names.insert(0, default)
        return tuple(names)

    def listing(self, kind: str) -> str:
        """A kind's engines for an error message: `'echo' (plugin echoplug 0.1), ...`."""
        found = self.of_kind(kind)
        if not found:
            return "none (no installed package declares one)"
        return ", ".join(f"{e.name!r} ({e.origin()})" for e in found)

    def view(self) -> dict[str, dict[str, dict[str, str]]]:
        """By kind, then name: what --check-config and `status` show."""
        return {kind: {e.name: e.view() for e in self.of_kind(kind)} for kind in KINDS}


def _parse(name: str, value: str, dist: str, version: str,
           warnings: list[str]) -> EngineInfo | None:
    kind, sep, engine = name.partition(":")
    where = f"entry point {name!r} of {dist} {version}"
    if not sep or not engine or kind not in KINDS:
        warnings.append(f"{where} is ignored: its name must be kind:name with kind one of "
                        f"{', '.join(KINDS)}")
        return None
    if not _TARGET.fullmatch(value.strip()):
        warnings.append(f"{where} is ignored: it must point at module:Class, got {value!r}")
        return None
    return EngineInfo(kind, engine, value.strip(), dist, version)


def _add(found: dict[tuple[str, str], EngineInfo], info: EngineInfo,
         warnings: list[str]) -> None:
    key = (info.kind, info.name)
    held = found.get(key)
    if held is None:
        found[key] = info
        return
    # the built-in keeps its name; between two plugins the one found first on sys.path stays
    winner, loser = (info, held) if info.builtin and not held.builtin else (held, info)
    found[key] = winner
    warnings.append(f"engine {info.kind}:{info.name} is declared by {winner.dist} "
                    f"{winner.version} and by {loser.dist} {loser.version}; "
                    f"using {winner.dist}'s ({winner.origin()}), ignoring {loser.dist}'s")


def _source_tree_entries() -> dict[str, str]:
    """The engine entry points of this project's own pyproject.toml, for a checkout whose
    installed metadata predates them (or that was never installed)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        with open(os.path.join(root, "pyproject.toml"), "rb") as f:
            project = tomllib.load(f).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    if _norm(str(project.get("name", ""))) != OWN_DIST:
        return {}
    table = project.get("entry-points", {}).get(GROUP, {})
    return {str(k): str(v) for k, v in table.items()}


@functools.cache
def discover() -> Discovery:
    """Every installed engine, read once per process from package metadata."""
    found: dict[tuple[str, str], EngineInfo] = {}
    warnings: list[str] = []
    for ep in metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else "?"
        info = _parse(ep.name, ep.value, dist, version, warnings)
        if info is not None:
            _add(found, info, warnings)
    if not any(e.builtin for e in found.values()):
        entries = _source_tree_entries()
        if entries:
            warnings.append(f"the installed metadata of {OWN_DIST} declares no engines; using "
                            f"those of its pyproject.toml (refresh it: pip install -e .)")
        for name, value in entries.items():
            info = _parse(name, value, OWN_DIST, "source", warnings)
            if info is not None:
                _add(found, info, warnings)
    return Discovery(found, tuple(warnings))
