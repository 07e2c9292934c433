import os
from pathlib import Path

import torch

from tqcompressor.methods.kronecker import KroneckerShape

# Tests read the local copies of models and data the way users point the tool at theirs.
os.environ.setdefault("TQCOMPRESSOR_ASSETS", str(Path(__file__).resolve().parents[2] / "shared" / "assets"))


def planted_matrix(shape: KroneckerShape, seed: int, rows: bool = True, cols: bool = True):
    """W = P (sum_i A_i ⊗ B_i) Q with random permutations; returns (W, exact Kronecker sum)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape.rank, shape.m1, shape.n1, generator=g, dtype=torch.float64)
    b = torch.randn(shape.rank, shape.m2, shape.n2, generator=g, dtype=torch.float64)
    k = torch.einsum("rac,rbd->abcd", a, b).reshape(shape.in_features, shape.out_features)
    p = torch.randperm(shape.in_features, generator=g) if rows else torch.arange(shape.in_features)
    q = torch.randperm(shape.out_features, generator=g) if cols else torch.arange(shape.out_features)
    w = torch.empty_like(k)
    w[p.unsqueeze(1), q.unsqueeze(0)] = k
    return w, k


class SlowClock:
    """A stand-in for the ``time`` module whose every reading is 10 s after the last: a time-bounded
    search stops at its first check, as it would on a machine busy with other work."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 10.0
        return self.now


def gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    folder = Path(os.environ["TQCOMPRESSOR_ASSETS"]) / "gpt2-tokenizer"
    return GPT2TokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))


def tiny_gpt2_dir(folder: Path, books_repeats: int = 200, **config) -> Path:
    """A saved tiny GPT-2 with the real tokenizer, as a user's model directory, and ``folder/books``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    settings = {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, **config}
    GPT2LMHeadModel(GPT2Config(**settings)).save_pretrained(folder / "tiny")
    gpt2_tokenizer().save_pretrained(folder / "tiny")
    (folder / "books").mkdir()
    (folder / "books" / "a.txt").write_text("It was the best of times, it was the worst of times. " * books_repeats)
    return folder / "tiny"
