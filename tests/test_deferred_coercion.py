"""Deferring Typer's coercion changes no value a command receives, and no usage error."""
from __future__ import annotations

import json
from typing import Optional

import pytest
import typer
from typer.testing import CliRunner

from resiso_cli import deferred_coercion


@pytest.fixture(scope="module")
def app():
    deferred_coercion.install()
    app = typer.Typer()

    @app.command()
    def cmd(name: str = typer.Argument(...),
            count: int = typer.Option(3, "--count"),
            limit: Optional[int] = typer.Option(None, "--limit", min=1, max=9),
            ratio: Optional[float] = typer.Option(None, "--ratio"),
            tag: Optional[list[str]] = typer.Option(None, "--tag"),
            flag: bool = typer.Option(False, "--flag")) -> None:
        print(json.dumps({"name": name, "count": count, "limit": limit, "ratio": ratio,
                          "tag": tag, "flag": flag}))
    return app


def run(app, *args):
    return CliRunner().invoke(app, list(args))


def test_defaults_and_given_values_arrive_typed(app):
    r = run(app, "x")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"name": "x", "count": 3, "limit": None, "ratio": None,
                                    "tag": None, "flag": False}
    r = run(app, "y", "--count", "7", "--limit", "4", "--ratio", "0.5", "--tag", "a",
            "--tag", "b", "--flag")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"name": "y", "count": 7, "limit": 4, "ratio": 0.5,
                                    "tag": ["a", "b"], "flag": True}


@pytest.mark.parametrize("args", [("x", "--count", "many"), ("x", "--limit", "10"),
                                  ("x", "--ratio", "half")])
def test_bad_values_are_still_usage_errors(app, args):
    assert run(app, *args).exit_code == 2


def test_absent_and_plain_values_build_no_adapter():
    from typer import core
    deferred_coercion.install()
    built = []

    class Info:
        parser = min = max = None

    class Descriptor:
        annotation, file_annotation, parameter_info = int, None, Info()

    class Param:
        multiple, nargs = False, 1

    p = deferred_coercion.DeferredParam(lambda d: built.append(d), Descriptor())
    assert p.coerce(None, Param(), None) is None and p.coerce(5, Param(), None) == 5
    assert built == []
    assert getattr(core.build_runtime_param, "deferred", False)
