"""Diagnostic: within-block rank reallocation during block reconstruction (SmolLM2 at 70%, best fit on 32k
drawn tokens, seed 0). Per block: (a) greedy ranks reconstructed as the library does; (b) the block's low-rank
layers' ranks soft (sigmoid gates on their whitened components, fitted at extended rank), moved on the block's
own reconstruction loss with the block's parameter total fixed, then rounded and finished. The greedy state is
kept, so each block's comparison is on the same inputs. With ``--perturb F`` both (b) and (c), the perturbed
ranks reconstructed as (a) is, start from ranks scaled by 1 + F and 1 - F alternately, shifted back to the total.
An experiment (results: benchmarks/results/block_ranks.md), not part of the library.

    python benchmarks/block_ranks.py [--blocks 8] [--perturb 0.3] [--out block_ranks.json]
"""

import argparse
import json
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import contextlib
import copy

import torch
from allocation import calibrate, with_fisher
from common import load_smollm2

import tqcompressor as tq
import tqcompressor.sequential as seq
from tqcompressor.allocation import allocation_plan
from tqcompressor.methods.lowrank.modules import LowRankLinear
from tqcompressor.plan import CompressionPlan, Rule
from tqcompressor.reconstruction import reconstruct as library_reconstruct

p = argparse.ArgumentParser()
p.add_argument("--blocks", type=int, default=6)
p.add_argument("--tokens", type=int, default=32768)
p.add_argument("--tau", type=float, default=1.0)
p.add_argument("--eta", type=float, default=0.3)
p.add_argument("--finish", type=int, default=2)
p.add_argument("--perturb", type=float, default=0.0)
p.add_argument("--out", default="block_ranks.json")
args = p.parse_args()

cache = Path(f"/tmp/block_ranks_state_{args.tokens}.pt")  # statistics and plan, reused by a second run
model, tokenizer = load_smollm2()
model.eval()
if cache.exists():
    state = torch.load(cache, weights_only=False)
else:
    sizes = argparse.Namespace(calibration_tokens=args.tokens, count_tokens=4194304, sensitivity_tokens=1024)
    stats, _, blocks, probe, counts = calibrate(model, tokenizer, sizes, seed=0, spread=True)
    fisher, _ = with_fisher(model, stats, blocks)
    target = round(0.7 * tq.count_parameters(model))
    allocation = allocation_plan(model, fisher, target, probe, methods=["lowrank"])
    state = dict(plan=allocation.plan.to_dict(), blocks=blocks, counts=counts, outputs=fisher.outputs)
    torch.save(state, cache)
    print("statistics and plan cached", flush=True)

plan = CompressionPlan.from_dict(state["plan"])
ranks = {}
rules = []
for rule in plan.rules:
    name = rule.pattern.replace("\\", "")
    parts = name.split(".")
    if "layers" in parts and int(parts[parts.index("layers") + 1]) >= args.blocks:
        continue
    cfg = rule.config
    if cfg.method == "lowrank" and "layers" in parts:
        module = model.get_submodule(name)
        full = min(module.in_features, module.out_features)
        r = cfg.rank_for(module.in_features, module.out_features)
        ranks[name] = r
        extended = min(full, r + max(8, r // 2))
        cfg = type(cfg)(rank=extended, whitening=cfg.whitening)
    rules.append(Rule(rule.pattern, cfg))
extended_plan = CompressionPlan(rules, name=plan.name, tie_head=plan.tie_head)
print(f"{len(ranks)} low-rank layers in blocks < {args.blocks}", flush=True)

compressed = copy.deepcopy(model)
results = []


class Stop(Exception):
    pass


def gated(module, mask_fn):
    def forward(self, x):
        y = ((x @ self.u.to(x.dtype)) * mask_fn().to(x.dtype)) @ self.v.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    module.forward = types.MethodType(forward, module)


def hard(rank, width):
    m = torch.zeros(width)
    m[:rank] = 1
    return m


def project(k, cost, lo, hi, budget):
    """Equal shift of every k so that sum(cost * clamp(k + s)) = budget (bisection)."""
    a, b = -1e4, 1e4
    for _ in range(100):
        s = (a + b) / 2
        if float((cost * (k + s).clamp(lo, hi)).sum()) > budget:
            b = s
        else:
            a = s
    return (k + a).clamp(lo, hi)


def round_to_budget(k, cost, hi, budget):
    r = k.floor().clamp(min=1)
    frac = k - r
    spent = float((cost * r).sum())
    for i in torch.argsort(frac, descending=True).tolist():
        if r[i] < hi[i] and spent + cost[i] <= budget:
            r[i] += 1
            spent += float(cost[i])
    return r.long(), spent


def patched(parameters, output, targets, epochs, lr, seed=0):
    parameters = list(parameters)
    ids = {id(p) for p in parameters}
    layers = [
        (n, m) for n, m in compressed.named_modules() if isinstance(m, LowRankLinear) and id(m.u) in ids and n in ranks
    ]
    if not layers:
        return library_reconstruct(parameters, output, targets, epochs=epochs, lr=lr, seed=seed)
    block = layers[0][0].split(".")[2]
    start = [q.detach().clone() for q in parameters]
    r0 = torch.tensor([ranks[n] for n, _ in layers], dtype=torch.float64)
    width = torch.tensor([m.u.shape[1] for _, m in layers], dtype=torch.float64)
    cost = torch.tensor([m.in_features + m.out_features for _, m in layers], dtype=torch.float64)
    budget = float((r0 * cost).sum())
    # (a) greedy ranks: components past r masked (zero gradients, Adam leaves them)
    for (_n, m), r in zip(layers, r0.long().tolist(), strict=False):
        mask = hard(r, m.u.shape[1])
        gated(m, lambda mask=mask: mask)
    t = time.perf_counter()
    a = library_reconstruct(parameters, output, targets, epochs=epochs, lr=lr, seed=seed)
    a_seconds = time.perf_counter() - t
    greedy_state = [q.detach().clone() for q in parameters]
    # (b) soft ranks
    with torch.no_grad():
        for q, v in zip(parameters, start, strict=False):
            q.copy_(v)
    lo = torch.ones_like(r0)
    k = r0.clone()
    perturbed = None
    if args.perturb:
        signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(len(layers))], dtype=torch.float64)
        k = project(r0 * (1 + args.perturb * signs), cost, lo, width, budget)
        perturbed, perturbed_spent = round_to_budget(k.clone(), cost, width, budget)
        for (_n, m), r in zip(layers, perturbed.tolist(), strict=False):
            mask = hard(r, m.u.shape[1])
            gated(m, lambda mask=mask: mask)
        c = library_reconstruct(parameters, output, targets, epochs=epochs, lr=lr, seed=seed)
        with torch.no_grad():
            for q, v in zip(parameters, start, strict=False):
                q.copy_(v)
    positions = [torch.arange(int(w), dtype=torch.float64) for w in width]
    k_param = torch.zeros(len(layers), dtype=torch.float64, requires_grad=True)

    def gate(i):
        return torch.sigmoid((k[i] + k_param[i] - positions[i] - 0.5) / args.tau).float()

    for i, (_n, m) in enumerate(layers):
        gated(m, lambda i=i: gate(i))
    held_out = len(targets) - 1

    def error(i):
        target = targets[i]
        per_token = (output(i) - target).square().sum(-1) / target.square().sum(-1).clamp_min(1e-30)
        return per_token.mean()

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    wanted = [q.requires_grad for q in parameters]
    momentum = torch.zeros_like(k)
    t = time.perf_counter()
    with torch.no_grad():
        soft_before = float(error(held_out))
    for q in parameters:
        q.requires_grad_(True)
    soft_epochs = epochs - args.finish
    for _epoch in range(soft_epochs):
        for i in torch.randperm(held_out, generator=generator).tolist():
            optimizer.zero_grad(set_to_none=True)
            k_param.grad = None
            with torch.enable_grad():
                error(i).backward()
            optimizer.step()
            g = k_param.grad / cost
            g = g / (g.abs().mean() + 1e-30)
            momentum = 0.8 * momentum + g
            k = project(k - args.eta * momentum, cost, lo, width, budget)
    with torch.no_grad():
        soft_after = float(error(held_out))
    for q, flag in zip(parameters, wanted, strict=False):
        q.requires_grad_(flag)
        q.grad = None
    # harden: rounded ranks, gates folded into u
    chosen, spent = round_to_budget(k, cost, width, budget)
    with torch.no_grad():
        for i, (_n, m) in enumerate(layers):
            m.u.mul_(gate(i)[None, :])
            mask = hard(int(chosen[i]), m.u.shape[1])
            gated(m, lambda mask=mask: mask)
        hardened = float(error(held_out))
    b = library_reconstruct(parameters, output, targets, epochs=args.finish, lr=lr, seed=seed + 1)
    b_seconds = time.perf_counter() - t
    row = dict(
        block=int(block),
        before=a.before,
        greedy_after=a.after,
        greedy_epoch=a.epoch,
        soft_before=soft_before,
        soft_after_soft=soft_after,
        hardened=hardened,
        soft_after=b.after,
        params_greedy=budget,
        params_soft=spent,
        greedy_seconds=a_seconds,
        soft_seconds=b_seconds,
        **(
            {}
            if perturbed is None
            else dict(
                perturbed_after=c.after,
                perturbed_params=perturbed_spent,
                perturbed_ranks=dict(zip([n.split(".", 3)[3] for n, _ in layers], perturbed.tolist(), strict=False)),
            )
        ),
        ranks={
            n.split(".", 3)[3]: [int(r), int(c)]
            for (n, _), r, c in zip(layers, r0.long().tolist(), chosen, strict=False)
        },
    )
    results.append(row)
    print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(dict(args=vars(args), rows=results), indent=1))
    # keep the greedy state for the stream
    with torch.no_grad():
        for q, v in zip(parameters, greedy_state, strict=False):
            q.copy_(v)
    for (_n, m), r in zip(layers, r0.long().tolist(), strict=False):
        mask = hard(r, m.u.shape[1])
        gated(m, lambda mask=mask: mask)
    if len(results) >= args.blocks:
        raise Stop
    return a


seq.reconstruct = patched
with contextlib.suppress(Stop):
    seq.compress_sequentially(
        compressed,
        extended_plan,
        state["blocks"],
        progress=False,
        token_counts=state["counts"],
        output_moments=state["outputs"],
        anchor=1.0,
        reconstruction_epochs=10,
    )
print("done", flush=True)
