"""Distillation methods' training speed: images/s of a training step of every method
against plain online logit KD, and the parameters each adds beside the student.

    python benchmarks/method_speed.py [--device cuda] [--batch-size 128] [--steps 6] [--rounds 3]
                                      [--student wrn-16-2] [--teacher wrn-40-2] [--bf16]

A step is what kdlab's loop does for one batch: the distiller's forward (student with its
taps and adapters, the teacher online with its taps, under ``torch.no_grad``; Jacobian
matching: both networks' input gradients, the student's with a graph for double backprop;
CRD: the memory banks of a 50,000-example training set), the loss and its parts, backward,
and an SGD step over the student and the adapters — on random
CIFAR-shaped tensors (3×32×32, 100 classes), the WRN-40-2 → WRN-16-2 pair by default,
with the teacher's and student's random weights (speed does not depend on training).
Methods run round-robin (``--rounds``, each ``--steps`` timed steps after 2 warm-up steps),
so a machine's drift hits all alike; each method's time is the median of its rounds' mean
step times, and its ratio is to logit KD's.

Prints a table and writes benchmarks/results/method_speed[-DEVICE].json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdlab.config import build_config  # noqa: E402
from kdlab.device import autocast, describe_device, resolve_device  # noqa: E402
from kdlab.models import build_model, count_parameters  # noqa: E402
from kdlab.training.distill import NoTeacher, OnlineTeacher  # noqa: E402
from kdlab.training.methods import build_distiller  # noqa: E402

METHODS = [  # (row, distill section, loss section)
    ("CE only (no teacher)", {"method": "logit"}, {"alpha": 0.0}),
    ("logit KD (KL, τ = 4), teacher online", {"method": "logit"}, {"alpha": 0.9, "tau": 4.0}),
    ("FitNets (one stage)", {"method": "fitnets"}, {"alpha": 0.0}),
    ("AT", {"method": "at"}, {"alpha": 0.0}),
    ("OFD", {"method": "ofd"}, {"alpha": 0.0}),
    ("AB (initialisation stage)", {"method": "ab"}, {"alpha": 0.0}),
    ("FT paraphraser stage", {"method": "ft", "options": {"stage": "paraphraser"}}, {"alpha": 0.0}),
    ("FT translator stage", {"method": "ft"}, {"alpha": 0.0}),
    ("Jacobian matching", {"method": "jacobian"}, {"alpha": 0.0}),
    ("CRD (K = 16384, 50k bank)", {"method": "crd"}, {"alpha": 0.0}),
    ("DKD", {"method": "dkd"}, {"alpha": 0.0, "tau": 4.0}),
    ("logit standardisation (KL)", {"method": "lskd"}, {"alpha": 0.9, "tau": 2.0}),
]
TRAIN_SIZE = 50_000  # CIFAR's training set: CRD's memory banks have a row per example
BASELINE = 1


class _Teachers:
    """The one frozen teacher, as kdlab's Teachers presents it to a distiller."""

    def __init__(self, model, name, channels_last):
        self.models, self.names, self.weight_files = [model], [name], []
        self.channels_last = channels_last

    @torch.no_grad()
    def __call__(self, x, bf16):
        with autocast(bf16, x.device.type):
            return self.models[0](x).float()


def _setup(row, args, device, data, teacher):
    _, distill, loss = row
    start = {"init_run": "benchmark-paraphraser"} if distill["method"] == "ft" else {}  # (weights do not matter)
    cfg = build_config({"model": {"name": args.student, **start}, "loss": loss, "distill": distill,
                        "teacher": {"runs": ["benchmark-teacher"]}, "channels_last": args.channels_last,
                        "data": {"name": "cifar100"}})
    torch.manual_seed(0)
    student = build_model(args.student, 100, input_shape=(3, 32, 32)).to(device)
    if args.channels_last:
        student = student.to(memory_format=torch.channels_last)
    teachers = _Teachers(teacher, args.teacher, args.channels_last)
    distiller = build_distiller(cfg, data, student, teachers, device, args.bf16)
    distiller.source = OnlineTeacher(teachers, args.bf16) if cfg.teacher_in_step else NoTeacher()
    params = list(distiller.module.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    extra = count_parameters(distiller.adapters) if distiller.adapters is not None else 0
    return distiller, optimizer, extra


def _steps(distiller, optimizer, batches, data, device) -> float:
    """Mean seconds per step over ``batches``."""
    module = distiller.module
    module.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for x, y, index in batches:
        loss, _, _ = distiller(data, module, x, y, index, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / len(batches)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--student", default="wrn-16-2")
    parser.add_argument("--teacher", default="wrn-40-2")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/method_speed[-DEVICE].json)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    labels = torch.arange(TRAIN_SIZE) % 100
    data = SimpleNamespace(input_shape=(3, 32, 32), forward=lambda model, x: model(x),
                           split_labels=lambda split: labels)
    teacher = build_model(args.teacher, 100, input_shape=(3, 32, 32)).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if args.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)

    def batch():
        x = torch.randn(args.batch_size, 3, 32, 32, generator=generator).to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        index = torch.randint(0, TRAIN_SIZE, (args.batch_size,), generator=generator)
        return x, labels[index].to(device), index.to(device)

    runs = [(row, *_setup(row, args, device, data, teacher)) for row in METHODS]
    times = {row[0]: [] for row in METHODS}
    print(f"{args.student} ← {args.teacher}, batch {args.batch_size}, {'bf16' if args.bf16 else 'fp32'}, "
          f"{describe_device(device)}", flush=True)
    started = time.perf_counter()
    for round_ in range(args.rounds):
        for row, distiller, optimizer, _ in runs:
            if round_ == 0:
                _steps(distiller, optimizer, [batch() for _ in range(2)], data, device)  # warm-up
            times[row[0]].append(_steps(distiller, optimizer, [batch() for _ in range(args.steps)], data, device))
        print(f"  round {round_ + 1}: " + ", ".join(f"{k.split(' (')[0]} {1 / v[-1] * args.batch_size:.0f}"
                                                    for k, v in times.items()) + " img/s", flush=True)
    step = {name: statistics.median(v) for name, v in times.items()}
    base = step[METHODS[BASELINE][0]]
    rows = [{"method": row[0], "distill": row[1], "loss": row[2], "images_per_s": args.batch_size / step[row[0]],
             "step_ms": 1000 * step[row[0]], "over_logit_kd": step[row[0]] / base, "extra_parameters": extra,
             "rounds_step_ms": [1000 * t for t in times[row[0]]]} for row, _, _, extra in runs]
    print("\n| method | images/s | step time vs logit KD | extra parameters |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['images_per_s']:.0f} | {r['over_logit_kd']:.2f} | {r['extra_parameters']:,} |")
    result = {"date": time.strftime("%Y-%m-%d"), "device": describe_device(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(), "student": args.student,
              "teacher": args.teacher, "batch_size": args.batch_size, "bf16": args.bf16,
              "channels_last": args.channels_last, "steps": args.steps, "rounds": args.rounds, "rows": rows,
              "wall_time_s": time.perf_counter() - started}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        "method_speed.json" if device.type == "cpu" else f"method_speed-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wall time {result['wall_time_s']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
