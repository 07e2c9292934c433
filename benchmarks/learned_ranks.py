"""Experiment: learn per-layer ranks end to end (soft truncation of each layer's Fisher-whitened SVD,
KL to the dense model on the calibration blocks, parameter budget held by projection), against the
greedy Fisher allocation, both fitted at once. Not part of the library: kept in history only.

    python benchmarks/learned_ranks.py 0.7 150 SEED    # writes /tmp/exp/{stats,results,greedy,learned}*
    python benchmarks/learned_ranks_sequential.py greedy
    python benchmarks/learned_ranks_sequential.py learned /tmp/exp/learned_0.7.json  # _0.7_s1.json for seed 1
"""

import copy
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, "/work/main/benchmarks")
from types import SimpleNamespace

import allocation as bench
import torch
import torch.nn.functional as F
from common import load_smollm2
from torch import nn

import tqcompressor as tq
from tqcompressor.allocation import allocation_plan, linear_layers
from tqcompressor.calibration import CalibrationStats
from tqcompressor.linalg import output_factor, whitening_factor
from tqcompressor.methods.lowrank.factors import whitened_singular_vectors

SEED = int(sys.argv[3]) if len(sys.argv) > 3 else 0
OUT = Path("/tmp/exp")
OUT.mkdir(exist_ok=True)
torch.manual_seed(SEED)
RATIO = float(sys.argv[1]) if len(sys.argv) > 1 else 0.7
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 150
TAU = 2.0
model, tok = load_smollm2()
model.eval()
args = SimpleNamespace(calibration_tokens=32768, count_tokens=4194304, sensitivity_tokens=1024)
statsf = OUT / "stats.safetensors"
t0 = time.time()
if statsf.exists():
    fisher = CalibrationStats.load(statsf)
    blocks = torch.load(OUT / "blocks.pt")
else:
    stats, _, blocks, _, counts = bench.calibrate(model, tok, args)
    fisher, _ = bench.with_fisher(model, stats, blocks)
    fisher.save(statsf)
    torch.save(blocks, OUT / "blocks.pt")
print("stats", time.time() - t0, flush=True)
probe = blocks[:2]
total = tq.count_parameters(model)
target = round(RATIO * total)
texts, passages = bench.evaluation_texts(tok, 8000, None)
res_path = OUT / f"results_{RATIO}.json"
results = json.loads(res_path.read_text()) if res_path.exists() else {}


def fit_eval(plan, label):
    m = copy.deepcopy(model)
    t = time.time()
    tq.compress_(m, plan, calibration=fisher, progress=False)
    r = bench.evaluate(m, texts, [], tok)
    r["params"] = tq.count_parameters(m)
    r["fit_s"] = time.time() - t
    results[label] = r
    res_path.write_text(json.dumps(results, indent=1))
    print(label, r, flush=True)


alloc = allocation_plan(model, fisher, target, probe, methods=["lowrank"])
print("greedy search", alloc.seconds, flush=True)
base = {n: c.params for n, c in alloc.chosen.items()}
(OUT / f"greedy_{RATIO}.json").write_text(json.dumps(base))
if "greedy" not in results:
    fit_eval(alloc.plan, "greedy")

linear = [n for n in linear_layers(model) if n in base]
emb = [n for n in base if n not in linear]
print("embedding", emb, [base[n] for n in emb])


class Soft(nn.Module):
    def __init__(self, lin, C, G, params):
        super().__init__()
        W = lin.weight.detach().double().T  # in x out
        S = whitening_factor(C)
        T = output_factor(G)
        u, s, vh = whitened_singular_vectors(W, S, T)
        A = torch.linalg.solve_triangular(S.T, u * s, upper=True)
        B = torch.linalg.solve_triangular(T.T, vh.T, upper=True).T
        scale = (B.norm(dim=1) / A.norm(dim=0)).sqrt()
        A, B = A * scale, B / scale[:, None]
        self.err = float((A @ B - W).norm() / W.norm())
        self.register_buffer("A", A.float())
        self.register_buffer("B", B.float())
        self.bias = lin.bias
        self.i, self.o = W.shape
        self.p = min(self.i, self.o)
        self.c = self.i + self.o
        k0 = params / self.c if params < self.i * self.o else self.p + 3 * TAU
        self.k = nn.Parameter(torch.tensor(float(k0)))
        self.register_buffer("idx", torch.arange(self.p, dtype=torch.float32) + 0.5)

    def forward(self, x):
        m = torch.sigmoid((self.k - self.idx) / TAU)
        y = ((x @ self.A) * m) @ self.B
        return y if self.bias is None else y + self.bias

    def cost(self, k):
        return min(max(k, 0.0) * self.c, self.i * self.o) if k < self.p + 2 * TAU else self.i * self.o


student = copy.deepcopy(model)
emb_plan = tq.CompressionPlan([r for r in alloc.plan.rules if any(re.fullmatch(r.pattern, n) for n in emb)])
if emb_plan.rules:
    tq.compress_(student, emb_plan, calibration=fisher, progress=False)
softs = {}
for n in linear:
    parent, _, child = n.rpartition(".")
    lin = student.get_submodule(n)
    st = fisher.for_module(n)
    s = Soft(lin, st.second_moment, st.output_second_moment, base[n])
    setattr(student.get_submodule(parent), child, s)
    softs[n] = s
print("max split error", max(s.err for s in softs.values()), flush=True)
for p in student.parameters():
    p.requires_grad_(False)
for s in softs.values():
    s.k.requires_grad_(True)
budget = sum(base[n] for n in linear)


def project():
    ks = {n: s.k.item() for n, s in softs.items()}

    def spent(lam):
        return sum(softs[n].cost(min(max(ks[n] - lam, 1.0), softs[n].p + 3 * TAU)) for n in ks)

    lo, hi = -600.0, 600.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if spent(mid) > budget:
            lo = mid
        else:
            hi = mid
    for n, s in softs.items():
        s.k.data.fill_(min(max(ks[n] - hi, 1.0), s.p + 3 * TAU))
    return spent(hi)


print("spent at start", project(), "budget", budget, flush=True)
train = blocks[2:]
mom = {n: 0.0 for n in softs}
eta = None
t1 = time.time()
for step in range(STEPS):
    batch = train[torch.randint(len(train), (2,))]
    with torch.no_grad():
        teacher = F.log_softmax(model(batch).logits.float(), -1)
    logp = F.log_softmax(student(batch).logits.float(), -1)
    kl = (teacher.exp() * (teacher - logp)).sum(-1).mean()
    grads = torch.autograd.grad(kl, [s.k for s in softs.values()])
    g = {n: gr.item() / softs[n].c for n, gr in zip(softs, grads, strict=True)}  # per parameter
    for n in softs:
        mom[n] = 0.8 * mom[n] + g[n]
    if eta is None:
        eta = 1.0 / sorted(abs(v) for v in mom.values())[int(0.9 * len(mom))]  # ~1 rank a step at the 90th pct
    for n, s in softs.items():
        s.k.data -= eta * mom[n]  # in ranks: dP = -eta' g/c -> dk = dP / c ... kept in rank units
    spent = project()
    if step % 10 == 0 or step == STEPS - 1:
        print(f"step {step} kl {kl.item():.4f} spent {spent:.0f} {time.time() - t1:.0f}s", flush=True)
ranks = {n: s.k.item() for n, s in softs.items()}
(OUT / (f"learned_{RATIO}.json" if SEED == 0 else f"learned_{RATIO}_s{SEED}.json")).write_text(json.dumps(ranks))
rules = []
for r in alloc.plan.rules:
    if any(re.fullmatch(r.pattern, n) for n in emb):
        rules.append(r)
used = 0
for n, s in softs.items():
    k = round(ranks[n])
    if k * s.c >= s.i * s.o or k >= s.p:
        used += s.i * s.o
        continue
    used += k * s.c
    rules.append(tq.Rule(re.escape(n), tq.LowRankConfig(rank=max(1, k))))
print("rounded linear params", used, "budget", budget, flush=True)
fit_eval(tq.CompressionPlan(rules, name="learned"), f"learned-{STEPS}-s{SEED}")
