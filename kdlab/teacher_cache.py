"""An exact table of teacher logits by (training sample, augmentation view).

Every kdlab augmentation has finitely many views per sample (pad-4 crop + flip: 162;
±2-pixel shifts: 25), and ``Augmentation.apply(x, view_ids)`` rebuilds any of them. So
the teacher's logits on every view of every training sample can be computed once —
stored raw (τ is applied at loss time) — and looked up in the training step instead of
running the teacher. The student still sees exactly the view its teacher logits belong
to, as with an online teacher.

The table is keyed by a hash of the teachers' weights, the training inputs, the split
and the augmentation, so every run of a sweep that uses the same teacher shares it. It
is written atomically (``<key>.npz``: logits + filled mask). ``full`` builds it before
training (with a progress bar); ``lazy`` fills entries the first time a (sample, view)
is met, from the very teacher outputs an online step would compute, and saves them at
the end of the run for the next run.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .runs import atomic_write_bytes

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def table_bytes(num_samples: int, num_views: int, num_classes: int, dtype: str) -> int:
    return num_samples * num_views * num_classes * torch.empty((), dtype=DTYPES[dtype]).element_size()


def cache_key(models, data) -> str:
    """SHA-256 over teacher weights and buffers, the training inputs and the augmentation."""
    digest = hashlib.sha256()
    for model in models:
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(data.train_x.contiguous().numpy().tobytes())
    digest.update(data.mean.numpy().tobytes() + data.std.numpy().tobytes())
    aug = data.augmentation
    digest.update(f"{aug.name}:{aug.pad_h}:{aug.pad_w}:{aug.flip}".encode())
    return digest.hexdigest()[:16]


class TeacherCache:
    def __init__(self, teachers, data, cfg, default_dir: Path, log=print):
        self.teachers, self.data, self.cfg = teachers, data, cfg
        self.num_views = data.augmentation.num_views
        n, k = len(data.train_y), data.num_classes
        size = table_bytes(n, self.num_views, k, cfg.dtype)
        self.key = cache_key(teachers.models, data)
        self.path = Path(cfg.dir or default_dir) / f"teacher-logits-{self.key}.npz"
        log(f"teacher cache ({cfg.mode}): {n:,} samples × {self.num_views} views × {k} classes × {cfg.dtype} = "
            f"{size / 1e9:.2f} GB -> {self.path}")
        if size > cfg.max_gb * 1e9:
            raise MemoryError(f"teacher cache needs {size / 1e9:.2f} GB > teacher.cache.max_gb={cfg.max_gb}")
        self.dirty = False
        self.device = getattr(teachers, "device", torch.device("cpu"))  # the table lives beside the teachers
        if self.path.is_file():
            with np.load(self.path) as stored:
                self.table = torch.from_numpy(stored["logits"].astype(np.dtype(cfg.dtype)))
                self.filled = torch.from_numpy(stored["filled"].copy())
            if self.table.shape != (n, self.num_views, k):
                raise ValueError(f"{self.path}: table of shape {tuple(self.table.shape)}, expected {(n, self.num_views, k)}")
        else:
            self.table = torch.zeros((n, self.num_views, k), dtype=DTYPES[cfg.dtype])
            self.filled = torch.zeros((n, self.num_views), dtype=torch.bool)
        self.table, self.filled = self.table.to(self.device), self.filled.to(self.device)
        self._complete = self.complete  # once complete, a lookup is one gather (no check, no sync)

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def build(self, batch_size: int, bf16: bool, progress: bool = True) -> None:
        """Fill every missing (sample, view) entry, view by view."""
        n = len(self.data.train_y)
        missing_views = [v for v in range(self.num_views) if not self.filled[:, v].all()]
        bar = tqdm(total=len(missing_views) * n, disable=not progress or not missing_views, unit="img",
                   desc="teacher cache", leave=False, dynamic_ncols=True)
        for view in missing_views:
            for start in range(0, n, batch_size):
                index = torch.arange(start, min(start + batch_size, n))
                views = torch.full((len(index),), view, dtype=torch.long)
                raw = self.data.train_x[index].to(self.device)
                x = self.data.prepare(self.data.augmentation.apply(raw, views))
                self._store(index, views, self.teachers(x, bf16))
                bar.update(len(index))
        bar.close()
        self._complete = True
        self.save()

    def lookup(self, index: torch.Tensor, views: torch.Tensor, x: torch.Tensor, bf16: bool) -> torch.Tensor:
        """Teacher logits (float32) for the batch; ``x`` is the prepared batch of those
        views, used only for entries not in the table yet. Returned on ``x``'s device."""
        index, views = index.to(self.device), views.to(self.device)
        if not self._complete:
            missing = ~self.filled[index, views]
            if missing.any():
                self._store(index[missing], views[missing], self.teachers(x[missing.to(x.device)], bf16))
        return self.table[index, views].float().to(x.device)

    def _store(self, index, views, logits) -> None:
        index, views = index.to(self.device), views.to(self.device)
        self.table[index, views] = logits.to(self.device, self.table.dtype)
        self.filled[index, views] = True
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, logits=self.table.cpu().numpy(), filled=self.filled.cpu().numpy())
        atomic_write_bytes(self.path, buffer.getvalue())
        self.dirty = False
