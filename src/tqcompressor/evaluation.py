"""Evaluation that consumes any causal LM: sliding-window perplexity, LAMBADA, size report."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .assets import local_asset
from .loading import check_runs_on_token_ids
from .methods import is_embedding
from .params import count_parameters
from .tied_head import TiedEmbeddingHead

LOCAL_FILES = {
    "wikitext2": "eval/wikitext-2-raw/wiki.test.raw",
    "ptb": "eval/ptb/ptb.test.txt",
    "lambada": "eval/lambada/lambada_test.jsonl",
}
DATASETS = tuple(LOCAL_FILES)


def _hub_text(name: str) -> str:
    from datasets import load_dataset  # only for users online without the local copies

    if name == "wikitext2":
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        return "".join(rows)
    if name == "ptb":
        return "\n".join(load_dataset("ptb_text_only", split="test")["sentence"])
    raise ValueError(name)


def _hub_lambada() -> list[str]:
    from datasets import load_dataset

    return load_dataset("EleutherAI/lambada_openai", "default", split="test")["text"]


def read_text(source: str | Path) -> str:
    """Text of a named dataset (the copy in $TQCOMPRESSOR_ASSETS, else the Hub) or of a file or folder of .txt files."""
    if str(source) in ("wikitext2", "ptb"):
        local = local_asset(LOCAL_FILES[str(source)])
        return local.read_text(encoding="utf-8") if local is not None else _hub_text(str(source))
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".raw", ".md"))
        if not files:
            raise ValueError(f"{path} contains no .txt/.raw/.md files")
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    raise FileNotFoundError(f"{source} is neither a known dataset ({', '.join(DATASETS)}) nor a file or folder")


def lambada_passages(source: str | Path = "lambada") -> list[str]:
    path = local_asset(LOCAL_FILES["lambada"]) if str(source) == "lambada" else Path(source)
    if path is None:
        return _hub_lambada()
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _context_length(model: nn.Module, max_length: int | None) -> int:
    config = getattr(model, "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024
    return min(max_length or limit, limit)


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor | list[int],
    max_length: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Sliding-window perplexity: every token after the first is scored exactly once, token-weighted.

    Each window ends at its last target and reaches back ``max_length`` tokens; windows advance by
    ``stride`` (at most window - 1, so that even a window's first target has context)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least two tokens")
    window = _context_length(model, max_length)
    stride = stride or window
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need a window of at least 2 tokens and 1 <= stride <= window ({window}), got {stride}")
    device = next(model.parameters()).device
    step = min(stride, window - 1)
    total_nll, scored_to = 0.0, 1  # token 0 has no context and is never scored
    started = time.perf_counter()
    bar = tqdm(total=ids.numel() - 1, desc="perplexity", disable=not progress, unit="tok")
    while scored_to < ids.numel():
        target_end = min(scored_to + step, ids.numel())
        begin = max(0, target_end - window)
        chunk = ids[begin:target_end].to(device)
        logits = model(chunk.unsqueeze(0)).logits[0].float()
        first = scored_to - begin
        total_nll += float(F.cross_entropy(logits[first - 1 : -1], chunk[first:], reduction="sum"))
        bar.update(target_end - scored_to)
        scored_to = target_end
    bar.close()
    scored = ids.numel() - 1
    seconds = time.perf_counter() - started
    return {
        "ppl": math.exp(min(total_nll / scored, 700.0)),
        "nll": total_nll / scored,
        "tokens": scored,
        "tokens_per_s": scored / max(seconds, 1e-9),
        "window": window,
        "stride": step,
    }


@torch.inference_mode()
def lambada(
    model: nn.Module,
    tokenizer,
    passages: Iterable[str],
    max_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """OpenAI LAMBADA: the last word is predicted from the rest. Accuracy = every token of the word
    is the greedy choice; perplexity = exp(-mean log P(word | context)), as lm-evaluation-harness."""
    device = next(model.parameters()).device
    correct, total_logprob, examples, tokens = 0, 0.0, 0, 0
    started = time.perf_counter()
    for text in tqdm(list(passages), desc="lambada", disable=not progress, unit="passage"):
        context, word = text.rsplit(" ", 1)
        context_ids = tokenizer(context)["input_ids"]
        target_ids = tokenizer(" " + word)["input_ids"]
        ids = torch.tensor(context_ids + target_ids, device=device)
        window = _context_length(model, None)
        ids = ids[-window:]
        logits = model(ids[:-1].unsqueeze(0)).logits[0, -len(target_ids) :].float()
        target = ids[-len(target_ids) :]
        logprobs = logits.log_softmax(-1)
        total_logprob += float(logprobs.gather(1, target.unsqueeze(1)).sum())
        correct += bool((logits.argmax(-1) == target).all())
        examples += 1
        tokens += ids.numel()
        if max_tokens is not None and tokens >= max_tokens:
            break
    if not examples:
        raise ValueError("no LAMBADA passages to score")
    seconds = time.perf_counter() - started
    return {
        "acc": correct / examples,
        "ppl": math.exp(-total_logprob / examples),
        "examples": examples,
        "tokens": tokens,
        "tokens_per_s": tokens / max(seconds, 1e-9),
    }


def evaluate(
    model: nn.Module,
    tokenizer,
    dataset: str,
    max_tokens: int | None = None,
    max_length: int | None = None,
    stride: int | None = None,
    progress: bool = False,
) -> dict:
    if dataset == "lambada" or str(dataset).endswith(".jsonl"):
        return {
            "dataset": str(dataset),
            **lambada(model, tokenizer, lambada_passages(dataset), max_tokens, progress),
        }
    ids = tokenizer(read_text(dataset), verbose=False)["input_ids"]  # windows come later
    return {"dataset": str(dataset), **perplexity(model, ids, max_length, stride, max_tokens, progress)}


def _component(name: str) -> str:
    lowered = name.lower()
    if any(key in lowered for key in ("attn", "attention", "q_proj", "k_proj", "v_proj")):
        return "attention"
    if any(key in lowered for key in ("mlp", "ffn", "feed_forward", "intermediate", "fc1", "fc2")):
        return "mlp"
    return "other"


def size_report(model: nn.Module, directory: str | Path | None = None) -> dict:
    """Parameters by component (embedding, attention, MLP, head, other), each tensor counted once."""
    embeddings = {id(m) for m in model.modules() if is_embedding(m)}
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    parts = {"embedding": 0, "attention": 0, "mlp": 0, "head": 0, "other": 0}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if id(module) in embeddings:
                parts["embedding"] += param.numel()
            elif module is head:
                parts["head"] += param.numel()
            else:
                parts[_component(module_name)] += param.numel()
    if isinstance(head, TiedEmbeddingHead):
        head_note = "tied to the compressed token embedding (counted under embedding)"
    elif head is not None and any(
        getattr(m, "weight", None) is head.weight for m in model.modules() if isinstance(m, nn.Embedding)
    ):
        head_note = "tied to the token embedding (counted under embedding)"
    else:
        head_note = "separate" if head is not None else "none"
    report = {"total": count_parameters(model), "by_component": parts, "head": head_note}
    if directory is not None and Path(directory).is_dir():
        report["bytes_on_disk"] = sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
    return report


@torch.inference_mode()
def fidelity(
    model: nn.Module, reference: nn.Module, token_ids: list[int], window: int = 128, max_tokens: int | None = None
) -> dict[str, float]:
    """How closely ``model`` computes what ``reference`` (the original) does, for models without a
    perplexity (encoders, classifiers): mean cosine similarity of the final hidden states per token, and
    how often the outputs' top choice agrees (per token for masked LMs, per sequence for classifiers)."""
    for compared in (model, reference):
        check_runs_on_token_ids(compared, "fidelity", "score it with its own seq2seq metrics")
    ids = torch.as_tensor(token_ids[:max_tokens] if max_tokens else token_ids, dtype=torch.long)
    usable = ids.numel() // window * window
    if usable == 0:
        raise ValueError(f"fidelity needs at least one window of {window} tokens, got {ids.numel()}")
    device = next(model.parameters()).device
    cosines, agreements = [], []
    for batch in ids[:usable].view(-1, window).split(4):
        batch = batch.to(device)
        ours, theirs = (m(batch, output_hidden_states=True) for m in (model, reference))
        cosines.append(F.cosine_similarity(ours.hidden_states[-1].float(), theirs.hidden_states[-1].float(), dim=-1))
        if getattr(ours, "logits", None) is not None:
            agreements.append((ours.logits.argmax(-1) == theirs.logits.argmax(-1)).float().flatten())
    result = {"hidden_cosine": float(torch.cat([c.flatten() for c in cosines]).mean()), "tokens": usable}
    if agreements:
        result["output_agreement"] = float(torch.cat(agreements).mean())
    return result
