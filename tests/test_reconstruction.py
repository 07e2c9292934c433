"""Block reconstruction: a joint gradient fit of a block's parameters to its original outputs."""

import copy
import re

import pytest
import torch
from test_architectures import llama_config
from test_calibration import blocks
from torch import nn
from transformers import LlamaForCausalLM

import tqcompressor as tq
from tqcompressor.reconstruction import reconstruct
from tqcompressor.sequential import compress_sequentially


class _GatedBlock(nn.Module):
    """x + down(silu(gate x) * up x): the nonlinearity no closed-form linear fit sees through."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def _planted(seed: int = 0, first_scale: float = 1.0):
    """(a block, a perturbed copy of it, inputs in 6 batches, what the block gives for them); each batch's
    first token scaled by ``first_scale``, as a real LM's first token is."""
    torch.manual_seed(seed)
    original = _GatedBlock()
    inputs = [torch.randn(64, 8) for _ in range(6)]
    for x in inputs:
        x[0] *= first_scale
    with torch.no_grad():
        targets = [original(x) for x in inputs]
        student = copy.deepcopy(original)
        for p in student.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn_like(p))
    return original, student, inputs, targets


def test_reconstruction_recovers_a_planted_block_and_keeps_the_best_epoch():
    _, student, inputs, targets = _planted()
    student.up.bias.requires_grad_(False)  # frozen by the caller: tuned here, frozen again after
    flags = [p.requires_grad for p in student.parameters()]
    result = reconstruct(list(student.parameters()), lambda i: student(inputs[i]), targets, epochs=60, lr=1e-2)
    assert result.after < 0.05 * result.before
    assert 0 < result.epoch <= 60
    assert _token_errors(student, inputs[-1], targets[-1]).mean() == pytest.approx(result.after, rel=1e-5)
    assert [p.requires_grad for p in student.parameters()] == flags
    assert all(p.grad is None for p in student.parameters())


def _token_errors(block: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (block(x) - target).square().sum(-1) / target.square().sum(-1)


def test_reconstruction_fits_every_token_not_the_largest():
    """A first token 300 times the others' size holds nearly all of a batch's squared output: a batch-wide
    error would fit it alone; per token, the others are fitted as well."""
    _, student, inputs, targets = _planted(first_scale=300.0)
    started = _token_errors(student, inputs[-1], targets[-1])[1:].mean()
    result = reconstruct(list(student.parameters()), lambda i: student(inputs[i]), targets, epochs=60, lr=1e-2)
    assert _token_errors(student, inputs[-1], targets[-1]).mean() == pytest.approx(result.after, rel=1e-5)
    assert _token_errors(student, inputs[-1], targets[-1])[1:].mean() < 0.1 * started


def test_a_reconstruction_that_only_raises_the_held_out_error_leaves_the_block_as_it_came():
    _, student, inputs, targets = _planted()
    given = copy.deepcopy(student.state_dict())
    result = reconstruct(list(student.parameters()), lambda i: student(inputs[i]), targets, epochs=3, lr=1e3)
    assert result.epoch == 0 and result.after == result.before
    for name, value in student.state_dict().items():
        assert torch.equal(value, given[name]), name


def test_reconstruction_needs_a_held_out_batch_and_an_epoch():
    _, student, inputs, targets = _planted()
    with pytest.raises(ValueError, match="at least two batches"):
        reconstruct(list(student.parameters()), lambda i: student(inputs[i]), targets[:1], epochs=1)
    with pytest.raises(ValueError, match="epochs must be 1 or more"):
        reconstruct(list(student.parameters()), lambda i: student(inputs[i]), targets, epochs=0)


def _llama():
    """Weights large enough that the MLPs' errors matter next to the residual stream."""
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(num_hidden_layers=3, initializer_range=0.1)).eval()


PLAN = tq.CompressionPlan([tq.Rule(r"model\.layers\.\d+\.mlp\.\w+_proj", tq.LowRankConfig(rank=4))])


def _logit_error(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids).logits - _llama()(ids).logits).square().mean())


def test_sequential_fits_reconstruct_each_block_and_come_closer_to_the_original():
    ids, unseen = blocks(count=64), blocks(count=8, seed=1)
    fitted = _llama()
    compress_sequentially(fitted, PLAN, ids, batch_size=2, progress=False)
    reconstructed = _llama()
    report = compress_sequentially(
        reconstructed, PLAN, ids, batch_size=2, progress=False, reconstruction_epochs=10, reconstruction_lr=1e-3
    )
    assert "reconstructed 3 blocks (10 epochs" in report.notes[-1]
    kept, last = map(int, re.search(r"(\d+) kept a tuned state, (\d+) that of the last", report.notes[-1]).groups())
    assert last <= kept <= 3  # which pass wins depends on the CPU's rounding: no exact count
    assert report.params_after == tq.count_parameters(reconstructed) == tq.count_parameters(fitted)
    assert _logit_error(reconstructed, unseen) < 0.9 * _logit_error(fitted, unseen)


def test_reconstruction_without_a_batch_to_hold_out_is_refused_before_anything_changes():
    model, ids = _llama(), blocks(count=4)
    with pytest.raises(ValueError, match="at least 5 calibration blocks"):
        compress_sequentially(model, PLAN, ids, progress=False, reconstruction_epochs=2)
    with pytest.raises(ValueError, match="0 or more"):
        compress_sequentially(model, PLAN, blocks(count=20), progress=False, reconstruction_epochs=-1)
    with pytest.raises(ValueError, match="must be positive"):
        compress_sequentially(
            model, PLAN, blocks(count=20), progress=False, reconstruction_epochs=1, reconstruction_lr=0
        )
    assert _logit_error(model, ids) == 0.0
