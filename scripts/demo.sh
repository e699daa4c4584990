#!/usr/bin/env bash
# The main job: start resisod with config.toml and run an LLM, a TTS and an image job on the
# built-in models, then stop the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=$(mktemp -d /tmp/resiso-demo.XXXXXX)
export RESISO_SOCKET="$RUN/resisod.sock" RESISO_STATE_DIR="$RUN/state"
export PATH="$PWD/.venv/bin:$PATH"
resisod --config config.toml 2>"$RUN/resisod.log" &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null; wait $DAEMON 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  resiso status --json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin).get("domains"); sys.exit(0 if d and all(v["state"]!="loading" for v in d.values()) else 1)' && break
  sleep 0.5
done
resiso status
echo "--- resiso llm"
resiso llm "What is the capital of France? Answer in one sentence." --temperature 0
echo "--- resiso tts"
resiso tts "Hello from resiso. Speech runs beside the language model." --out "$RUN/hello.wav"
echo "--- resiso tts, Mandarin (no --voice: the text's script picks the voice)"
resiso tts "这是一段测试文本。第二句。" --out "$RUN/zh.wav"
echo "--- resiso image (builtin:tiny-sd draws noise; see README to use a real model)"
resiso image "a lighthouse at dusk" --watch --steps 10 --out "$RUN/image.png"
resiso jobs
echo "outputs in $RUN"
