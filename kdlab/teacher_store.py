"""A teacher store for streamed data (FKD-style, Shen & Xing 2022): soft labels for
crops drawn once.

RandomResizedCrop has unbounded views, so no table can hold the teacher's logits for
every view (``teacher_cache.py`` does that for finite views). Instead, for every
training image, ``teacher.store.crops`` = M crops are drawn once from a seeded generator
(rows of uniforms, as ``data/imagefolder.py`` turns into crop boxes and flips) and the
teacher's logits on each are stored, all K of them (float16, or float32 to be exact up
to float rounding), or (``top_k``) only the k largest teacher probabilities at the
loss's τ with their classes (FKD's compact form, KL at finite τ only: the missing mass
is spread evenly over the other classes, and the lookup returns logits τ·log p̃ whose
softmax at τ is that distribution). Training then draws, per (epoch, sample), one of the M stored crops
with the run's generator: the student sees that crop and is taught by its stored
logits, so teacher and student see the same crop and no teacher runs.

On disk, ``<dir>/teacher-store-<key>/`` holds ``store.json`` (what it is) and one pair
of ``.npy`` shards per ``shard_size`` images: ``shard-NNNNN.rows.npy`` (S, M, P) float32
crop rows and ``shard-NNNNN.logits.npy`` (S, M, K) — or, top-k, ``.index.npy`` (S, M, k)
int32 classes and ``.probs.npy`` (S, M, k) probabilities. Shards are written atomically and
read memory-mapped; a build killed half-way resumes at the first missing shard, and one
build runs at a time (a file lock). The key covers the teachers' weights, the training
files (relative paths and sizes), the view settings, M, the seed, the dtype and how the
logits are computed (chunks of 128 rows, bf16, layout, device type).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from tqdm.auto import tqdm

from .errors import DataError, warn
from .runs import atomic_write_bytes, atomic_write_json, lock_file
from .teacher_cache import CHUNK, canonical_logits

DTYPES = {"float16": np.float16, "float32": np.float32}


def format_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.3g} {unit}"
        count /= 1000


def store_bytes(num_images: int, crops: int, num_classes: int, dtype: str) -> int:
    return num_images * crops * num_classes * np.dtype(DTYPES[dtype]).itemsize


ROW_BLOCK = 1024  # images per stream of crop rows (fixed: the crops must not depend on the sharding)
FLOOR = 1e-12  # top-k: smallest probability a class gets (log 0 would make the KL nan)


def store_key(teachers, data, cfg, bf16: bool, tau: float | None = None) -> str:
    digest = hashlib.sha256()
    for model in teachers.models:
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    root = Path(data.files["train"][0]).parents[2] if data.files["train"] else Path(".")
    for path in data.files["train"]:  # (not the labels: the teacher's outputs do not depend on them)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise DataError(f"training image {path} vanished or became unreadable since the folder was scanned") from None
        digest.update(f"{os.path.relpath(path, root)}:{size}\n".encode())
    digest.update(json.dumps({"image_size": data.image_size, "scale": list(data.scale), "ratio": list(data.ratio),
                              "crops": cfg.crops, "seed": cfg.seed, "dtype": cfg.dtype, "chunk": CHUNK, "bf16": bf16,
                              "top_k": cfg.top_k, "tau": tau if cfg.top_k else None, "shard_size": cfg.shard_size,
                              "channels_last": getattr(teachers, "channels_last", False),
                              "device": getattr(teachers, "device", torch.device("cpu")).type}).encode())
    if data.decoder != "pillow":  # (stores built before the choice decoded with Pillow and keep their keys)
        digest.update(f"decoder={data.decoder}".encode())
    return digest.hexdigest()[:16]


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


class TeacherStore:
    def __init__(self, teachers, data, cfg, default_dir: Path, log=print, bf16: bool = False, tau: float = 1.0):
        from .data.imagefolder import VIEW_PARAMS

        self.teachers, self.data, self.cfg, self.bf16, self.tau = teachers, data, cfg, bf16, tau
        self.crops, self.params = cfg.crops, VIEW_PARAMS
        self.num_images, self.num_classes = len(data.labels["train"]), data.num_classes
        self.top_k = cfg.top_k
        if self.top_k is not None and not (self.top_k < self.num_classes and math.isfinite(tau)):
            raise ValueError(f"teacher.store.top_k={self.top_k} needs k < {self.num_classes} classes and a finite τ")
        self.key = store_key(teachers, data, cfg, bf16, tau)
        self.path = Path(cfg.dir or default_dir) / f"teacher-store-{self.key}"
        self.shards = -(-self.num_images // cfg.shard_size)
        width = self.top_k or self.num_classes
        size = store_bytes(self.num_images, self.crops, width, cfg.dtype) + (
            4 * self.num_images * self.crops * width if self.top_k else 0)
        what = f"top-{self.top_k} probabilities at τ={tau:g} (+ int32 classes)" if self.top_k else "logits"
        log(f"teacher store: {self.num_images:,} images × {self.crops} crops × {width} {what} × "
            f"{cfg.dtype} = {format_bytes(size)} (+ crop rows) -> {self.path}")
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._check_recorded_key()

    def _check_recorded_key(self) -> None:
        """A store folder holds the key it was built for: one copied or renamed into this
        key's place (another teacher's logits) is refused, not used."""
        manifest = self.path / "store.json"
        if not manifest.is_file():
            return
        try:
            recorded = json.loads(manifest.read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != self.key:
            raise DataError(f"teacher store {self.path} records key {recorded!r} in store.json, not {self.key!r}: it "
                            "was built for another teacher, data or settings (copied or renamed?); move it away and "
                            "run again to build the right one")

    def _shard_paths(self, shard: int) -> list[Path]:
        """The shard's files; the last is written last and marks the shard done."""
        names = ("rows", "index", "probs") if self.top_k else ("rows", "logits")
        return [self.path / f"shard-{shard:05d}.{name}.npy" for name in names]

    def _shard_ok(self, shard: int) -> bool:
        paths = self._shard_paths(shard)
        if not all(p.is_file() for p in paths):
            return False
        try:
            arrays = [np.load(p, mmap_mode="r") for p in paths]
        except (ValueError, OSError) as err:
            warn(f"teacher store shard {paths[-1]} is unreadable ({type(err).__name__}): rebuilding it")
            return False
        count = min(self.cfg.shard_size, self.num_images - shard * self.cfg.shard_size)
        widths = [self.params] + [self.top_k or self.num_classes] * (len(paths) - 1)
        return all(a.shape == (count, self.crops, w) for a, w in zip(arrays, widths))

    def build(self, batch_size: int, progress: bool = True) -> None:
        """Compute every missing shard (resumable; one builder at a time)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(lock_file(str(self.path) + ".lock"), thread_local=False):
            for tmp in self.path.glob(".*.tmp"):  # a killed build's partial writes
                tmp.unlink(missing_ok=True)
            missing = [s for s in range(self.shards) if not self._shard_ok(s)]
            total = sum(min(self.cfg.shard_size, self.num_images - s * self.cfg.shard_size) for s in missing)
            bar = tqdm(total=total * self.crops, disable=not progress or not missing, unit="crop",
                       desc="teacher store", leave=False, dynamic_ncols=True)
            for shard in missing:
                self._build_shard(shard, batch_size, bar)
            bar.close()
            atomic_write_json(self.path / "store.json", {
                "key": self.key, "images": self.num_images, "crops": self.crops, "classes": self.num_classes,
                "top_k": self.top_k, "tau": self.tau if self.top_k else None,
                "dtype": self.cfg.dtype, "seed": self.cfg.seed, "shard_size": self.cfg.shard_size,
                "image_size": self.data.image_size, "crop_scale": list(self.data.scale),
                "crop_ratio": list(self.data.ratio), "view_params": self.params})

    def _draw_rows(self, first: int, count: int) -> np.ndarray:
        """Crop rows (float32, stored as drawn) of images first..first+count−1: each block
        of ROW_BLOCK images has its own seeded stream, so an image's crops do not depend on
        how the store is sharded."""
        blocks = range(first // ROW_BLOCK, (first + count - 1) // ROW_BLOCK + 1)
        drawn = [torch.rand(ROW_BLOCK, self.crops, self.params,
                            generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + b)) for b in blocks]
        start = first - blocks[0] * ROW_BLOCK
        return torch.cat(drawn)[start : start + count].numpy()

    def _build_shard(self, shard: int, batch_size: int, bar) -> None:
        first = shard * self.cfg.shard_size
        count = min(self.cfg.shard_size, self.num_images - first)
        rows = self._draw_rows(first, count)
        items = [("store", first + i, rows[i, m].astype(np.float64)) for i in range(count) for m in range(self.crops)]
        batch_size = max(CHUNK, batch_size // CHUNK * CHUNK)
        batches = [items[b : b + batch_size] for b in range(0, len(items), batch_size)]
        out = []
        device = getattr(self.teachers, "device", torch.device("cpu"))
        for x, _, _, _, _ in self.data._pass(batches, device):
            out.append(canonical_logits(self.teachers, self.data.prepare(x), self.bf16).float().cpu())
            bar.update(len(x))
        logits = torch.cat(out)
        if self.top_k:
            probs, index = torch.softmax(logits / self.tau, dim=-1).topk(self.top_k, dim=-1)
            arrays = [index.int().numpy(), probs.numpy().astype(DTYPES[self.cfg.dtype])]
        else:
            arrays = [logits.numpy().astype(DTYPES[self.cfg.dtype])]
        shape = (count, self.crops, -1)
        for path, array in zip(self._shard_paths(shard), [rows] + [a.reshape(shape) for a in arrays]):
            _save_npy(path, array)  # the last is written last: its presence (and shape) marks the shard done

    def _shard(self, shard: int) -> list[np.ndarray]:
        if shard not in self._maps:
            self._maps[shard] = [np.load(p, mmap_mode="r") for p in self._shard_paths(shard)]
        return self._maps[shard]

    def _gather(self, which: int, index: torch.Tensor, crop: torch.Tensor) -> np.ndarray:
        index, crop = index.numpy(), crop.numpy()
        shard, offset = index // self.cfg.shard_size, index % self.cfg.shard_size
        first = self._shard(int(shard[0]))[which] if len(index) else np.zeros((0, 0, 0), np.float32)
        out = np.empty((len(index), first.shape[-1]), dtype=np.int64 if first.dtype.kind == "i" else np.float32)
        for s in np.unique(shard):
            picked = shard == s
            out[picked] = self._shard(int(s))[which][offset[picked], crop[picked]]
        return out

    def rows(self, index: torch.Tensor, crop: torch.Tensor) -> np.ndarray:
        """The stored crop rows of (image, crop) pairs, (B, P) float32."""
        return self._gather(0, index, crop)

    def lookup(self, index: torch.Tensor, crop: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The stored teacher logits (float32) of (image, crop) pairs, on ``x``'s device; for
        a top-k store, τ·log p̃ where p̃ is the stored top-k probabilities with the missing
        mass spread evenly over the other classes (floored at FLOOR)."""
        if self.top_k:
            classes = torch.from_numpy(self._gather(1, index, crop))
            probs = torch.from_numpy(self._gather(2, index, crop)).double()
            rest = ((1.0 - probs.sum(-1, keepdim=True)) / (self.num_classes - self.top_k)).clamp_min(0.0)
            full = rest.expand(len(probs), self.num_classes).clone().scatter_(1, classes, probs)
            logits = (self.tau * full.clamp_min(FLOOR).log()).float()
        else:
            logits = torch.from_numpy(self._gather(1, index, crop))
        return logits.to(x.device) if x is not None else logits
