#!/usr/bin/env bash
# The test suite (CPU; Triton kernels run under the interpreter; vLLM on CPU from .venv-vllm).
# Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-vllm.sh  # vLLM in its own environment (.venv-vllm) for tests/test_vllm.py
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
exec .venv/bin/python -m pytest -q -p no:cacheprovider -m "not slow" "$@"
