"""Run by test_ddp.py under ``torchrun`` (or alone): distil the tiny student (``moe``: the MoE one) and write
this rank's weights."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from test_distillation import compressed_pair, config, pattern_blocks
from test_experts import moe_pair

from tqcompressor.training import Trainer, process_state

out = Path(sys.argv[1])
state = process_state()
if sys.argv[2:] == ["moe"]:
    teacher, student = moe_pair()
else:
    teacher, student = compressed_pair()
for module in student.modules():  # dropout masks differ per process; without it 1 and 2 processes must agree
    if isinstance(module, torch.nn.Dropout):
        module.p = 0.0
trainer = Trainer(student, teacher, pattern_blocks(), config(bf16=False), out / "run", progress=False)
metrics = trainer.run()
weights = {k: v.contiguous() for k, v in trainer.student.state_dict().items() if "index" not in k}
save_file(weights, str(out / f"rank{state.process_index}.safetensors"))
(out / f"rank{state.process_index}.json").write_text(json.dumps(metrics))
