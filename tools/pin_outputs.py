#!/usr/bin/env python3
"""Pin kdlab's outputs: run the same tiny training scenarios on two trees and compare
every file they write, byte for byte after normalisation.

    .venv/bin/python tools/pin_outputs.py [--base REV] [--head REV|WORKTREE|DIR]
                                          [--keep DIR] [--only SCENARIO,...] [--list]
                                          [--jobs N] [--json PATH] [--added-keys PATTERN,...]

A refactor keeps behaviour: run this after every refactor step. ``--base`` (default
HEAD) is checked out with ``git worktree add --detach`` into a temporary directory;
``--head`` is by default the current working tree, uncommitted edits included. Each
side runs every scenario in a fresh subprocess of this Python with PYTHONPATH=<that
tree> (checked: the kdlab imported must be that tree's), OMP_NUM_THREADS=1,
CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED=0 and its own KDLAB_CACHE; every config has
``threads: 1`` and ``tensorboard: false``. The scenarios' inputs (an image folder, a
parallel-text corpus, CIFAR pickles) are generated once and read by both sides, and
every path in a config is relative to the side's working directory, so config.yaml,
run hashes and run-dir names are the same on both sides.

Every file under each scenario's directory (run dirs, teacher caches and stores,
translations, snapshots of a stopped run) and each side's KDLAB_CACHE is compared:

  *.pt / *.pth       torch.load(weights_only=True): same structure, every tensor of the
                     same dtype and shape and equal (torch.equal, or bit for bit where
                     NaNs are), every other value equal; key ``elapsed`` dropped (below)
  *.npz / *.npy      same keys; per array same dtype, shape and np.array_equal (NaN = NaN)
  *.json, .lock      JSON with the keys of DROPPED_KEYS removed, at any depth
  *.jsonl            the same, line by line
  *.model            sentencepiece ModelProto without trainer_spec.model_prefix (below)
  anything else      bytes (text with the sides' root paths replaced by placeholders)

``--added-keys`` lets the head side add keys the base lacks (new metrics, say) without
counting as a difference, and lists every added key it met. A file on one side only is a difference; so is a scenario that failed on a side (its
last lines are shown). Exit status 0 when everything is identical, 1 otherwise, 2 on a
usage error. The table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

TOOL = Path(__file__).resolve()

# Keys dropped from JSON files (result.json, meta.json, metrics.jsonl, store.json, .lock)
# before comparing, at any depth, and why: they are timings or identify the process,
# host or commit, so they differ between two runs of the same code.
DROPPED_KEYS = {
    "epoch_time_s": "wall time of an epoch (metrics.jsonl)",
    "images_per_s": "speed, from wall time (metrics.jsonl, result.json)",
    "tokens_per_s": "speed, from wall time (translation metrics.jsonl, result.json)",
    "train_time_s": "sum of the epochs' wall times (result.json)",
    "decode_s": "wall time of a decoding pass (translation result.json bleu.*)",
    "sentences_per_s": "decoding speed (translation result.json bleu.*)",
    "started_at": "wall-clock start time (meta.json and each meta.json starts[] entry)",
    "pid": "process id (meta.json, .lock)",
    "git_commit": "the commit of the tree: differs between the sides by design (meta.json)",
    "host": "host name (.lock)",
    "since": "wall-clock time the run lock was taken (.lock)",
}
# Keys dropped from the non-tensor values of .pt files: a mid-epoch checkpoint's
# partial.elapsed is the wall time the epoch had run when it was saved.
DROPPED_PT_KEYS = {"elapsed": "wall time of the epoch so far (mid-epoch checkpoint.pt partial.elapsed)"}

# --added-keys: names (fnmatch patterns) that the head side may have and the base side not,
# in JSON/JSONL objects and torch-saved dicts, at any depth — a change that adds outputs
# (new metrics keys) while every existing one stays as it was. Every such key that was
# seen is listed in the summary, so an allowed addition is never silent.
ADDED_ALLOWED: list[str] = []
ADDED_SEEN: set[str] = set()


def _added(key) -> bool:
    """Whether ``key`` (present on the head side only) is an allowed addition; noted if so."""
    import fnmatch

    if any(fnmatch.fnmatchcase(str(key), pattern) for pattern in ADDED_ALLOWED):
        ADDED_SEEN.add(str(key))
        return True
    return False

# sentencepiece models (.model: a ModelProto) record the path they were trained to,
# trainer_spec.model_prefix = KDLAB_CACHE/tokenizers/.spm-KEY.PID (the side's cache and the pid)
DROPPED_SPM_FIELDS = {"trainer_spec.model_prefix": "the temporary path of the training (side's KDLAB_CACHE and "
                      "pid) that sentencepiece stores in the model (.model in KDLAB_CACHE and tokenizer.model)"}

JSON_SUFFIXES = (".json", ".lock")
TEXT_SUFFIXES = (".yaml", ".yml", ".txt", ".tsv", ".csv", ".vocab", ".md", ".en", ".de", ".log")


# ---------------------------------------------------------------------------------------
# Scenarios. They run inside a side's subprocess (cwd = the side's work dir, PYTHONPATH =
# the side's tree) through kdlab's public API (kdlab.config.build_config, kdlab.train.train)
# or the `kdlab` command. Each writes under its own directory, named after the scenario.
# ---------------------------------------------------------------------------------------

def merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, recursively for nested mappings (neither is modified)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


COMMON = {"threads": 1, "tensorboard": False}
DIGITS = merge(COMMON, {
    "data": {"name": "digits", "val_size": 200, "augment": "shift2"},
    "model": {"name": "mlp-32"}, "eval_batch_size": 150,  # (several eval batches per split)
    "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05, "milestones": [1]}})
TEACHER = {"name": "teacher", "model": {"name": "mlp-128"}, "optim": {"epochs": 3, "milestones": [2]}}
MI = {"every_steps": 5, "classes": [0, 1], "per_class": 20, "views": 3}
INF = float("inf")


class Ctx:
    """What a scenario sees: its directory (relative to the side's work dir, the cwd), the
    shared inputs (relative), helpers to build configs and train quietly."""

    def __init__(self, name: str, inputs: str):
        self.name, self.inputs = name, inputs
        self.dir = Path(name)
        self.calls = []

    def input(self, kind: str) -> str:
        return os.path.join(self.inputs, kind)

    def config(self, *layers: dict, out: str = "runs"):
        from kdlab.config import build_config

        data = {}
        for layer in layers:
            data = merge(data, layer)
        data.setdefault("out_dir", str(self.dir / out))
        return build_config(data)

    def train(self, cfg, label: str, **kwargs):
        """train() quietly; what it returned (None = stopped) is recorded in calls.json."""
        from kdlab.train import train

        result = train(cfg, progress=False, log=lambda *a, **k: None, **kwargs)
        self.calls.append({"call": label, "stop": {k: v for k, v in kwargs.items()},
                           "returned": None if result is None else "result", "run_dir": str(cfg.run_dir())})
        (self.dir / "calls.json").write_text(json.dumps(self.calls, indent=1) + "\n")
        return result

    def teacher(self, scenario: str = "01-teacher", prefix: str = "teacher") -> str:
        """The finished run dir ``prefix-HASH`` of another scenario (relative path)."""
        found = sorted(p for p in Path(scenario, "runs").glob(f"{prefix}-*") if (p / "result.json").is_file())
        if len(found) != 1:
            raise RuntimeError(f"expected one finished {prefix}-* run in {scenario}/runs, found {len(found)}")
        return str(found[0])

    def snapshot(self, run_dir: Path, label: str, names=("checkpoint.pt", "metrics.jsonl")) -> None:
        """Copy a stopped run's files aside before it resumes (they are compared too)."""
        target = self.dir / f"snapshot-{label}"
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            if (run_dir / name).exists():
                shutil.copyfile(run_dir / name, target / name)

    def write_yaml(self, data: dict, name: str = "config-in.yaml") -> str:
        import yaml

        path = self.dir / name
        path.write_text(yaml.safe_dump(data, sort_keys=True))
        return str(path)


def _teacher_cli_config(c: Ctx, out: str) -> dict:
    return merge(merge(DIGITS, TEACHER), {"out_dir": str(c.dir / out)})


def s01_teacher(c: Ctx):
    path = c.write_yaml(_teacher_cli_config(c, "runs"))
    subprocess.run([sys.executable, "-m", "kdlab", "train", path, "--no-progress"], check=True)


def s02_kl_tau4(c: Ctx):
    c.train(c.config(DIGITS, {"name": "student", "loss": {"alpha": 0.7, "tau": 4.0},
                              "teacher": {"runs": [c.teacher()]}}), "student")


def s03_cache_lazy(c: Ctx):
    for seed in (0, 1):  # the second run reads (and extends) the first's saved table
        c.train(c.config(DIGITS, {"name": "student", "seed": seed, "loss": {"alpha": 1.0, "tau": INF},
                                  "teacher": {"runs": [c.teacher()], "cache": {"mode": "lazy"}}}), f"seed{seed}")


def s04_cache_full(c: Ctx):
    c.train(c.config(DIGITS, {"name": "student", "loss": {"alpha": 1.0, "tau": INF},
                              "teacher": {"runs": [c.teacher()], "cache": {"mode": "full"}}}), "full")
    # a table over max_gb: refused by the cache, the teacher runs online instead
    c.train(c.config(DIGITS, {"name": "fallback", "loss": {"alpha": 1.0, "tau": INF},
                              "teacher": {"runs": [c.teacher()], "cache": {"mode": "full", "max_gb": 1e-6}}}),
            "fallback")


def s05_mse_ls_noise(c: Ctx):
    c.train(c.config(DIGITS, {"name": "student", "data": {"label_noise": 0.2},
                              "loss": {"alpha": 0.5, "kd": "mse", "mse_reduction": "mean", "smoothing": 0.1,
                                       "smoothing_mode": "others"},
                              "optim": {"schedule": "constant"}, "teacher": {"runs": [c.teacher()]}}), "student")


def s06_ema_accum_adam(c: Ctx):
    c.train(c.config(DIGITS, {"name": "ema", "eval_every": 2,
                              "optim": {"optimizer": "adam", "lr": 0.005, "accumulate": 2, "warmup_epochs": 1,
                                        "grad_clip": 1.0, "ema_decay": 0.9, "epochs": 3, "schedule": "cosine"}}),
            "ema")


def s07_mi_probe(c: Ctx):
    c.train(c.config(DIGITS, {"name": "mi", "mutual_information": MI}), "mi")


def s08_resume(c: Ctx):
    # within an epoch: KD + EMA + warm-up + MI probe, stopped at the first checkpoint at or after step 7
    cfg = c.config(DIGITS, {"name": "midepoch", "loss": {"alpha": 0.7, "tau": 4.0}, "teacher": {"runs": [c.teacher()]},
                            "optim": {"ema_decay": 0.9, "warmup_epochs": 1}, "mutual_information": MI,
                            "checkpoint_every_steps": 5})
    c.train(cfg, "midepoch-stop", stop_after_step=7)
    c.snapshot(cfg.run_dir(), "midepoch")
    c.train(cfg, "midepoch-resume")
    # at an epoch's end: gradient accumulation + a lazy teacher cache (saved at the stop)
    cfg = c.config(DIGITS, {"name": "epochstop", "loss": {"alpha": 1.0, "tau": INF},
                            "teacher": {"runs": [c.teacher()], "cache": {"mode": "lazy"}},
                            "optim": {"accumulate": 2, "epochs": 3, "milestones": [2]}})
    c.train(cfg, "epochstop-stop", stop_after_epoch=1)
    c.snapshot(cfg.run_dir(), "epochstop")
    c.train(cfg, "epochstop-resume")
    c.train(cfg, "finished-again")  # a finished run is found and returned


def s09_ensemble(c: Ctx):
    c.train(c.config(DIGITS, {"name": "teacher2", "seed": 1, "model": {"name": "mlp-64"},
                              "data": {"augment": "none"}}), "teacher2")
    c.train(c.config(DIGITS, {"name": "student", "loss": {"alpha": 0.9, "tau": 2.0, "kl_scaling": "max"},
                              "teacher": {"runs": [c.teacher(), c.teacher(c.name, "teacher2")]}}), "student")


def _images(c: Ctx) -> dict:
    return merge(COMMON, {"data": {"name": "imagefolder", "root": c.input("imagefolder"), "image_size": 16,
                                   "val_size": 8, "loader_workers": 0, "on_bad_image": "skip"},
                          "model": {"name": "mlp-32"}, "eval_batch_size": 20,
                          "optim": {"epochs": 2, "batch_size": 8, "lr": 0.02, "schedule": "cosine"}})


def s10_imagefolder(c: Ctx):
    base = _images(c)
    c.train(c.config(base, {"name": "teacher", "model": {"name": "mlp-64"}}), "teacher")
    teacher = c.teacher(c.name)
    c.train(c.config(base, {"name": "store", "loss": {"alpha": 1.0, "tau": 4.0},
                            "teacher": {"runs": [teacher], "store": {"crops": 2}}}), "store")
    c.train(c.config(base, {"name": "online", "loss": {"alpha": 0.5, "tau": 4.0}, "teacher": {"runs": [teacher]}}),
            "online")
    c.train(c.config(base, {"name": "topk", "loss": {"alpha": 1.0, "tau": 2.0},
                            "teacher": {"runs": [teacher], "store": {"crops": 3, "top_k": 2, "seed": 1}}}), "topk")


def s11_translation(c: Ctx):
    base = merge(COMMON, {"data": {"name": "translation", "root": c.input("corpus"), "vocab_size": 40,
                                   "max_tokens": 160, "calibration_tokens": 120},
                          "model": {"name": "transformer-1-16-2"},
                          "optim": {"optimizer": "adam", "lr": 0.01, "schedule": "inverse_sqrt", "warmup_steps": 10,
                                    "epochs": 2, "weight_decay": 0.0},
                          "loss": {"smoothing": 0.1}, "decode": {"beam": 2}})
    c.train(c.config(base, {"name": "teacher"}), "teacher")
    c.train(c.config(base, {"name": "student", "model": {"name": "transformer-1-8-2"}, "optim": {"epochs": 1},
                            "loss": {"alpha": 1.0, "kd": "kl", "tau": INF},
                            "teacher": {"runs": [c.teacher(c.name)]}}), "student")


def s12_torchrun(c: Ctx):
    import socket

    path = c.write_yaml(_teacher_cli_config(c, "runs"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                    f"--master_port={port}", "-m", "kdlab", "train", path, "--no-progress"], check=True, timeout=300)
    # a KD student of that teacher under torchrun, checkpointed mid-epoch
    student = c.write_yaml(merge(DIGITS, {"out_dir": str(c.dir / "runs"), "name": "student",
                                          "loss": {"alpha": 0.7, "tau": 4.0}, "checkpoint_every_steps": 4,
                                          "teacher": {"runs": [c.teacher(c.name)]}}), "student.yaml")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                    f"--master_port={port}", "-m", "kdlab", "train", student, "--no-progress"], check=True, timeout=300)


def s13_bf16(c: Ctx):
    c.train(c.config(DIGITS, {"name": "bf16", "bf16": True, "loss": {"alpha": 0.5, "tau": 4.0},
                              "teacher": {"runs": [c.teacher()]}}), "bf16")


def s14_channels_last(c: Ctx):
    base = merge(COMMON, {"data": {"name": "cifar10", "root": c.input("cifar10"), "val_size": 10},
                          "model": {"name": "wrn-10-1"}, "channels_last": True, "eval_batch_size": 8,
                          "optim": {"epochs": 2, "batch_size": 16, "lr": 0.05, "milestones": [1],
                                    "decay_bn_bias": True}})
    c.train(c.config(base, {"name": "teacher"}), "teacher")
    c.train(c.config(base, {"name": "student", "seed": 1, "loss": {"alpha": 0.5, "tau": 4.0},
                            "teacher": {"runs": [c.teacher(c.name)]}}), "student")


def s15_mnist1d(c: Ctx):
    c.train(c.config(COMMON, {"name": "cnn1d", "data": {"name": "mnist1d", "num_samples": 600},
                              "model": {"name": "cnn1d-8"},
                              "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05, "milestones": [1]}}), "cnn1d")


@dataclass
class Scenario:
    name: str
    fn: object
    covers: str
    requires: tuple = ()
    inputs: tuple = ()
    modules: tuple = ()  # skipped (not a difference) when one is not importable here


SCENARIOS = [
    Scenario("01-teacher", s01_teacher, "CLI `kdlab train`; digits in memory, shift2 views from the generator; SGD "
             "(nesterov) + multistep; per-epoch eval; final eval_{train,val,test}.npz, model.pt, result.json"),
    Scenario("02-kl-tau4", s02_kl_tau4, "KL τ=4 (tau2 scaling), online teacher in the step; teacher val/test "
             "metrics (agreement, logit distance), teacher_logits in eval npz", ("01-teacher",)),
    Scenario("03-cache-lazy", s03_cache_lazy, "KL τ=∞ closed form; teacher cache lazy: filled as views are met, "
             "saved; a second run (seed 1) reads and extends the table", ("01-teacher",)),
    Scenario("04-cache-full", s04_cache_full, "teacher cache full (built before training); cache over max_gb -> "
             "MemoryError -> online teacher", ("01-teacher",)),
    Scenario("05-mse-ls-noise", s05_mse_ls_noise, "MSE (mean) KD, label smoothing (others), symmetric label noise "
             "(label_noise.npz), constant schedule", ("01-teacher",)),
    Scenario("06-ema-accum-adam", s06_ema_accum_adam, "Adam, optim.accumulate=2 (loss weighted by rows), warm-up "
             "epochs, grad_clip, EMA (ema_* metrics, model_ema.pt), eval_every=2 (epoch 1 not evaluated), cosine"),
    Scenario("07-mi-probe", s07_mi_probe, "mutual-information probe every 5 steps (MI lines in metrics.jsonl)"),
    Scenario("08-resume", s08_resume, "stop_after_step inside an epoch (checkpoint_every_steps; KD + EMA + "
             "warm-up + MI probe) and resume; stop_after_epoch with accumulate=2 + lazy cache and resume; a "
             "finished run found again; snapshots of the stopped checkpoints", ("01-teacher",)),
    Scenario("09-ensemble", s09_ensemble, "ensemble of two teachers (mean logits), KL τ=2 with max scaling",
             ("01-teacher",)),
    Scenario("10-imagefolder", s10_imagefolder, "streamed image folder (PNG/JPEG, RandomResizedCrop rows, 0 loader "
             "workers, one unreadable image skipped): teacher, student with a teacher store (2 crops, fp16), student "
             "with an online teacher, student with a top-2 store",
             inputs=("imagefolder",), modules=("PIL",)),
    Scenario("11-translation", s11_translation, "translation: token rows, Adam + inverse_sqrt, smoothing, "
             "sentencepiece in KDLAB_CACHE, token calibration arrays, greedy + beam-2 translations, BLEU; "
             "word-level KD student (τ=∞)", inputs=("corpus",), modules=("sentencepiece", "sacrebleu")),
    Scenario("12-torchrun", s12_torchrun, "2-process torchrun (gloo) of scenario 1's config through the CLI: "
             "sharded batches, DDP, all-reduced sums, gathered eval; a KD student of it under torchrun with "
             "mid-epoch checkpoints"),
    Scenario("13-bf16", s13_bf16, "bf16 autocast on the CPU (student and online teacher), losses in float32",
             ("01-teacher",)),
    Scenario("14-channels-last", s14_channels_last, "CIFAR pickles, crop_flip, wrn-10-1 (BatchNorm) in "
             "channels_last, decay_bn_bias; a channels_last teacher for a student", inputs=("cifar10",)),
    Scenario("15-mnist1d", s15_mnist1d, "MNIST-1D generated into KDLAB_CACHE, shift1d, cnn1d-8"),
]
BY_NAME = {s.name: s for s in SCENARIOS}


def _side_main(argv: list[str]) -> int:
    """``pin_outputs.py _side SCENARIO WORK INPUTS TREE``: run one scenario (a side's subprocess)."""
    name, work, inputs, tree = argv
    os.chdir(work)
    import kdlab

    where = Path(kdlab.__file__).resolve()
    if not where.is_relative_to(Path(tree).resolve()):
        print(f"kdlab was imported from {where}, not from the side's tree {tree}", file=sys.stderr)
        return 3
    scenario = BY_NAME[name]
    Path(name).mkdir(parents=True, exist_ok=True)
    try:
        scenario.fn(Ctx(name, inputs))
    except subprocess.CalledProcessError as err:
        print(f"{name}: {' '.join(map(str, err.cmd[:6]))} ... exited {err.returncode}", file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


# ---------------------------------------------------------------------------------------
# Inputs, generated once per comparison by this process and read by both sides.
# (The same ideas as tests/conftest.py and tests/test_translation_run.py.)
# ---------------------------------------------------------------------------------------

TESTS = Path(__file__).resolve().parents[1] / "tests"


def write_image_folder(root: Path) -> None:
    """The tests' tiny image folder (tests/conftest.py), and one unreadable training image:
    runs on this folder set data.on_bad_image=skip."""
    sys.path.insert(0, str(TESTS))
    from conftest import write_image_folder as write

    write(root, train_per_class=10, val_per_class=3)
    (root / "train" / "class_01" / "train_9999.jpg").write_bytes(b"\xff\xd8\xff not a JPEG")


def write_corpus(root: Path) -> None:
    """The tests' numbers corpus (tests/test_translation_run.py), smaller."""
    sys.path.insert(0, str(TESTS))
    from test_translation_run import write_corpus as write

    write(root, sizes=(160, 20, 20))


def write_cifar10(root: Path) -> None:
    """The tests' CIFAR-10 pickles (tests/conftest.py)."""
    sys.path.insert(0, str(TESTS))
    from conftest import write_cifar

    write_cifar(root, 10)


INPUT_WRITERS = {"imagefolder": write_image_folder, "corpus": write_corpus, "cifar10": write_cifar10}


# ---------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------

class Normaliser:
    """Replaces each side's own absolute paths (its root, its tree) by placeholders."""

    def __init__(self, replacements: list[tuple[str, str]]):
        self.pairs = sorted(replacements, key=lambda p: -len(p[0]))  # longest first

    def text(self, s: str) -> str:
        for old, new in self.pairs:
            s = s.replace(old, new)
        return s

    def data(self, b: bytes) -> bytes:
        for old, new in self.pairs:
            b = b.replace(old.encode(), new.encode())
        return b


def _fmt(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_norm(value, norm: Normaliser):
    if isinstance(value, dict):
        return {k: _json_norm(v, norm) for k, v in value.items() if k not in DROPPED_KEYS}
    if isinstance(value, list):
        return [_json_norm(v, norm) for v in value]
    if isinstance(value, str):
        return norm.text(value)
    return value


def _same_scalar(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _diff_json(a, b, where: str) -> str | None:
    """The first difference between two parsed JSON values, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a and _added(key):
                continue
            if key not in a or key not in b:
                return f"{where}.{key}: only in {'head' if key not in a else 'base'}"
            found = _diff_json(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _diff_json(x, y, f"{where}[{i}]")
            if found:
                return found
        return None if len(a) == len(b) else f"{where}: {len(a)} vs {len(b)} items"
    if _same_scalar(a, b):
        return None
    return f"{where}: {_fmt(a)} vs {_fmt(b)}"


def _compare_json(pa: Path, pb: Path, na: Normaliser, nb: Normaliser, lines: bool) -> str | None:
    ta, tb = pa.read_text(errors="surrogateescape"), pb.read_text(errors="surrogateescape")
    if not lines:
        try:
            a, b = json.loads(ta), json.loads(tb)
        except ValueError:
            return _compare_text_bytes(ta.encode(errors="surrogateescape"), tb.encode(errors="surrogateescape"),
                                       na, nb)
        found = _diff_json(_json_norm(a, na), _json_norm(b, nb), "")
        return None if found is None else found.lstrip(".:").strip() or found
    la, lb = ta.split("\n"), tb.split("\n")
    for i, (x, y) in enumerate(zip(la, lb)):
        try:
            found = _diff_json(_json_norm(json.loads(x), na), _json_norm(json.loads(y), nb), "") if x or y else None
        except ValueError:
            found = None if na.text(x) == nb.text(y) else f": {_fmt(x)} vs {_fmt(y)}"
        if found:
            return f"line {i + 1}: {found.lstrip('.:').strip()}"
    return None if len(la) == len(lb) else f"{len(la) - 1} vs {len(lb) - 1} lines"


def _compare_text_bytes(a: bytes, b: bytes, na: Normaliser, nb: Normaliser) -> str | None:
    a, b = na.data(a), nb.data(b)
    if a == b:
        return None
    try:
        la, lb = a.decode().split("\n"), b.decode().split("\n")
    except UnicodeDecodeError:
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return f"bytes differ at offset {first} ({len(a)} vs {len(b)} bytes)"
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            return f"line {i + 1}: {_fmt(x)} vs {_fmt(y)}"
    return f"{len(la)} vs {len(lb)} lines"


def _array_diff(a, b, where: str) -> str | None:
    import numpy as np

    if a.dtype != b.dtype:
        return f"{where}: dtype {a.dtype} vs {b.dtype}"
    if a.shape != b.shape:
        return f"{where}: shape {a.shape} vs {b.shape}"
    if np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
        return None
    if a.dtype.kind in "fciub":
        delta = np.abs(a.astype(np.float64) - b.astype(np.float64))
        return f"{where}: {int((delta != 0).sum())} of {a.size} values differ, max |Δ| {np.nanmax(delta):.3g}"
    return f"{where}: values differ"


def _compare_npz(pa: Path, pb: Path) -> str | None:
    import numpy as np

    with np.load(pa, allow_pickle=False) as a, np.load(pb, allow_pickle=False) as b:
        if sorted(a.files) != sorted(b.files):
            return f"keys {sorted(a.files)} vs {sorted(b.files)}"
        for key in sorted(a.files):
            found = _array_diff(a[key], b[key], f"[{key!r}]")
            if found:
                return found
    return None


def _compare_npy(pa: Path, pb: Path) -> str | None:
    import numpy as np

    return _array_diff(np.load(pa, allow_pickle=False), np.load(pb, allow_pickle=False), "array")


def _tensor_diff(a, b, where: str) -> str | None:
    import torch

    if a.dtype != b.dtype:
        return f"{where}: dtype {a.dtype} vs {b.dtype}"
    if a.shape != b.shape:
        return f"{where}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if torch.equal(a, b):
        return None
    if a.numel() and a.element_size() and a.is_floating_point():  # NaNs in the same places, bit for bit
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(a.element_size())
        if bits is not None and torch.equal(a.contiguous().view(bits), b.contiguous().view(bits)):
            return None
    if a.is_floating_point() or a.is_complex():
        delta = (a.double() - b.double()).abs()
        return f"{where}: {int((delta != 0).sum())} of {a.numel()} values differ, max |Δ| {delta.max().item():.3g}"
    return f"{where}: {int((a != b).sum())} of {a.numel()} values differ"


def _diff_obj(a, b, where: str, na: Normaliser, nb: Normaliser) -> str | None:
    """The first difference between two torch.load()ed objects."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{where}: {type(a).__name__} vs {type(b).__name__}"
        return _tensor_diff(a, b, where)
    if isinstance(a, dict) and isinstance(b, dict):
        if type(a) is not type(b):
            return f"{where}: {type(a).__name__} vs {type(b).__name__}"
        ka = [k for k in a if k not in DROPPED_PT_KEYS]
        kb = [k for k in b if k not in DROPPED_PT_KEYS and (k in a or not _added(k))]
        if ka != kb:  # (state dicts are ordered: the order is part of the file)
            only = [k for k in ka if k not in b] or [k for k in kb if k not in a]
            return f"{where}: keys differ ({_fmt(only) if only else 'order'})"
        for key in ka:
            found = _diff_obj(a[key], b[key], f"{where}[{key!r}]", na, nb)
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b):
            return f"{where}: {type(a).__name__} vs {type(b).__name__}"
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _diff_obj(x, y, f"{where}[{i}]", na, nb)
            if found:
                return found
        return None
    if isinstance(a, str) and isinstance(b, str):
        a, b = na.text(a), nb.text(b)
    if _same_scalar(a, b):
        return None
    return f"{where}: {_fmt(a)} vs {_fmt(b)}"


def _compare_pt(pa: Path, pb: Path, na: Normaliser, nb: Normaliser) -> str | None:
    import torch

    a = torch.load(pa, map_location="cpu", weights_only=True)
    b = torch.load(pb, map_location="cpu", weights_only=True)
    return _diff_obj(a, b, "", na, nb)


def _proto_fields(buf: bytes) -> list[tuple[int, int, bytes]]:
    """(field number, wire type, payload) of a serialised protobuf message; ValueError if it is not one."""
    def varint(i):
        value = shift = 0
        while True:
            if i >= len(buf) or shift > 63:
                raise ValueError("truncated varint")
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, i
            shift += 7

    fields, i = [], 0
    while i < len(buf):
        key, i = varint(i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            start = i
            _, i = varint(i)
            payload = buf[start:i]
        elif wire == 1:
            payload, i = buf[i:i + 8], i + 8
        elif wire == 2:
            size, i = varint(i)
            payload, i = buf[i:i + size], i + size
        elif wire == 5:
            payload, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        if number == 0 or i > len(buf):
            raise ValueError("not a protobuf message")
        fields.append((number, wire, payload))
    return fields


def _compare_spm(a: bytes, b: bytes) -> str | None:
    """Two sentencepiece ModelProtos, trainer_spec (field 2) without model_prefix (its field 2)."""
    def normal(buf):
        out = []
        for number, wire, payload in _proto_fields(buf):
            if number == 2 and wire == 2:  # trainer_spec
                payload = tuple(f for f in _proto_fields(payload) if f[0] != 2)
            out.append((number, wire, payload))
        return out

    fa, fb = normal(a), normal(b)
    names = {1: "pieces", 2: "trainer_spec", 3: "normalizer_spec", 4: "self_test_data", 5: "denormalizer_spec"}
    for k, (x, y) in enumerate(zip(fa, fb)):
        if x != y:
            return f"ModelProto entry {k} (field {x[0]}, {names.get(x[0], '?')}) differs"
    return None if len(fa) == len(fb) else f"{len(fa)} vs {len(fb)} ModelProto fields"


def compare_file(pa: Path, pb: Path, na: Normaliser, nb: Normaliser) -> str | None:
    """None when the two files are the same after normalisation, else the first difference."""
    name = pa.name
    try:
        if name.endswith((".pt", ".pth")):
            return _compare_pt(pa, pb, na, nb)
        if name.endswith(".npz"):
            return _compare_npz(pa, pb)
        if name.endswith(".npy"):
            return _compare_npy(pa, pb)
        if name.endswith(".jsonl"):
            return _compare_json(pa, pb, na, nb, lines=True)
        if name.endswith(JSON_SUFFIXES):
            return _compare_json(pa, pb, na, nb, lines=False)
        if name.endswith(TEXT_SUFFIXES):
            return _compare_text_bytes(pa.read_bytes(), pb.read_bytes(), na, nb)
        if name.endswith(".model"):
            a, b = pa.read_bytes(), pb.read_bytes()
            return None if a == b else _compare_spm(a, b)
    except Exception as err:  # unreadable on a side: fall back to the bytes
        raw = _compare_text_bytes(pa.read_bytes(), pb.read_bytes(), na, nb)
        return None if raw is None else f"({type(err).__name__} reading it: {str(err)[:80]}) {raw}"
    a, b = pa.read_bytes(), pb.read_bytes()
    if a == b:
        return None
    return _compare_text_bytes(a, b, na, nb)


def files_under(root: Path) -> set[str]:
    if not root.is_dir():
        return set()
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


# a name that ends in a run hash (8 hex digits: run dirs) or a content key (16: teacher caches
# and stores, sentencepiece models), before any suffixes
HASHED = re.compile(r"^(?P<stem>.+?)-(?P<key>[0-9a-f]{8}(?:[0-9a-f]{8})?)(?P<suffix>(?:\.[A-Za-z0-9_]+)*)$")


def _canonical(files: set[str]) -> dict[str, str]:
    """{path with hashes in names replaced by '#': real path}. A name is replaced only where
    no sibling has the same stem and suffix, so that runs whose hash changed still pair up."""
    children = {}
    for rel in files:
        parts = Path(rel).parts
        for i in range(len(parts)):
            children.setdefault(parts[:i], set()).add(parts[i])

    def canon(name: str) -> str | None:
        m = HASHED.match(name)
        return f"{m['stem']}-#{m['suffix']}" if m else None

    def name(parent: tuple, part: str) -> str:
        c = canon(part)
        if c is None or sum(canon(n) == c for n in children[parent]) != 1:
            return part
        return c

    return {str(Path(*[name(parts[:i], parts[i]) for i in range(len(parts))])): rel
            for rel in files for parts in [Path(rel).parts]}


def compare_trees(a: Path, b: Path, na: Normaliser, nb: Normaliser) -> tuple[int, list[tuple[str, str]]]:
    """(files compared, [(relative path, first difference)]) of two directories. Files pair
    up by path, hashes in names aside: a run dir whose hash changed is one difference (its
    name), and its files are compared all the same."""
    ca, cb = _canonical(files_under(a)), _canonical(files_under(b))
    diffs, renamed = [], set()
    for key in sorted(set(ca) | set(cb)):
        if key not in ca or key not in cb:
            diffs.append((ca.get(key) or cb[key], f"only in {'base' if key in ca else 'head'}"))
            continue
        ra, rb = ca[key], cb[key]
        if ra != rb:
            parts_a, parts_b = Path(ra).parts, Path(rb).parts
            i = next(i for i, (x, y) in enumerate(zip(parts_a, parts_b)) if x != y)  # the first renamed name
            prefix = str(Path(*parts_a[: i + 1]))
            if prefix not in renamed:
                renamed.add(prefix)
                diffs.append((prefix, f"name (hash/key) differs: head has {parts_b[i]}"))
        found = compare_file(a / ra, b / rb, na, nb)
        if found is not None:
            diffs.append((ra if ra == rb else f"{ra} ~ {rb}", found))
    return len(set(ca) | set(cb)), diffs


# ---------------------------------------------------------------------------------------
# Sides and the driver
# ---------------------------------------------------------------------------------------

def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@dataclass
class Side:
    label: str  # base / head
    spec: str  # what was asked for: a rev, WORKTREE or a directory
    root: Path  # <tmp>/<label>: work/, cache/, logs/ (and tree/ for a checkout)
    tree: Path = None
    worktree: bool = False  # a checkout this tool made (removed at the end)
    description: str = ""
    results: dict = field(default_factory=dict)  # scenario -> {"rc", "seconds", "tail"}

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def normaliser(self) -> Normaliser:
        # both sides get the same placeholders: only the prefixes differ
        pairs = [(str(self.root), "<SIDE-ROOT>"), (str(self.tree), "<TREE>")]
        pairs += [(os.path.realpath(old), new) for old, new in pairs if os.path.realpath(old) != old]
        return Normaliser(pairs)


def prepare_side(repo: Path, label: str, spec: str, root: Path) -> Side:
    side = Side(label, spec, root / label)
    side.root.mkdir(parents=True)
    for sub in ("work", "cache", "logs"):
        (side.root / sub).mkdir()
    if spec == "WORKTREE":
        side.tree = repo
        head = git(repo, "rev-parse", "--short", "HEAD")
        dirty = [line for line in git(repo, "status", "--porcelain").splitlines() if line.strip()]
        side.description = f"working tree {repo} (HEAD {head}" + (f", {len(dirty)} uncommitted change(s))"
                                                                  if dirty else ", clean)")
    elif Path(spec).is_dir() and (Path(spec) / "kdlab" / "__init__.py").is_file():
        side.tree = Path(spec).resolve()
        side.description = f"directory {side.tree}"
    else:
        commit = git(repo, "rev-parse", "--verify", f"{spec}^{{commit}}")
        side.tree = side.root / "tree"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "--quiet", str(side.tree), commit],
                       check=True, capture_output=True, text=True)
        side.worktree = True
        side.description = f"{spec} = {commit[:10]} (git worktree)"
    return side


def remove_side_tree(repo: Path, side: Side) -> None:
    if side.worktree and side.tree is not None:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(side.tree)],
                       capture_output=True, text=True)
        if side.tree.exists():
            shutil.rmtree(side.tree, ignore_errors=True)
            subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True, text=True)


def side_env(side: Side) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDLAB_")}  # (no fault injection, no cache)
    env.update(PYTHONPATH=str(side.tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               KDLAB_CACHE=str(side.cache), PYTHONHASHSEED="0", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    return env


def start_scenario(side: Side, scenario: Scenario, inputs: Path, python: str):
    log = open(side.root / "logs" / f"{scenario.name}.log", "wb")
    rel_inputs = os.path.relpath(inputs, side.work)
    proc = subprocess.Popen([python, str(TOOL), "_side", scenario.name, str(side.work), rel_inputs, str(side.tree)],
                            cwd=side.work, env=side_env(side), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # (its own process group: a timeout ends torchrun's too)
    RUNNING.add(proc)
    return proc, log, time.perf_counter()


RUNNING: set = set()  # side processes not yet waited for (their groups are ended on an interrupt)


def end_group(proc) -> None:
    """End a side process and what it started (its process group, made by start_new_session):
    SIGTERM first (torchrun's agent then ends its workers, which sit in sessions of their
    own), SIGKILL after 10 s."""
    def group_alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_alive():
                return
            time.sleep(0.1)
    proc.wait()


def finish_scenarios(runs: list, scenario: Scenario, timeout: float) -> None:
    """Wait for the sides' processes of a scenario [(side, (proc, log, started))]; record
    each one's exit status, seconds and last lines."""
    ended = {}
    while len(ended) < len(runs):
        for k, (side, (proc, log, started)) in enumerate(runs):
            if k in ended:
                continue
            rc = proc.poll()
            if rc is None and time.perf_counter() - started > timeout:
                end_group(proc)
                rc = f"timeout after {timeout:.0f} s"
            if rc is not None:
                ended[k] = (rc, time.perf_counter() - started)
        if len(ended) < len(runs):
            time.sleep(0.05)
    for k, (side, (proc, log, started)) in enumerate(runs):
        RUNNING.discard(proc)
        log.close()
        text = (side.root / "logs" / f"{scenario.name}.log").read_text(errors="replace")
        tail = [line for line in text.splitlines() if line.strip()][-8:]
        side.results[scenario.name] = {"rc": ended[k][0], "seconds": ended[k][1], "tail": tail}


def select(only: str | None) -> list[Scenario]:
    if not only:
        return list(SCENARIOS)
    wanted = set()
    for token in (t.strip() for t in only.split(",") if t.strip()):
        matches = [s.name for s in SCENARIOS if token in (s.name, s.name[:2], s.name[3:]) or
                   (token.isdigit() and s.name[:2] == f"{int(token):02d}")]
        if not matches:
            print(f"pin_outputs: unknown scenario {token!r} (see --list)", file=sys.stderr)
            raise SystemExit(2)
        wanted.update(matches)
    closure = set()

    def add(name):
        if name not in closure:
            closure.add(name)
            for dep in BY_NAME[name].requires:
                add(dep)

    for name in wanted:
        add(name)
    return [s for s in SCENARIOS if s.name in closure]


class Progress:
    """A tqdm bar on stderr when tqdm is there, else one line per step."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True, leave=False)
        except ImportError:
            self.bar = None
        self.done, self.total = 0, total

    def step(self, text: str, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_description_str(text)
            self.bar.update(n)
        else:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args) -> int:
    started = time.perf_counter()
    repo = Path(git(TOOL.parent, "rev-parse", "--show-toplevel"))
    scenarios = select(args.only)
    skipped = {}
    import importlib.util

    for s in scenarios:
        missing = [m for m in s.modules if importlib.util.find_spec(m) is None]
        if missing:
            skipped[s.name] = f"skipped: {', '.join(missing)} not installed"
    runnable = [s for s in scenarios if s.name not in skipped]

    if args.keep:
        root = Path(args.keep).resolve()
        if root.exists() and any(root.iterdir()):
            print(f"pin_outputs: --keep {root} exists and is not empty", file=sys.stderr)
            return 2
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="pin_outputs-"))
    sides = []
    try:
        for label, spec in (("base", args.base), ("head", args.head)):
            try:
                sides.append(prepare_side(repo, label, spec, root))
            except subprocess.CalledProcessError as err:
                lines = (err.stderr or "").strip().splitlines()
                print(f"pin_outputs: --{label} {spec}: {lines[-1] if lines else err}", file=sys.stderr)
                return 2
        print(f"base: {sides[0].description}\nhead: {sides[1].description}\nwork: {root}"
              + ("" if args.keep else " (removed at the end; --keep DIR keeps it)"), file=sys.stderr)
        inputs = root / "inputs"
        for kind in sorted({k for s in runnable for k in s.inputs}):
            INPUT_WRITERS[kind](inputs / kind)

        progress = Progress(2 * len(runnable) + len(runnable) + 1)
        for s in runnable:
            failed_deps = [d for d in s.requires if any(side.results.get(d, {}).get("rc") != 0 for side in sides)]
            if failed_deps:
                for side in sides:
                    side.results[s.name] = {"rc": "not run", "seconds": 0.0,
                                            "tail": [f"its requirement {', '.join(failed_deps)} failed"]}
                progress.step(f"{s.name}: not run", 2)
                continue
            if args.jobs >= 2:  # both sides at once
                finish_scenarios([(side, start_scenario(side, s, inputs, args.python)) for side in sides], s,
                                 args.timeout)
                progress.step(f"{s.name} (both sides)", 2)
            else:
                for side in sides:
                    finish_scenarios([(side, start_scenario(side, s, inputs, args.python))], s, args.timeout)
                    progress.step(f"{s.name} ({side.label})")

        rows = []
        na, nb = sides[0].normaliser(), sides[1].normaliser()
        for s in scenarios:
            row = {"scenario": s.name, "covers": s.covers, "files": 0, "status": "identical", "differences": [],
                   "seconds": {side.label: round(side.results.get(s.name, {}).get("seconds", 0.0), 2)
                               for side in sides}}
            if s.name in skipped:
                row.update(status="skipped", detail=skipped[s.name])
                rows.append(row)
                continue
            count, diffs = compare_trees(sides[0].work / s.name, sides[1].work / s.name, na, nb)
            row["files"] = count
            row["differences"] = [{"file": f, "first": d} for f, d in diffs]
            failures = {side.label: side.results[s.name] for side in sides if side.results[s.name]["rc"] != 0}
            if failures:
                row["status"] = "failed"
                row["failures"] = {label: {"rc": r["rc"], "last_lines": r["tail"]} for label, r in failures.items()}
                row["detail"] = "; ".join(f"{label} exit {r['rc']}: {r['tail'][-1] if r['tail'] else ''}"
                                          for label, r in failures.items())
            elif diffs:
                row["status"] = "differs"
                row["detail"] = f"{len(diffs)} file(s); first: {diffs[0][0]} {diffs[0][1]}"
            rows.append(row)
            progress.step(f"compared {s.name}")
        count, diffs = compare_trees(sides[0].cache, sides[1].cache, na, nb)
        rows.append({"scenario": "KDLAB_CACHE", "covers": "each side's cache (MNIST-1D arrays, sentencepiece models)",
                     "files": count, "status": "differs" if diffs else "identical",
                     "differences": [{"file": f, "first": d} for f, d in diffs],
                     "detail": f"{len(diffs)} file(s); first: {diffs[0][0]} {diffs[0][1]}" if diffs else "",
                     "seconds": {}})
        progress.step("compared KDLAB_CACHE")
        progress.close()
    finally:
        for proc in list(RUNNING):  # (an interrupt: nothing of ours keeps running)
            end_group(proc)
        for side in sides:
            remove_side_tree(repo, side)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    wall = time.perf_counter() - started
    ok = all(r["status"] in ("identical", "skipped") for r in rows)
    print_table(rows, sides)
    for r in rows:
        if r["status"] == "failed":
            for label, failure in r["failures"].items():
                print(f"\n{r['scenario']} failed on {label} (exit {failure['rc']}); last lines:")
                for line in failure["last_lines"]:
                    print(f"    {line}")
        if r["status"] in ("differs", "failed") and len(r["differences"]) > 1:
            print(f"\n{r['scenario']}: every differing file:")
            for d in r["differences"]:
                print(f"    {d['file']}: {d['first']}")
    if ADDED_SEEN:
        print(f"\nkeys added on the head side (allowed by --added-keys): {', '.join(sorted(ADDED_SEEN))}")
    print(f"\n{'IDENTICAL' if ok else 'DIFFERENT'}: {sum(r['status'] == 'identical' for r in rows)} identical, "
          f"{sum(r['status'] == 'differs' for r in rows)} differing, {sum(r['status'] == 'failed' for r in rows)} "
          f"failed, {sum(r['status'] == 'skipped' for r in rows)} skipped; wall time {wall:.1f} s"
          + (f"; outputs kept in {root}" if args.keep else ""))
    if args.json:
        summary = {"identical": ok, "wall_s": round(wall, 1), "base": sides[0].description,
                   "head": sides[1].description, "kept": str(root) if args.keep else None, "jobs": args.jobs,
                   "added_keys_allowed": ADDED_ALLOWED, "added_keys_seen": sorted(ADDED_SEEN),
                   "dropped_json_keys": DROPPED_KEYS, "dropped_pt_keys": DROPPED_PT_KEYS,
                   "dropped_sentencepiece_fields": DROPPED_SPM_FIELDS, "scenarios": rows}
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if ok else 1


def print_table(rows: list[dict], sides: list[Side]) -> None:
    width = max(len(r["scenario"]) for r in rows)
    print(f"\n{'scenario':{width}}  {'files':>5}  {'base s':>6}  {'head s':>6}  result")
    for r in rows:
        secs = [f"{r['seconds'][s.label]:6.1f}" if s.label in r["seconds"] else f"{'':6}" for s in sides]
        text = r["status"] + (f": {r['detail']}" if r.get("detail") else "")
        print(f"{r['scenario']:{width}}  {r['files']:5d}  {secs[0]}  {secs[1]}  {text}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_side"]:
        return _side_main(argv[1:])
    parser = argparse.ArgumentParser(prog="pin_outputs.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="git revision of the base side (default HEAD)")
    parser.add_argument("--head", default="WORKTREE", help="WORKTREE (default: the current working tree, "
                        "uncommitted changes included), a git revision, or a directory holding kdlab/")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR (new or empty) and keep the outputs there "
                        "(the git worktrees are removed all the same)")
    parser.add_argument("--only", metavar="SCENARIO,...", help="run only these scenarios (name, number or name "
                        "without its number) and what they need")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--jobs", type=int, default=1, choices=(1, 2), help="2: run the two sides of a scenario at "
                        "once (two single-threaded processes; torchrun: two workers each). Default 1")
    parser.add_argument("--json", metavar="PATH", help="write a JSON summary here")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a scenario may take on a side")
    parser.add_argument("--added-keys", metavar="PATTERN,...", help="keys the head side may add (fnmatch patterns, "
                        "e.g. 'train_ce,train_kd'), in JSON objects and torch-saved dicts; listed in the summary")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the sides (default: this one)")
    args = parser.parse_args(argv)
    ADDED_ALLOWED.extend(k for k in (args.added_keys or "").split(",") if k)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # (cleanup runs: worktrees removed, sides ended)
    if args.list:
        for s in SCENARIOS:
            extra = (f" [needs {', '.join(s.requires)}]" if s.requires else "") + \
                    (f" [skipped without {', '.join(s.modules)}]" if s.modules else "")
            print(f"{s.name:18s} {s.covers}{extra}")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
