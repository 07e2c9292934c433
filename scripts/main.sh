#!/usr/bin/env bash
# Install, then run the main job on the local default assets (../shared/assets).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python benchmarks/decomposition.py "$@"
