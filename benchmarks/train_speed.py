"""Training speed: kdlab's step against the pure-compute floor and a conventional KD loop.

    python benchmarks/train_speed.py [--quick] [--precision bf16|fp32] [--images N]

One process, one model pair (WRN-16-2 student, WRN-28-4 teacher), one batch size, on
random 32×32×3 uint8 images written as CIFAR-100 python pickles and read back by kdlab's
loader. Each kdlab number is the *second* epoch of a real `kdlab.train` run (the first
warms up allocators); each loop is timed on the training step only (no evaluation).

1. compute: forward + backward + SGD step on pre-made normalised batches — the floor;
2. a kdlab CE epoch (batched pad-4 crop + flip with view ids, normalisation, step);
3. a kdlab KD epoch with the teacher run online, and with the exact teacher-logit cache
   (a second run with the same seed meets exactly the views the first one stored);
4. a conventional loop as the papers' public code: torch DataLoader, per-image PIL pad /
   crop / flip / to-tensor / normalise, teacher forward every step, fp32 NCHW;
   kdlab runs fp32 with channels_last by default (--precision bf16, --nchw to change);
5. teacher forward passes for Kim Fig. 3's grid (7 τ × 6 α × 5 seeds, 200 epochs,
   50k CIFAR-100 training images) with and without the cache.

Prints a table and writes benchmarks/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdlab.config import build_config  # noqa: E402
from kdlab.data import load_dataset  # noqa: E402
from kdlab.losses import kl_loss  # noqa: E402
from kdlab.models import build_model  # noqa: E402
from kdlab.runs import read_metrics  # noqa: E402
from kdlab.train import train  # noqa: E402

GRID_RUNS, GRID_EPOCHS, CIFAR_TRAIN, CROP_FLIP_VIEWS = 7 * 6 * 5, 200, 50_000, 162


def write_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"fine_labels": rng.integers(0, 100, n).tolist()}
        with open(root / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=4)


def second_epoch_rate(run_dir: str) -> float:
    metrics = read_metrics(run_dir)
    return metrics[-1]["images_per_s"]


def pure_compute(model_name, data, batch_size, steps, bf16, channels_last) -> float:
    torch.manual_seed(0)
    model = build_model(model_name, 100)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = data.prepare(data.train_x[:batch_size])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = data.train_y[:batch_size]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def step():
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


class _PilCifar(torch.utils.data.Dataset):
    """Per-image transforms as torchvision's RandomCrop(32, padding=4), RandomHorizontalFlip,
    ToTensor, Normalize would do them, written with PIL directly (torchvision does not
    install beside this machine's torch build)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std):
        self.images, self.labels = images, labels
        self.mean, self.std = np.asarray(mean, np.float32)[:, None, None], np.asarray(std, np.float32)[:, None, None]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image, ImageOps

        img = Image.fromarray(self.images[i].transpose(1, 2, 0))
        img = ImageOps.expand(img, border=4, fill=0)
        left, top = np.random.randint(0, 9, size=2)
        img = img.crop((left, top, left + 32, top + 32))
        if np.random.rand() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((x - self.mean) / self.std), int(self.labels[i])


def conventional_kd(data, teacher_run, student_name, batch_size, epochs, workers) -> float:
    """The papers' loop: DataLoader + PIL per image + teacher forward every step. Returns
    images/s of the last epoch."""
    from kdlab.runs import load_finished_model

    teacher = load_finished_model(teacher_run)
    torch.manual_seed(0)
    student = build_model(student_name, 100)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    dataset = _PilCifar(data.train_x.numpy(), data.train_y.numpy(), data.mean.numpy(), data.std.numpy())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=False, persistent_workers=workers > 0)
    rate = 0.0
    for _ in range(epochs):
        student.train()
        start, seen = time.perf_counter(), 0
        for x, y in loader:
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = kl_loss(student(x), teacher_logits, 4.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
        rate = seen / (time.perf_counter() - start)
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,536 images per epoch (about 5 minutes on 2 cores)")
    parser.add_argument("--images", type=int, help="training images per epoch (default 1,536 quick, 10,000 full)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="kdlab runs and the floor: fp32, or bf16 autocast (fast only on CPUs with "
                             "avx512_bf16/AMX or on GPUs; emulated and ~2x slower on others)")
    parser.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last for kdlab and the floor")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the conventional loop")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_speed.json"))
    args = parser.parse_args()
    n_train = args.images or (1536 if args.quick else 10_000)
    bf16 = args.precision == "bf16"
    channels_last = not args.nchw
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_cifar100(tmp / "cifar-100-python", n_train + 128, 128)
        base = {"out_dir": str(tmp / "runs"), "eval_every": 2, "eval_batch_size": 256,
                "data": {"name": "cifar100", "root": str(tmp / "cifar-100-python"), "val_size": 128},
                "optim": {"epochs": 2, "batch_size": args.batch_size, "lr": 0.1, "milestones": [100]},
                "bf16": bf16, "channels_last": channels_last}
        data = load_dataset(build_config(base).data)
        rows = {}
        log = lambda *a: None  # noqa: E731

        print(f"{n_train:,} images per epoch, batch {args.batch_size}, {args.precision}, "
              f"{'channels_last' if channels_last else 'NCHW'}, "
              f"{torch.get_num_threads()} threads", flush=True)
        steps = max(4, n_train // args.batch_size)
        rows["compute"] = pure_compute("wrn-16-2", data, args.batch_size, steps, bf16, channels_last)
        print(f"  compute floor      {rows['compute']:8.1f} img/s", flush=True)
        ce = train(build_config({**base, "name": "ce", "model": {"name": "wrn-16-2"}}), progress=False, log=log)
        rows["ce"] = second_epoch_rate(ce["run_dir"])
        print(f"  kdlab CE epoch     {rows['ce']:8.1f} img/s", flush=True)
        teacher = train(build_config({**base, "name": "teacher", "model": {"name": "wrn-28-4"},
                                      "optim": {**base["optim"], "epochs": 1}}), progress=False, log=log)
        student = {**base, "model": {"name": "wrn-16-2"}, "loss": {"alpha": 1.0, "tau": 4.0}}
        online = train(build_config({**student, "name": "kd-online", "teacher": {"runs": [teacher["run_dir"]]}}),
                       progress=False, log=log)
        rows["kd_online"] = second_epoch_rate(online["run_dir"])
        print(f"  kdlab KD online    {rows['kd_online']:8.1f} img/s", flush=True)
        cache = {"runs": [teacher["run_dir"]], "cache": {"mode": "lazy"}}
        train(build_config({**student, "name": "kd-fill", "teacher": cache}), progress=False, log=log)
        cached = train(build_config({**student, "name": "kd-cached", "teacher": cache}), progress=False, log=log)
        rows["kd_cached"] = second_epoch_rate(cached["run_dir"])
        print(f"  kdlab KD cached    {rows['kd_cached']:8.1f} img/s", flush=True)
        rows["conventional"] = conventional_kd(data, teacher["run_dir"], "wrn-16-2", args.batch_size, 2, args.workers)
        print(f"  conventional KD    {rows['conventional']:8.1f} img/s", flush=True)

    online_forwards = GRID_RUNS * GRID_EPOCHS * CIFAR_TRAIN
    cached_forwards = CIFAR_TRAIN * CROP_FLIP_VIEWS
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpu": _cpu(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "quick": args.quick, "images_per_epoch": n_train, "batch_size": args.batch_size, "precision": args.precision,
        "channels_last": channels_last,
        "student": "wrn-16-2", "teacher": "wrn-28-4", "conventional_loader_workers": args.workers,
        "images_per_s": rows,
        "ce_over_compute": rows["compute"] / rows["ce"],
        "kd_cached_over_ce": rows["ce"] / rows["kd_cached"],
        "kd_online_over_ce": rows["ce"] / rows["kd_online"],
        "speedup_over_conventional": rows["kd_cached"] / rows["conventional"],
        "speedup_online_over_conventional": rows["kd_online"] / rows["conventional"],
        "grid_teacher_forwards_online": online_forwards,
        "grid_teacher_forwards_cached": cached_forwards,
        "grid_teacher_forward_ratio": online_forwards / cached_forwards,
        "wall_time_s": time.perf_counter() - started,
    }
    print()
    print("| measurement | images/s | ratio | goal |")
    print("|---|---:|---:|---|")
    print(f"| 1. compute floor (fwd + bwd + step) | {rows['compute']:.1f} | 1.00 | |")
    print(f"| 2. kdlab CE epoch | {rows['ce']:.1f} | {result['ce_over_compute']:.2f} × floor time | ≤ 1.10 |")
    print(f"| 3a. kdlab KD epoch, online teacher | {rows['kd_online']:.1f} | {result['kd_online_over_ce']:.2f} × CE time | |")
    print(f"| 3b. kdlab KD epoch, cached teacher | {rows['kd_cached']:.1f} | {result['kd_cached_over_ce']:.2f} × CE time | ≤ 1.10 |")
    print(f"| 4. conventional KD loop | {rows['conventional']:.1f} | kdlab cached is {result['speedup_over_conventional']:.1f}× faster | ≥ 3× |")
    print(f"| 5. Kim Fig. 3 grid teacher forwards | online {online_forwards:.3g} | cached {cached_forwards:.3g} "
          f"({result['grid_teacher_forward_ratio']:.0f}× fewer) | |")
    print(f"\nwall time {result['wall_time_s']:.0f} s; wrote {args.out}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
