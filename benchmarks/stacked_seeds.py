"""Would training several seeds' small students in one process be cheaper, and exact enough?

    python benchmarks/stacked_seeds.py [--models 1,5,10,20] [--steps 200] [--threads 1]

Issue 25 weighs this for the quick-scale recipes that need 27-41 seeds. The quick scale's
student is mlp-64-64-bn on MNIST-1D (40 inputs, 10 classes, batch 128), distilled with KL at
τ = 4 from fixed teacher logits. This measures one SGD step (Nesterov 0.9, lr 0.1, weight
decay 5e-4 on the weights) of that student:

- **sequential**: K separate ``nn.Module`` copies (kdlab's model: Linear → BatchNorm1d → ReLU,
  twice, then Linear), each its own forward, backward and ``torch.optim.SGD`` step — what K
  runs do, without process start-up and data loading;
- **stacked**: the same K models as one set of stacked parameters (K, in, out), each layer a
  batched matmul (``torch.bmm``) with batch norm per model (statistics over each model's
  own batch), one loss summed over models (so each model's gradient is its own), one SGD step
  over the stacked tensors (``foreach``).

Each model has its own initialisation and its own batches (different seeds: different data
orders), as K runs would. Exactness: the same K initialisations and batches go through both,
and after ``--steps`` steps the largest weight difference between a stacked model and its
sequential twin is reported (float32 and float64): batched and unbatched matmuls round
differently, so bitwise equality is not expected; the question is whether the difference
stays at rounding level or grows. Writes benchmarks/results/stacked_seeds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdlab.device import cpu_name  # noqa: E402

IN, HIDDEN, CLASSES, BATCH, TAU = 40, 64, 10, 128, 4.0
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


def make_models(k: int, dtype) -> list[torch.nn.Module]:
    from kdlab.models import build_model

    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(build_model("mlp-64-64-bn", CLASSES, input_shape=(1, IN)).to(dtype))
    return models


def linear_and_bn(model: torch.nn.Module):
    """The student's Linear and BatchNorm1d layers in order (kdlab's mlp-…-bn)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(linears) == 3 and len(norms) == 2, (linears, norms)
    return linears, norms


def kd_loss(logits, teacher):
    return F.kl_div(F.log_softmax(logits / TAU, -1), F.log_softmax(teacher / TAU, -1), reduction="batchmean",
                    log_target=True) * TAU * TAU


def sgd(params, decay):
    groups = [{"params": [p for p, d in zip(params, decay) if d], "weight_decay": WD},
              {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, nesterov=True)


class Sequential:
    def __init__(self, models):
        self.models = models
        self.opts = []
        for m in models:
            linears, norms = linear_and_bn(m)
            params = [l.weight for l in linears] + [linears[2].bias] + \
                     [n.weight for n in norms] + [n.bias for n in norms]
            self.opts.append(sgd(params, [True] * 3 + [False] * 5))
            m.train()

    def step(self, xs, ts):
        for m, opt, x, t in zip(self.models, self.opts, xs, ts):
            loss = kd_loss(m(x), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()



class Stacked:
    def __init__(self, models):
        linears, _ = zip(*[linear_and_bn(m) for m in models])
        norms = [linear_and_bn(m)[1] for m in models]
        self.w = [torch.stack([ls[j].weight.detach().t() for ls in linears]).clone().requires_grad_() for j in range(3)]
        self.b = torch.stack([ls[2].bias.detach() for ls in linears]).unsqueeze(1).clone().requires_grad_()
        self.g = [torch.stack([ns[j].weight.detach() for ns in norms]).unsqueeze(1).clone().requires_grad_()
                  for j in range(2)]
        self.beta = [torch.stack([ns[j].bias.detach() for ns in norms]).unsqueeze(1).clone().requires_grad_()
                     for j in range(2)]
        self.eps = norms[0][0].eps
        params = self.w + [self.b] + self.g + self.beta
        self.opt = sgd(params, [True] * 3 + [False] * 5)

    def forward(self, x):  # x: (K, B, IN)
        for j in range(2):
            h = torch.bmm(x, self.w[j])  # no bias: batch norm follows (kdlab's mlp-…-bn)
            mean = h.mean(1, keepdim=True)
            var = h.var(1, unbiased=False, keepdim=True)
            x = torch.relu((h - mean) / torch.sqrt(var + self.eps) * self.g[j] + self.beta[j])
        return torch.baddbmm(self.b, x, self.w[2])

    def step(self, x, t):
        logits = self.forward(x)
        k = x.shape[0]
        loss = kd_loss(logits.reshape(k * BATCH, CLASSES), t.reshape(k * BATCH, CLASSES)) * k  # = Σ_k batchmean_k
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def batches(k: int, steps: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, k, BATCH, IN, generator=g).to(dtype)
    t = (torch.randn(steps, k, BATCH, CLASSES, generator=g) * 3).to(dtype)
    return x, t


def timed(k: int, steps: int) -> tuple[float, float]:
    x, t = batches(k, steps, torch.float32)
    seq, stk = Sequential(make_models(k, torch.float32)), Stacked(make_models(k, torch.float32))
    for i in range(5):  # warm-up
        seq.step(list(x[i]), list(t[i]))
        stk.step(x[i], t[i])
    started = time.perf_counter()
    for i in range(steps):
        seq.step(list(x[i]), list(t[i]))
    sequential = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(steps):
        stk.step(x[i], t[i])
    stacked = time.perf_counter() - started
    return sequential / steps, stacked / steps


def difference(k: int, steps: int, dtype) -> float:
    x, t = batches(k, steps, dtype, seed=1)
    seq, stk = Sequential(make_models(k, dtype)), Stacked(make_models(k, dtype))
    for i in range(steps):
        seq.step(list(x[i]), list(t[i]))
        stk.step(x[i], t[i])
    worst = 0.0
    for m in range(k):
        linears, _ = linear_and_bn(seq.models[m])
        for j in range(3):
            worst = max(worst, float((linears[j].weight.detach().t() - stk.w[j][m].detach()).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1,5,10,20")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for k in [int(v) for v in args.models.split(",")]:
        seq, stk = timed(k, args.steps)
        diff32 = difference(k, args.steps, torch.float32)
        diff64 = difference(k, args.steps, torch.float64)
        rows.append({"models": k, "sequential_ms_per_step": seq * 1e3, "stacked_ms_per_step": stk * 1e3,
                     "speedup": seq / stk, "max_weight_diff_fp32": diff32, "max_weight_diff_fp64": diff64})
        print(f"K={k}: sequential {seq * 1e3:.2f} ms, stacked {stk * 1e3:.2f} ms per step of K models "
              f"({seq / stk:.1f}×); after {args.steps} steps max |Δw| fp32 {diff32:.1e}, fp64 {diff64:.1e}", flush=True)
    print(f"\nmlp-64-64-bn, KL τ={TAU:g}, batch {BATCH}, {args.threads} thread(s), torch {torch.__version__}\n")
    print("| models K | sequential (ms / step of K) | stacked | speed-up | max weight difference after "
          f"{args.steps} steps, fp32 | fp64 |\n|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['models']} | {r['sequential_ms_per_step']:.2f} | {r['stacked_ms_per_step']:.2f} | "
              f"{r['speedup']:.1f}× | {r['max_weight_diff_fp32']:.1e} | {r['max_weight_diff_fp64']:.1e} |")
    out = Path(args.out or Path(__file__).parent / "results" / "stacked_seeds.json")
    out.write_text(json.dumps({"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
                                           "torch": torch.__version__, "python": platform.python_version()},
                               "steps": args.steps, "rows": rows,
                               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
