"""The streamed image-folder path: how many images per second it delivers.

    python benchmarks/data_speed.py [--quick] [--root IMAGE_FOLDER] [--workers 0,1,2]

Measured on JPEG files of ImageNet's typical size (500×375, quality 90): by default a
folder made here from scikit-learn's digits, upscaled and tinted (smooth content, like
photographs, not noise, which decodes slower); ``--root`` measures a real folder
(``root/train/<class>/*``). Rows:

1. decode + RandomResizedCrop + flip to 224×224, in this process, per core, with each
   decoder (``data.decoder``): TorchCodec (decode, then torch's antialiased bilinear resize
   of the crop) and Pillow (decode, one ``resize`` with the crop box, transpose);
2. the same + normalisation of the batch (``ImageFolderData.prepare``), TorchCodec;
3. the evaluation view (resize the shorter side to 256, centre crop 224), per core, each
   decoder;
4. whole epochs through kdlab's loader (``ImageFolderData.epoch_batches``: views drawn
   by the generator, workers decode) with 0, 1, 2, … worker processes, after a warm-up
   pass (worker start-up is excluded: workers persist across epochs);
5. building a teacher store (``teacher_store.py``: crops drawn, decoded by 2 loader
   workers, teacher forward, fp16 shards written) with a small MLP teacher, so that the
   row shows the store's own cost; a real teacher adds its forward time (ResNet-152 on
   a GPU, for Kim's Table 5);
6. small images: the training view of 28×28 grayscale PNGs (the built-in Fashion-MNIST
   folder's files) to 32×32, each decoder.

Prints a table and writes benchmarks/results/data_speed.json.
"""

from __future__ import annotations

import argparse
import json
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
from kdlab.data.imagefolder import VIEW_PARAMS, _Images, load_imagefolder  # noqa: E402

from train_speed import _cpu  # noqa: E402

DECODERS = ("torchcodec", "pillow")


def write_jpeg_folder(root: Path, images: int, classes: int = 10, size=(500, 375), seed: int = 0) -> Path:
    """``images`` JPEGs in ImageNet's layout (train/ and a small val/), smooth content."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    ramp = np.linspace(0, 1, size[0])[None, :, None] * np.linspace(0.3, 1, size[1])[:, None, None]
    for split, count in (("train", images), ("val", classes)):
        for k in range(count):
            label = k % classes
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            digit = Image.fromarray(np.clip(digits.images[rng.integers(len(digits.images))] * 16, 0, 255).astype(np.uint8))
            gray = np.asarray(digit.resize(size, Image.BICUBIC), dtype=np.float32)[:, :, None] / 255
            tint = rng.random(3)
            rgb = (255 * (0.6 * gray * tint + 0.4 * ramp * tint[::-1])).clip(0, 255).astype(np.uint8)
            Image.fromarray(rgb).save(folder / f"{k:06d}.jpg", quality=90)
    return root


def per_core(data, count: int, train_view: bool, decoder: str = "torchcodec") -> float:
    """Images/s of decoding + the view in this process (one core)."""
    dataset = _Images(data.files, data.labels, data.image_size, data.eval_resize, data.scale, data.ratio, False,
                      decoder)
    rows = np.random.default_rng(0).random((count, VIEW_PARAMS))
    n = len(data.files["train"])
    dataset[("train", 0, rows[0] if train_view else None)]  # warm-up (imports)
    started = time.perf_counter()
    for k in range(count):
        dataset[("train", k % n, rows[k] if train_view else None)]
    return count / (time.perf_counter() - started)


def small_pngs(root: Path, count: int, decoder: str) -> float:
    """The training view of 28×28 grayscale PNGs to 32×32, one core."""
    from PIL import Image

    folder = root / "train" / "class_0"
    if not folder.is_dir():
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            for label in (0, 1):
                (root / split / f"class_{label}").mkdir(parents=True, exist_ok=True)
                for k in range(count if split == "train" else 1):
                    image = (np.cumsum(rng.integers(-9, 10, (28, 28)), axis=1) % 256).astype(np.uint8)
                    Image.fromarray(image).save(root / split / f"class_{label}" / f"{k:05d}.png")
    data = load_imagefolder(DataConfig(name="imagefolder", root=str(root), image_size=32, val_size=0), num_workers=0)
    return per_core(data, count, True, decoder)


def with_normalise(data, count: int, batch: int = 64) -> float:
    dataset = _Images(data.files, data.labels, data.image_size, data.eval_resize, data.scale, data.ratio, False)
    rows = np.random.default_rng(1).random((count, VIEW_PARAMS))
    n = len(data.files["train"])
    started = time.perf_counter()
    for begin in range(0, count, batch):
        items = [dataset[("train", k % n, rows[k])] for k in range(begin, min(begin + batch, count))]
        data.prepare(torch.stack([i[0] for i in items]))
    return count / (time.perf_counter() - started)


def through_loader(cfg: DataConfig, workers: int, epochs: int, batch: int = 64) -> float:
    data = load_imagefolder(cfg, num_workers=workers)
    generator = torch.Generator().manual_seed(0)
    device = torch.device("cpu")
    for _ in data.epoch_batches(generator, batch, device):  # warm-up: workers start, files cached
        pass
    seen, started = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _, _, _, _ in data.epoch_batches(generator, batch, device):
            data.prepare(x)
            seen += len(x)
    rate = seen / (time.perf_counter() - started)
    data.close()
    return rate


class _OneTeacher:
    """A teacher as the store takes it: models, device, a call on a prepared batch."""

    def __init__(self, model: torch.nn.Module):
        self.models, self.device, self.channels_last = [model.eval()], torch.device("cpu"), False

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, bf16: bool) -> torch.Tensor:
        return self.models[0](x).float()


def store_build(cfg: DataConfig, crops: int, out: Path) -> float:
    from kdlab.config import TeacherStoreConfig
    from kdlab.models import build_model
    from kdlab.teacher_store import TeacherStore

    data = load_imagefolder(cfg, num_workers=2)
    torch.manual_seed(0)
    teacher = _OneTeacher(build_model("mlp-64", data.num_classes, input_shape=data.input_shape))
    store = TeacherStore(teacher, data, TeacherStoreConfig(crops=crops, shard_size=256), out, log=lambda *a: None)
    started = time.perf_counter()
    store.build(256, progress=False)
    rate = len(data.labels["train"]) * crops / (time.perf_counter() - started)
    data.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (a few minutes in all)")
    parser.add_argument("--root", help="a real image folder (root/train/<class>/*, root/val/<class>/*)")
    parser.add_argument("--workers", default="0,1,2", help="loader worker counts to measure")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    count = 300 if args.quick else 1000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else write_jpeg_folder(Path(tmp) / "jpegs", count)
        cfg = DataConfig(name="imagefolder", root=str(root), image_size=224, val_size=0)
        data = load_imagefolder(cfg, num_workers=0)
        rows = [(f"decode + RandomResizedCrop 224 + flip, {decoder}, 1 core", per_core(data, count, True, decoder))
                for decoder in DECODERS]
        rows.append(("  + normalise (batches of 64), torchcodec, 1 core", with_normalise(data, count)))
        rows += [(f"decode + resize 256 + centre crop 224 (eval), {decoder}, 1 core",
                  per_core(data, count, False, decoder)) for decoder in DECODERS]
        rows += [(f"28×28 grayscale PNG → 32 training view, {decoder}, 1 core",
                  small_pngs(Path(tmp) / "pngs", count, decoder)) for decoder in DECODERS]
        for workers in (int(w) for w in args.workers.split(",")):
            rate = through_loader(cfg, workers, 1 if args.quick else 2)
            rows.append((f"kdlab loader epoch, {workers} worker process(es)", rate))
        rows.append(("teacher store build, 2 workers, mlp-64 teacher (crops/s)", store_build(cfg, 2, Path(tmp) / "st")))
    print(f"\nimage-folder path, JPEG 500×375 → 224×224 ({os.cpu_count()} cores, {_cpu()}, torch {torch.__version__})\n")
    print(f"| {'measurement':66s} | images/s |\n|{'-' * 68}|---------:|")
    for name, rate in rows:
        print(f"| {name:66s} | {rate:8.1f} |")
    result = {"machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__},
              "images": "user folder" if args.root else f"{count} synthetic smooth JPEGs 500x375 q90",
              "rows": [{"measurement": name, "images_per_s": rate} for name, rate in rows],
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
