"""Does kdlab's image-folder loader keep an ImageNet model fed? Loader rate against step rate.

    python benchmarks/imagenet_path.py [--device cuda] [--workers 0,2,4,8] [--images 2000]

Two measurements on one machine, put side by side:

1. the loader: whole training epochs of ``ImageFolderData.epoch_batches`` (views drawn
   by the run's generator, RandomResizedCrop 224 + flip decoded by loader worker processes,
   uint8 batches moved to the device, pinned on CUDA) over synthetic 500×375 JPEGs
   (ImageNet's typical size, quality 90, smooth content), for each worker count, with the
   default decoder (TorchCodec) and, at the largest count, Pillow; after a warm-up epoch
   (workers persist across epochs, so their start-up is excluded);
2. the model: ResNet-50's training step (forward + backward + SGD, 1,000 classes, batch
   ``--batch-size``) on a synthetic batch already on the device, fp32 and bf16 autocast,
   channels_last — timm's resnet50 as kdlab builds it (``timm:resnet50``), or
   torchvision's where timm is missing.

From the two it prints how many loader workers the model needs on this machine (the step
rate over the per-worker rate) and writes benchmarks/results/imagenet_path-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdlab.config import DataConfig  # noqa: E402
from kdlab.data.imagefolder import load_imagefolder  # noqa: E402
from kdlab.device import cpu_name  # noqa: E402


def write_jpegs(root: Path, images: int, classes: int = 10, size=(500, 375), seed: int = 0) -> Path:
    """ImageNet's layout of smooth synthetic JPEGs (sums of random low-frequency waves per
    channel, a little noise), written by Pillow or, without it, by TorchCodec's encoder."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    try:
        from PIL import Image

        def save(array, path):
            Image.fromarray(array).save(path, quality=90)
    except ImportError:
        from torchcodec.encoders import encode_image  # noqa: F401  (torchcodec >= 0.16)

        def save(array, path):
            Path(path).write_bytes(bytes(encode_image(torch.from_numpy(array).permute(2, 0, 1), "jpeg", quality=90)))
    for split, count in (("train", images), ("val", classes)):
        for k in range(count):
            folder = root / split / f"class_{k % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            channels = []
            for _ in range(3):
                fx, fy, phase = rng.uniform(2, 12, 2) / size[0], rng.uniform(2, 12), rng.uniform(0, 6.3)
                channels.append(np.sin(xx * fx[0] * 6.3 + phase) * np.cos(yy * fy / size[1] * 6.3) * 90 + 128)
            array = np.stack(channels, -1) + rng.normal(0, 6, (size[1], size[0], 3))
            save(array.clip(0, 255).astype(np.uint8), folder / f"{k:06d}.jpg")
    return root


def loader_rate(root: Path, workers: int, decoder: str, device: torch.device, batch: int, epochs: int) -> float:
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=224, val_size=0, decoder=decoder)
    data = load_imagefolder(cfg, num_workers=workers)
    generator = torch.Generator().manual_seed(0)
    try:
        for x, *_ in data.epoch_batches(generator, batch, device):  # warm-up: workers start, caches fill
            pass
        seen, started = 0, time.perf_counter()
        for _ in range(epochs):
            for x, *_ in data.epoch_batches(generator, batch, device):
                seen += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return seen / (time.perf_counter() - started)
    finally:
        data.close()


def resnet50(device: torch.device) -> tuple[torch.nn.Module, str]:
    try:
        from kdlab.models import build_model

        return build_model("timm:resnet50", 1000, input_shape=(3, 224, 224)).to(device), "timm:resnet50 (kdlab)"
    except Exception:
        import torchvision

        return torchvision.models.resnet50(num_classes=1000).to(device), "torchvision resnet50"


def step_rate(device: torch.device, batch: int, bf16: bool, steps: int) -> tuple[float, str]:
    model, name = resnet50(device)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - started), name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", default="0,2,4,8")
    parser.add_argument("--images", type=int, default=2000, help="training JPEGs (an epoch)")
    parser.add_argument("--epochs", type=int, default=1, help="timed loader epochs after the warm-up")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed ResNet-50 steps")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    counts = [int(w) for w in args.workers.split(",")]
    rows, model_rows = [], []
    started = time.perf_counter()
    for bf16 in (False, True):
        rate, name = step_rate(device, args.batch_size, bf16, args.steps)
        model_rows.append({"model": name, "precision": "bf16" if bf16 else "fp32", "batch": args.batch_size,
                           "images_per_s": rate})
        print(f"{name}, {'bf16' if bf16 else 'fp32'}, batch {args.batch_size}: {rate:,.0f} img/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpegs(Path(tmp) / "jpegs", args.images)
        print(f"wrote {args.images} JPEGs in {time.perf_counter() - started:.0f} s (total so far)", flush=True)
        plan = [(w, "torchcodec") for w in counts] + [(max(counts), "pillow")]
        for workers, decoder in plan:
            rate = loader_rate(root, workers, decoder, device, min(args.batch_size, args.images), args.epochs)
            rows.append({"workers": workers, "decoder": decoder, "images_per_s": rate})
            print(f"loader, {workers} workers, {decoder}: {rate:,.0f} img/s", flush=True)
    per_worker = max((r["images_per_s"] / r["workers"] for r in rows if r["workers"] and r["decoder"] == "torchcodec"),
                     default=float("nan"))
    need = {m["precision"]: math.ceil(m["images_per_s"] / per_worker) if per_worker == per_worker else None
            for m in model_rows}
    print(f"\nimage-folder path against ResNet-50 ({os.cpu_count()} cores, {cpu_name()}, {device}, torch "
          f"{torch.__version__})\n")
    print("| loader workers | decoder | images/s |\n|---:|---|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['decoder']} | {r['images_per_s']:,.0f} |")
    print("\n| model | precision | batch | images/s | TorchCodec workers to keep up |\n|---|---|---:|---:|---:|")
    for m in model_rows:
        print(f"| {m['model']} | {m['precision']} | {m['batch']} | {m['images_per_s']:,.0f} | {need[m['precision']]} |")
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__, "device": str(device),
                          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
              "images": f"{args.images} synthetic smooth JPEGs 500x375 q90", "loader": rows, "model": model_rows,
              "best_images_per_s_per_worker": per_worker, "workers_needed": need,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(args.out or Path(__file__).parent / "results" / f"imagenet_path-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
