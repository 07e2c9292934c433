#!/usr/bin/env bash
# Create .venv (if missing) and install tqcompressor with its dev extras.
# torch is pinned first so that pip takes the local CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install --quiet "torch==2.13.0"
pip install --quiet -e ".[dev]"
