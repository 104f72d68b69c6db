"""A teacher store for streamed data (FKD-style, Shen & Xing 2022): soft labels for
crops drawn once.

RandomResizedCrop has unbounded views, so no table can hold the teacher's logits for
every view (``teacher_cache.py`` does that for finite views). Instead, for every
training image, ``teacher.store.crops`` = M crops are drawn once from a seeded generator
(rows of uniforms, as ``data/imagefolder.py`` turns into crop boxes and flips) and the
teacher's logits on each are stored, all K of them (float16, or float32 to be exact up
to float rounding). Training then draws, per (epoch, sample), one of the M stored crops
with the run's generator: the student sees that crop and is taught by its stored
logits, so teacher and student see the same crop and no teacher runs.

On disk, ``<dir>/teacher-store-<key>/`` holds ``store.json`` (what it is) and one pair
of ``.npy`` shards per ``shard_size`` images: ``shard-NNNNN.rows.npy`` (S, M, P) float32
crop rows and ``shard-NNNNN.logits.npy`` (S, M, K). Shards are written atomically and
read memory-mapped; a build killed half-way resumes at the first missing shard, and one
build runs at a time (a file lock). The key covers the teachers' weights, the training
files (relative paths and sizes), the view settings, M, the seed, the dtype and how the
logits are computed (chunks of 128 rows, bf16, layout, device type).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from tqdm.auto import tqdm

from .errors import warn
from .runs import atomic_write_bytes, atomic_write_json
from .teacher_cache import CHUNK, canonical_logits

DTYPES = {"float16": np.float16, "float32": np.float32}


def store_bytes(num_images: int, crops: int, num_classes: int, dtype: str) -> int:
    return num_images * crops * num_classes * np.dtype(DTYPES[dtype]).itemsize


def store_key(teachers, data, cfg, bf16: bool) -> str:
    digest = hashlib.sha256()
    for model in teachers.models:
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    root = Path(data.files["train"][0]).parents[2] if data.files["train"] else Path(".")
    for path, label in zip(data.files["train"], data.labels["train"]):
        digest.update(f"{os.path.relpath(path, root)}:{os.path.getsize(path)}:{label}\n".encode())
    digest.update(json.dumps({"image_size": data.image_size, "scale": list(data.scale), "ratio": list(data.ratio),
                              "crops": cfg.crops, "seed": cfg.seed, "dtype": cfg.dtype, "chunk": CHUNK, "bf16": bf16,
                              "channels_last": getattr(teachers, "channels_last", False),
                              "device": getattr(teachers, "device", torch.device("cpu")).type}).encode())
    return digest.hexdigest()[:16]


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


class TeacherStore:
    def __init__(self, teachers, data, cfg, default_dir: Path, log=print, bf16: bool = False):
        from .data.imagefolder import VIEW_PARAMS

        self.teachers, self.data, self.cfg, self.bf16 = teachers, data, cfg, bf16
        self.crops, self.params = cfg.crops, VIEW_PARAMS
        self.num_images, self.num_classes = len(data.labels["train"]), data.num_classes
        self.key = store_key(teachers, data, cfg, bf16)
        self.path = Path(cfg.dir or default_dir) / f"teacher-store-{self.key}"
        self.shards = -(-self.num_images // cfg.shard_size)
        size = store_bytes(self.num_images, self.crops, self.num_classes, cfg.dtype)
        log(f"teacher store: {self.num_images:,} images × {self.crops} crops × {self.num_classes} logits × "
            f"{cfg.dtype} = {size / 1e9:.3g} GB (+ crop rows) -> {self.path}")
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _shard_paths(self, shard: int) -> tuple[Path, Path]:
        return self.path / f"shard-{shard:05d}.rows.npy", self.path / f"shard-{shard:05d}.logits.npy"

    def _shard_ok(self, shard: int) -> bool:
        rows_path, logits_path = self._shard_paths(shard)
        if not (rows_path.is_file() and logits_path.is_file()):
            return False
        try:
            rows, logits = np.load(rows_path, mmap_mode="r"), np.load(logits_path, mmap_mode="r")
        except (ValueError, OSError) as err:
            warn(f"teacher store shard {logits_path} is unreadable ({type(err).__name__}): rebuilding it")
            return False
        count = min(self.cfg.shard_size, self.num_images - shard * self.cfg.shard_size)
        return rows.shape == (count, self.crops, self.params) and logits.shape == (count, self.crops, self.num_classes)

    def build(self, batch_size: int, progress: bool = True) -> None:
        """Compute every missing shard (resumable; one builder at a time)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock", thread_local=False):
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
                "dtype": self.cfg.dtype, "seed": self.cfg.seed, "shard_size": self.cfg.shard_size,
                "image_size": self.data.image_size, "crop_scale": list(self.data.scale),
                "crop_ratio": list(self.data.ratio), "view_params": self.params})

    def _build_shard(self, shard: int, batch_size: int, bar) -> None:
        first = shard * self.cfg.shard_size
        count = min(self.cfg.shard_size, self.num_images - first)
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + shard)  # a shard's rows: its own stream
        rows = torch.rand(count, self.crops, self.params, generator=generator).numpy()  # float32, stored as drawn
        items = [("store", first + i, rows[i, m].astype(np.float64)) for i in range(count) for m in range(self.crops)]
        batch_size = max(CHUNK, batch_size // CHUNK * CHUNK)
        batches = [items[b : b + batch_size] for b in range(0, len(items), batch_size)]
        out = []
        device = getattr(self.teachers, "device", torch.device("cpu"))
        for x, _, _, _ in self.data._pass(batches, device):
            out.append(canonical_logits(self.teachers, self.data.prepare(x), self.bf16).float().cpu())
            bar.update(len(x))
        logits = torch.cat(out).numpy().reshape(count, self.crops, self.num_classes).astype(DTYPES[self.cfg.dtype])
        rows_path, logits_path = self._shard_paths(shard)
        _save_npy(rows_path, rows)
        _save_npy(logits_path, logits)  # written last: its presence (and shape) marks the shard done

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if shard not in self._maps:
            rows_path, logits_path = self._shard_paths(shard)
            self._maps[shard] = (np.load(rows_path, mmap_mode="r"), np.load(logits_path, mmap_mode="r"))
        return self._maps[shard]

    def _gather(self, which: int, index: torch.Tensor, crop: torch.Tensor) -> np.ndarray:
        index, crop = index.numpy(), crop.numpy()
        shard, offset = index // self.cfg.shard_size, index % self.cfg.shard_size
        width = self.params if which == 0 else self.num_classes
        out = np.empty((len(index), width), dtype=np.float32)
        for s in np.unique(shard):
            picked = shard == s
            out[picked] = self._shard(int(s))[which][offset[picked], crop[picked]]
        return out

    def rows(self, index: torch.Tensor, crop: torch.Tensor) -> np.ndarray:
        """The stored crop rows of (image, crop) pairs, (B, P) float32."""
        return self._gather(0, index, crop)

    def lookup(self, index: torch.Tensor, crop: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The stored teacher logits (float32) of (image, crop) pairs, on ``x``'s device."""
        logits = torch.from_numpy(self._gather(1, index, crop))
        return logits.to(x.device) if x is not None else logits
