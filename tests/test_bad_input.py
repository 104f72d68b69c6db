"""Bad input, end to end, through the command line.

Every case must: exit with code 2; print exactly one line on stderr, starting with
``kdlab: error:`` and naming the problem (the key, file or value); print no traceback;
and leave the output directory -- in fact everything under the test's tmp dir and the
shared fixture runs -- exactly as it was (names, sizes and mtimes; every mtime is set to
a fixed past time before the command, so any write shows). Cases about a missing
out_dir check that it is not created.

Most cases run in-process through ``kdlab.cli.main`` (fast); a few representative ones
also run as real ``python -m kdlab`` subprocesses, for the real exit code and stderr.
The base overrides keep any run tiny, so a case that wrongly trains ends quickly (and
then fails).
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from conftest import write_cifar, write_cifar_batch, write_idx, write_idx_dataset
from kdlab.cli import main
from kdlab.config import build_config
from kdlab.train import train

# tiny, valid, fast: a case that is wrongly accepted trains one epoch of an MLP on digits
BASE = ["data.name=digits", "data.val_size=200", "model.name=mlp-16", "optim.epochs=1", "out_dir={out}"]
PAST_NS = 1_000_000_000 * 10**9  # 2001-09-09: every mtime is set to this before a case runs
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass
class Case:
    id: str
    argv: list[str]  # "{name}" placeholders: tmp, out, finished, unfinished, runs + what setup returns
    fragments: tuple[str, ...]  # each must appear in the error line
    setup: Callable[[Path], dict] | None = None
    out: str = "populated"  # "populated": {out} exists with content; "missing": {out} (and its parent) must not appear
    dir_mtimes: bool = True  # False: a directory may be created and removed again (a run that failed in training)
    absent: tuple[str, ...] = ()  # paths that must not exist afterwards
    forbidden: tuple[str, ...] = ()  # fragments that must NOT appear in the error line
    max_seconds: float | None = None
    marks: tuple = ()


def T(*extra: str) -> list[str]:
    """``kdlab train`` with the tiny base overrides, then ``extra`` (later ones win)."""
    return ["train", "--no-progress", *BASE, *extra]


def IDX() -> list[str]:
    """Train on the MNIST IDX files a case's setup writes to {root}."""
    return T("data.name=mnist", "data.root={root}", "data.val_size=5")


def CIFAR10() -> list[str]:
    """Train on the CIFAR-10 pickles a case's setup writes to {root}."""
    return T("data.name=cifar10", "data.root={root}", "data.val_size=5")


def TC(config: str, *extra: str) -> list[str]:
    """``kdlab train CONFIG`` with the tiny base overrides, then ``extra``."""
    return ["train", "--no-progress", config, *BASE, *extra]


# --- setups: tiny files in the real formats, then broken in one way --------------------------------


def _text(name: str, content: str):
    def setup(tmp: Path) -> dict:
        path = tmp / name
        path.write_text(content.replace("{tmp}", str(tmp)))
        return {name.split(".")[0]: str(path)}

    return setup


def _not_utf8(tmp: Path) -> dict:
    (tmp / "latin.yaml").write_bytes(b"\xff\xfe\x00name: caf\xe9\n")
    return {"latin": str(tmp / "latin.yaml")}


def _file(tmp: Path) -> dict:
    (tmp / "afile").write_text("not a directory\n")
    return {"afile": str(tmp / "afile")}


def _empty_dir(tmp: Path) -> dict:
    (tmp / "empty").mkdir()
    return {"empty": str(tmp / "empty")}


def _read_only(tmp: Path) -> dict:
    ro = tmp / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("x")
    ro.chmod(0o555)
    return {"ro": str(ro)}


def _idx(mutate=None, compress=False):
    """A tiny MNIST IDX folder (40 train / 20 test images), then ``mutate(root)``."""

    def setup(tmp: Path) -> dict:
        root = write_idx_dataset(tmp / "mnist", compress=compress)
        if mutate:
            mutate(root)
        return {"root": str(root)}

    return setup


def _edit(path: Path, fn) -> None:
    path.write_bytes(fn(path.read_bytes()))


def _bad_magic(root: Path) -> None:
    _edit(root / "train-images-idx3-ubyte", lambda b: b"\x01\x02\x08\x03" + b[4:])


def _header_cut_short(root: Path) -> None:
    (root / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + struct.pack(">i", 40))


def _negative_dim(root: Path) -> None:
    (root / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + struct.pack(">3i", -5, 28, 28) + bytes(100))


def _body_truncated(root: Path) -> None:
    _edit(root / "train-images-idx3-ubyte", lambda b: b[:-100])


def _absurd_header(root: Path) -> None:
    """A header declaring 2^31-1 images (1.7 TB): must be refused from what the file holds, not allocated."""
    (root / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + struct.pack(">3i", 2**31 - 1, 28, 28) + bytes(784))


def _labels_other_length(root: Path) -> None:
    write_idx(root / "train-labels-idx1-ubyte", (np.arange(39) % 10).astype(np.uint8))


def _test_labels_out_of_range(root: Path) -> None:
    labels = (np.arange(20) % 10).astype(np.uint8)
    labels[7] = 10
    write_idx(root / "t10k-labels-idx1-ubyte", labels)


def _images_not_bytes(root: Path) -> None:
    write_idx(root / "train-images-idx3-ubyte", np.zeros((40, 28, 28), np.float32))


def _empty_idx(root: Path) -> None:
    (root / "t10k-images-idx3-ubyte").write_bytes(b"")


def _corrupt_gzip(root: Path) -> None:
    def corrupt(b: bytes) -> bytes:
        middle = len(b) // 2
        return b[:middle] + bytes(x ^ 0xFF for x in b[middle : middle + 64]) + b[middle + 64 :]

    _edit(root / "train-images-idx3-ubyte.gz", corrupt)


def _truncated_gzip(root: Path) -> None:
    _edit(root / "t10k-images-idx3-ubyte.gz", lambda b: b[: len(b) // 2])


def _cifar(mutate=None, num_classes=10):
    """A tiny CIFAR-10 (5×12 train, 12 test) or CIFAR-100 (12 + 12) folder, then ``mutate(root)``."""

    def setup(tmp: Path) -> dict:
        root = write_cifar(tmp / f"cifar{num_classes}", num_classes)
        if mutate:
            mutate(root)
        return {"root": str(root)}

    return setup


def _missing_test_batch(root: Path) -> None:
    (root / "test_batch").unlink()


def _data_not_3072(root: Path) -> None:
    write_cifar_batch(root / "data_batch_2", np.zeros(12 * 3072 - 7, np.uint8), [0] * 12, key=b"labels")


def _cifar_labels_other_length(root: Path) -> None:
    write_cifar_batch(root / "data_batch_3", np.zeros((12, 3072), np.uint8), [1] * 11, key=b"labels")


def _cifar_test_labels_out_of_range(root: Path) -> None:
    write_cifar_batch(root / "test_batch", np.zeros((12, 3072), np.uint8), [0] * 11 + [10], key=b"labels")


def _cifar_truncated(root: Path) -> None:
    _edit(root / "data_batch_1", lambda b: b[: len(b) // 3])


class _System:
    """Pickles as a call of os.system(command): what a hostile "CIFAR batch" would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _cifar_forbidden_global(root: Path) -> None:
    with open(root / "data_batch_1", "wb") as handle:
        pickle.dump({b"data": _System(f"touch {root.parent / 'pwned'}"), b"labels": [0] * 12}, handle, protocol=2)


def _recipe_only_quick(tmp: Path) -> dict:
    path = tmp / "mine.yaml"
    path.write_text("id: mine\ntitle: t\nsource: s\nscales:\n  quick:\n    stages:\n      - name: a\n"
                    "        config: {data: {name: digits}, model: {name: mlp-16}, optim: {epochs: 1}}\n")
    return {"recipe": str(path)}


def _both(*setups):
    def setup(tmp: Path) -> dict:
        out = {}
        for s in setups:
            out.update(s(tmp))
        return out

    return setup


def _image_folder(mutate=None, classes: int = 3):
    """A tiny image folder (ImageNet's layout, real PNG/JPEG), then ``mutate(root)``."""

    def setup(tmp: Path) -> dict:
        from conftest import write_image_folder

        root = write_image_folder(tmp / "images", train_per_class=3, val_per_class=1, classes=classes, size=12)
        if mutate:
            mutate(root)
        return {"root": str(root)}

    return setup


def _empty_class(root: Path) -> None:
    (root / "train" / "class_99").mkdir()


def _class_in_a_subfolder(root: Path) -> None:
    folder = root / "train" / "class_01"
    (folder / "more").mkdir()
    for image in [p for p in folder.iterdir() if p.is_file()]:
        image.rename(folder / "more" / image.name)


def _class_linked_to_train(root: Path) -> None:
    (root / "train" / "class_zz").symlink_to(root / "train")


def IMAGES(*extra: str) -> list[str]:
    return T("data.name=imagefolder", "data.root={root}", "data.image_size=12", "data.val_size=1",
             "data.loader_workers=0", *extra)


def _free_port(tmp: Path) -> dict:
    """A local TCP port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return {"port": str(sock.getsockname()[1])}


def _legacy_pickles(tmp: Path) -> dict:
    """A plain pickle and torch's legacy (non-zip) format, given where torch files go."""
    (tmp / "plain.pt").write_bytes(pickle.dumps({"fc.weight": np.zeros(3)}))
    torch.save({"fc.weight": torch.zeros(3)}, tmp / "legacy.pt", _use_new_zipfile_serialization=False)
    return {"plain": str(tmp / "plain.pt"), "legacy": str(tmp / "legacy.pt")}


def _lock_dir(tmp: Path) -> dict:
    """A directory where the run's lock file would go."""
    cfg = build_config(apply_overrides_for(BASE, tmp / "out"))
    (cfg.run_dir() / ".lock").mkdir(parents=True)
    return {}


def apply_overrides_for(base: list[str], out: Path) -> dict:
    from kdlab.config import apply_overrides

    return apply_overrides({}, [b.format(out=out) for b in base])


def _as_teacher(kind: str):
    """A copy of the finished fixture run posing as another kind of run: ``translation``
    (result.json with token calibration, no eval_*.npz) or ``no-evals``."""

    def setup(tmp: Path) -> dict:
        import json
        import shutil

        fixture = next(Path(p) for p in _FIXTURE_RUNS)
        other = tmp / f"{kind}-run"
        shutil.copytree(fixture, other)
        for eval_file in other.glob("eval_*.npz"):
            eval_file.unlink()
        if kind == "translation":
            result = json.loads((other / "result.json").read_text())
            result.update(dataset="translation", token_calibration={"tokens": 10})
            (other / "result.json").write_text(json.dumps(result))
        return {"other": str(other)}

    return setup


_FIXTURE_RUNS: list[str] = []  # the finished fixture run (filled by the fixture, read by setups)


def _recipe_with_duplicate_key(tmp: Path) -> dict:
    path = tmp / "dup.yaml"
    path.write_text("id: dup\ntitle: t\nsource: s\nscales:\n  quick:\n    stages:\n      - name: a\n"
                    "        config: {data: {name: digits}, model: {name: mlp-16}, optim: {epochs: 1}}\n"
                    "title: again\n")
    return {"dup": str(path)}


ROOT_IGNORES_PERMISSIONS = pytest.mark.skipif(IS_ROOT, reason="root ignores directory permissions")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
TEACHER = ("loss.alpha=1", "teacher.runs=[{finished}]")

CASES = [
    # --- config -----------------------------------------------------------------------------------
    Case("unknown-key", T("bogus=1"), ("unknown config key 'bogus'",)),
    Case("unknown-key-missing-out", T("bogus=1"), ("unknown config key 'bogus'",), out="missing"),
    Case("unknown-nested-key", T("optim.bogus=1"), ("unknown config key 'optim.bogus'",)),
    Case("unknown-section", T("optimizer.lr=0.1"), ("unknown config key 'optimizer'",)),
    Case("lr-wrong-type", T("optim.lr=fast"), ("optim.lr",)),
    Case("bf16-not-a-bool", T("bf16=maybe"), ("'bf16'",)),
    Case("alpha-1.2", T("loss.alpha=1.2"), ("loss.alpha",)),
    Case("tau-0", T("loss.tau=0"), ("loss.tau",)),
    Case("tau-negative", T("loss.tau=-1"), ("loss.tau",)),
    Case("tau-nan", T("loss.tau=nan"), ("loss.tau",)),
    Case("epochs-0", T("optim.epochs=0"), ("optim.epochs",)),
    Case("batch-size-negative", T("optim.batch_size=-5"), ("optim.batch_size",)),
    Case("momentum-1", T("optim.momentum=1"), ("optim.momentum",)),
    Case("grad-clip-0", T("optim.grad_clip=0"), ("optim.grad_clip",)),
    Case("val-size-negative", T("data.val_size=-1"), ("data.val_size",)),
    Case("extra-test-not-mnist1d", T("data.extra_test=100"), ("data.extra_test", "MNIST-1D only")),
    Case("label-noise-1.5", T("data.label_noise=1.5"), ("data.label_noise",)),
    Case("noise-type-unknown", T("data.noise_type=weird"), ("data.noise_type",)),
    Case("dataset-unknown", T("data.name=imagenet"), ("data.name",)),
    Case("augment-unknown", T("data.augment=rotate"), ("data.augment",)),
    Case("threads-0", T("threads=0"), ("'threads'",)),
    Case("eval-every-0", T("eval_every=0"), ("eval_every",)),
    Case("alpha-without-teacher", T("loss.alpha=0.5"), ("loss.alpha", "teacher")),
    Case("teacher-runs-empty", T("loss.alpha=1", "teacher.runs=[]"), ("teacher.runs",)),
    Case("override-empty-key", T("=5"), ("'=5'", "empty key")),
    Case("override-empty-key-part", T("optim..lr=0.1"), ("optim..lr", "empty key")),
    Case("device-gpu", T("device=gpu"), ("device",)),
    Case("device-cuda-without-cuda", T("device=cuda"), ("device", "CUDA is not available"), marks=(NO_CUDA,)),
    Case("name-with-slash", T("name=bad/name"), ("'name'",)),
    Case("yaml-invalid", TC("{bad}"), ("bad.yaml", "invalid YAML"), setup=_text("bad.yaml", "data: [digits\n  model: {\n")),
    Case("yaml-a-list", TC("{list}"), ("list.yaml", "mapping"), setup=_text("list.yaml", "- data.name=digits\n- 3\n")),
    Case("yaml-unknown-key", TC("{keys}"), ("unknown config key 'optimizer'",),
         setup=_text("keys.yaml", "optimizer: {lr: 0.1}\n")),
    Case("yaml-python-tag", TC("{tag}"), ("tag.yaml",),
         setup=_text("tag.yaml", '!!python/object/apply:os.system ["touch {tmp}/pwned"]\n'), absent=("{tmp}/pwned",)),
    Case("yaml-not-utf8", TC("{latin}"), ("latin.yaml",), setup=_not_utf8),
    Case("seed-too-big", T("seed=99999999999999999999"), ("seed",)),
    Case("split-seed-negative", T("data.split_seed=-1"), ("data.split_seed",)),
    Case("noise-seed-negative", T("data.label_noise=0.1", "data.noise_seed=-1"), ("data.noise_seed",)),
    Case("generator-seed-negative", T("data.name=mnist1d", "data.num_samples=500", "data.generator_seed=-1"),
         ("data.generator_seed",)),
    Case("generator-seed-too-big", T("data.name=mnist1d", "data.num_samples=500", "data.generator_seed=4294967296"),
         ("data.generator_seed",)),
    Case("config-file-missing", TC("{tmp}/no-such-config.yaml"), ("no-such-config.yaml", "not found")),
    Case("config-is-a-directory", TC("{empty}"), ("not found",), setup=_empty_dir),
    Case("override-without-equals-after-flag", ["train", *BASE, "--no-progress", "loss.tau"],
         ("unrecognized arguments: loss.tau",)),
    Case("unknown-flag", T("--bogus-flag"), ("--bogus-flag",)),
    Case("override-after-flag-is-read", ["train", "{cfg}", *BASE, "--no-progress", "optim.epochs=0"], ("optim.epochs",),
         setup=_text("cfg.yaml", "data: {name: digits, val_size: 200}\nmodel: {name: mlp-16}\noptim: {epochs: 1}\n")),
    # --- models -----------------------------------------------------------------------------------
    Case("model-wrn-3-2", T("model.name=wrn-3-2"), ("model.name", "got 3")),
    Case("model-wrn-16-0", T("model.name=wrn-16-0"), ("model.name", "wrn-16-0")),
    Case("model-resnet-7", T("model.name=resnet-7"), ("model.name", "got 7")),
    Case("model-cnn1d-0", T("model.name=cnn1d-0"), ("model.name", "cnn1d-0")),
    Case("model-mlp-0", T("model.name=mlp-0"), ("model.name", "mlp-0")),
    Case("model-mlp-16-0", T("model.name=mlp-16-0"), ("model.name", "mlp-16-0")),
    Case("model-unknown", T("model.name=vgg-16"), ("model.name", "vgg-16")),
    Case("model-wrn-on-mnist1d", T("data.name=mnist1d", "data.num_samples=500", "model.name=wrn-16-2"),
         ("model.name", "wrn-16-2")),
    Case("model-cnn1d-on-digits", T("model.name=cnn1d-8"), ("model.name", "cnn1d-8")),
    Case("model-absurd-size", T("model.name=mlp-200000-200000"), ("GB", "memory_limit_gb"), max_seconds=20),
    Case("memory-limit-tiny", T("memory_limit_gb=0.000001"), ("memory_limit_gb",)),
    # --- augmentation -----------------------------------------------------------------------------
    Case("augment-crop-flip-on-mnist1d", T("data.name=mnist1d", "data.num_samples=500", "data.augment=crop_flip"),
         ("data.augment", "crop_flip")),
    Case("augment-shift2-on-mnist1d", T("data.name=mnist1d", "data.num_samples=500", "data.augment=shift2"),
         ("data.augment", "shift2")),
    Case("augment-shift1d-on-digits", T("data.augment=shift1d"), ("data.augment", "shift1d")),
    # --- data: file datasets ----------------------------------------------------------------------
    Case("mnist-root-missing", T("data.name=mnist", "data.root=/does/not/exist"), ("/does/not/exist",)),
    Case("mnist-root-missing-missing-out", T("data.name=mnist", "data.root=/does/not/exist"), ("/does/not/exist",),
         out="missing"),
    Case("mnist-root-is-a-file", T("data.name=mnist", "data.root={afile}"), ("afile",), setup=_file),
    Case("mnist-root-missing-a-file", T("data.name=mnist", "data.root={root}"), ("t10k-labels-idx1-ubyte",),
         setup=_idx(lambda r: (r / "t10k-labels-idx1-ubyte").unlink())),
    Case("idx-bad-magic", IDX(),
         ("train-images-idx3-ubyte", "magic"), setup=_idx(_bad_magic)),
    Case("idx-header-cut-short", IDX(),
         ("train-images-idx3-ubyte", "cut short"), setup=_idx(_header_cut_short)),
    Case("idx-negative-dimension", IDX(),
         ("train-images-idx3-ubyte", "-5"), setup=_idx(_negative_dim)),
    Case("idx-absurd-header", IDX(),
         ("train-images-idx3-ubyte", "2147483647"), setup=_idx(_absurd_header), max_seconds=20),
    Case("idx-body-truncated", IDX(),
         ("train-images-idx3-ubyte", "truncated"), setup=_idx(_body_truncated)),
    Case("idx-labels-other-length", IDX(),
         ("train-labels-idx1-ubyte", "39"), setup=_idx(_labels_other_length)),
    Case("idx-test-labels-out-of-range", IDX(),
         ("test labels", "10"), setup=_idx(_test_labels_out_of_range)),
    Case("idx-images-not-bytes", IDX(),
         ("train-images-idx3-ubyte", "float32"), setup=_idx(_images_not_bytes)),
    Case("idx-empty-file", IDX(),
         ("t10k-images-idx3-ubyte",), setup=_idx(_empty_idx)),
    Case("idx-corrupt-gzip", IDX(),
         ("train-images-idx3-ubyte.gz", "gzip"), setup=_idx(_corrupt_gzip, compress=True)),
    Case("idx-truncated-gzip", IDX(),
         ("t10k-images-idx3-ubyte.gz", "gzip"), setup=_idx(_truncated_gzip, compress=True)),
    Case("cifar-missing-test-batch", CIFAR10(),
         ("test_batch",), setup=_cifar(_missing_test_batch)),
    Case("cifar-data-not-3072", CIFAR10(),
         ("data_batch_2", "3072"), setup=_cifar(_data_not_3072)),
    Case("cifar-labels-other-length", CIFAR10(),
         ("data_batch_3", "11 labels"), setup=_cifar(_cifar_labels_other_length)),
    Case("cifar-test-labels-out-of-range", CIFAR10(),
         ("test_batch", "10"), setup=_cifar(_cifar_test_labels_out_of_range)),
    Case("cifar-truncated-pickle", CIFAR10(),
         ("data_batch_1",), setup=_cifar(_cifar_truncated)),
    Case("cifar-forbidden-global", CIFAR10(),
         ("data_batch_1", "refusing to unpickle"), setup=_cifar(_cifar_forbidden_global), absent=("{tmp}/pwned",)),
    Case("cifar100-on-cifar10-folder", T("data.name=cifar100", "data.root={root}", "data.val_size=5"),
         ("missing dataset file",), setup=_cifar()),
    Case("cifar100-without-root", T("data.name=cifar100"), ("data.root",)),
    Case("cifar100-without-root-missing-out", T("data.name=cifar100"), ("data.root",), out="missing"),
    # --- data: built-in datasets ------------------------------------------------------------------
    Case("mnist1d-num-samples-huge", T("data.name=mnist1d", "data.num_samples=100000000"), ("data.num_samples",),
         max_seconds=20),
    Case("mnist1d-num-samples-under-10", T("data.name=mnist1d", "data.num_samples=9"), ("data.num_samples", "at least 10")),
    Case("val-size-larger-than-train", T("data.val_size=5000"), ("data.val_size", "5000")),
    # --- teacher ----------------------------------------------------------------------------------
    Case("teacher-missing", T("loss.alpha=1", "teacher.runs=[/no/such/run]"), ("/no/such/run",)),
    Case("teacher-missing-missing-out", T("loss.alpha=1", "teacher.runs=[/no/such/run]"), ("/no/such/run",),
         out="missing"),
    Case("teacher-not-a-run-dir", T("loss.alpha=1", "teacher.runs=[{empty}]"), ("empty", "run dir"),
         setup=_empty_dir),
    Case("teacher-unfinished", T("loss.alpha=1", "teacher.runs=[{unfinished}]"), ("unfinished-", "not finished")),
    Case("teacher-other-input-shape", T(*TEACHER, "data.name=mnist1d", "data.num_samples=500"),
         ("finished-", "(1, 8, 8)")),
    Case("teacher-other-class-count", T(*TEACHER, "data.name=cifar100", "data.root={root}", "data.val_size=5"),
         ("finished-", "10 classes", "100"), setup=_cifar(num_classes=100)),
    Case("teacher-cache-mode-bogus", T(*TEACHER, "teacher.cache.mode=bogus"), ("teacher.cache.mode",)),
    # --- mutual information -----------------------------------------------------------------------
    Case("mi-views-huge", T("mutual_information.every_steps=1", "mutual_information.views=100000000"),
         ("mutual-information", "GB"), max_seconds=20),
    Case("mi-class-out-of-range", T("mutual_information.every_steps=5", "mutual_information.classes=[0,99]"),
         ("mutual_information.classes", "99")),
    Case("mi-one-view", T("mutual_information.views=1"), ("mutual_information.views",)),
    Case("mi-three-classes", T("mutual_information.classes=[0,1,2]"), ("mutual_information.classes",)),
    # --- out_dir ----------------------------------------------------------------------------------
    Case("out-dir-read-only", T("out_dir={ro}/runs"), ("out_dir", "ro"), setup=_read_only,
         marks=(ROOT_IGNORES_PERMISSIONS,)),
    Case("out-dir-under-a-file", T("out_dir={afile}/runs"), ("out_dir", "afile"), setup=_file,
         absent=("{afile}/runs",)),
    Case("out-dir-is-a-file", T("out_dir={afile}"), ("out_dir", "afile"), setup=_file),
    # --- training ---------------------------------------------------------------------------------
    Case("loss-not-finite-in-epoch-1", T("optim.lr=1e10"), ("training loss", "epoch 1", "optim.lr"),
         dir_mtimes=False, forbidden=("checkpointed", "resumes from")),
    Case("loss-not-finite-missing-out", T("optim.lr=1e10"), ("training loss", "epoch 1"), out="missing",
         dir_mtimes=False, forbidden=("checkpointed", "resumes from")),
    # --- analyze ----------------------------------------------------------------------------------
    Case("analyze-no-such-dir", ["analyze", "/no/such/dir"], ("/no/such/dir",)),
    Case("analyze-empty-dir", ["analyze", "{empty}", "--out", "{out}/analysis"], ("empty",), setup=_empty_dir),
    Case("analyze-unfinished", ["analyze", "{unfinished}"], ("unfinished-", "not a finished")),
    Case("analyze-bootstrap-0", ["analyze", "{finished}", "--bootstrap", "0"], ("--bootstrap", "0")),
    Case("analyze-bootstrap-negative", ["analyze", "{finished}", "--bootstrap", "-3"], ("--bootstrap", "-3")),
    Case("analyze-bootstrap-not-a-number", ["analyze", "{finished}", "--bootstrap", "many"], ("--bootstrap", "many")),
    Case("analyze-two-classes", ["analyze", "{finished}", "--classes", "0,1", "--bootstrap", "5"], ("--classes",)),
    Case("analyze-two-classes-out", ["analyze", "{finished}", "--classes", "0,1", "--bootstrap", "5",
                                     "--out", "{out}/analysis"], ("--classes",)),
    Case("analyze-classes-not-numbers", ["analyze", "{finished}", "--classes", "a,b,c"], ("--classes", "a,b,c")),
    Case("analyze-class-out-of-range", ["analyze", "{finished}", "--classes", "0,1,10", "--bootstrap", "5"],
         ("--classes", "10")),
    Case("analyze-repeated-class", ["analyze", "{finished}", "--classes", "0,0,1", "--bootstrap", "5"],
         ("--classes",)),
    Case("analyze-out-under-a-file", ["analyze", "{finished}", "--out", "{afile}/analysis", "--bootstrap", "5"],
         ("afile",), setup=_file),
    Case("analyze-out-is-a-file", ["analyze", "{finished}", "--out", "{afile}", "--bootstrap", "5"], ("afile",),
         setup=_file),
    Case("analyze-teacher-missing", ["analyze", "{finished}", "--teacher", "/no/such/teacher"], ("/no/such/teacher",)),
    Case("analyze-teacher-unfinished", ["analyze", "{finished}", "--teacher", "{unfinished}"], ("unfinished-",)),
    Case("export-unfinished", ["export", "{unfinished}", "--out", "{out}/export"], ("unfinished-", "not finished")),
    Case("export-out-not-empty", ["export", "{finished}", "--out", "{out}"], ("--out", "not empty", "--force")),
    # --- sweep / reproduce / report / others ------------------------------------------------------
    Case("sweep-unknown-recipe", ["sweep", "no-such-recipe", "--out", "{out}/sweep"], ("no-such-recipe",)),
    Case("sweep-without-recipe", ["sweep", "--out", "{out}/sweep"], ("RECIPE",)),
    Case("reproduce-without-recipe", ["reproduce", "--out", "{out}/sweep"], ("RECIPE",)),
    Case("reproduce-paper-without-cifar", ["reproduce", "kim-table2", "--scale", "paper", "--no-progress"],
         ("data.root",), absent=("{tmp}/runs",)),
    Case("reproduce-paper-without-cifar-out", ["reproduce", "kim-table2", "--scale", "paper", "--no-progress",
                                               "--out", "{out}/kim"], ("data.root",)),
    Case("sweep-workers-0", ["sweep", "kim-table2", "--workers", "0", "--out", "{out}/sweep"], ("--workers",)),
    Case("sweep-workers-not-a-number", ["sweep", "kim-table2", "--workers", "two"], ("--workers", "two")),
    Case("sweep-threads-0", ["sweep", "kim-table2", "--threads", "0", "--out", "{out}/sweep"], ("--threads",)),
    Case("sweep-executor-unknown", ["sweep", "kim-table2", "--executor", "bogus", "--out", "{out}/sweep"],
         ("--executor", "bogus")),
    Case("sweep-scale-unknown", ["sweep", "kim-table2", "--scale", "huge"], ("--scale", "huge")),
    Case("sweep-recipe-without-scale", ["sweep", "{recipe}", "--scale", "paper", "--out", "{out}/sweep"],
         ("paper",), setup=_recipe_only_quick),
    Case("sweep-out-under-a-file", ["sweep", "{recipe}", "--out", "{afile}/sweep", "--no-progress"], ("afile",),
         setup=_both(_file, _recipe_only_quick)),
    Case("sweep-out-is-a-file", ["sweep", "{recipe}", "--out", "{afile}", "--no-progress"], ("afile",),
         setup=_both(_file, _recipe_only_quick)),
    Case("reproduce-out-under-a-file", ["reproduce", "{recipe}", "--out", "{afile}/sweep", "--no-progress"],
         ("afile",), setup=_both(_file, _recipe_only_quick)),
    Case("sweep-set-without-equals", ["sweep", "kim-table2", "--set", "bogus", "--out", "{out}/sweep"], ("bogus",)),
    Case("sweep-set-unknown-key", ["sweep", "kim-table2", "--set", "nosuch.key=1", "--out", "{out}/sweep"],
         ("nosuch",)),
    Case("sweep-set-bad-value", ["sweep", "kim-table2", "--set", "loss.tau=0", "--out", "{out}/sweep"], ("loss.tau",)),
    Case("reproduce-set-unknown-key", ["reproduce", "kim-table2", "--set", "nosuch.key=1", "--out", "{out}/sweep"],
         ("nosuch",)),
    Case("report-no-such-dir", ["report", "/no/such/dir"], ("/no/such/dir",)),
    Case("report-dir-without-sweep", ["report", "{out}"], ("sweep.json",)),
    Case("configs-unknown-example", ["configs", "no-such-example"], ("no-such-example",)),
    Case("distill-method-typo", T("distill.method=ofdd", "teacher.runs=[{finished}]"), ("distill", "did you mean ofd")),
    Case("distill-option-typo", T("distill.method=at", "distill.options.bta=1", "teacher.runs=[{finished}]"),
         ("no option 'bta'", "did you mean beta")),
    Case("distill-option-out-of-range", T("distill.method=at", "distill.options.p=-1", "teacher.runs=[{finished}]"),
         ("options.p", "method at")),
    Case("distill-feature-method-with-cache", T("distill.method=fitnets", "teacher.runs=[{finished}]",
                                                "teacher.cache.mode=lazy"), ("runs its teacher online",)),
    Case("distill-feature-method-with-ensemble", T("distill.method=at", "teacher.runs=[{finished},{finished}]"),
         ("one teacher",)),
    Case("distill-dkd-with-kd-term", T("distill.method=dkd", *TEACHER), ("set loss.alpha=0",)),
    Case("distill-unknown-layer", T("distill.method=fitnets", "teacher.runs=[{finished}]",
                                    "distill.student_layers=[hiden.0]", "distill.teacher_layers=[hidden.0]"),
         ("hiden.0", "did you mean")),
    Case("distill-ofd-without-batch-norm", T("distill.method=ofd", "teacher.runs=[{finished}]"),
         ("distill.method=ofd",)),
    Case("distill-at-on-an-mlp", T("distill.method=at", "teacher.runs=[{finished}]"), ("distill.method=at",)),
    Case("init-run-unfinished", T("model.init_run={unfinished}"), ("model.init_run", "not a finished run")),
    Case("init-run-other-model", T("model.init_run={finished}", "model.name=mlp-32"),
         ("model.init_run", "trained mlp-16", "mlp-32")),
    Case("init-run-other-input-shape", T("model.init_run={finished}", "data.name=mnist1d", "data.num_samples=500"),
         ("model.init_run",)),
    Case("init-run-and-pretrained-path", T("model.init_run={finished}", "model.pretrained_path={finished}/model.pt"),
         ("give one",)),
    Case("fitnets-hint-with-kd-term", T("distill.method=fitnets", "distill.options.variant=hint", *TEACHER),
         ("variant hint", "loss.alpha=0")),
    Case("ab-with-kd-term", T("distill.method=ab", "loss.alpha=0.5", *TEACHER), ("initialisation stage",
                                                                                 "loss.alpha=0")),
    Case("ft-without-paraphraser-run", T("distill.method=ft", *TEACHER), ("model.init_run", "paraphraser stage")),
    Case("ft-on-an-mlp", T("distill.method=ft", "teacher.runs=[{finished}]", "model.init_run={finished}"),
         ("paraphraser is convolutional", "convolutional student")),
    Case("jacobian-with-teacher-cache", T("distill.method=jacobian", "teacher.cache.mode=lazy", *TEACHER),
         ("runs its teacher online", "teacher.cache")),
    Case("jacobian-with-sync-batchnorm", T("distill.method=jacobian", "sync_batchnorm=true", *TEACHER),
         ("distill.method=jacobian", "drop sync_batchnorm")),
    Case("crd-unknown-option", T("distill.method=crd", "distill.options.nce_kk=10", *TEACHER),
         ("nce_kk", "did you mean nce_k")),
    Case("model-name-without-size", T("model.name=cnn1d"), ("unknown model 'cnn1d'", "did you mean cnn1d-8")),
    Case("model-name-imagenet-spelling", T("model.name=resnet18"), ("did you mean timm:resnet18",)),
    Case("config-key-misspelt", T("optim.epoch=3"), ("unknown config key 'optim.epoch'", "did you mean optim.epochs")),
    Case("recipe-misspelt", ["reproduce", "kim-tabel2", "--out", "{out}/r"], ("unknown recipe", "did you mean kim-table2")),
    Case("train-without-anything", ["train"], ("train needs a config", "teacher-mnist1d")),
    Case("models-layers-unknown-model", ["models", "--layers", "vgg-16"], ("--layers vgg-16", "unknown model")),
    Case("models-layers-incomplete-name", ["models", "--layers", "wrn-16"], ("--layers wrn-16", "unknown model")),
    Case("models-layers-bad-input-shape", ["models", "--layers", "resnet-20", "--input-shape", "3,a"],
         ("--input-shape", "3,a")),
    Case("demo-teacher-epochs-0", ["demo", "--out", "{out}/demo", "--teacher-epochs", "0", "--no-progress"],
         ("epochs",)),
    # the students' configs must be checked before the teacher is trained (1 epoch here; 100 by default)
    Case("demo-student-epochs-0", ["demo", "--out", "{out}/demo", "--teacher-epochs", "1", "--student-epochs", "0",
                                   "--no-progress"], ("epochs",)),
    Case("demo-seeds-0", ["demo", "--out", "{out}/demo", "--seeds", "0", "--no-progress"], ("--seeds",)),
    # --- issue 20: accepted silently before, or a traceback after training -------------------------
    Case("milestones-decreasing", T("optim.milestones=[4,2]"), ("optim.milestones", "[4, 2]")),
    Case("milestones-negative", T("optim.milestones=[-3]"), ("optim.milestones", "[-3]")),
    Case("crop-scale-above-1", T("data.crop_scale=[2.0,3.0]"), ("data.crop_scale", "at most 1")),
    Case("store-top-k-with-store-off", T(*TEACHER, "teacher.store.top_k=3"), ("top_k", "teacher.store.crops")),
    Case("sync-batchnorm-without-torchrun", T("sync_batchnorm=true"), ("sync_batchnorm", "torchrun")),
    Case("mi-same-class-twice", T("mutual_information.every_steps=5", "mutual_information.classes=[3,3]"),
         ("mutual_information.classes", "[3, 3]")),
    Case("mi-per-class-above-the-data", T("mutual_information.every_steps=5", "mutual_information.per_class=1000"),
         ("mutual_information.per_class=1000", "only")),
    Case("yaml-duplicate-key", TC("{dup}"), ("dup.yaml", "duplicate key 'lr'", "line 2", "line 4"),
         setup=_text("dup.yaml", "optim:\n  lr: 0.1\n  epochs: 1\n  lr: 0.5\n")),
    Case("yaml-duplicate-section", TC("{dup}"), ("dup.yaml", "duplicate key 'optim'"),
         setup=_text("dup.yaml", "optim: {lr: 0.1}\ndata: {name: digits}\noptim: {epochs: 1}\n")),
    Case("recipe-duplicate-key", ["sweep", "{dup}", "--out", "{out}/sweep", "--no-progress"],
         ("dup.yaml", "duplicate key 'title'"), setup=_recipe_with_duplicate_key),
    Case("pretrained-plain-pickle", T("model.pretrained_path={plain}"), ("plain.pt",), setup=_legacy_pickles),
    Case("pretrained-legacy-torch-file", T("model.pretrained_path={legacy}"), ("legacy.pt",), setup=_legacy_pickles),
    Case("run-lock-is-a-directory", T(), (".lock", "is a directory"), setup=_lock_dir, dir_mtimes=False),
    Case("out-dir-in-proc", T("out_dir=/proc/kdlab-test/runs"), ("out_dir", "/proc")),
    Case("out-dir-in-sys", T("out_dir=/sys/kernel/kdlab-test"), ("out_dir", "/sys")),
    Case("sweep-out-in-proc", ["sweep", "{recipe}", "--out", "/proc/kdlab-test/sweep", "--no-progress"],
         ("--out", "/proc"), setup=_recipe_only_quick),
    Case("analyze-out-in-sys", ["analyze", "{finished}", "--out", "/sys/kernel/kdlab-test", "--bootstrap", "5"],
         ("--out", "/sys")),
    Case("analyze-bootstrap-huge", ["analyze", "{finished}", "--bootstrap", "100000000"],
         ("--bootstrap 100000000", "GB"), max_seconds=20),
    Case("analyze-teacher-of-translation", ["analyze", "{finished}", "--teacher", "{other}", "--bootstrap", "5"],
         ("--teacher", "translation run"), setup=_as_teacher("translation")),
    Case("analyze-teacher-without-evals", ["analyze", "{finished}", "--teacher", "{other}", "--bootstrap", "5"],
         ("--teacher", "without eval_test.npz"), setup=_as_teacher("no-evals")),
    Case("analyze-translation-run-with-teacher", ["analyze", "{other}", "--teacher", "{finished}", "--bootstrap", "5"],
         ("--teacher", "translation run"), setup=_as_teacher("translation")),
    Case("sweep-ray-address-not-answering", ["sweep", "{recipe}", "--executor", "ray", "--address", "127.0.0.1:{port}",
                                             "--out", "{out}/sweep", "--no-progress"],
         ("--address", "no Ray cluster answers"), setup=_both(_recipe_only_quick, _free_port), max_seconds=15),
    Case("sweep-ray-address-malformed", ["sweep", "{recipe}", "--executor", "ray", "--address", "somewhere",
                                         "--out", "{out}/sweep", "--no-progress"],
         ("--address", "HOST:PORT"), setup=_recipe_only_quick),
    Case("imagefolder-one-class", IMAGES(), ("1 class folder", "at least 2"), setup=_image_folder(classes=1)),
    Case("imagefolder-empty-class-folder", IMAGES(), ("class_99", "without"), setup=_image_folder(_empty_class)),
    Case("imagefolder-class-images-in-a-subfolder", IMAGES(), ("class_01", "subfolders"),
         setup=_image_folder(_class_in_a_subfolder)),
    Case("imagefolder-class-linked-to-train", IMAGES(), ("class_zz", "without"),
         setup=_image_folder(_class_linked_to_train)),
    Case("unknown-command", ["bogus-command"], ("bogus-command",)),
    Case("no-command", [], ("command",)),
]

# run again as real `python -m kdlab` processes: one of each way an error reaches the user
# (argparse, ConfigError, DataError, RunError in training, YAML, analyze)
SUBPROCESS_CASES = {"unknown-key", "unknown-flag", "idx-bad-magic", "yaml-python-tag", "loss-not-finite-in-epoch-1",
                    "analyze-no-such-dir", "pretrained-legacy-torch-file", "sweep-ray-address-not-answering"}


def _params(cases):
    return [pytest.param(c, id=c.id, marks=c.marks) for c in cases]


# --- helpers ----------------------------------------------------------------------------------------


def _age(root: Path) -> None:
    """Set every mtime under ``root`` (``root`` too) to PAST_NS, so any later write shows."""
    for path in [*Path(root).rglob("*"), Path(root)]:
        os.utime(path, ns=(PAST_NS, PAST_NS), follow_symlinks=False)


def listing(root: Path, dir_mtimes: bool = True) -> dict:
    """Every path under ``root`` (relative) -> (kind, size, mtime) of files, (kind, mtime) of dirs."""
    root = Path(root)
    entries = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        rel = path.relative_to(root).as_posix()
        if path.is_dir() and not path.is_symlink():
            entries[rel] = ("dir", st.st_mtime_ns if dir_mtimes else None)
        else:
            entries[rel] = ("file", st.st_size, st.st_mtime_ns)
    return entries


def _populate(out: Path) -> None:
    """An out dir with something in it, so that "unchanged" means something."""
    (out / "old-run-0123abcd").mkdir(parents=True)
    (out / "old-run-0123abcd" / "result.json").write_text('{"final": {}}\n')
    (out / "old-run-0123abcd" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (out / ".teacher-cache").mkdir()
    (out / "notes.txt").write_text("keep me\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished tiny run and an unfinished one (config.yaml, checkpoint, no result.json)."""
    root = tmp_path_factory.mktemp("bad-input-runs")
    quiet = {"progress": False, "log": lambda *a: None}
    tiny = {"out_dir": str(root), "data": {"name": "digits", "val_size": 200, "augment": "none"},
            "model": {"name": "mlp-16"}, "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05}}
    finished = train(build_config({**tiny, "name": "finished"}), **quiet)["run_dir"]
    unfinished_cfg = build_config({**tiny, "name": "unfinished", "optim": {**tiny["optim"], "epochs": 2}})
    assert train(unfinished_cfg, stop_after_epoch=1, **quiet) is None
    unfinished = unfinished_cfg.run_dir()
    assert (unfinished / "config.yaml").is_file() and not (unfinished / "result.json").exists()
    _age(root)
    _FIXTURE_RUNS[:] = [str(finished)]
    return {"runs": str(root), "finished": str(finished), "unfinished": str(unfinished)}


@dataclass
class Prepared:
    argv: list[str]
    out: Path
    absent: list[Path]
    before_tmp: dict
    before_out: dict | None
    before_runs: dict


def _prepare(case: Case, tmp: Path, runs: dict) -> Prepared:
    if case.out == "populated":
        out = tmp / "out"
        _populate(out)
    else:
        out = tmp / "missing" / "out"
    names = {"tmp": str(tmp), "out": str(out), **runs}
    if case.setup:
        names.update(case.setup(tmp))
    argv = [a.format(**names) for a in case.argv]
    absent = [Path(a.format(**names)) for a in case.absent]
    _age(tmp)
    return Prepared(argv, out, absent, listing(tmp, case.dir_mtimes),
                    listing(out, case.dir_mtimes) if out.exists() else None, listing(Path(runs["runs"])))


def _check(case: Case, prepared: Prepared, tmp: Path, runs: dict, code, out: str, err: str, seconds: float) -> None:
    shown = f"exit {code}\nstderr: {err[-1500:]!r}\nstdout tail: {out[-500:]!r}"
    assert code == 2, shown
    assert "Traceback" not in err and "Traceback" not in out, shown
    assert err.startswith("kdlab: error:"), shown
    assert err.endswith("\n") and err.count("\n") == 1 and "\r" not in err, f"not one line: {shown}"
    for fragment in case.fragments:
        assert fragment in err, f"{fragment!r} not in the error: {shown}"
    for fragment in case.forbidden:
        assert fragment not in err, f"{fragment!r} in the error: {shown}"
    if prepared.before_out is not None:
        assert listing(prepared.out, case.dir_mtimes) == prepared.before_out, f"out dir changed: {shown}"
    else:
        assert not prepared.out.exists() and not prepared.out.parent.exists(), f"out_dir created: {shown}"
    for path in prepared.absent:
        assert not path.exists(), f"{path} exists: {shown}"
    assert listing(tmp, case.dir_mtimes) == prepared.before_tmp, f"files changed under {tmp}: {shown}"
    assert listing(Path(runs["runs"])) == prepared.before_runs, f"the fixture runs changed: {shown}"
    if case.max_seconds is not None:
        assert seconds < case.max_seconds, f"took {seconds:.1f} s (refused too slowly): {shown}"


def _restore_permissions(tmp: Path) -> None:
    for path in [tmp, *tmp.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)


# --- the tests --------------------------------------------------------------------------------------


def test_matrix_is_large_and_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) >= 50 and len(set(ids)) == len(ids)
    assert SUBPROCESS_CASES <= set(ids)


@pytest.mark.parametrize("case", _params(CASES))
def test_bad_input_in_process(case, tmp_path, runs, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative defaults (runs/...) land here, where they are seen
    try:
        prepared = _prepare(case, tmp_path, runs)
        capsys.readouterr()
        started = time.perf_counter()
        crash = ""
        try:
            code = main(prepared.argv)
        except SystemExit as exit:  # argparse
            code = exit.code
        except Exception:  # what `python -m kdlab` would do: a traceback and exit 1
            code, crash = 1, traceback.format_exc()
        seconds = time.perf_counter() - started
        captured = capsys.readouterr()
        _check(case, prepared, tmp_path, runs, code, captured.out, captured.err + crash, seconds)
    finally:
        _restore_permissions(tmp_path)


@pytest.mark.parametrize("case", _params([c for c in CASES if c.id in SUBPROCESS_CASES]))
def test_bad_input_subprocess(case, tmp_path, runs):
    try:
        prepared = _prepare(case, tmp_path, runs)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "kdlab", *prepared.argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - started
        _check(case, prepared, tmp_path, runs, proc.returncode, proc.stdout, proc.stderr, seconds)
    finally:
        _restore_permissions(tmp_path)
