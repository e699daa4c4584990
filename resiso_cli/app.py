"""The `resiso` command: one Typer app; each command group lives in its own module."""
from __future__ import annotations

from typing import Optional

import typer

from . import __version__, deferred_coercion, generate, jobcmds, keycmds, output, top

app = typer.Typer(
    name="resiso", no_args_is_help=True, add_completion=True, rich_markup_mode=None,
    help="Run LLM, speech and image jobs on resisod, the local resource-isolating scheduler.")


def _version(value: bool) -> None:
    if value:
        print(f"resiso {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", callback=_version,
                                                 is_eager=True, help="Print the version.")
          ) -> None:
    pass


app.command()(generate.llm)
app.command()(generate.tts)
app.command()(generate.image)
app.command()(generate.submit)
app.command()(jobcmds.status)
app.command()(jobcmds.jobs)
app.command()(jobcmds.show)
app.command()(jobcmds.watch)
app.command()(jobcmds.wait)
app.command()(jobcmds.cancel)
app.command()(jobcmds.get)
app.command()(top.top)
app.add_typer(keycmds.app, name="keys")


@app.command("serve-http", context_settings={"allow_extra_args": True,
                                             "ignore_unknown_options": True})
def serve_http(ctx: typer.Context) -> None:
    """Run the HTTP gateway (REST + OpenAI-compatible API) against the daemon.

    Options: --listen HOST:PORT, --config PATH, --socket PATH."""
    import os
    import sys
    os.execv(sys.executable, [sys.executable, "-m", "resisod.http", *ctx.args])


def main() -> None:
    output.utf8_text()
    deferred_coercion.install()
    app()
