"""Distil a (compressed) student from a frozen teacher: AdamW, warm-up + cosine, gradient accumulation,
bf16 autocast, data parallel through ``accelerate``, atomic checkpoints and exact resume.

Exact resume needs no stored random state: each step's batch comes from ``batch_indices`` (a function of
the step) and dropout is reseeded from (seed, step, rank) before every step. A checkpoint holds the model
in the save/load format plus ``optimizer.safetensors`` and ``trainer_state.json`` (no pickles).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator, PartialState
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .data import TokenBlocks, batch_indices
from .distillation import DistillationLoss
from .methods import is_compressed
from .serialization import load, save

CHECKPOINT, FINAL, LOG, METRICS = "checkpoint", "model", "log.jsonl", "metrics.json"
OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "trainer_state.json"
# Settings that may change between a run and its resume without changing the trajectory.
CADENCE = {"eval_every", "eval_blocks", "checkpoint_every", "log_every"}


@dataclass
class TrainConfig:
    tokens: int  # training tokens; steps = ceil(tokens / (batch_size * block_size))
    batch_size: int = 16  # sequences per optimizer step, over all processes and accumulation steps
    micro_batch_size: int = 4  # sequences per forward pass on one process
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    bf16: bool = True
    trainable: Literal["all", "compressed"] = "all"
    eval_every: int = 50
    eval_blocks: int = 16
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    loss: DistillationLoss = field(default_factory=DistillationLoss)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = DistillationLoss(**self.loss)
        if self.tokens <= 0:
            raise ValueError(f"tokens must be positive, got {self.tokens}")
        if self.batch_size <= 0 or self.micro_batch_size <= 0 or self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a positive multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )
        if self.trainable not in ("all", "compressed"):
            raise ValueError(f"trainable must be 'all' or 'compressed', got {self.trainable!r}")
        if not 0 <= self.warmup_fraction < 1 or self.lr <= 0:
            raise ValueError("need lr > 0 and 0 <= warmup_fraction < 1")

    def steps(self, block_size: int) -> int:
        return max(1, math.ceil(self.tokens / (self.batch_size * block_size)))

    def lr_at(self, step: int, total: int) -> float:
        warmup = round(self.warmup_fraction * total)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().cpu().contiguous()
        for index, entries in state["state"].items()
        for key, value in entries.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def on_cpu_only() -> bool:
    # accelerate only sets up multi-process CPU training (gloo) when told it runs on CPU.
    return not torch.accelerator.is_available()


def process_state() -> PartialState:
    """This process's place in a ``torchrun``/``accelerate launch`` job (a single process otherwise)."""
    return PartialState(cpu=on_cpu_only())


class Trainer:
    """One distillation stage: ``Trainer(student, teacher, data, config, out).run()``.

    ``out`` receives ``checkpoint/`` while training, ``model/`` (the final student, loadable with
    ``tqcompressor.load``) at the end, ``log.jsonl`` and ``metrics.json``. With ``resume`` and a
    checkpoint in ``out``, the student is the checkpoint's and training continues where it stopped.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        data: TokenBlocks,
        config: TrainConfig,
        out: str | Path,
        tokenizer=None,
        resume: bool = False,
        progress: bool = True,
    ):
        self.accelerator = Accelerator(cpu=on_cpu_only())
        self.config, self.data, self.out, self.tokenizer = config, data, Path(out), tokenizer
        self.progress = progress and self.accelerator.is_main_process
        self.total_steps = config.steps(data.block_size)
        world = self.accelerator.num_processes
        if config.batch_size % (config.micro_batch_size * world):
            raise ValueError(
                f"batch_size {config.batch_size} is not divisible by micro_batch_size x processes "
                f"({config.micro_batch_size} x {world})"
            )
        if config.loss.needs_teacher and teacher is None:
            raise ValueError("the KL and hidden-state terms need a teacher (or set alpha = gamma = 0)")
        if teacher is not None:
            _check_compatible(student, teacher)
        self.step, self.history = 0, []
        checkpoint = self.out / CHECKPOINT
        state = None
        if resume and checkpoint.is_dir():
            state = json.loads((checkpoint / STATE_FILE).read_text())
            _check_same_run(state["config"], config)
            student = load(checkpoint)
            self.step, self.history = state["step"], state["history"]
        elif (self.out / FINAL).exists() or checkpoint.exists():
            raise FileExistsError(f"{self.out} already holds a run (pass resume=True / --resume to continue it)")

        device = self.accelerator.device
        self.student = student.to(device)
        self.teacher = None if teacher is None else teacher.to(device).eval().requires_grad_(False)
        self._choose_trainable()
        decay = [p for p in self.student.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.student.parameters() if p.requires_grad and p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
            betas=(0.9, 0.95),
        )
        if state is not None:
            _restore_optimizer(self.optimizer, load_file(str(checkpoint / OPTIMIZER_FILE)), state["optimizer"])
        self.model = self.accelerator.prepare_model(self.student)
        self.bf16 = config.bf16 and (device.type == "cpu" or torch.cuda.is_bf16_supported())
        self.stop_requested = False
        self.local_sequences = 0  # this process's share since start or resume (global = all processes)

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.data.block_size  # global: the same for any number of processes

    def _choose_trainable(self) -> None:
        if self.config.trainable == "all":
            self.student.requires_grad_(True)
            return
        self.student.requires_grad_(False)
        compressed = [m for m in self.student.modules() if is_compressed(m)]
        if not compressed:
            raise ValueError("trainable='compressed' but the student has no compressed layers")
        for module in compressed:
            module.requires_grad_(True)

    def _autocast(self):
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _losses(self, input_ids: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor]:
        loss = self.config.loss
        with self._autocast():
            teacher_out = None
            if self.teacher is not None and loss.needs_teacher:
                with torch.no_grad():
                    teacher_out = self.teacher(input_ids, output_hidden_states=loss.needs_hidden_states)
            student_out = model(input_ids, output_hidden_states=loss.needs_hidden_states)
        return loss(student_out, teacher_out, input_ids)

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the global batch of ``self.step``; this process takes its share."""
        config, accelerator = self.config, self.accelerator
        rank, world = accelerator.process_index, accelerator.num_processes
        torch.manual_seed(config.seed * 1_000_003 + self.step * 1009 + rank)  # dropout, reproducible per step
        indices = batch_indices(len(self.data.train), config.batch_size, self.step, config.seed)
        share = indices.view(world, -1)[rank].split(config.micro_batch_size)
        lr = config.lr_at(self.step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        sums: dict[str, float] = {}
        for i, micro in enumerate(share):
            self.local_sequences += len(micro)
            input_ids = self.data.train[micro].to(accelerator.device)
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            sync = nullcontext() if i == len(share) - 1 else accelerator.no_sync(self.model)
            with sync:
                terms = self._losses(input_ids, self.model)
                accelerator.backward(terms["loss"] / len(share))
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) / len(share)
        if config.grad_clip > 0:
            sums["grad_norm"] = float(accelerator.clip_grad_norm_(self.model.parameters(), config.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if world > 1:  # report the global mean of each term, not rank 0's share
            reduced = accelerator.reduce(torch.tensor(list(sums.values()), device=accelerator.device), "mean")
            sums = dict(zip(sums, reduced.tolist(), strict=True))
        return {**sums, "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out next-token loss and perplexity of the student (every process computes the same)."""
        self.student.eval()
        blocks = self.data.heldout[: self.config.eval_blocks]
        total = 0.0
        for batch in blocks.split(self.config.micro_batch_size):
            input_ids = batch.to(self.accelerator.device)
            with self._autocast():
                logits = self.student(input_ids).logits[:, :-1].float()
            total += float(
                nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
            ) * len(batch)
        loss = total / len(blocks)
        return {"heldout_loss": loss, "heldout_ppl": math.exp(min(loss, 700.0))}

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / LOG).open("a") as log:
                log.write(json.dumps(record) + "\n")

    def save_checkpoint(self) -> None:
        if self.accelerator.is_main_process:
            tensors, groups = _optimizer_tensors(self.optimizer)
            state = {
                "step": self.step,
                "total_steps": self.total_steps,
                "config": asdict(self.config),
                "optimizer": groups,
                "history": self.history,
            }

            def write_state(folder: Path) -> None:
                save_file(tensors, str(folder / OPTIMIZER_FILE))
                (folder / STATE_FILE).write_text(json.dumps(state, indent=1))

            save(self.student, self.out / CHECKPOINT, self.tokenizer, overwrite=True, write_extra=write_state)
        self.accelerator.wait_for_everyone()

    def _stop_everywhere(self) -> bool:
        flag = torch.tensor(float(self.stop_requested), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag)

    def run(self, until_step: int | None = None) -> dict:
        """Train to the end (or to ``until_step``, leaving a checkpoint). Ctrl-C finishes the current
        step, writes a checkpoint and returns; a second Ctrl-C aborts at once."""
        config = self.config
        last = min(self.total_steps, until_step if until_step is not None else self.total_steps)
        tokens_per_step = self.tokens_per_step
        if not self.history:
            self._log({"step": 0, "tokens": 0, **self.evaluate()})
        previous = signal.getsignal(signal.SIGINT)

        def request_stop(signum, frame):
            self.stop_requested = True
            signal.signal(signal.SIGINT, previous)

        signal.signal(signal.SIGINT, request_stop)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, unit="step", desc="distil")
        started, start_step = time.perf_counter(), self.step
        try:
            while self.step < last:
                metrics = self.train_step()
                tokens_per_s = (self.step - start_step) * tokens_per_step / (time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                record = {"step": self.step, "tokens": self.step * tokens_per_step, **metrics}
                if self.step % config.log_every == 0 or self.step == last:
                    self._log({**record, "tokens_per_s": tokens_per_s})
                if self.step % config.eval_every == 0 and self.step < self.total_steps:
                    self._log({"step": self.step, "tokens": record["tokens"], **self.evaluate()})
                if self._stop_everywhere():
                    break
                if self.step % config.checkpoint_every == 0 and self.step < last:
                    self.save_checkpoint()
        finally:
            bar.close()
            signal.signal(signal.SIGINT, previous)
        seconds = time.perf_counter() - started
        if self.step < self.total_steps:
            self.save_checkpoint()
            return {"finished": False, "step": self.step, "interrupted": self.stop_requested}
        return self._finish(seconds, (self.step - start_step) * tokens_per_step)

    def _finish(self, seconds: float, tokens: int) -> dict:
        final = self.evaluate()
        self._log({"step": self.step, "tokens": self.step * self.tokens_per_step, **final})
        evals = [r for r in self.history if "heldout_loss" in r]
        metrics = {
            "finished": True,
            "steps": self.step,
            "tokens": self.step * self.tokens_per_step,
            "heldout_ppl_before": evals[0]["heldout_ppl"],
            "heldout_ppl_after": final["heldout_ppl"],
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "processes": self.accelerator.num_processes,
            "local_sequences": self.local_sequences,
        }
        if self.accelerator.is_main_process:
            save(self.student, self.out / FINAL, self.tokenizer, overwrite=True)
            (self.out / METRICS).write_text(json.dumps(metrics, indent=2))
            checkpoint = self.out / CHECKPOINT
            if checkpoint.exists():  # the final model supersedes it
                shutil.rmtree(checkpoint)
        self.accelerator.wait_for_everyone()
        return metrics


def _vocab_size(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    size = getattr(head, "out_features", None) or getattr(head, "num_embeddings", None)
    return size or getattr(getattr(model, "config", None), "vocab_size", None)


def _check_compatible(student: nn.Module, teacher: nn.Module) -> None:
    s, t = _vocab_size(student), _vocab_size(teacher)
    if s is not None and t is not None and s != t:
        raise ValueError(f"teacher vocabulary ({t}) and student vocabulary ({s}) differ: they cannot be distilled")


def _check_same_run(saved: dict, config: TrainConfig) -> None:
    current = asdict(config)
    changed = sorted(k for k in current if k not in CADENCE and saved.get(k) != current[k])
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)} -> {current[k]}" for k in changed)
        raise ValueError(f"cannot resume: the checkpoint was trained with different settings ({detail})")
