"""lm-evaluation-harness integration, on a local LAMBADA task (the harness cannot download data here):
the harness's scores for a compressed run equal this package's own LAMBADA implementation."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

import tqcompressor as tq
from tqcompressor.assets import assets_dir, local_asset
from tqcompressor.cli import main
from tqcompressor.evaluation import lambada, lambada_passages

TASK = """task: lambada_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_harness_scores_a_compressed_run_like_the_builtin_lambada(tmp_path, capsys):
    folder = assets_dir() / "gpt2-tokenizer"
    tokenizer = GPT2TokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256)).eval()
    tq.compress_(
        model,
        tq.CompressionPlan([tq.Rule(r"transformer\.h\.\d+\.mlp\.c_fc", tq.LowRankConfig(rank=8))]),
        progress=False,
    )
    tq.save(model, tmp_path / "run", tokenizer)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "lambada_local.yaml").write_text(
        TASK.format(path=local_asset("eval/lambada/lambada_test.jsonl"))
    )
    args = ["eval", str(tmp_path / "run"), "--tasks", "lambada_local", "--include-path", str(tmp_path / "tasks")]
    assert main([*args, "--limit", "12", "--json", str(tmp_path / "scores.json")]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())["tasks"]["lambada_local"]
    ours = lambada(tq.load(tmp_path / "run"), tokenizer, lambada_passages()[:12])
    assert scores["acc,none"] == pytest.approx(ours["acc"])
    assert scores["perplexity,none"] == pytest.approx(ours["ppl"], rel=1e-4)
    capsys.readouterr()
    assert (
        main(["eval", str(tmp_path / "run"), "--tasks", "no_such_task", "--include-path", str(tmp_path / "tasks")]) == 2
    )
    assert main(["eval", str(tmp_path / "run"), "--dataset", "lambada", "--limit", "3"]) == 2
    err = capsys.readouterr().err
    assert "unknown harness tasks ['no_such_task']" in err and "apply to harness --tasks only" in err
