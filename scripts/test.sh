#!/usr/bin/env bash
# The test suite (CPU; Triton kernels run under the interpreter). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
exec .venv/bin/python -m pytest -q -p no:cacheprovider -m "not slow" "$@"
