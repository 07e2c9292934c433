"""lm-evaluation-harness integration: a compressed run (or any model ``load_model`` opens) evaluated on
harness tasks through the harness's own Hugging Face model class, so scores match what the harness
reports for dense models. Needs ``pip install lm-eval``.

    tqcompressor eval runs/tq --tasks lambada_openai,wikitext            # the CLI
    import tqcompressor.harness; lm_eval.simple_evaluate(model="tqcompressor", model_args="path=runs/tq", ...)
"""

from __future__ import annotations

import importlib.util

from .loading import load_model

if importlib.util.find_spec("lm_eval") is None:
    raise ImportError("the lm-evaluation-harness integration needs the lm-eval package: pip install lm-eval")

from lm_eval import simple_evaluate
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager


@register_model("tqcompressor")
class CompressedLM(HFLM):
    """``HFLM`` over a model opened by ``tqcompressor`` (compressed directory, HF directory or name, GGUF)."""

    def __init__(self, path: str, batch_size: int | str = 1, **kwargs):
        model, tokenizer = load_model(path)
        super().__init__(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device), **kwargs
        )


def evaluate_tasks(path: str, tasks: list[str], include_path: str | None = None, limit: int | None = None) -> dict:
    """Harness metrics per task, e.g. {"lambada_openai": {"acc,none": ..., "perplexity,none": ...}}."""
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown harness tasks {unknown}" + ("" if include_path else " (local tasks need --include-path)")
        )
    results = simple_evaluate(
        model=CompressedLM(path), tasks=tasks, task_manager=manager, limit=limit, log_samples=False
    )
    return {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in results["results"].items()}
