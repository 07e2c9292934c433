"""Sequential calibration: compress a model one part at a time in forward order, each part fitted on the
inputs the model compressed so far gives it (as GPTQ and SVD-LLM fit block by block) and aimed at what
the original model computed there, so that each fit also corrects the error the parts before it left
(asymmetric calibration, as in GPTAQ).

Where the model's blocks form a chain (each block's output is the next one's input, with the same mask
and positions and no KV cache; every decoder stack does), the inputs of the stack are kept twice, as
the compressed model and as the original model give them, and each block runs alone over them: inside
a block the modules sharing one input (q/k/v, gate/up) form a part, each part is calibrated after the
parts before it are compressed (its passes stop at the part), the block run once on the original
stream before any of it changes gives the original inputs, and the layers the plan keeps dense are
aimed in their turn (unless ``aim_dense=False``). Elsewhere a block's modules are calibrated together
on whole-model passes over the compressed model, not aimed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import (
    CalibrationStats,
    calibration_targets,
    check_finite,
    check_token_count,
    collect,
    expand_containers,
    forward_order,
    weight_digest,
)
from .experts import routed_owner
from .linalg import aimed_weight
from .methods import is_embedding
from .methods.targets import dense_weight, is_linear
from .params import count_parameters, shared_parameter_names
from .reconstruction import RECONSTRUCTION_LR, Reconstruction, reconstruct
from .statistics import InputStats

# The ridge of the aimed weight, relative to the mean input energy (GPTQ damps with 0.01). SmolLM2, uniform
# low-rank at 70%, 8k calibration tokens, held-out ppl by damping: 0.001: 237, 0.01: 192, 0.03: 172,
# 0.1: 166, 0.3: 172, 1.0: 187; not aimed: 365 (at once: 400).
DAMPING = 0.1


def compress_sequentially(
    model: nn.Module,
    plan,
    blocks: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    damping: float = DAMPING,
    aim_dense: bool = True,
    token_counts: torch.Tensor | None = None,
    output_moments: Mapping[str, torch.Tensor] | None = None,
    anchor: float = 0.0,
    reconstruction_epochs: int = 0,
    reconstruction_lr: float = RECONSTRUCTION_LR,
):
    """Compress ``model`` by ``plan`` (a ``CompressionPlan``) part by part, calibrating each part on
    ``blocks`` (sequences x tokens) as the model compressed so far sees them; ``damping``: the ridge of
    the aimed weights (``linalg.aimed_weight``). With ``aim_dense`` the linear layers of the kept stack
    that the plan leaves dense are aimed too, once anything before them is compressed: they stay dense
    and keep their size, and correct what the compressed parts before them left (SmolLM2 with its MLPs
    halved, 8k tokens: held-out ppl 210 aimed so, 65077 with the attention left as it was, 2675 fitted
    at once). ``token_counts``: an embedding's row weights counted on more text (as in ``collect``).
    ``output_moments``: the original model's Fisher output metrics per module (``CalibrationStats.outputs``
    from ``collect(..., fisher=True)``), given to each part's fit. ``anchor`` A: each aimed part minimises
    ‖X̃Ŵ − XW‖² + A‖X(Ŵ − W)‖², X̃ its inputs in the model compressed so far and X the original's: 0 aims
    only, a large A fits as at once. ``reconstruction_epochs``: after each block of a chained stack is fitted
    and aimed, tune all its parameters together on its output error for this many epochs with Adam at
    ``reconstruction_lr`` (``reconstruction``; 0: closed-form fits only). Returns one report."""
    from .plan import CompressionPlan, Rule
    from .report import CompressionReport
    from .surgery import compress_, resolve, shared_weights_note

    if not anchor >= 0:
        raise ValueError(f"the anchor weighs an error: it must be 0 or more, got {anchor}")
    if reconstruction_epochs < 0:
        raise ValueError(f"reconstruction epochs must be 0 or more, got {reconstruction_epochs}")
    if not reconstruction_lr > 0:
        raise ValueError(f"the reconstruction's learning rate must be positive, got {reconstruction_lr}")
    if reconstruction_epochs and len(blocks.split(batch_size)) < 2:
        raise ValueError(
            f"block reconstruction holds one calibration batch out: give at least {batch_size + 1} calibration "
            f"blocks of {blocks.shape[1]} tokens, or fewer per batch"
        )
    steps = resolve(model, plan)  # the whole plan is checked before anything changes
    names = list(dict.fromkeys(name for _, name in steps))
    calibration_targets(model, names)
    note = shared_weights_note(model, names)  # before any part unties one
    # Experts take their place from their experts module, which every token reaches (the first block's
    # tokens may be routed to none of them).
    owners = {name: owner for name in names if (owner := routed_owner(model, name))}
    order = []
    for called in forward_order(model, list(dict.fromkeys([*names, *owners.values()])), blocks[:1]):
        order += [name for name in names if (name == called and name not in owners) or owners.get(name) == called]
    unreached = [name for name in names if name not in order]
    if unreached:
        raise ValueError(f"the calibration text never reached {unreached[:3]}: they are not used in forward")
    groups: dict[str, list[str]] = {}
    for name in order:
        groups.setdefault(_block(name), []).append(name)
    reconstruction = (
        partial(reconstruct, epochs=reconstruction_epochs, lr=reconstruction_lr) if reconstruction_epochs else None
    )
    started = time.perf_counter()
    # What every stack receives from the original model, before anything is compressed.
    stacks = {}
    for group, members in groups.items():
        stack, _ = _stack_position(model, group)
        if stack is not None and stack not in stacks and _all_linear(model, members):
            stacks[stack] = _StackReplay.capture(model, stack, blocks, batch_size, damping, anchor, reconstruction)
    seconds = time.perf_counter() - started
    history = list(getattr(model, "tqcompressor_history", []))
    before, layers, head = None, [], ""
    compressed, aimed = 0, 0  # parts compressed so far; blocks fitted on kept inputs
    tokens, left = blocks.numel(), None  # left: the stack of the group before

    def finish(name: str | None) -> None:
        """Aim the blocks of stack ``name`` after its last compressed one."""
        if aim_dense and stacks.get(name) is not None:
            stacks[name].advance_to(len(stacks[name].stack), model, tokens, aim=True)

    was_training = model.training
    model.eval()
    try:
        for group, members in tqdm(groups.items(), desc="calibrate + compress", disable=not progress, unit="block"):
            stack, index = _stack_position(model, group)
            if left != stack:
                finish(left)
            left = stack
            replay = stacks.get(stack)
            if replay is not None and not _all_linear(model, members):
                stacks[stack] = replay = None  # an embedding inside a block: the whole-model way from here
            if replay is not None and replay.compressed_parts != compressed:
                started = time.perf_counter()  # something before the stack changed what it receives
                if not replay.recapture(model, blocks, batch_size, compressed):
                    stacks[stack] = replay = None
                seconds += time.perf_counter() - started
            if replay is not None:
                replay.advance_to(index, model, tokens, aim=aim_dense)
                parts = replay.parts(model, members, tokens, aim_dense)
                aimed += 1
            else:
                parts = iter([(members, collect(model, members, blocks, batch_size, False, token_counts))])
            for part_members, stats in parts:
                seconds += stats.seconds
                held = expand_containers(model, part_members)
                stats.outputs = {n: output_moments[n] for n in held if n in (output_moments or {})}
                rules = [Rule(re.escape(name), rule.config) for rule, name in steps if name in part_members]
                part = CompressionPlan(rules, name=plan.name, tie_head=plan.tie_head)
                report = compress_(model, part, calibration=stats, progress=False)
                before = report.params_before if before is None else before
                layers += report.layers
                head = report.head  # each part describes the head as the parts so far leave it
                compressed += 1
                if replay is not None:
                    replay.compressed_parts = compressed
        finish(left)
    finally:
        model.train(was_training)
    final = CompressionReport(plan.name, layers, before, count_parameters(model), head)
    final.notes += [note] if note else []
    replays = [replay for replay in stacks.values() if replay is not None]
    redirected = sum(replay.dense_aimed for replay in replays)
    seconds += sum(replay.dense_seconds for replay in replays)
    final.notes.append(
        f"calibrated sequentially, {len(groups)} blocks: {aimed} on kept inputs, aimed at the original "
        f"model's outputs{f', as were {redirected} layers the plan keeps dense' if aim_dense else ''}; "
        f"{len(groups) - aimed} on whole-model passes; {seconds:.1f} s of calibration"
    )
    unreached = sum(replay.unreached_experts for replay in replays)
    if unreached:
        final.notes.append(
            "experts' layers that the calibration text reached and that got no token once the layers before them "
            f"were compressed, fitted to their weights alone: {unreached}"
        )
    done = [r for replay in replays for r in replay.reconstructions]
    if reconstruction_epochs:
        kept = sum(r.epoch > 0 for r in done)
        # Blocks still improving at the last epoch say more epochs would help.
        last = sum(r.epoch == reconstruction_epochs for r in done)
        # Each block's "before" already has the blocks before it tuned: compare within a block.
        lowered = sum(1 - r.after / r.before for r in done if r.before > 0) / max(len(done), 1)
        final.notes.append(
            f"reconstructed {len(done)} blocks ({reconstruction_epochs} epochs; {kept} kept a tuned state, "
            f"{last} that of the last epoch): "
            f"held-out output error {lowered:.1%} lower per block on average; "
            f"{sum(replay.reconstruction_seconds for replay in replays):.1f} s"
        )
    model.tqcompressor_history = [*history, {"plan": plan.to_dict(), "report": final.to_dict()}]
    return final


def _all_linear(model: nn.Module, members: list[str]) -> bool:
    """Whether kept block inputs can serve ``members``: linear layers, or modules cut whole that hold them
    (no embedding)."""
    modules = [model.get_submodule(name) for name in members]
    return all(is_linear(m) or (not is_embedding(m) and any(is_linear(c) for c in m.children())) for m in modules)


def _block(name: str) -> str:
    """The repeated block a module belongs to (``model.layers.3.mlp.up_proj`` -> ``model.layers.3``)."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return name if index is None else ".".join(parts[: index + 1])


def _stack_position(model: nn.Module, group: str) -> tuple[str | None, int]:
    """(``model.layers``, 3) for the group ``model.layers.3`` when it is an entry of a module list."""
    parent, _, index = group.rpartition(".")
    if not index.isdigit() or not isinstance(model.get_submodule(parent), nn.ModuleList | nn.Sequential):
        return None, -1
    return parent, int(index)


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, tuple[tuple, dict]]:
    """A block's hidden state (its first argument) and everything else it receives."""
    if args:
        return args[0], (args[1:], kwargs)
    rest = {key: value for key, value in kwargs.items() if key != "hidden_states"}
    return kwargs.get("hidden_states"), ((), rest)


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return (), {**kwargs, "hidden_states": hidden}


def _hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _Reached(Exception):
    """Stops a forward pass once the inputs wanted from it are seen."""


def _module_inputs(
    root: nn.Module, names: list[str], run: Callable[[], object], stop: bool = False
) -> tuple[dict[str, torch.Tensor], object]:
    """(the input each of ``names`` (submodules of ``root``) receives while ``run`` runs, what ``run``
    returned); with ``stop``, ``run`` is cut short once all of them are seen (what comes after cannot
    change them) and returns nothing."""
    seen: dict[str, torch.Tensor] = {}
    result = None

    def hook(module, args, name):
        seen.setdefault(name, args[0])
        if stop and len(seen) == len(names):
            raise _Reached

    handles = [root.get_submodule(name).register_forward_pre_hook(partial(hook, name=name)) for name in names]
    try:
        result = run()
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen, result


class _StackReplay:
    """What one stack of repeated blocks (``model.layers``) receives per calibration batch, kept on the
    model's device twice: as the compressed model gives it (``batches``: the current block's arguments)
    and as the original model does (``originals``: the hidden states alone, the other arguments are
    shared). ``calls``: per batch, the arguments besides the hidden state that each block takes (masks,
    rotary tables: Gemma 3's differ between its sliding-window and global layers).
    ``damping`` and ``anchor`` say how its parts are aimed (``compress_sequentially``); ``reconstruction``
    (``reconstruct`` with its epochs and step given, or None) tunes each block once its parts are fitted."""

    def __init__(
        self,
        name: str,
        stack: nn.Module,
        calls: list[list[tuple[tuple, dict]]],
        damping: float,
        anchor: float,
        reconstruction: Callable[..., Reconstruction] | None,
    ):
        self.name, self.stack, self.position = name, stack, 0
        self._keep(calls)
        self.damping, self.anchor, self.reconstruction = damping, anchor, reconstruction
        self.reconstructions: list[Reconstruction] = []
        self.reconstruction_seconds = 0.0
        self.originals = [_split_hidden(args, kwargs)[0] for args, kwargs in self.batches]
        self.compressed_parts = 0  # parts of the model compressed when ``batches`` was taken
        self.dense_aimed = 0  # layers the plan keeps dense whose weights were aimed
        self.dense_seconds = 0.0  # spent aiming parts with nothing to compress
        self.unreached_experts = 0  # planned experts' layers the compressed stream routed no token to

    @classmethod
    def capture(
        cls,
        model: nn.Module,
        name: str,
        blocks: torch.Tensor,
        batch_size: int,
        damping: float,
        anchor: float,
        reconstruction: Callable[..., Reconstruction] | None,
    ) -> _StackReplay | None:
        """Run the whole model once and keep what every block receives (the hidden state only for the
        first); ``None`` where the blocks do not form a chain."""
        calls = _stack_inputs(model, name, blocks, batch_size)
        return None if calls is None else cls(name, model.get_submodule(name), calls, damping, anchor, reconstruction)

    def recapture(self, model: nn.Module, blocks: torch.Tensor, batch_size: int, compressed_parts: int) -> bool:
        """Retake the compressed model's inputs (the original ones stay); False if the chain broke."""
        if self.position != 0:
            raise RuntimeError(f"{self.name} changed its inputs after its blocks were calibrated")
        calls = _stack_inputs(model, self.name, blocks, batch_size)
        if calls is None:
            return False
        self._keep(calls)
        self.compressed_parts = compressed_parts
        return True

    def _keep(self, calls: list[list[tuple[tuple, dict]]]) -> None:
        """From ``_stack_inputs``: the first block's arguments as the stream to replay, and every block's
        other arguments to hand it on with (the hidden states let go: the replay recomputes them)."""
        self.batches = [per_block[0] for per_block in calls]
        self.calls = [[_with_hidden(args, kwargs, None) for args, kwargs in per_block] for per_block in calls]

    @torch.no_grad()
    def advance_to(self, index: int, model: nn.Module, tokens: int, aim: bool) -> None:
        """Run both streams through the blocks before ``index`` that the plan leaves as they are, with
        ``aim`` aiming their linear layers (once the streams differ)."""
        if index < self.position:
            raise RuntimeError(f"{self.name}.{index} comes before the kept inputs of block {self.position}")
        while self.position < index:
            if aim and self.compressed_parts > 0:
                for _ in self.parts(model, [], tokens, aim_dense=True):
                    pass
            else:
                self._move_on(self.stack[self.position])

    def parts(
        self, model: nn.Module, members: list[str], tokens: int, aim_dense: bool
    ) -> Iterator[tuple[list[str], CalibrationStats]]:
        """Yield (modules sharing one input, their statistics) through block ``position`` in forward order,
        each part's weights aimed at the original model's outputs; compress each part before taking the
        next. With ``aim_dense`` the block's other linear layers are aimed in their turn and stay dense.
        Afterwards both streams have moved past the block."""
        block = self.stack[self.position]
        prefix = f"{self.name}.{self.position}."
        check_token_count(model, expand_containers(model, members), tokens)
        planned = [name[len(prefix) :] for name in members]
        # A module cut whole (an MLP losing units) is fitted once the block's parts are: its linear layers
        # are aimed in their turn like planned ones, and their statistics kept for it.
        containers = [name for name in planned if not is_linear(block.get_submodule(name))]
        planned = [name for name in planned if name not in containers]
        held = expand_containers(block, containers)
        held_stats: dict[str, InputStats] = {}
        # An expert's layer sees other tokens in the two streams (routing follows what came before), so no
        # row of its inputs pairs with one of the original's: fitted to its own inputs, never aimed (nor, left
        # dense, aimed itself).
        routed = {name for name, module in block.named_modules() if is_linear(module) and routed_owner(block, name)}
        # A weight other layers share stays as it is: aimed at this use, it would move for the others.
        shared = shared_parameter_names(model)
        dense = [
            n
            for n, m in block.named_modules()
            if aim_dense and is_linear(m) and n not in planned + held and f"{prefix}{n}.weight" not in shared
        ]
        found = _shared_input_parts(block, planned + held + dense, self.batches[0])
        # A dense layer the block never calls has no inputs to aim it on (Mamba multiplies by its dt_proj's
        # weight): it stays as it is. A planned one the whole-model pass reached must be reached here too,
        # but an expert may have no token in the first batch (its inputs come from those it has) or, routed
        # otherwise in the model compressed so far, none at all (fitted to its weight alone).
        missing = [name for name in planned if not any(name in part for part in found)]
        lost = [name for name in missing if name not in routed]
        if lost:
            raise RuntimeError(f"{prefix}{lost[0]} was reached by the model's forward and not by its block's")
        # Before anything in it changes, the block gives the original inputs of every part and its output
        # in one pass per batch; the compressed stream's passes stop at the part they are for.
        wanted, outputs = self._original_pass(block, [part[0] for part in found if part[0] not in routed])
        for part in found + [[name] for name in missing]:
            names = [prefix + name for name in part if name in planned]
            holds = [name for name in part if name in held]
            # Until something is compressed both streams are the same: nothing to correct.
            aim = self.compressed_parts > 0 and part[0] not in routed
            if not (names or aim or holds):
                continue
            started = time.perf_counter()
            second = cross = original = 0
            count = 0
            with torch.no_grad():
                for i, (args, kwargs) in enumerate(self.batches):
                    given, _ = _module_inputs(block, part, partial(block, *args, **kwargs), stop=True)
                    if part[0] in routed and not given:
                        continue  # no token of this batch was routed to the expert
                    if len(given) < len(part) or any(given[name] is not given[part[0]] for name in part):
                        raise RuntimeError(f"{prefix}{part} changed which input they share between batches")
                    x = given[part[0]].reshape(-1, given[part[0]].shape[-1]).double()
                    second = second + x.T @ x
                    count += x.shape[0]
                    if aim:
                        x_original = wanted[i][part[0]].reshape(-1, x.shape[-1]).double()
                        cross = cross + x.T @ x_original
                        if self.anchor:
                            original = original + x_original.T @ x_original
                if aim:
                    # ‖X̃Ŵ − XW‖² + anchor·‖X(Ŵ − W)‖² is ‖X̃'(Ŵ − W*)‖² + const for X̃'ᵀX̃' = C̃ + anchor·C
                    # and X̃'ᵀX' = M + anchor·C: the same aim and fit on the mixed moments.
                    second, cross = second + self.anchor * original, cross + self.anchor * original
                    for name in part:
                        weight = dense_weight(block.get_submodule(name))[0]
                        weight.copy_(aimed_weight(weight, second, cross, self.damping).to(weight.dtype))
                    self.dense_aimed += sum(name in dense for name in part)
            held_stats.update({name: InputStats(second.cpu(), count) for name in holds})
            if not names:
                self.dense_seconds += time.perf_counter() - started
                continue
            if count == 0:  # an expert no token reached: its weight's own error, as a data-free fit measures
                width = dense_weight(block.get_submodule(part[0]))[0].shape[0]
                second, count = torch.eye(width, dtype=torch.float64), 1
                self.unreached_experts += 1
            stats = CalibrationStats(
                {name: names[0] for name in names},
                inputs={names[0]: InputStats(second.cpu(), count)},
                digests={name: weight_digest(model.get_submodule(name)) for name in names},
                model_type=getattr(getattr(model, "config", None), "model_type", None),
                seconds=time.perf_counter() - started,
            )
            check_finite(stats)
            yield names, stats
        for container in containers:
            children = [name for name in held if name.startswith(f"{container}.")]
            stats = CalibrationStats(
                {prefix + name: name for name in children},
                inputs={name: held_stats[name] for name in children},
                digests={prefix + name: weight_digest(block.get_submodule(name)) for name in children},
                model_type=getattr(getattr(model, "config", None), "model_type", None),
            )
            check_finite(stats)
            yield [prefix + container], stats
        if self.reconstruction is not None and self.compressed_parts > 0:
            started = time.perf_counter()
            parameters = [p for p in block.parameters() if p.is_floating_point()]
            self.reconstructions.append(
                self.reconstruction(
                    parameters, lambda i: _hidden_of(block(*self.batches[i][0], **self.batches[i][1])), outputs
                )
            )
            self.reconstruction_seconds += time.perf_counter() - started
        self._move_on(block, outputs)

    @torch.no_grad()
    def _original_pass(
        self, block: nn.Module, names: list[str]
    ) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
        """Per batch of the original stream: the input ``block`` gives each of ``names``, and its output."""
        inputs, outputs = [], []
        for i, (args, kwargs) in enumerate(self.batches):
            was = _with_hidden(args, kwargs, self.originals[i])
            seen, output = _module_inputs(block, names, partial(block, *was[0], **was[1]))
            missing = [name for name in names if name not in seen]
            if missing:
                raise RuntimeError(f"{self.name}.{self.position}: batch {i} never reached {missing[:3]}")
            inputs.append(seen)
            outputs.append(_hidden_of(output))
        return inputs, outputs

    @torch.no_grad()
    def _move_on(self, block: nn.Module, originals: list[torch.Tensor] | None = None) -> None:
        """Replace the compressed stream by what ``block`` gives for it, and the original stream by
        ``originals`` (the original block's outputs) or, without them, by what ``block`` gives for it;
        then hand both to the next block with its own other arguments."""
        following = self.position + 1
        for i, (args, kwargs) in enumerate(self.batches):
            output = _hidden_of(block(*args, **kwargs))
            if originals is not None:
                self.originals[i] = originals[i]
            elif self.originals[i] is _split_hidden(args, kwargs)[0]:  # nothing compressed yet: one stream
                self.originals[i] = output
            else:
                was = _with_hidden(args, kwargs, self.originals[i])
                self.originals[i] = _hidden_of(block(*was[0], **was[1]))
            if following < len(self.calls[i]):
                args, kwargs = self.calls[i][following]
            self.batches[i] = _with_hidden(args, kwargs, output)
        self.position = following


def _shared_input_parts(block: nn.Module, names: list[str], batch: tuple[tuple, dict]) -> list[list[str]]:
    """Those of ``names`` (submodules of ``block``) that it calls, grouped by the input tensor they share,
    in call order."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        block.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: calls.append((name, args[0])))
        for name in names
    ]
    try:
        with torch.no_grad():
            block(*batch[0], **batch[1])
    finally:
        for handle in handles:
            handle.remove()
    parts: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in calls:
        part = next((members for tensor, members in parts if tensor is x), None)
        if part is None:
            parts.append((x, [name]))
        elif name not in part:
            part.append(name)
    return [members for _, members in parts]


def _flat(values) -> list:
    return [v for value in values for v in (_flat(value) if isinstance(value, tuple | list) else (value,))]


@torch.no_grad()
def _stack_inputs(
    model: nn.Module, name: str, blocks: torch.Tensor, batch_size: int
) -> list[list[tuple[tuple, dict]]] | None:
    """Per batch, the (args, kwargs) of every block of the stack in one whole-model pass, or ``None``
    unless every block takes the previous block's output as its hidden state and nothing else that an
    earlier block computed (as T5 hands on the position bias of its first block), and none carries
    state between calls (a KV cache). The other arguments (masks, rotary tables) come from before the
    stack, so a replay may take them as they are."""
    from transformers.cache_utils import Cache

    stack = model.get_submodule(name)
    calls: list[list[tuple[tuple, dict]]] = []
    state = {"chained": True, "expected": 0, "output": None, "made": set()}

    def before(index: int):
        def hook(module, args, kwargs):
            hidden, others = _split_hidden(args, kwargs)
            flat = _flat([*others[0], *others[1].values()])
            if index == 0:
                calls.append([])
                state["made"] = set()
            elif index != state["expected"] or hidden is not state["output"]:
                state["chained"] = False
            if hidden is None or any(isinstance(v, Cache) or id(v) in state["made"] for v in flat):
                state["chained"] = False
            # Only the first block's hidden state is kept: the others' are what a replay recomputes.
            calls[-1].append((args, kwargs) if index == 0 else _with_hidden(args, kwargs, None))
            state["expected"] = index + 1

        return hook

    def after(module, args, kwargs, output):
        state["output"] = _hidden_of(output)
        given = {id(v) for v in _flat([*args, *kwargs.values()])}  # handed back, not made (a mask, say)
        made = _flat(output if isinstance(output, tuple | list) else (output,))
        state["made"] |= {id(v) for v in made if isinstance(v, torch.Tensor) and id(v) not in given}

    handles = []
    for index, block in enumerate(stack):
        handles.append(block.register_forward_pre_hook(before(index), with_kwargs=True))
        handles.append(block.register_forward_hook(after, with_kwargs=True))
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config  # multimodal: its own
    use_cache = {"use_cache": False} if hasattr(text_config, "use_cache") else {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in blocks.split(batch_size):
            state["expected"] = 0
            model(batch.to(device), **use_cache)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not state["chained"] or len(calls) != len(blocks.split(batch_size)):
        return None
    if any(len(per_block) != len(stack) for per_block in calls):
        return None
    return calls
