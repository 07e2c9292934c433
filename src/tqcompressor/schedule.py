"""Multi-step compression: apply part of a plan, distil, save, evaluate; repeat.

A schedule file (YAML or JSON)::

    steps:
      - name: embedding          # rules as in a plan file, or  plan: path/to/plan.yaml
        rules: [{pattern: 'transformer\\.wte', embedding_factor: 2}]
        tokens: 200000           # optional: otherwise the run's --tokens are shared equally
      - name: mlp
        plan: mlp-plan.yaml
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from torch import nn

from .data import TokenBlocks
from .experts import is_fused_experts, unfuse_experts
from .params import count_parameters
from .plan import CompressionPlan
from .presets import preset_steps
from .serialization import load, recover_interrupted_write, save
from .surgery import compress_, resolve
from .training import CHECKPOINT, FINAL, METRICS, TrainConfig, Trainer, process_state
from .training.continuation import (
    FINAL_OPTIMIZER,
    Continuation,
    parameter_values,
    read_optimizer_state,
    unchanged_parameters,
)

COMPRESSED = "compressed"  # a step's model right after compression, before distillation


@dataclass
class ScheduleStep:
    name: str
    plan: CompressionPlan | None  # None: distil only
    tokens: int | None = None


@dataclass
class Schedule:
    steps: list[ScheduleStep]

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("a schedule needs at least one step")
        names = [step.name for step in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"schedule step names must be unique, got {names}")

    @classmethod
    def from_dict(cls, data: dict, base: Path = Path(".")) -> Schedule:
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise ValueError("a schedule must be a mapping with a 'steps' list")
        steps = []
        for i, raw in enumerate(data["steps"], 1):
            if not isinstance(raw, dict):
                raise ValueError(f"schedule step {i} must be a mapping")
            unknown = set(raw) - {"name", "rules", "plan", "tokens", "tie_head"}
            if unknown:
                raise ValueError(f"schedule step {i}: unknown keys {sorted(unknown)}")
            if "rules" in raw and "plan" in raw:
                raise ValueError(f"schedule step {i}: give either rules or plan, not both")
            name = str(raw.get("name", f"step{i}"))
            if "plan" in raw:
                plan = CompressionPlan.load(base / raw["plan"])
            elif raw.get("rules"):
                plan = CompressionPlan.from_dict({"rules": raw["rules"], "name": name})
            else:
                plan = None
            if plan is not None and "tie_head" in raw:
                plan.tie_head = bool(raw["tie_head"])
            tokens = raw.get("tokens")
            if tokens is not None and (not isinstance(tokens, int) or tokens <= 0):
                raise ValueError(f"schedule step {i}: tokens must be a positive integer, got {tokens!r}")
            steps.append(ScheduleStep(name, plan, tokens))
        return cls(steps)

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"schedule file {path} does not exist")
        try:
            data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"cannot parse schedule file {path}: {err}") from err
        return cls.from_dict(data, base=path.parent)

    @classmethod
    def from_preset(cls, name: str, config, tie_head: bool = True, **search) -> Schedule:
        """``tqcompressedgpt2``/``kngpt2`` as the paper runs them: embedding ÷2, MLPs, embedding ÷2."""
        plans = preset_steps(name, config, tie_head, **search)
        return cls([ScheduleStep(re.sub(r"^[a-z0-9]+-", "", plan.name), plan) for plan in plans])

    def one_shot(self) -> Schedule:
        """Every step's rules applied at once, then one distillation with all the tokens."""
        rules = [rule for step in self.steps if step.plan for rule in step.plan.rules]
        tie = all(step.plan.tie_head for step in self.steps if step.plan)
        tokens = sum(step.tokens for step in self.steps) if all(s.tokens for s in self.steps) else None
        plan = CompressionPlan(rules, name="one-shot", tie_head=tie) if rules else None
        return Schedule([ScheduleStep("one-shot", plan, tokens)])

    def share_tokens(self, total: int, shares: list[float]) -> Schedule:
        """The schedule with ``total`` tokens split between its steps in proportion to ``shares``."""
        if len(shares) != len(self.steps):
            raise ValueError(f"{len(shares)} token shares for a schedule of {len(self.steps)} steps")
        if any(share <= 0 for share in shares):
            raise ValueError(f"token shares must be positive, got {shares}")
        if any(step.tokens is not None for step in self.steps):
            raise ValueError("the schedule's steps already have their own token budgets; give shares or budgets")
        tokens = [max(1, round(total * share / sum(shares))) for share in shares]
        return Schedule([replace(step, tokens=n) for step, n in zip(self.steps, tokens, strict=True)])

    def token_budgets(self, total: int | None) -> list[int]:
        fixed = sum(step.tokens or 0 for step in self.steps)
        shared = [step for step in self.steps if step.tokens is None]
        if shared and total is None:
            raise ValueError("give a total token budget (--tokens) or tokens for every schedule step")
        remaining = (total or fixed) - fixed
        if shared and remaining < len(shared):
            raise ValueError(f"--tokens {total} leaves nothing for the steps without their own budget")
        share = remaining // len(shared) if shared else 0
        return [step.tokens if step.tokens is not None else share for step in self.steps]

    def check(self, model: nn.Module) -> None:
        """Raise before any work if a step names nothing or its shapes do not fit the model (its student, with
        MoE experts unfused: ``run_schedule``)."""
        model = student_shape(model)
        for step in self.steps:
            if step.plan is not None:
                try:
                    resolve(model, step.plan)
                except ValueError as err:
                    raise ValueError(f"schedule step {step.name!r}: {err}") from err
        merged = self.one_shot().steps[0].plan
        if merged is not None:
            resolve(model, merged)  # widths as the earlier steps leave them


def student_shape(teacher: nn.Module) -> nn.Module:
    """``teacher``, or where it holds fused MoE experts an empty copy (meta device) with them unfused, as the
    student is: the names and shapes its plans resolve against."""
    if not any(is_fused_experts(module) for module in teacher.modules()):
        return teacher
    with torch.device("meta"):
        student = type(teacher)(teacher.config)
    unfuse_experts(student)
    return student


def step_dir(out: Path, index: int, step: ScheduleStep) -> Path:
    return out / f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', step.name)}"


def run_schedule(
    teacher: nn.Module,
    tokenizer,
    schedule: Schedule,
    data: TokenBlocks,
    config: TrainConfig,
    out: str | Path,
    total_tokens: int | None = None,
    resume: bool = False,
    progress: bool = True,
    evaluate=None,
    continuous: bool = True,
) -> list[dict]:
    """Run every step; each leaves ``NN-name/{compressed,model}/``, its log and metrics in ``out``.
    ``evaluate(model) -> dict`` adds metrics of each step's model before and after distillation.
    With ``resume``, finished steps are loaded and skipped and an interrupted one continues.

    ``continuous`` (the default) runs the steps as one training run: one warm-up + cosine learning-rate
    schedule over all steps, and the parameters a step leaves unchanged keep their optimizer state
    (``training.continuation``). Without it every step restarts AdamW and its schedule. Either way each
    step reads the data from where the step before it stopped."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(f"{out} is not empty (pass --resume to continue the run there)")
    schedule.check(teacher)
    budgets = schedule.token_budgets(total_tokens)
    step_counts = [replace(config, tokens=tokens).steps(data.block_size) for tokens in budgets]
    # The student's experts become linear layers that plans can name; the teacher keeps its fused ones and
    # their faster implementations (grouped_mm on a GPU).
    student, results = copy.deepcopy(teacher), []
    unfuse_experts(student)
    for index, (step, tokens) in enumerate(zip(schedule.steps, budgets, strict=True), 1):
        folder = step_dir(out, index, step)
        if resume and (folder / METRICS).is_file():
            student = load(folder / FINAL)
            results.append(json.loads((folder / METRICS).read_text()))
            continue
        if resume:
            recover_interrupted_write(folder / CHECKPOINT)
        trainer_resumes = resume and (folder / CHECKPOINT).is_dir()
        compression = None
        continuation = Continuation(sum(step_counts[: index - 1]), sum(step_counts), restart=not continuous)
        if not trainer_resumes:
            previous = parameter_values(student) if continuous and index > 1 else None
            student, compression = _start_step(student, step, folder, tokenizer)
            if previous is not None:
                kept = unchanged_parameters(previous, student)
                moments = read_optimizer_state(step_dir(out, index - 1, schedule.steps[index - 2]) / FINAL_OPTIMIZER)
                continuation.optimizer_state = {name: moments[name] for name in kept if name in moments}
        before = evaluate(student) if evaluate and not trainer_resumes else None

        def describe(trained: nn.Module, name=step.name, compression=compression, before=before) -> dict:
            extra = {"step": name, "params": count_parameters(trained)}
            if compression is not None:
                extra["compression"] = compression
            if evaluate:
                extra["eval_after"] = evaluate(trained)
                if before is not None:
                    extra["eval_before"] = before
            return extra

        trainer = Trainer(
            student,
            teacher,
            data,
            replace(config, tokens=tokens),
            folder,
            tokenizer,
            trainer_resumes,
            progress,
            continuation,
            keep_optimizer=continuous and index < len(schedule.steps),
        )
        metrics = trainer.run(describe=describe)
        results.append(metrics if metrics["finished"] else {"step": step.name, **metrics})
        if not metrics["finished"]:
            break
        student = trainer.student
    return results


def _start_step(student: nn.Module, step: ScheduleStep, folder: Path, tokenizer) -> tuple[nn.Module, dict | None]:
    """Start a step afresh (a step that stopped before its first checkpoint starts over) and apply its plan.
    Only the main process compresses, and every process loads the result: the permutation search stops
    on a clock, so separate processes could otherwise end with different students."""
    state = process_state()
    report = None
    if state.is_main_process:
        if folder.exists():
            shutil.rmtree(folder)
        if step.plan is not None:
            report = compress_(student, step.plan, progress=False).to_dict()
            save(student, folder / COMPRESSED, tokenizer, overwrite=True)
    state.wait_for_everyone()
    if step.plan is None:
        return student, None
    return load(folder / COMPRESSED), report
