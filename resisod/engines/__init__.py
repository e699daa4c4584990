"""Engine registry: (kind, engine name) -> the module and class that implement it.

Modules are imported lazily, inside worker processes only; importing this package pulls in
no model library.
"""
from __future__ import annotations

import importlib
from typing import Any

from .base import Engine, EngineContext, EngineUnavailable

REGISTRY: dict[tuple[str, str], str] = {
    ("null", "null"): "resisod.engines.null:NullEngine",
    ("llm", "llama_cpp"): "resisod.engines.llama_cpp:LlamaCppEngine",
    ("llm", "transformers"): "resisod.engines.transformers_llm:TransformersEngine",
    ("tts", "piper"): "resisod.engines.piper_tts:PiperEngine",
    ("tts", "espeak"): "resisod.engines.espeak_tts:EspeakEngine",
    ("tts", "coqui"): "resisod.engines.coqui_tts:CoquiEngine",
    ("image", "diffusers"): "resisod.engines.diffusers_image:DiffusersEngine",
}


def create(domain: dict[str, Any], ctx: EngineContext) -> Engine:
    target = REGISTRY.get((domain["kind"], domain["engine"]))
    if target is None:
        raise EngineUnavailable(f"no engine {domain['engine']!r} for kind {domain['kind']!r}")
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineUnavailable(f"engine {domain['engine']!r} cannot be imported: {exc}") from exc
    return getattr(module, cls_name)(domain, ctx)
