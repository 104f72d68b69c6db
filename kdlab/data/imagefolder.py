"""Image folders streamed from disk (ImageNet's layout): ``root/train/<class>/*`` and
``root/val/<class>/*``, JPEG or PNG, decoded in DataLoader worker processes by TorchCodec
(``data.decoder: torchcodec``, the default: torchvision.io's image decoders, which moved there
when torchvision 0.29 deprecated them) with torch's antialiased bilinear resize, or by Pillow
(``data.decoder: pillow``). Both decode 8-bit files to the same pixels (compared bit for bit
in the tests), but Pillow's box resize reads pixels just outside a crop's edges and torch's
only the crop, so the views differ slightly and the decoder is in the run hash. A 16-bit PNG is scaled to 8 bits by TorchCodec (Pillow clips it at 255).
The folders are listed (and the built-in one made) by :mod:`kdlab.data.imagefolder_scan`;
how a loader worker dies with the run is :mod:`kdlab.data.imagefolder_workers`. Their
names are re-exported here.

Views. A training view is ImageNet's RandomResizedCrop + horizontal flip, but every
random number of it is drawn in the training process by the run's checkpointed
generator, per (epoch, sample), as a row of ``VIEW_PARAMS`` uniforms: ten (scale, log
aspect ratio) attempts as torchvision makes them, the crop's position and the flip.
:func:`crop_box` turns a row and an image size into the box, exactly as deterministic
as the row, so a view is known from (seed, epoch, sample) alone: a resumed run sees the
same crops, and a teacher store (next step) can key logits by them. Evaluation views:
resize the shorter side to ``eval_resize`` and take the centre ``image_size`` square.

Batches. One persistent pool of loader workers serves every split: the main process
hands it lists of (split, index, view row) items, so the order and the views never
depend on the worker count (``data.loader_workers`` is not part of the run hash).
Workers start with ``spawn`` (not ``fork``), so they never inherit the run's lock (an
flock on ``RUN_DIR/.lock``): a fresh interpreter gets only the pipes multiprocessing
passes it. They die with the run, SIGKILL included (:mod:`kdlab.data.imagefolder_workers`).
(``forkserver`` would not do: its workers are the server's children, so torch's watchdog
watches the server; and every child holds the server's "alive" pipe: after a SIGKILL,
workers, server and tracker kept one another alive.)
An unreadable image is a one-line error naming the file, or (``data.on_bad_image:
skip``) left out of its training batch and counted in the epoch's metrics; evaluation
and store builds keep it as a black image (with a warning), so outputs stay aligned.
"""

from __future__ import annotations

import functools
import math
import multiprocessing.context
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..distributed import shard
from ..errors import DataError, warn
from .rows import sample_rows
from .noise import add_label_noise
from .imagefolder_scan import EXTENSIONS, FASHION_MNIST_CLASSES, builtin_root, cache_dir, parse_builtin, scan_folder
from .imagefolder_workers import _WatchOnUnpickle, _die_with_run

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "ATTEMPTS", "VIEW_PARAMS", "SPLITS", "crop_box", "centre_box", "ImageFolderData",
    "load_imagefolder", "default_loader_workers",
    # from kdlab.data.imagefolder_scan
    "EXTENSIONS", "FASHION_MNIST_CLASSES", "cache_dir", "parse_builtin", "builtin_root", "scan_folder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes, then falls back to a centre crop
VIEW_PARAMS = 2 * ATTEMPTS + 3  # (scale, log ratio) × 10, position y, position x, flip
SPLITS = ("train", "val", "test")


def crop_box(width: int, height: int, row: np.ndarray, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box (left, top, right, bottom) for an image of ``width`` ×
    ``height`` from one view row of uniforms (torchvision's algorithm, its random draws
    replaced by the row), and the flip bit."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * row[2 * attempt])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * row[2 * attempt + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(row[-3] * (height - h + 1)), height - h)
            left = min(int(row[-2] * (width - w + 1)), width - w)
            return (left, top, left + w, top + h), bool(row[-1] < 0.5)
    in_ratio = width / height  # fallback: the centre crop of the clamped ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (left, top, left + w, top + h), bool(row[-1] < 0.5)


def centre_box(width: int, height: int, resize: int, size: int):
    """The region of the original image that "resize the shorter side to ``resize``, then
    crop the centre ``size`` square" keeps."""
    side = min(width, height) * size / resize
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def _view_pillow(path: str, row, size: int, eval_resize: int, scale, ratio) -> torch.Tensor:
    """Pillow: decode, then one ``resize`` of the view's box (fractional for evaluation)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if row is None:
            out = image.resize((size, size), Image.BILINEAR, box=centre_box(*image.size, eval_resize, size))
        else:
            box, flip = crop_box(*image.size, row, scale, ratio)
            out = image.resize((size, size), Image.BILINEAR, box=box)
            if flip:
                out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1)


def _view_torchcodec(path: str, row, size: int, eval_resize: int, scale, ratio) -> torch.Tensor:
    """TorchCodec: decode to RGB uint8, then torch's bilinear antialiased resize of the
    view's box (what torchvision's ``resized_crop`` does on a uint8 tensor, bit for bit);
    the evaluation box is rounded to whole pixels."""
    from torchcodec.decoders import decode_image

    with open(path, "rb") as file:  # (read here: a missing or empty file gets Python's own error)
        encoded = file.read()
    if not encoded:
        raise OSError("empty file")
    image = decode_image(encoded, mode="RGB")  # (uint8: a 16-bit PNG is scaled to 8 bits)
    height, width = image.shape[-2:]
    flip = False
    if row is None:
        left, top, right, bottom = (round(v) for v in centre_box(width, height, eval_resize, size))
    else:
        (left, top, right, bottom), flip = crop_box(width, height, row, scale, ratio)
    out = torch.nn.functional.interpolate(image[None, :, top:bottom, left:right], size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False)[0]
    return out.flip(-1).contiguous() if flip else out.contiguous()


def _decode_error(err: Exception, path: str) -> str:
    """The reason, in one line: TorchCodec's RuntimeErrors read "function, source.cpp:line,
    reason. more" (kept: the function and the reason's first sentence)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, OSError) and err.strerror:  # (without the path, which the message names already)
        text = err.strerror
    found = re.match(r"(\w+), \S+:\d+, ([^.]*)", text) if isinstance(err, RuntimeError) else None
    if found:
        text = f"{found.group(1)}: {found.group(2)}"
    text = text.split(". ", 1)[0]  # (TorchCodec's unknown-format message goes on for three sentences)
    text = text.replace(f" {path!r}", "").replace(f" {path}", "")  # (Pillow's names the file: so does ours)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class _Images(torch.utils.data.Dataset):
    """Decodes one (split, index, view row) item to a uint8 (3, S, S) tensor."""

    def __init__(self, files: dict, labels: dict, image_size: int, eval_resize: int, scale, ratio, skip_bad: bool,
                 decoder: str = "torchcodec"):
        self.files, self.labels = files, labels
        self.image_size, self.eval_resize, self.scale, self.ratio = image_size, eval_resize, scale, ratio
        self.skip_bad, self.decoder = skip_bad, decoder

    def __reduce__(self):
        """Sent to a loader worker being started, the dataset carries the pid of the
        process that starts it (the run), and its state as one bytes object, which pickle
        sends outside its frames: the worker watches the run before it reads the file
        lists, which take a while to send when the folder is large (a run SIGKILLed then
        leaves its worker with a truncated pickle)."""
        watch = _WatchOnUnpickle(os.getpid()) if multiprocessing.context.get_spawning_popen() is not None else None
        return _images, (watch, pickle.dumps(self.__dict__, protocol=pickle.HIGHEST_PROTOCOL))

    def __len__(self):
        return sum(len(f) for f in self.files.values())

    def __getitem__(self, item):
        from PIL import Image

        split, index, row = item
        path = self.files[split][index]
        view = _view_torchcodec if self.decoder == "torchcodec" else _view_pillow
        try:
            array = view(path, row, self.image_size, self.eval_resize, self.scale, self.ratio)
        except (OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError) as err:
            if self.skip_bad:  # left out of a training batch; a black image in evaluation (warned)
                dropped = split == "train" and row is not None  # a training view; evaluation and stores keep all
                black = torch.zeros((3, self.image_size, self.image_size), dtype=torch.uint8)
                return black, int(self.labels[split][index]), index, False, dropped
            raise DataError(f"unreadable image {path} ({_decode_error(err, path)}); "
                            "set data.on_bad_image=skip to leave such images out") from None
        return array, int(self.labels[split][index]), index, True, False


def _collate(items):
    """Stack the decoded images; unreadable ones (skip mode) are counted, and left out of
    training batches (evaluation keeps them, black, so outputs stay aligned with labels)."""
    positions = [k for k, item in enumerate(items) if not item[4]]
    skipped = sum(not item[3] for item in items)
    if not positions:
        return None, None, None, skipped, torch.zeros(0, dtype=torch.long)
    kept = [items[k] for k in positions]
    x = torch.stack([i[0] for i in kept])
    return x, torch.tensor([i[1] for i in kept]), torch.tensor([i[2] for i in kept]), skipped, torch.tensor(positions)


def _images(_watched: None, state: bytes) -> _Images:
    """Unpickles an ``_Images`` (its first argument has set up the watch on the run)."""
    images = _Images.__new__(_Images)
    images.__dict__.update(pickle.loads(state))
    return images


class _Batches(torch.utils.data.Sampler):
    """A batch sampler whose batches the main process sets before each pass."""

    def __init__(self):
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


@dataclass
class ImageFolderData:
    """A streamed dataset: file lists and labels in memory, pixels read per batch."""

    name: str
    num_classes: int
    classes: list[str]
    files: dict  # split -> list of paths
    labels: dict  # split -> np.ndarray
    image_size: int
    eval_resize: int
    scale: tuple
    ratio: tuple
    loader_workers: int
    skip_bad: bool
    decoder: str = "torchcodec"
    mean: torch.Tensor = field(default_factory=lambda: torch.tensor(IMAGENET_MEAN))
    std: torch.Tensor = field(default_factory=lambda: torch.tensor(IMAGENET_STD))
    noisy_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    clean_train_y: torch.Tensor | None = None
    augmentation: None = None  # no finite views: no exact (sample, view) teacher table
    streamed: bool = True
    tokens = False
    _loader: object = field(default=None, repr=False)
    _device_stats: dict = field(default_factory=dict, repr=False)
    _warned: set = field(default_factory=set, repr=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    @property
    def train_y(self) -> torch.Tensor:
        return torch.from_numpy(self.labels["train"])

    def split_labels(self, split: str) -> torch.Tensor:
        return torch.from_numpy(self.labels[split])

    # the batch protocol (kdlab/data/rows.py): rows are samples
    num_train = property(sample_rows.num_train)
    steps_per_epoch = sample_rows.steps_per_epoch
    global_rows = sample_rows.global_rows
    inputs = sample_rows.inputs
    forward = staticmethod(sample_rows.forward)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> normalised float32 on its device: (x/255 − mean)/std as one fused
        multiply-add (half the time of four separate passes on a CPU)."""
        if x.device not in self._device_stats:
            scale = (1.0 / (255.0 * self.std)).view(1, -1, 1, 1)
            shift = (-self.mean / self.std).view(1, -1, 1, 1)
            self._device_stats[x.device] = (scale.to(x.device), shift.to(x.device))
        scale, shift = self._device_stats[x.device]
        return torch.addcmul(shift, x.float(), scale)

    def loader(self, pin_memory: bool = False):
        """The one DataLoader (persistent workers) every pass goes through."""
        if self._loader is None:
            dataset = _Images(self.files, self.labels, self.image_size, self.eval_resize, self.scale, self.ratio,
                              self.skip_bad, self.decoder)
            workers = self.loader_workers
            self._batches = _Batches()
            self._loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=self._batches, num_workers=workers, collate_fn=_collate,
                pin_memory=pin_memory, persistent_workers=workers > 0,
                multiprocessing_context="spawn" if workers > 0 else None,  # children of this process: see the top
                worker_init_fn=functools.partial(_die_with_run, os.getpid()) if workers > 0 else None,
                prefetch_factor=4 if workers > 0 else None)
        return self._loader

    def _pass(self, batches: list, device: torch.device):
        loader = self.loader(pin_memory=device.type == "cuda")
        self._batches.batches = batches
        try:
            for x, y, index, skipped, positions in loader:
                yield (None if x is None else x.to(device, non_blocking=True)), y, index, skipped, positions
        except DataError as err:  # re-raised from a worker with its traceback: keep our line
            raise DataError(str(err).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None

    def epoch_batches(self, generator: torch.Generator, batch_size: int, device: torch.device, store=None,
                      start_batch: int = 0, ctx=None):
        """One epoch in the generator's order: (raw uint8 batch on device, labels, sample
        indices, views, skipped count). The order and the views are drawn here: a fresh
        row of uniforms per sample, or, with a teacher ``store``, one of each image's
        stored crops (the views are then crop numbers, the rows come from the store). The
        first ``start_batch`` batches are drawn but not loaded (a resume within an epoch). With a
        multi-process ``ctx``, each rank loads its contiguous slice of every global batch."""
        n = len(self.labels["train"])
        order = torch.randperm(n, generator=generator)
        if store is None:
            views = rows = torch.rand(n, VIEW_PARAMS, generator=generator, dtype=torch.float64)
        else:
            views = torch.randint(0, store.crops, (n,), generator=generator)
            rows = torch.from_numpy(store.rows(order, views).astype(np.float64))
        batches, batch_views = [], []
        for begin in range(0, n, batch_size):
            index, row = order[begin : begin + batch_size], rows[begin : begin + batch_size]
            batches.append([("train", int(i), r) for i, r in zip(index.tolist(), row.numpy())])
            batch_views.append(views[begin : begin + batch_size])
        batches, views = batches[start_batch:], batch_views[start_batch:]
        if ctx is not None and ctx.active:
            parts = [shard(len(batch), ctx) for batch in batches]
            batches, views = [b[p] for b, p in zip(batches, parts)], [v[p] for v, p in zip(views, parts)]
        for (x, y, index, skipped, positions), view in zip(self._pass(batches, device), views):
            yield x, y, index, view[positions], skipped  # the views of the images kept

    def eval_batches(self, split: str, batch_size: int, device: torch.device, ctx=None):
        """Raw uint8 batches of ``split`` under the evaluation view, in file order (with a
        multi-process ``ctx``: batch b on rank b mod N)."""
        n = len(self.labels[split])
        batches = [[(split, i, None) for i in range(b, min(b + batch_size, n))] for b in range(0, n, batch_size)]
        if ctx is not None:
            batches = batches[ctx.rank :: ctx.world]
        total = 0
        for x, _, _, skipped, _ in self._pass(batches, device):
            total += skipped
            yield x
        if total and split not in self._warned:
            self._warned.add(split)
            warn(f"{total} unreadable image(s) in the {split} split were evaluated as black images "
                 "(data.on_bad_image=skip)")

    def close(self) -> None:
        """Stop the loader's worker processes now (not when the loader is collected: a
        traceback being handled can keep it alive)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()  # torch's own shutdown of persistent workers
        self._loader = None


def load_imagefolder(cfg, num_workers: int | None = None) -> ImageFolderData:
    """Scan ``cfg.root`` (train/ and val/; val is the test split, as ImageNet's) and hold
    out ``cfg.val_size`` training images (seeded) for validation."""
    root = builtin_root(cfg.root) if cfg.root.startswith("builtin:") else Path(cfg.root)
    train_files, classes, train_labels = scan_folder(root / "train")
    test_files, _, test_labels = scan_folder(root / "val", classes)
    n = len(train_files)
    val_size = cfg.val_size if cfg.val_size is not None else min(10000, n // 10)
    if not 0 <= val_size < n:
        raise DataError(f"data.val_size={val_size} must be smaller than the {n} training images in {root / 'train'}")
    order = np.random.default_rng(cfg.split_seed).permutation(n)
    val_idx, train_idx = np.sort(order[:val_size]), np.sort(order[val_size:])
    files = {"train": [train_files[i] for i in train_idx], "val": [train_files[i] for i in val_idx], "test": test_files}
    labels = {"train": train_labels[train_idx], "val": train_labels[val_idx], "test": test_labels}
    files["store"] = files["train"]  # the training images as a teacher store builds them (none left out)
    image_size = cfg.image_size
    eval_resize = cfg.eval_resize or int(round(image_size / 0.875))
    if eval_resize < image_size:
        raise DataError(f"data.eval_resize={eval_resize} must be at least data.image_size={image_size}")
    data = ImageFolderData(
        name=cfg.name, num_classes=len(classes), classes=classes, files=files, labels=labels,
        image_size=image_size, eval_resize=eval_resize, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
        loader_workers=num_workers if num_workers is not None else (
            cfg.loader_workers if cfg.loader_workers is not None else default_loader_workers()),
        skip_bad=cfg.on_bad_image == "skip", decoder=cfg.decoder)
    if cfg.label_noise > 0:
        data.clean_train_y = torch.from_numpy(labels["train"].copy())
        labels["train"], data.noisy_indices = add_label_noise(labels["train"], len(classes), cfg.label_noise,
                                                              cfg.noise_type, cfg.noise_seed)
    labels["store"] = labels["train"]
    return data


def default_loader_workers() -> int:
    return min(4, os.cpu_count() or 1)
