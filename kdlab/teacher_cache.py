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
is met and saves them at the end of the run for the next run.

Every entry is computed the same way, whenever and by whichever run it is filled: in
chunks of exactly ``CHUNK`` rows (a partial chunk is padded), in the teachers' memory
layout. A network's output for one row can depend on the batch size (here: batches of
1-7 rows take other kernels), so this makes an entry a function of (sample, view) alone:
a lazy run killed before its save and resumed recomputes bit-identical entries, and a
``full`` table equals a ``lazy`` one. The key also holds what else changes the numbers
(bf16 autocast, memory layout, device type). An unreadable table file is rebuilt, with
a warning.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from filelock import FileLock, Timeout

from .errors import warn
from .runs import atomic_write_bytes, lock_file

DTYPES = {"float32": torch.float32, "float16": torch.float16}
CHUNK = 128  # rows per teacher forward when filling the table (see the module docstring)


def canonical_logits(teachers, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Teacher logits (float32, on the teachers' device) of a prepared batch, computed in
    chunks of exactly CHUNK rows (the last padded with copies of a row) in the teachers'
    memory layout, so that each row's logits do not depend on the batch it came in."""
    device = getattr(teachers, "device", torch.device("cpu"))
    channels_last = getattr(teachers, "channels_last", False)
    out = []
    for start in range(0, len(x), CHUNK):
        part = x[start : start + CHUNK]
        rows = len(part)
        if rows < CHUNK:
            part = torch.cat([part, part[:1].expand(CHUNK - rows, *part.shape[1:])])
        part = part.to(device)
        layout = torch.channels_last if channels_last and part.dim() == 4 else torch.contiguous_format
        out.append(teachers(part.contiguous(memory_format=layout), bf16)[:rows])
    return torch.cat(out).to(device)


def table_bytes(num_samples: int, num_views: int, num_classes: int, dtype: str) -> int:
    return num_samples * num_views * num_classes * torch.empty((), dtype=DTYPES[dtype]).element_size()


def cache_key(models, data, bf16: bool = False, channels_last: bool = False, device_type: str = "cpu") -> str:
    """SHA-256 over teacher weights and buffers, the training inputs, the augmentation and
    how the entries are computed (chunk size, bf16, memory layout, device type)."""
    digest = hashlib.sha256()
    digest.update(f"chunk={CHUNK}:bf16={bf16}:channels_last={channels_last}:device={device_type}".encode())
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
    def __init__(self, teachers, data, cfg, default_dir: Path, log=print, bf16: bool = False):
        self.teachers, self.data, self.cfg, self.bf16 = teachers, data, cfg, bf16
        self.num_views = data.augmentation.num_views
        n, k = len(data.train_y), data.num_classes
        size = table_bytes(n, self.num_views, k, cfg.dtype)
        self.device = getattr(teachers, "device", torch.device("cpu"))  # the table lives beside the teachers
        self.channels_last = getattr(teachers, "channels_last", False)
        self.key = cache_key(teachers.models, data, bf16, self.channels_last, self.device.type)
        self.path = Path(cfg.dir or default_dir) / f"teacher-logits-{self.key}.npz"
        self.lock = FileLock(lock_file(self.path.with_suffix(".lock")), thread_local=False)
        log(f"teacher cache ({cfg.mode}): {n:,} samples × {self.num_views} views × {k} classes × {cfg.dtype} = "
            f"{size / 1e9:.2f} GB -> {self.path}")
        if size > cfg.max_gb * 1e9:
            raise MemoryError(f"teacher cache needs {size / 1e9:.2f} GB > teacher.cache.max_gb={cfg.max_gb}")
        self.dirty = False
        self._remove_stale_temporaries()
        stored = self._read(n, k) if self.path.is_file() else None
        if stored is not None:
            self.table, self.filled = stored
        else:
            self.table = torch.zeros((n, self.num_views, k), dtype=DTYPES[cfg.dtype])
            self.filled = torch.zeros((n, self.num_views), dtype=torch.bool)
        self.table, self.filled = self.table.to(self.device), self.filled.to(self.device)
        self._complete = self.complete  # once complete, a lookup is one gather (no check, no sync)

    def _read(self, n: int, k: int):
        """(table, filled) from the file, or None (with a warning) when it is unreadable
        or of another shape: the table is then rebuilt and the file replaced at the save."""
        try:
            with np.load(self.path) as stored:
                table = torch.from_numpy(stored["logits"].astype(np.dtype(self.cfg.dtype)))
                filled = torch.from_numpy(stored["filled"].astype(bool))
            if tuple(table.shape) != (n, self.num_views, k) or tuple(filled.shape) != (n, self.num_views):
                raise ValueError(f"shape {tuple(table.shape)}, expected {(n, self.num_views, k)}")
        except Exception as err:  # truncated zip, missing array, wrong shape: all repairable
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            warn(f"teacher cache {self.path} is unreadable ({reason}): rebuilding it")
            return None
        return table, filled

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of a killed save; only when nobody is saving this table now."""
        if not self.path.parent.is_dir():
            return
        try:
            with self.lock.acquire(timeout=0):
                for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                    tmp.unlink(missing_ok=True)
        except Timeout:
            pass

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits of a prepared batch, the canonical way (``canonical_logits``)."""
        return canonical_logits(self.teachers, x, self.bf16)

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def build(self, batch_size: int, progress: bool = True) -> None:
        """Fill every missing (sample, view) entry, view by view, ``batch_size`` samples
        (rounded to whole chunks) at a time."""
        batch_size = max(CHUNK, batch_size // CHUNK * CHUNK)
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
                self._store(index, views, self.compute(x))
                bar.update(len(index))
        bar.close()
        self._complete = True
        self.save()

    def lookup(self, index: torch.Tensor, views: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits (float32) for the batch; ``x`` is the prepared batch of those
        views, used only for entries not in the table yet. Returned on ``x``'s device."""
        index, views = index.to(self.device), views.to(self.device)
        if not self._complete:
            missing = ~self.filled[index, views]
            if missing.any():
                self._store(index[missing], views[missing], self.compute(x[missing.to(x.device)]))
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
        with self.lock:  # runs sharing the table may save at once: one write at a time, each atomic
            atomic_write_bytes(self.path, buffer.getvalue())
        self.dirty = False
