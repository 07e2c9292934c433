"""Training text → fixed-length token blocks: files, folders, JSONL or a streamed Hugging Face dataset."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_SUFFIXES = (".txt", ".raw", ".md")


@dataclass
class TokenBlocks:
    """Packed training data: ``train`` and ``heldout`` are (blocks, block_size) token tensors."""

    train: torch.Tensor
    heldout: torch.Tensor
    source: str

    @property
    def block_size(self) -> int:
        return self.train.shape[1]


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not valid JSON: {err}") from err
            if not isinstance(row, dict) or field not in row:
                raise ValueError(f"{path}:{number} has no {field!r} field")
            yield str(row[field])


def iter_texts(source: str | Path, seed: int = 0, field: str = "text") -> Iterator[str]:
    """Documents of a text file, a folder of text/JSONL files (whole files in a seeded order, so that a
    token cap samples across a folder of many short files; with a few long ones it reads one or two),
    a JSONL file, or, for a name that is no path (no suffix, no leading . or /), a Hub dataset
    ``name[:config]``, streamed."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl"))
        if not files:
            raise ValueError(f"{path} contains no .txt/.raw/.md/.jsonl files")
        random.Random(seed).shuffle(files)
        for file in files:
            yield from iter_texts(file, seed, field)
    elif path.is_file():
        if path.suffix == ".jsonl":
            yield from _jsonl_texts(path, field)
        else:
            yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"training data {source} does not exist")
    else:
        yield from _hub_texts(str(source), field)


def _hub_texts(name: str, field: str) -> Iterator[str]:
    from datasets import load_dataset  # for users online; streaming keeps OpenWebText off the disk

    dataset, _, config = name.partition(":")
    for row in load_dataset(dataset, config or None, split="train", streaming=True):
        yield row[field]


def token_ids(
    source: str | Path, tokenizer, max_tokens: int | None = None, seed: int = 0, field: str = "text"
) -> list[int]:
    """The first ``max_tokens`` token ids of ``source``'s documents in ``iter_texts`` order, each
    document followed by the end-of-text token."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in iter_texts(source, seed, field):
        # Long books are tokenised in pieces: fast tokenizers slow down on one multi-megabyte string.
        for start in range(0, len(text), 1 << 20):
            ids += tokenizer(text[start : start + (1 << 20)], verbose=False)["input_ids"]
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        ids += separator
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens]
    return ids


def token_counts(
    source: str | Path, tokenizer, vocab_size: int, max_tokens: int | None = None, seed: int = 0, field: str = "text"
) -> torch.Tensor:
    """How often each token id occurs in the first ``max_tokens`` tokens of ``source`` (float64,
    ``vocab_size``): read in the order ``load_blocks`` reads, so its blocks are counted too."""
    return id_counts(token_ids(source, tokenizer, max_tokens, seed, field), vocab_size)


def id_counts(ids: list[int], vocab_size: int) -> torch.Tensor:
    """How often each id in ``ids`` occurs (float64, ``vocab_size``)."""
    counted = torch.tensor(ids, dtype=torch.long)
    if len(counted) and int(counted.max()) >= vocab_size:
        raise ValueError(
            f"the tokenizer gives id {int(counted.max())}, outside the model's {vocab_size}-token vocabulary"
        )
    return torch.bincount(counted, minlength=vocab_size).double()


def load_blocks(
    source: str | Path,
    tokenizer,
    block_size: int,
    max_tokens: int | None = None,
    heldout_fraction: float = 0.02,
    seed: int = 0,
    field: str = "text",
    pool_tokens: int | None = None,
) -> TokenBlocks:
    """Tokenise documents (each followed by the end-of-text token) until ``max_tokens``, pack them into
    blocks of ``block_size``, shuffle the blocks with ``seed`` and split off a held-out slice.

    With ``pool_tokens``, the first ``pool_tokens`` are read and ``max_tokens`` of them are drawn as
    blocks at random positions: a few long books would otherwise fill a small cap with one or two of
    them, and which ones decides the result more than the cap does."""
    _check_packing(block_size, heldout_fraction)  # before reading: a streamed text takes long
    if pool_tokens is not None and (max_tokens is None or pool_tokens < max_tokens):
        raise ValueError(
            f"pool_tokens draws max_tokens from a larger text: give max_tokens <= {pool_tokens}, got {max_tokens}"
        )
    ids = token_ids(source, tokenizer, pool_tokens or max_tokens, seed, field)
    return pack_blocks(ids, block_size, max_tokens if pool_tokens else None, heldout_fraction, seed, str(source))


def pack_blocks(
    ids: list[int],
    block_size: int,
    max_tokens: int | None = None,
    heldout_fraction: float = 0.02,
    seed: int = 0,
    source: str = "the text",
) -> TokenBlocks:
    """``ids`` packed into blocks of ``block_size``, shuffled with ``seed``, the first ``max_tokens``
    of them (all when None) kept, and a held-out slice split off: blocks at random positions in ``ids``."""
    _check_packing(block_size, heldout_fraction)
    available = len(ids) // block_size
    count = available if max_tokens is None else min(available, max_tokens // block_size)
    if count < 2:
        raise ValueError(
            f"{source} gives {min(len(ids), max_tokens or len(ids))} tokens: fewer than two blocks of "
            f"{block_size} (need a train and a held-out block)"
        )
    blocks = torch.tensor(ids[: available * block_size], dtype=torch.long).view(available, block_size)
    blocks = blocks[torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:count]]
    held = max(1, round(count * heldout_fraction))
    return TokenBlocks(train=blocks[held:], heldout=blocks[:held], source=source)


def _check_packing(block_size: int, heldout_fraction: float) -> None:
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")


def batch_indices(num_blocks: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Block indices of the global batch at optimizer step ``step``. Epochs are seeded permutations,
    so any step's batch is known without replaying the ones before it (exact resume)."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // num_blocks, positions % num_blocks
    indices = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        in_epoch = epochs == epoch
        indices[in_epoch] = order[offsets[in_epoch]]
    return indices
