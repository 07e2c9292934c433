"""The plans of learned_ranks.py (greedy, or learned ranks from its JSON) fitted sequentially, as the
budget's default fit does; appends to /tmp/exp/seq_results.jsonl."""

import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, "/work/main/benchmarks")
import allocation as bench
import torch
from common import ASSETS, load_smollm2

import tqcompressor as tq
from tqcompressor.calibration import CalibrationStats
from tqcompressor.data import id_counts, token_ids
from tqcompressor.sequential import compress_sequentially

which = sys.argv[1]  # learned or greedy
model, tok = load_smollm2()
model.eval()
fisher = CalibrationStats.load("/tmp/exp/stats.safetensors")
blocks = torch.load("/tmp/exp/blocks.pt")
ids = token_ids(ASSETS / "corpus/gutenberg/train", tok, 4194304, seed=0)
counts = id_counts(ids, model.get_input_embeddings().num_embeddings)
greedy = json.loads(Path("/tmp/exp/greedy_0.7.json").read_text())
learned = json.loads(Path(sys.argv[2]).read_text()) if which == "learned" else {}
rules = []
for n, params in greedy.items():
    w = model.get_submodule(n).weight
    c = sum(w.shape)
    dense = w.numel()
    if n in learned:
        k = round(learned[n])
        params = dense if k * c >= dense or k >= min(w.shape) else k * c
    if params >= dense:
        continue
    assert params % c == 0, n
    rules.append(tq.Rule(re.escape(n), tq.LowRankConfig(rank=params // c)))
plan = tq.CompressionPlan(rules, name=which)
t = time.time()
compress_sequentially(
    model, plan, blocks, progress=False, aim_dense=True, token_counts=counts, output_moments=fisher.outputs
)
texts, _ = bench.evaluation_texts(tok, 8000, None)
r = bench.evaluate(model, texts, [], tok)
r.update(params=tq.count_parameters(model), fit_s=time.time() - t, plan=which + "-sequential")
print(json.dumps(r), flush=True)
with open("/tmp/exp/seq_results.jsonl", "a") as f:
    f.write(json.dumps(r) + "\n")
