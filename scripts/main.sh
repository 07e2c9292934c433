#!/usr/bin/env bash
# Install, then run the main job on the local default assets (../shared/assets): compress the house
# teacher with the tqcompressedgpt2 recipe as a 3-step schedule, distil after each step, evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export TQCOMPRESSOR_ASSETS="$(cd .. && pwd)/shared/assets"  # the local models and data sets
ASSETS="$TQCOMPRESSOR_ASSETS"
OUT=runs/house-teacher-tq
tqcompressor distill --preset tqcompressedgpt2 --data "$ASSETS/corpus/gutenberg/train" --tokens 300000 \
    --time-budget 10 --out "$OUT" --resume "$@"
tqcompressor eval "$OUT/03-step3-embedding/model" --dataset "$ASSETS/corpus/gutenberg/heldout" \
    --max-length 512 --max-tokens 20000 --json "$OUT/heldout.json" --quiet
