#!/usr/bin/env bash
# Build the wheel, install it into a fresh virtual environment and use it from a directory outside
# the checkout, with no TQCOMPRESSOR_ASSETS: what a user who pip-installs the package gets.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS="$(cd .. && pwd)/shared/assets"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
pip wheel --quiet --no-deps -w "$WORK/dist" .
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install --quiet "torch==2.13.0" "$WORK"/dist/tqcompressor-*.whl
cd "$WORK"
unset TQCOMPRESSOR_ASSETS
PY="$WORK/venv/bin/python"
"$WORK/venv/bin/tqcompressor" --help > /dev/null
"$PY" - "$ASSETS/gpt2-tokenizer" <<'PY'
import sys
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

folder = sys.argv[1]
tokenizer = GPT2TokenizerFast(vocab_file=f"{folder}/vocab.json", merges_file=f"{folder}/merges.txt")
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32)).save_pretrained("tiny")
tokenizer.save_pretrained("tiny")
open("plan.yaml", "w").write(
    "rules:\n  - {pattern: 'transformer\\.h\\.\\d+\\.mlp\\.c_fc', method: lowrank, ratio: 0.5}\n"
    "  - {pattern: 'transformer\\.h\\.1\\.mlp\\.c_proj', ratio: 0.5, time_budget: 1}\n"
)
PY
"$WORK/venv/bin/tqcompressor" compress --model tiny --plan plan.yaml --out out --quiet > compress.log
"$WORK/venv/bin/tqcompressor" inspect out > inspect.log
"$PY" -c "import tqcompressor as tq; m = tq.load('out'); assert type(m.transformer.h[0].mlp.c_fc).__name__ == 'LowRankLinear'"
# With neither --model nor TQCOMPRESSOR_ASSETS the CLI says what to pass (exit 2), and writes nothing.
if "$WORK/venv/bin/tqcompressor" compress --preset tqcompressedgpt2 --out nothing 2> error.log; then
    echo "wheel check: compress without a model should fail" >&2; exit 1
fi
grep -q "pass --model" error.log
test ! -e nothing
echo "wheel check: installed wheel works outside the checkout"
