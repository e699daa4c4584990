"""What a CLI command loads: `resiso status` must answer at once, so it imports only what it
uses. Speed itself is measured by bench/cli_latency.py; this checks the causes."""
from __future__ import annotations

import os
import subprocess
import sys

from .conftest import BIN

MODEL_LIBRARIES = ("torch", "transformers", "diffusers", "onnxruntime", "llama_cpp", "TTS",
                   "piper")


def imported(daemon, *args: str) -> set[str]:
    """Every module the command imported, from `python -X importtime`."""
    r = subprocess.run([sys.executable, "-X", "importtime", os.path.join(BIN, "resiso"), *args],
                       capture_output=True, text=True, timeout=120, env=daemon.env,
                       cwd=daemon.run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines()
            if line.startswith("import time:") and "|" in line} - {"package"}


def _top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def test_status_loads_neither_rich_nor_pydantic_nor_package_metadata(null_daemon):
    mods = imported(null_daemon, "status")
    assert "resiso_cli.client" in mods and "zmq" in mods  # the probe sees real imports
    # Typer's pydantic coercion (for options not given), Rich (plain columns), the
    # engine registry's entry-point scan, the WAV writer and the progress bars
    unwanted = {"pydantic", "rich", "importlib.metadata", "resisod.engines", "wave",
                "resiso_cli.progress", "resiso_cli.panel"}
    assert not unwanted & (mods | _top(mods)), unwanted & (mods | _top(mods))
    assert not set(MODEL_LIBRARIES) & _top(mods)


def test_top_snapshot_loads_no_model_library(null_daemon):
    mods = imported(null_daemon, "top")
    assert "resiso_cli.panel" in mods
    assert not set(MODEL_LIBRARIES) & _top(mods)
    assert "pydantic" not in _top(mods)
