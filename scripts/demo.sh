#!/usr/bin/env bash
# The main job on the bundled default model (SmolLM2-135M): `kvpass demo` (extra args go to it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvpass demo "$@"
