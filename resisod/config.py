"""Configuration: TOML in, a validated tree with every default filled in out.

Errors name the exact key and what is allowed, so `resisod --check-config` can print them
as they are. The schema below is the single source of defaults; config.toml documents it.
"""
from __future__ import annotations

import copy
import json
import os
import tomllib
from dataclasses import dataclass
from typing import Any, Callable

from . import seed_config
from .engines import registry as engine_registry

KINDS = ("llm", "tts", "image", "null")
# the engines are those installed (package metadata, nothing imported); a domain that names
# none gets its kind's default
DEFAULT_ENGINE = {"llm": "llama_cpp", "tts": "piper", "image": "diffusers", "null": "null"}
ENGINES = {kind: engine_registry.discover().names(kind, DEFAULT_ENGINE[kind]) for kind in KINDS}
PRIORITIES = ("realtime", "normal", "batch")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(Exception):
    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Key:
    default: Any
    check: Callable[[Any], str | None]


def _int(lo: int, hi: int | None = None) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {type(v).__name__}"
        if v < lo or (hi is not None and v > hi):
            return f"must be between {lo} and {hi}" if hi is not None else f"must be >= {lo}"
        return None
    return check


def _num(lo: float, hi: float | None = None) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, got {type(v).__name__}"
        if v < lo or (hi is not None and v > hi):
            return f"must be between {lo} and {hi}" if hi is not None else f"must be >= {lo}"
        return None
    return check


def _str(choices: tuple[str, ...] | None = None) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"must be a string, got {type(v).__name__}"
        if choices is not None and v not in choices:
            return f"must be one of {', '.join(repr(c) for c in choices)}, got {v!r}"
        return None
    return check


def _node(v: Any) -> str | None:
    # the node name goes into task ids, which load balancers match with a plain regex
    # (deploy/haproxy.cfg, deploy/nginx.conf): keep it to what needs no escaping anywhere
    if not isinstance(v, str):
        return f"must be a string, got {type(v).__name__}"
    if v and not (len(v) <= 16 and all(c in "abcdefghijklmnopqrstuvwxyz0123456789" for c in v)):
        return (f"must be 1 to 16 lowercase letters or digits ([a-z0-9]), or \"\" for "
                f"none, got {v!r}")
    return None


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {type(v).__name__}"


def _cpus(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(c, int) and not isinstance(c, bool)
                                         and c >= 0 for c in v):
        return "must be a list of CPU numbers (non-negative integers), e.g. [0, 1]"
    return None


def _names(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(n, str) and n.strip() for n in v):
        return "must be a list of non-empty strings"
    return None


def _plain(v: Any) -> bool:
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    return isinstance(v, (str, int, float, bool))


def _options(v: Any) -> str | None:
    # unvalidated, but it travels to the worker as JSON: TOML dates and times cannot
    if not isinstance(v, dict):
        return f"must be a table, got {type(v).__name__}"
    if not _plain(v):
        return "may hold strings, numbers, booleans, arrays and tables only (no dates or times)"
    return None


def _device(v: Any) -> str | None:
    if not isinstance(v, str):
        return f"must be a string, got {type(v).__name__}"
    if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return None
    return f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {v!r}"


SCHEMA: dict[str, dict[str, Key]] = {
    "daemon": {
        "socket": Key("", _str()),
        "state_dir": Key("", _str()),
        "socket_group": Key("", _str()),
        "max_clients": Key(64, _int(1, 100000)),
        "request_timeout_ms": Key(120000, _int(0)),
        "batch_timeout_ms": Key(3600000, _int(0)),
        # a worker holding the interpreter (a model library's import, a step in Python)
        # misses beats; below 50 ms that kills healthy workers
        "heartbeat_ms": Key(500, _int(50, 60000)),
        "max_request_bytes": Key(1048576, _int(1024, 64 * 1024 * 1024)),
        "result_ttl_hours": Key(24.0, _num(0)),
        "shutdown_grace_s": Key(10.0, _num(0, 3600)),
        "restart_backoff_max_s": Key(30.0, _num(0.1, 3600)),
        "cancel_grace_s": Key(2.0, _num(0.1, 3600)),
        "load_attempts": Key(3, _int(1, 1000)),
        "failed_domain_hold_s": Key(60.0, _num(0, 86400)),
        "breaker_failures": Key(5, _int(0, 1000)),
        "breaker_cooldown_s": Key(30.0, _num(0.1, 86400)),
        "node": Key("", _node),
    },
    "logging": {
        "level": Key("INFO", _str(LOG_LEVELS)),
        "file": Key("", _str()),
        "max_size_mb": Key(10.0, _num(0.001)),
        "backups": Key(3, _int(0, 100)),
        "json": Key(False, _bool),
    },
    "resources": {
        "cpu_threads": Key(0, _int(0, 1024)),
        "max_memory_mb": Key(0, _int(0)),
        "isolation": Key(True, _bool),
        "preempt_across_cores": Key(True, _bool),
        # "adaptive": batch work pauses for realtime work on its device only while running
        # beside it is measured to slow it by more than max_slowdown (resisod/corun.py);
        # "always": it pauses whenever realtime work is busy there
        "preemption": Key("adaptive", _str(("adaptive", "always"))),
        "max_slowdown": Key(0.10, _num(0.0, 10.0)),
        "probe_every_s": Key(5.0, _num(0.1, 3600.0)),
        # the VRAM plan (resisod/vram_plan.py): per worker process a CUDA context outside
        # any allocator cap, a margin kept free, and no worker below gpu_min_worker_mb
        "gpu_context_mb": Key(700.0, _num(0.0, 8192.0)),
        "gpu_margin_pct": Key(5.0, _num(0.0, 50.0)),
        "gpu_margin_min_mb": Key(512.0, _num(0.0)),
        "gpu_min_worker_mb": Key(256.0, _num(0.0)),
        # how GPU workers share a card's compute (resisod/gpu_compute.py): "mps" runs them
        # under a per-user NVIDIA MPS server with SM caps from gpu_allocation, "timeslice"
        # leaves CUDA's default turns, "auto" takes MPS where it starts
        "gpu_compute": Key("auto", _str(("auto", "mps", "timeslice"))),
    },
    "resources.gpu_allocation": {
        "llm": Key(70, _int(0, 100)),
        "image": Key(30, _int(0, 100)),
    },
    "http": {
        "enabled": Key(False, _bool),
        "listen": Key("127.0.0.1:8080", _str()),
        "api_key": Key("", _str()),
        "max_body_bytes": Key(1048576, _int(1024)),
        "cors_origins": Key([], lambda v: None if isinstance(v, list) and all(
            isinstance(o, str) for o in v) else "must be a list of origin strings"),
    },
}


def _redis_url(v: Any) -> str | None:
    if not isinstance(v, str):
        return f"must be a string, got {type(v).__name__}"
    if not v.startswith(("redis://", "rediss://", "unix://")):
        return f"must be a redis://, rediss:// or unix:// URL, got {v!r}"
    return None


# the result cache shared between daemons (TTS audio, repeatable LLM answers); its keys are
# checked here so a daemon never starts with a cache its workers cannot open
SCHEMA["cache"] = {
    "backend": Key("local", _str(("local", "redis"))),
    "url": Key("redis://127.0.0.1:6379/0", _redis_url),
    "ttl_s": Key(86400, _int(0, 365 * 86400)),
    "namespace": Key("resiso:", _str()),
    "failure_threshold": Key(3, _int(1, 1000)),
    "cooldown_s": Key(30.0, _num(0.1, 86400)),
    "timeout_ms": Key(50, _int(1, 60000)),
}

def _cluster_listen(v: Any) -> str | None:
    # remote workers connect over TCP; an ipc endpoint is the local workers' own
    if not isinstance(v, str):
        return f"must be a string, got {type(v).__name__}"
    if v and not (v.startswith("tcp://") and ":" in v[6:]):
        return f'must be "" (off) or a tcp://HOST:PORT endpoint, got {v!r}'
    return None


# remote workers (resisod/cluster.py): a second worker endpoint on TCP, CURVE-encrypted with
# the keys in keys_dir ("" = <state_dir>/keys) unless insecure is set
SCHEMA["cluster"] = {
    "listen": Key("", _cluster_listen),
    "insecure": Key(False, _bool),
    "keys_dir": Key("", _str()),
}

DOMAIN_COMMON: dict[str, Key] = {
    "kind": Key(None, _str(KINDS)),
    "engine": Key(None, _str()),
    "model": Key("", _str()),
    "device": Key("auto", _device),
    # 0: served by remote workers only (needs [cluster] listen)
    "workers": Key(1, _int(0, 64)),
    "cpus": Key([], _cpus),
    "threads": Key(0, _int(0, 1024)),
    "priority": Key("normal", _str(PRIORITIES)),
    "max_queue": Key(64, _int(1, 1000000)),
    "max_memory_mb": Key(0, _int(0)),
    "keep_alive_s": Key(0.0, _num(0, 7 * 86400)),  # a week; the worker waits in int32 ms
    "preemptible": Key(False, _bool),
    "timeout_ms": Key(0, _int(0)),
    # this domain's percent of its GPU's memory; 0: its kind's [resources.gpu_allocation]
    "gpu_percentage": Key(0, _int(0, 100)),
    # GPU memory per worker, as NVML counts it (CUDA context included), past which the worker
    # is restarted and its job fails memory_limit; 0: its VRAM plan budget + gpu_context_mb
    "max_vram_mb": Key(0, _int(0)),
    # the engine's own settings (a plugin's), passed to it as they are
    "options": Key({}, _options),
}

DOMAIN_KIND: dict[str, dict[str, Key]] = {
    "llm": {
        "context_size": Key(2048, _int(64, 1048576)),
        "max_tokens_limit": Key(4096, _int(1, 1048576)),
        "default_max_tokens": Key(256, _int(1, 1048576)),
        "default_temperature": Key(0.7, _num(0.0, 2.0)),
        "dtype": Key("auto", _str(("auto", "fp32", "fp16", "bf16"))),
        "gpu_layers": Key(-1, _int(-1)),
        "model_name": Key("", _str()),
        # sequences one worker decodes at once (continuous batching); 0: 4 on a CPU, 16 on
        # a GPU. Each holds context_size tokens of KV memory.
        "parallel": Key(0, _int(0, 256)),
        # transformers engine: a lone job decodes on a static KV cache with a compiled step;
        # auto: on CUDA only (on a CPU the compiled step was slower than the eager one)
        "compile": Key("auto", _str(("auto", "on", "off"))),
    },
    "tts": {
        "voice": Key("", _str()),
        "speed": Key(1.0, _num(0.25, 4.0)),  # speed of requests that give none
        # the language this domain speaks ("" = read from the voice or model name); a request
        # without a voice is sent to a domain of its text's language
        "language": Key("", _str()),
        # further voice names requests may give; passed to the engine as they are
        "voices": Key([], _names),
        "max_chars": Key(5000, _int(1, 1000000)),
        "cache_mb": Key(256, _int(0)),
        "config_path": Key("", _str()),
    },
    "image": {
        "default_width": Key(256, _int(8, 8192)),
        "default_height": Key(256, _int(8, 8192)),
        "default_steps": Key(20, _int(1, 150)),
        "turbo_steps": Key(4, _int(1, 150)),
        "max_side": Key(2048, _int(8, 16384)),
        "dtype": Key("auto", _str(("auto", "fp32", "fp16", "bf16"))),
    },
    "null": {
        "delay_ms": Key(0.0, _num(0)),
        "steps": Key(0, _int(0, 1000000)),
        "load_ms": Key(0.0, _num(0)),
        "crash_on_load": Key(False, _bool),
        "fail_loads": Key(0, _int(0, 1000000)),
    },
}

DEFAULT_DOMAINS: dict[str, dict[str, Any]] = {
    "llm": {"kind": "llm", "engine": "llama_cpp", "model": "builtin:smollm2-135m-instruct",
            "priority": "realtime"},
    # two Piper workers of one onnxruntime thread each: concurrent requests run side by side
    # (one core per worker; on 2 cores that is both, see isolation.auto_layout). Measured on
    # 2 cores: 2 threads in one worker are slower than 1, batching gains nothing per item.
    "tts": {"kind": "tts", "engine": "piper", "model": "builtin:en_US-joe-medium",
            "device": "cpu", "priority": "realtime", "workers": 2, "threads": 1},
    # Mandarin: espeak-ng's cmn voice, the one Chinese voice that ships offline
    "tts-zh": {"kind": "tts", "engine": "espeak", "voice": "cmn", "device": "cpu",
               "priority": "realtime"},
    "image": {"kind": "image", "engine": "diffusers", "model": "builtin:tiny-sd",
              "priority": "batch", "preemptible": True, "max_queue": 256},
}


# Names that clients of other APIs send and cannot be told to change: OpenAI's voices and
# models. A voice alias names a voice ("" = a voice of the text's language); a model alias
# names a kind (the usual routing then picks the domain) or a domain.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage",
                 "shimmer", "verse")
DEFAULT_ALIASES: dict[str, dict[str, str]] = {
    "models": {"tts-1": "tts", "tts-1-hd": "tts", "gpt-4o-mini-tts": "tts",
               "dall-e-2": "image", "dall-e-3": "image"},
    "voices": {v: "" for v in OPENAI_VOICES},
}


def _aliases(given: Any, domains: dict[str, Any], errors: list[str]) -> dict[str, dict[str, str]]:
    out = copy.deepcopy(DEFAULT_ALIASES)
    if given is None:
        return out
    if not isinstance(given, dict):
        errors.append("[aliases] must be a table")
        return out
    for table, entries in given.items():
        if table not in out:
            errors.append(f"aliases.{table}: unknown table; allowed: models, voices")
            continue
        if not isinstance(entries, dict):
            errors.append(f"[aliases.{table}] must be a table of \"name\" = \"target\"")
            continue
        for name, target in entries.items():
            if not isinstance(target, str):
                errors.append(f"aliases.{table}.{name}: must be a string, got "
                              f"{type(target).__name__}")
            elif table == "models" and target not in KINDS and target not in domains:
                errors.append(f"aliases.models.{name}: {target!r} is neither a kind "
                              f"({', '.join(KINDS)}) nor a configured domain "
                              f"({', '.join(sorted(domains)) or 'none'})")
            else:
                out[table][name] = target
    return out


def _apply(section: str, schema: dict[str, Key], given: Any, errors: list[str]) -> dict[str, Any]:
    out = {k: copy.deepcopy(key.default) for k, key in schema.items()}
    if given is None:
        return out
    if not isinstance(given, dict):
        errors.append(f"[{section}] must be a table")
        return out
    for name, value in given.items():
        key = schema.get(name)
        if key is None:
            errors.append(f"{section}.{name}: unknown key; allowed: {', '.join(sorted(schema))}")
            continue
        problem = key.check(value)
        if problem:
            errors.append(f"{section}.{name}: {problem}")
        else:
            out[name] = value
    return out


def _domain(name: str, given: Any, errors: list[str]) -> dict[str, Any]:
    if not isinstance(given, dict):
        errors.append(f"[domains.{name}] must be a table")
        return {}
    kind = given.get("kind", DEFAULT_DOMAINS.get(name, {}).get("kind"))
    if kind not in KINDS:
        errors.append(f"domains.{name}.kind: must be one of {', '.join(KINDS)}, got {kind!r}")
        return {}
    schema = {**DOMAIN_COMMON, **DOMAIN_KIND[kind]}
    # a default domain's settings carry over to the same kind; its engine and model only
    # to the same engine: an espeak [domains.tts] must not inherit the Piper voice file
    default = DEFAULT_DOMAINS.get(name, {})
    base = dict(default) if default.get("kind") == kind else {}
    if given.get("engine", base.get("engine")) != base.get("engine"):
        base = {k: v for k, v in base.items() if k not in ("engine", "model", "voice")}
    out = _apply(f"domains.{name}", schema, {**base, **given}, errors)
    out["kind"] = kind
    if out["engine"] is None and ENGINES[kind]:
        out["engine"] = ENGINES[kind][0]
    if out["engine"] not in ENGINES[kind]:
        errors.append(f"domains.{name}.engine: for kind {kind!r} must be one of the engines "
                      f"installed, {engine_registry.discover().listing(kind)}; "
                      f"got {out['engine']!r}")
    if kind != "null" and not out["model"] and not (kind == "tts" and out["engine"] == "espeak"):
        errors.append(f"domains.{name}.model: required for kind {kind!r} "
                      f"(a path or a builtin: name)")
    if kind == "tts" and out["device"] == "auto":
        out["device"] = "cpu"  # speech runs on CPU cores beside the GPU work
    ncpu = os.cpu_count() or 1
    bad = [c for c in out["cpus"] if c >= ncpu]
    if bad:
        errors.append(f"domains.{name}.cpus: CPU {bad[0]} does not exist (this machine has "
                      f"CPUs 0-{ncpu - 1})")
    return out


def build(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate a parsed TOML tree; return the effective configuration or raise ConfigError."""
    errors: list[str] = []
    cfg: dict[str, Any] = {}
    known = {"daemon", "logging", "resources", "http", "cache", "cluster", "domains", "aliases"}
    for name in raw:
        if name not in known:
            errors.append(f"{name}: unknown section; allowed: {', '.join(sorted(known))}")
    for section in ("daemon", "logging", "http", "cache", "cluster"):
        cfg[section] = _apply(section, SCHEMA[section], raw.get(section), errors)
    resources = dict(raw.get("resources") or {})
    gpu = resources.pop("gpu_allocation", None)
    cfg["resources"] = _apply("resources", SCHEMA["resources"], resources, errors)
    cfg["resources"]["gpu_allocation"] = _apply(
        "resources.gpu_allocation", SCHEMA["resources.gpu_allocation"], gpu, errors)
    alloc = cfg["resources"]["gpu_allocation"]
    if alloc["llm"] + alloc["image"] > 100:
        errors.append("resources.gpu_allocation: llm + image must not exceed 100 (percent), got "
                      f"{alloc['llm'] + alloc['image']}")
    domains_raw = raw.get("domains")
    if domains_raw is None:
        domains_raw = {name: {} for name in DEFAULT_DOMAINS}
    if not isinstance(domains_raw, dict):
        errors.append("[domains] must be a table of [domains.<name>] tables")
        domains_raw = {}
    cfg["domains"] = {}
    for name, given in domains_raw.items():
        if not name.replace("_", "").replace("-", "").isalnum():
            errors.append(f"domains.{name}: a domain name may hold letters, digits, '-' and '_'")
            continue
        cfg["domains"][name] = _domain(name, given, errors)
    if not cfg["cluster"]["listen"]:
        for name, d in cfg["domains"].items():
            if d.get("workers") == 0:
                errors.append(f"domains.{name}.workers: must be between 1 and 64 (0, remote "
                              f"workers only, needs [cluster] listen)")
    from .devices import visible_device_errors  # an index past CUDA_VISIBLE_DEVICES
    errors += visible_device_errors(cfg["domains"])
    cfg["aliases"] = _aliases(raw.get("aliases"), cfg["domains"], errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def load(path: str | None) -> dict[str, Any]:
    """Load and validate a config file; None means built-in defaults only."""
    if not path:
        return build({})
    if path.endswith(".json"):  # the original design's config.json
        return build(_seed_json(path))
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"config file {path} does not exist"])
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"])
    return build(raw)


def _seed_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError([f"config file {path} does not exist"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: not valid JSON: {exc}"])
    try:
        return seed_config.translate(raw, os.path.dirname(os.path.abspath(path)))
    except ValueError as exc:
        raise ConfigError(list(exc.args[0]))
