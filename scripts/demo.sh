#!/usr/bin/env bash
# The main job on the bundled default model (SmolLM2-135M). Extra args go to `kvpass inspect`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvpass inspect smollm2-135m "$@"
