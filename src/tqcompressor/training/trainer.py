"""Distil a (compressed) student from a frozen teacher: AdamW, warm-up + cosine, gradient accumulation,
bf16 autocast, data parallel through ``accelerate``, atomic checkpoints and exact resume.

The parts live beside this file: ``config`` (settings, learning rate), ``step`` (one optimisation
step), ``evaluation`` (held-out loss), ``checkpoint`` (write and read back); ``Trainer`` runs them."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn
from tqdm.auto import tqdm

from ..data import TokenBlocks
from ..experts import unfused_experts
from ..loading import check_runs_on_token_ids
from ..methods import is_compressed
from ..plots import plot_training
from ..serialization import recover_interrupted_write, save, write_file_atomically
from .checkpoint import CHECKPOINT, read_checkpoint, restore_optimizer, write_checkpoint
from .config import TrainConfig
from .continuation import FINAL_OPTIMIZER, Continuation, optimizer_state_by_name, write_optimizer_state
from .evaluation import heldout_loss
from .step import computes_bf16_natively, optimization_step

FINAL, LOG, METRICS, CURVE = "model", "log.jsonl", "metrics.json", "curve.png"


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
        continuation: Continuation | None = None,
        keep_optimizer: bool = False,
    ):
        """``continuation`` places this stage inside a longer run (see ``continuation``);
        ``keep_optimizer`` writes the final optimizer state beside the final model for the next stage."""
        # A step may route no token to an expert, whose unfused layers then get no gradient: data parallel must
        # look for unused parameters there (else it stops: "Expected to have finished reduction").
        ddp = DistributedDataParallelKwargs(find_unused_parameters=bool(unfused_experts(student)))
        self.accelerator = Accelerator(cpu=on_cpu_only(), kwargs_handlers=[ddp])
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
        for model in (student, teacher):
            if model is not None:
                check_runs_on_token_ids(model, "distillation", "fine-tune it with a seq2seq trainer")
        if teacher is not None:
            _check_compatible(student, teacher)
        self.step, self.history = 0, []
        self.keep_optimizer = keep_optimizer
        self.first_step, self.run_steps, self.restart = 0, self.total_steps, False
        if continuation is not None:
            self.first_step, self.run_steps = continuation.first_step, continuation.run_steps
            self.restart = continuation.restart
            if self.first_step + self.total_steps > self.run_steps:
                raise ValueError(
                    f"this stage's {self.total_steps} steps from step {self.first_step} overrun the "
                    f"{self.run_steps}-step run"
                )
        carried = dict(continuation.optimizer_state) if continuation is not None else {}
        state = None
        if resume:
            recover_interrupted_write(self.out / CHECKPOINT)
            recover_interrupted_write(self.out / FINAL)
        if resume and (self.out / CHECKPOINT).is_dir():
            student, state = read_checkpoint(self.out)
            config.check_resumes(state["config"])
            position = [self.first_step, self.run_steps, self.restart]
            if state.get("run", [0, self.total_steps, False]) != position:
                raise ValueError(
                    f"cannot resume: the checkpoint's stage has (first step, run steps, restart) "
                    f"{state.get('run')}, this one {position}"
                )
            carried = {name: {} for name in state.get("carried", [])}  # the checkpoint holds their moments
            self.step, self.history = state["step"], state["history"]
            if self.accelerator.is_main_process:
                # Lines logged after the checkpoint (or half-written by a killed run) would repeat or break.
                log = "".join(json.dumps(record) + "\n" for record in self.history)
                write_file_atomically(self.out / LOG, lambda path: path.write_text(log))
        elif (self.out / FINAL).exists() or (self.out / CHECKPOINT).exists():
            raise FileExistsError(f"{self.out} already holds a run (pass resume=True / --resume to continue it)")

        device = self.accelerator.device
        self.student = student.to(device)
        self.teacher = None if teacher is None else teacher.to(device).eval().requires_grad_(False)
        self._choose_trainable()
        self.carried = sorted(carried)
        self.optimizer = self._optimizer(carried)
        if state is not None:
            restore_optimizer(self.optimizer, self.out, state)
        self.model = self.accelerator.prepare_model(self.student)
        self.bf16 = config.bf16 and computes_bf16_natively(device)
        self.stop_requested = False
        self.local_sequences = 0  # this process's share since start or resume (global = all processes)

    def _optimizer(self, carried: dict[str, dict[str, torch.Tensor]]) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices only; parameters in ``carried`` start from their moments."""
        parameters = dict(self.student.named_parameters())
        unknown = sorted(
            name for name, moments in carried.items() if name not in parameters or not parameters[name].requires_grad
        )
        if unknown:
            raise ValueError(f"optimizer state given for parameters the student does not train: {unknown[:3]}")
        groups = []
        for fresh in (False, True):
            for decay in (True, False):
                params = [
                    p
                    for name, p in parameters.items()
                    if p.requires_grad and (p.ndim >= 2) == decay and (name not in carried) == fresh
                ]
                if params:
                    weight_decay = self.config.weight_decay if decay else 0.0
                    groups.append({"params": params, "weight_decay": weight_decay, "fresh": fresh})
        optimizer = torch.optim.AdamW(groups, lr=self.config.lr, betas=(0.9, 0.95))
        for name, moments in carried.items():
            if moments:
                p = parameters[name]
                optimizer.state[p] = {
                    key: value.to(p.device) if value.ndim else value.clone() for key, value in moments.items()
                }
        return optimizer

    def learning_rate(self, step: int) -> float:
        """The schedule at this stage's ``step``: the run's, or the stage's own when it restarts."""
        if self.restart:
            return self.config.lr_at(step, self.total_steps)
        return self.config.lr_at(self.first_step + step, self.run_steps)

    def _set_learning_rates(self) -> float:
        lr = self.learning_rate(self.step)
        # Parameters a later stage created have zero moments: they warm up over the run's warm-up length.
        ramp = min(1.0, (self.step + 1) / max(1, round(self.config.warmup_fraction * self.run_steps)))
        continuing = self.first_step > 0 and not self.restart
        for group in self.optimizer.param_groups:
            group["lr"] = lr * ramp if group.get("fresh", False) and continuing else lr
        return lr

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

    def train_step(self) -> dict[str, float]:
        lr = self._set_learning_rates()
        metrics, sequences = optimization_step(
            self.accelerator,
            self.model,
            self.teacher,
            self.optimizer,
            self.data,
            self.config,
            self.first_step + self.step,  # the run's position: the data moves on from stage to stage
            self.bf16,
        )
        self.step += 1
        self.local_sequences += sequences
        return {**metrics, "lr": lr}

    def evaluate(self) -> dict[str, float]:
        blocks = self.data.heldout[: self.config.eval_blocks]
        return heldout_loss(self.student, blocks, self.config.micro_batch_size, self.accelerator.device, self.bf16)

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / LOG).open("a") as log:
                log.write(json.dumps(record) + "\n")

    def save_checkpoint(self) -> None:
        if self.accelerator.is_main_process:
            state = {
                "step": self.step,
                "total_steps": self.total_steps,
                "run": [self.first_step, self.run_steps, self.restart],
                "carried": self.carried,
                "config": asdict(self.config),
                "history": self.history,
            }
            write_checkpoint(self.out, self.student, self.optimizer, state, self.tokenizer)
            plot_training(self.history, self.out / CURVE)
        self.accelerator.wait_for_everyone()

    def _stop_everywhere(self) -> bool:
        if self.accelerator.num_processes == 1:
            return self.stop_requested
        flag = torch.tensor(float(self.stop_requested), device=self.accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag)

    def run(self, until_step: int | None = None, describe: Callable[[nn.Module], dict] | None = None) -> dict:
        """Train to the end (or to ``until_step``, leaving a checkpoint). Ctrl-C finishes the current
        step, writes a checkpoint and returns; a second Ctrl-C aborts at once. ``describe(student)``
        adds entries to the final metrics (written once, to ``metrics.json``)."""
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
        return self._finish(seconds, (self.step - start_step) * tokens_per_step, describe)

    def _finish(self, seconds: float, tokens: int, describe: Callable[[nn.Module], dict] | None) -> dict:
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
            "bf16": self.bf16,
        }
        if describe is not None:
            metrics.update(describe(self.student))
        if self.accelerator.is_main_process:
            save(self.student, self.out / FINAL, self.tokenizer, overwrite=True)
            if self.keep_optimizer:
                state = optimizer_state_by_name(self.optimizer, self.student)
                write_file_atomically(self.out / FINAL_OPTIMIZER, lambda path: write_optimizer_state(state, path))
            write_file_atomically(self.out / METRICS, lambda path: path.write_text(json.dumps(metrics, indent=2)))
            plot_training(self.history, self.out / CURVE)
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
