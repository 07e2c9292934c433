"""Export a compressed run as a plain Hugging Face model directory: dense weights in the original
architecture, config and tokenizer, loadable by stock ``transformers`` without this package."""

from __future__ import annotations

from pathlib import Path

import torch

from .loading import stored_dtype
from .serialization import load, materialize, read_config, refuse_to_clobber, write_atomically


def export(run: str | Path, out: str | Path, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """``dtype``: the floating dtype the weights are written in (default: the run's own, which for a
    ``distill`` output is the float32 it trained in)."""
    run, out = Path(run), Path(out)
    refuse_to_clobber(out, overwrite)
    read_config(run)  # a clear error for a directory that is not a saved model
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"export writes floating weights; {dtype} is not a floating dtype")
    model = materialize(load(run)).to(dtype or stored_dtype(str(run)))  # as the run is stored, not as loaded
    tokenizer = None
    if any((run / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run)

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    return write_atomically(out, write)
