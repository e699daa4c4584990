"""The original design's `config.json`, read as it was written, and mapped onto resiso's own
settings (the TOML tree that `config.build` validates).

    server.port / host                  -> [http] listen, with the gateway enabled
    server.max_concurrent_connections   -> [daemon] max_clients
    server.request_timeout_ms           -> [daemon] request_timeout_ms
    resources.gpu_allocation.*_percentage, cpu_threads, max_memory_mb -> [resources]
    models.llm|tts|image                -> [domains.llm|tts|image]
    logging.level|file|max_size_mb|backups -> [logging]

Every key is checked here, before the mapping, so an error names the key as the user wrote
it in the JSON file, its value, and what is allowed.
"""
from __future__ import annotations

import os
from typing import Any

LOOPBACK = "127.0.0.1"

# engine_type -> (kind, engine, name clients use in `model`). An engine type of the seed's
# with no engine of its own here goes to the nearest one: MeloTTS (a neural multi-language
# voice) to Piper's ONNX voices, pyttsx3 (espeak on Linux) to espeak-ng, the SD and SDXL
# Turbo checkpoints to the diffusers pipeline that loads them. An LLM engine is llama.cpp for
# a .gguf file and transformers for a model directory, whatever the type says.
ENGINE_TYPES: dict[str, tuple[str, str, str]] = {
    "QWEN_2_5": ("llm", "auto", "qwen2.5"),
    "QWEN": ("llm", "auto", "qwen"),
    "LLAMA": ("llm", "auto", "llama"),
    "LLAMA_3": ("llm", "auto", "llama3"),
    "LLAMA_CPP": ("llm", "llama_cpp", ""),
    "TRANSFORMERS": ("llm", "transformers", ""),
    "COQUI_GLOW_TTS": ("tts", "coqui", ""),
    "COQUI_TTS": ("tts", "coqui", ""),
    "MELOTTS": ("tts", "piper", ""),
    "MELO_TTS": ("tts", "piper", ""),
    "PIPER": ("tts", "piper", ""),
    "PYTTSX3": ("tts", "espeak", ""),
    "ESPEAK": ("tts", "espeak", ""),
    "STABLE_DIFFUSION_1_5_TURBO": ("image", "diffusers", "sd-turbo"),
    "STABLE_DIFFUSION_1_5": ("image", "diffusers", "sd-1.5"),
    "SD_TURBO": ("image", "diffusers", "sd-turbo"),
    "SDXL_TURBO": ("image", "diffusers", "sdxl-turbo"),
    "STABLE_DIFFUSION_XL_TURBO": ("image", "diffusers", "sdxl-turbo"),
}
NEEDS_NO_MODEL = {"espeak"}  # espeak-ng's voices come with the program

SERVER_KEYS = {"host", "port", "max_concurrent_connections", "request_timeout_ms"}
RESOURCE_KEYS = {"gpu_allocation", "cpu_threads", "max_memory_mb"}
GPU_KEYS = {"llm_percentage": "llm", "image_percentage": "image"}
LOGGING_KEYS = {"level": "level", "file": "file", "max_size_mb": "max_size_mb",
                "backups": "backups"}
# per model section: seed key -> domain key (None: handled by hand)
MODEL_KEYS: dict[str, dict[str, str | None]] = {
    "llm": {"engine_type": None, "model_path": None, "device_id": None,
            "default_max_tokens": "default_max_tokens", "max_tokens": "max_tokens_limit",
            "default_temperature": "default_temperature", "context_size": "context_size"},
    "tts": {"engine_type": None, "model_path": None, "device_id": None, "voice": "voice",
            "speed": "speed"},
    "image": {"engine_type": None, "model_path": None, "device_id": None,
              "default_width": "default_width", "default_height": "default_height",
              "default_steps": "default_steps"},
}


def _unknown(section: str, given: dict[str, Any], allowed: set[str] | dict,
             errors: list[str]) -> None:
    for key in given:
        if key not in allowed:
            errors.append(f"{section}.{key}: unknown key; allowed: {', '.join(sorted(allowed))}")


def _table(section: str, value: Any, errors: list[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append(f"{section}: must be an object, got {type(value).__name__}")
        return {}
    return value


def _device(section: str, value: Any, errors: list[str]) -> str | None:
    """device_id: a GPU index (-1 = the CPU), or a device string as resiso writes it."""
    if isinstance(value, bool):
        errors.append(f"{section}.device_id: must be a GPU index (-1 = CPU) or 'cpu', "
                      f"'cuda', 'cuda:N', 'auto'; got {value!r}")
        return None
    if isinstance(value, int):
        return "cpu" if value < 0 else f"cuda:{value}"
    if isinstance(value, str):
        return value  # `config.build` checks the spelling
    errors.append(f"{section}.device_id: must be a GPU index (-1 = CPU) or 'cpu', 'cuda', "
                  f"'cuda:N', 'auto'; got {value!r}")
    return None


def _model(kind: str, given: Any, base_dir: str, errors: list[str]) -> dict[str, Any] | None:
    section = f"models.{kind}"
    m = _table(section, given, errors)
    if not m:
        return None
    _unknown(section, m, MODEL_KEYS[kind], errors)
    etype = m.get("engine_type")
    allowed = sorted(t for t, (k, _, _) in ENGINE_TYPES.items() if k == kind)
    if not isinstance(etype, str) or etype.upper() not in ENGINE_TYPES \
            or ENGINE_TYPES[etype.upper()][0] != kind:
        errors.append(f"{section}.engine_type: {etype!r} is not an engine type for {kind}; "
                      f"allowed: {', '.join(allowed)}")
        return None
    _, engine, served = ENGINE_TYPES[etype.upper()]
    out: dict[str, Any] = {"kind": kind}
    path = m.get("model_path", "")
    if not isinstance(path, str):
        errors.append(f"{section}.model_path: must be a string, got {type(path).__name__}")
        return None
    if path.startswith("builtin:"):
        out["model"] = path
    elif path:
        full = os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))
        if not os.path.exists(full):
            errors.append(f"{section}.model_path: {path!r} does not exist (looked for {full}); "
                          f"give an existing model file or directory, or a builtin: name")
            return None
        out["model"] = full
    elif engine not in NEEDS_NO_MODEL:
        errors.append(f"{section}.model_path: required for engine_type {etype!r} "
                      f"(a model file or directory, or a builtin: name)")
        return None
    if engine == "auto":  # an LLM: the file decides
        engine = "llama_cpp" if out["model"].endswith(".gguf") or \
            out["model"].startswith("builtin:") else "transformers"
    out["engine"] = engine
    if served and kind == "llm":
        out["model_name"] = served
    if "device_id" in m:
        device = _device(section, m["device_id"], errors)
        if device is not None:
            out["device"] = device
    for seed_key, key in MODEL_KEYS[kind].items():
        if key is not None and seed_key in m:
            out[key] = m[seed_key]
    return out


def translate(raw: Any, base_dir: str) -> dict[str, Any]:
    """The seed's JSON tree -> resiso's TOML tree. Raises ValueError with every problem."""
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ValueError(["the file must hold one JSON object"])
    _unknown("", raw, {"server", "resources", "models", "logging"}, errors)
    errors[:] = [e.lstrip(".") for e in errors]
    out: dict[str, Any] = {"daemon": {}, "http": {}, "resources": {}, "logging": {},
                           "domains": {}}
    server = _table("server", raw.get("server"), errors)
    _unknown("server", server, SERVER_KEYS, errors)
    if "port" in server:
        port = server["port"]
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            errors.append(f"server.port: must be a port number (1-65535), got {port!r}")
        else:
            host = server.get("host", LOOPBACK)
            out["http"] = {"enabled": True, "listen": f"{host}:{port}"}
    for seed_key, key in (("max_concurrent_connections", "max_clients"),
                          ("request_timeout_ms", "request_timeout_ms")):
        if seed_key in server:
            out["daemon"][key] = server[seed_key]
    res = _table("resources", raw.get("resources"), errors)
    _unknown("resources", res, RESOURCE_KEYS, errors)
    for key in ("cpu_threads", "max_memory_mb"):
        if key in res:
            out["resources"][key] = res[key]
    gpu = _table("resources.gpu_allocation", res.get("gpu_allocation"), errors)
    _unknown("resources.gpu_allocation", gpu, GPU_KEYS, errors)
    if gpu:
        out["resources"]["gpu_allocation"] = {GPU_KEYS[k]: v for k, v in gpu.items()
                                              if k in GPU_KEYS}
    logging_ = _table("logging", raw.get("logging"), errors)
    _unknown("logging", logging_, LOGGING_KEYS, errors)
    out["logging"] = {LOGGING_KEYS[k]: v for k, v in logging_.items() if k in LOGGING_KEYS}
    if isinstance(out["logging"].get("file"), str) and out["logging"]["file"]:
        out["logging"]["file"] = os.path.normpath(os.path.join(base_dir, out["logging"]["file"]))
    models = _table("models", raw.get("models"), errors)
    _unknown("models", models, MODEL_KEYS, errors)
    for kind in MODEL_KEYS:
        domain = _model(kind, models.get(kind), base_dir, errors)
        if domain is not None:
            out["domains"][kind] = domain
    if not out["domains"] and not errors:
        errors.append("models: declares no model; give at least one of llm, tts, image")
    if errors:
        raise ValueError(errors)
    return out
