"""The files of an image folder (:mod:`kdlab.data.imagefolder`): ``folder/<class>/*``
listed and checked (:func:`scan_folder`), and the built-in folder
``builtin:fashion-mnist[:N]`` made once from Debian's Fashion-MNIST IDX files
(:func:`builtin_root`). Re-exported by :mod:`kdlab.data.imagefolder`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError

EXTENSIONS = {".jpg", ".jpeg", ".png"}


FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle-boot"]


def cache_dir() -> Path:
    """Where kdlab keeps what it makes once (``$KDLAB_CACHE``, else ``~/.cache/kdlab``)."""
    base = os.environ.get("KDLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdlab"
    return Path(base)


def parse_builtin(spec: str) -> tuple[str, int | None]:
    """``builtin:fashion-mnist[:N]`` -> ("fashion-mnist", N training images per class or None)."""
    name, _, count = spec.removeprefix("builtin:").partition(":")
    if name != "fashion-mnist":
        raise DataError(f"data.root={spec}: the built-in image folder is builtin:fashion-mnist[:N per class]")
    if count and not (count.isdigit() and 0 < int(count) <= 6000):
        raise DataError(f"data.root={spec}: N (training images per class) must be 1..6000")
    return name, int(count) if count else None


def builtin_root(spec: str) -> Path:
    """A real image folder made once from Debian's Fashion-MNIST IDX files: every test
    image in val/, the first N training images of each class (all without N) in train/,
    28×28 grayscale PNG; kept in ``cache_dir()/imagefolders`` (written to a temporary
    folder, renamed when complete; one maker at a time)."""
    from filelock import FileLock
    from PIL import Image

    from .sources import FASHION_MNIST_DEBIAN_DIR, load_idx_arrays

    name, per_class = parse_builtin(spec)
    target = cache_dir() / "imagefolders" / f"{name}-{per_class or 'all'}"
    if (target / "train").is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", thread_local=False):
        if (target / "train").is_dir():
            return target
        train_x, train_y, test_x, test_y = load_idx_arrays(FASHION_MNIST_DEBIAN_DIR)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        for split, images, labels in (("train", train_x, train_y), ("val", test_x, test_y)):
            taken = np.zeros(10, dtype=np.int64)
            for k, (image, label) in enumerate(zip(images, labels)):
                if split == "train" and per_class is not None:
                    if taken[label] >= per_class:
                        continue
                    taken[label] += 1
                folder = tmp / split / f"{label:02d}-{FASHION_MNIST_CLASSES[label]}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image[0]).save(folder / f"{k:05d}.png")
        os.replace(tmp, target)
    return target


def scan_folder(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """(files, classes, labels) of ``folder/<class>/*.{jpg,jpeg,png}``, sorted. With
    ``classes`` given (the training split's), a class folder outside them is an error."""
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist (data.root must hold train/<class>/ and val/<class>/)")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    training = classes is None  # (the training split defines the classes: each needs images)
    if training:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{folder}: class folder(s) not in the training split: {', '.join(unknown[:5])}")
    files, labels = [], []
    for label, name in enumerate(classes):
        directory = folder / name
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.suffix.lower() in EXTENSIONS and path.is_file():
                files.append(str(path))
                labels.append(label)
    if not files:
        raise DataError(f"{folder}: no .jpg/.jpeg/.png images in its class folders")
    if training:
        if len(classes) < 2:
            raise DataError(f"{folder}: {len(classes)} class folder ({', '.join(classes)}); a classifier needs at least "
                            "2 (one folder of images per class)")
        empty = [name for label, name in enumerate(classes) if label not in set(labels)]
        if empty:
            raise DataError(f"{folder}: class folder(s) without .jpg/.jpeg/.png images directly inside: "
                            f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} (images in subfolders are not "
                            "read); remove the folder or put its images in it")
    return files, classes, np.asarray(labels, dtype=np.int64)

