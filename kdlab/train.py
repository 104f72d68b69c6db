"""The one training loop: teacher or student, CE / LS / KL / MSE, resumable.

``train(cfg)`` resolves everything that can fail on bad input (data, teachers, whether
the model fits the data, the memory the run will need, a writable out_dir) *before* it
creates the run dir, then trains with SGD, checkpointing atomically every epoch. The
run dir belongs to one process (an flock on ``.lock``): a second process on the same
config gets a one-line error naming the holder, or waits (sweeps). Starting the same
config again resumes from the last checkpoint, or returns the stored result when the
run has finished. Data order and augmentation come from one seeded ``torch.Generator``
whose state is checkpointed, and the torch thread count is recorded and kept on resume,
so a resumed run ends with exactly the metrics of an uninterrupted one.

Repairs on start: stale temporary files of killed writes are removed, a partial last
line of ``metrics.jsonl`` is dropped (with a warning), and a corrupt ``checkpoint.pt``
is moved aside to ``checkpoint.pt.corrupt`` with an error that says how to go on. A run
that fails before its first checkpoint leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import Config
from .data import Dataset, load_dataset
from .errors import ConfigError, RunError, warn
from .losses import distillation_loss, ensemble_logits
from .models import build_model, check_model, count_parameters
from .runs import (
    RunLock,
    atomic_save_npz,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    file_sha256,
    load_finished_model,
    load_weights,
    load_weights_model,
    parse_metrics,
    read_json,
    remove_stale_temporaries,
    run_meta,
    torch_load,
)
from .teacher_cache import TeacherCache, table_bytes
from .teacher_store import TeacherStore


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` -> a usable torch.device, or a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} asked for, but CUDA is not available to this torch "
                              f"({torch.__version__}); use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _autocast(enabled: bool, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_device_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@torch.inference_mode()
def predict_batches(model: nn.Module, data: Dataset, batches, *, features: bool = False, bf16: bool = False,
                    channels_last: bool = False):
    """Logits (float32, on the CPU) of ``model`` on raw batches (and penultimate features)."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    logits, feats = [], []
    for raw in batches:
        batch = _to_device_layout(data.prepare(raw.to(device)), channels_last)
        with _autocast(bf16, device.type):
            out = model(batch, return_features=True)
        logits.append(out[0].float().cpu())
        feats.append(out[1].float().cpu())
    model.train(was_training)
    logits = torch.cat(logits) if logits else torch.zeros(0)
    return (logits, torch.cat(feats)) if features else logits


def predict(model: nn.Module, data: Dataset, x: torch.Tensor, batch_size: int = 1000, **kwargs):
    """``predict_batches`` on raw inputs held in memory, ``batch_size`` at a time."""
    return predict_batches(model, data, (x[s : s + batch_size] for s in range(0, len(x), batch_size)), **kwargs)


def predict_split(model: nn.Module, data, split: str, batch_size: int = 1000, **kwargs):
    """``predict_batches`` on a split under its evaluation view (in memory or streamed)."""
    return predict_batches(model, data, data.eval_batches(split, batch_size, _model_device(model)), **kwargs)


def _metrics(prefix: str, logits: torch.Tensor, labels: torch.Tensor, teacher_logits=None) -> dict:
    out = {
        f"{prefix}_acc": (logits.argmax(1) == labels).float().mean().item(),
        f"{prefix}_nll": nn.functional.cross_entropy(logits, labels).item(),
        f"{prefix}_logit_sum": logits.sum(1).mean().item(),
    }
    if teacher_logits is not None:
        out[f"{prefix}_agreement"] = (logits.argmax(1) == teacher_logits.argmax(1)).float().mean().item()
        out[f"{prefix}_logit_distance"] = (logits - teacher_logits).norm(dim=1).mean().item()
    return out


def _param_groups(model: nn.Module, weight_decay: float, decay_bn_bias: bool):
    if decay_bn_bias:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _scheduler(optimizer, cfg):
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


class _Teachers:
    """Frozen teacher(s); several are an ensemble whose logits are averaged."""

    def __init__(self, teacher_cfg, data: Dataset, channels_last: bool = False,
                 device: torch.device = torch.device("cpu")):
        self.models = [load_finished_model(Path(r), data.num_classes, data.input_shape).to(device)
                       for r in teacher_cfg.runs]
        self.weight_files = []  # plain weights files: path and SHA-256, for meta.json
        for i, spec in enumerate(teacher_cfg.weights):
            model = load_weights_model(spec.model, Path(spec.path), data.num_classes, data.input_shape,
                                       f"teacher.weights.{i}")
            self.models.append(model.to(device))
            self.weight_files.append({"model": spec.model, "path": str(Path(spec.path).resolve()),
                                      "sha256": file_sha256(Path(spec.path))})
        if channels_last:  # the same layout as the student's batches: no conversion per step
            self.models = [m.to(memory_format=torch.channels_last) for m in self.models]
        self.device, self.channels_last = device, channels_last

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, bf16: bool) -> torch.Tensor:
        """Float32 logits on the teachers' device of a prepared batch (moved there if needed)."""
        x = x.to(self.device, non_blocking=True)
        with _autocast(bf16, self.device.type):
            return ensemble_logits([m(x) for m in self.models])

    def predict(self, data: Dataset, split: str, batch_size: int, channels_last: bool = False) -> torch.Tensor:
        return ensemble_logits([predict_split(m, data, split, batch_size, channels_last=channels_last)
                                for m in self.models])


class _MutualInformationProbe:
    """Müller §4: a fixed set of training examples of two classes, each under L fixed
    views; Y = z_a − z_b of the network being trained, in eval mode. Its own generator,
    so the training data order is the same with the probe on or off."""

    def __init__(self, cfg: Config, data: Dataset):
        mi = cfg.mutual_information
        generator = torch.Generator().manual_seed(mi.seed)
        chosen = []
        for cls in mi.classes:
            if not 0 <= cls < data.num_classes:
                raise ConfigError(f"mutual_information.classes: class {cls} is not in 0..{data.num_classes - 1}")
            idx = torch.nonzero(data.train_y == cls).flatten()
            chosen.append(idx[torch.randperm(len(idx), generator=generator)[: mi.per_class]])
        self.index = torch.cat(chosen)
        self.views = data.augmentation.sample(len(self.index) * mi.views, generator).view(len(self.index), mi.views)
        self.classes, self.data, self.cfg = mi.classes, data, cfg
        self.inputs = self.data.train_x[self.index].repeat_interleave(mi.views, dim=0)

    def __call__(self, model: nn.Module) -> float:
        from .analysis.mutual_information import mutual_information

        x = self.data.augmentation.apply(self.inputs, self.views.flatten())
        logits = predict(model, self.data, x, self.cfg.eval_batch_size, bf16=self.cfg.bf16,
                         channels_last=self.cfg.channels_last)
        values = (logits[:, self.classes[0]] - logits[:, self.classes[1]]).view(len(self.index), -1)
        return mutual_information(values.double().numpy())


STREAMED_TRAIN_EVAL_MAX = 100_000  # streamed data: eval_train.npz only up to this many images


def physical_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory(cfg: Config, data: Dataset, num_params: int) -> dict[str, int]:
    """Bytes of the allocations that grow with the config, before any is made."""
    items = {"model (weights, gradients, momentum, checkpoint copy)": 16 * num_params}
    mi = cfg.mutual_information
    if mi.every_steps:
        examples = sum(min(mi.per_class, int((data.train_y == c).sum())) for c in mi.classes)
        per_input = math.prod(data.input_shape) * (data.train_x.element_size() + 4)
        items["mutual-information probe (inputs × views, pairwise densities)"] = (
            examples * mi.views * (per_input + 8 * data.num_classes) + 24 * examples**2)
    if cfg.teacher is not None and cfg.loss.alpha > 0 and cfg.teacher.cache.mode != "off":
        size = table_bytes(len(data.train_y), data.augmentation.num_views, data.num_classes, cfg.teacher.cache.dtype)
        if size <= cfg.teacher.cache.max_gb * 1e9:  # larger: refused by the cache itself (online teacher)
            items["teacher cache"] = size
    return items


def check_memory(cfg: Config, data: Dataset, num_params: int, device: torch.device) -> None:
    """Refuse, with the numbers, a run whose estimated allocations exceed the limit."""
    total = physical_memory_bytes(device)
    limit = cfg.memory_limit_gb * 1e9 if cfg.memory_limit_gb else (0.9 * total if total else None)
    if limit is None:
        return
    items = estimate_memory(cfg, data, num_params)
    need = sum(items.values())
    if need > limit:
        biggest = max(items, key=items.get)
        raise ConfigError(f"the run would need ~{need / 1e9:,.3g} GB ({biggest}: {items[biggest] / 1e9:,.3g} GB) but the "
                          f"limit is {limit / 1e9:,.3g} GB (memory_limit_gb; default 90% of {device.type} memory)")


def _remove_created(run_dir: Path, created: Path | None) -> None:
    """Remove ``run_dir`` and the parents this call created, if empty (a sweep's out_dir
    may hold other runs by now: never more than that)."""
    if created is None:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent != created.parent and parent.is_dir():
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (what mkdir(parents) creates)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _check_teacher_source(cfg: Config, data) -> None:
    """What the data kind allows: finite views (in memory) take the exact teacher cache and
    the MI probe; streamed crops take the teacher store (top-k: KL at a finite τ only)."""
    if data.streamed:
        if cfg.mutual_information.every_steps:
            raise ConfigError("mutual_information.every_steps: the MI probe needs in-memory data with finite views; "
                              f"{cfg.data.name} is streamed from disk")
        if cfg.teacher is not None and cfg.loss.alpha > 0 and cfg.teacher.cache.mode != "off":
            raise ConfigError(f"teacher.cache.mode={cfg.teacher.cache.mode}: the exact (sample, view) table needs "
                              f"finite views; {cfg.data.name}'s random resized crops are unbounded: use "
                              "teacher.store.crops=M (stored crops) or the online teacher (mode=off)")
        store_cfg = cfg.teacher.store if cfg.teacher is not None else None
        if store_cfg is not None and store_cfg.crops and store_cfg.top_k is not None:
            if cfg.loss.kd != "kl" or math.isinf(cfg.loss.tau):
                raise ConfigError("teacher.store.top_k: a top-k store holds probabilities at the loss's τ: it serves "
                                  "KL at a finite τ only (use the full store for τ=inf or MSE)")
            if store_cfg.top_k >= data.num_classes:
                raise ConfigError(f"teacher.store.top_k={store_cfg.top_k} must be below the {data.num_classes} classes")
    elif cfg.teacher is not None and cfg.teacher.store.crops:
        raise ConfigError("teacher.store.crops: the crop store is for streamed data (data.name=imagefolder); "
                          "in-memory data has the exact teacher cache (teacher.cache.mode=lazy|full)")


def train(cfg: Config, *, progress: bool = True, stop_after_epoch: int | None = None,
          log=print, wait_for_lock: bool = False) -> dict | None:
    """Train the run ``cfg`` describes; return its result dict.

    ``stop_after_epoch`` ends the call after that many epochs in total, as a kill would
    (checkpoint written, no result): the next call resumes. It returns None then.
    ``wait_for_lock``: when another process trains this run, wait for it (and then
    return its result) instead of failing.
    """
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data)
    teachers = _Teachers(cfg.teacher, data, cfg.channels_last, device) if cfg.teacher else None
    try:
        num_params = check_model(cfg.model.name, data.num_classes, data.input_shape)
    except ValueError as err:
        raise ConfigError(f"config key 'model.name': {err} (data {cfg.data.name} gives inputs of shape "
                          f"{tuple(data.input_shape)})") from None
    if cfg.model.pretrained_path:  # every key and shape checked now, before the run dir exists
        with torch.device("meta"):
            shapes = build_model(cfg.model.name, data.num_classes, input_shape=data.input_shape)
        load_weights(shapes, Path(cfg.model.pretrained_path), "model.pretrained_path", assign=True)
    _check_teacher_source(cfg, data)
    check_memory(cfg, data, num_params, device)
    probe = _MutualInformationProbe(cfg, data) if cfg.mutual_information.every_steps else None

    run_dir = cfg.run_dir()
    if (run_dir / "result.json").is_file():
        log(f"{run_dir}: finished already, nothing to do")
        return read_json(run_dir / "result.json")
    check_writable_dir(cfg.out_dir, "out_dir")
    if cfg.teacher is not None:
        for key, where in (("teacher.cache.dir", cfg.teacher.cache.dir), ("teacher.store.dir", cfg.teacher.store.dir)):
            if where:
                check_writable_dir(where, key)
    created = _first_missing(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    try:
        lock.acquire(wait=wait_for_lock, log=log)
    except BaseException:
        if RunLock.busy(run_dir) is None:
            _remove_created(run_dir, created)
        raise
    if created is not None and any(p.name != ".lock" for p in run_dir.iterdir()):
        created = None  # another process filled it while we waited: not ours to remove
    threads_before = torch.get_num_threads()
    try:
        if (run_dir / "result.json").is_file():  # finished by the process we waited for
            log(f"{run_dir}: finished already, nothing to do")
            return read_json(run_dir / "result.json")
        return _train_locked(cfg, run_dir, device, data, teachers, probe, progress, stop_after_epoch, log)
    except BaseException:
        # nothing to resume from: leave nothing behind (what this call created)
        if not (run_dir / "checkpoint.pt").exists() and not (run_dir / "result.json").exists():
            _remove_created(run_dir, created)
        raise
    finally:
        lock.release()
        torch.set_num_threads(threads_before)
        if data.streamed:
            data.close()  # the loader's worker processes


def _load_checkpoint(path: Path) -> dict:
    """The checkpoint, or (corrupt) moved aside to ``checkpoint.pt.corrupt`` and a RunError.
    A read error (EIO, permissions) is not corruption: the file stays where it is."""
    try:
        path.read_bytes()[:1]
    except OSError as err:
        raise RunError(f"{path}: cannot be read ({err.strerror}); it is left in place: fix the cause and run "
                       "the same command again to resume") from None
    try:
        state = torch_load(path)
        if not isinstance(state, dict) or not {"epoch", "model", "optimizer", "generator"} <= set(state):
            raise RunError(f"{path}: not a kdlab checkpoint")
        return state
    except RunError as err:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        raise RunError(f"{err}; moved it to {aside.name}: run the same command again to restart this run from "
                       "epoch 0 (or put a good checkpoint back as checkpoint.pt to resume)") from None


def _restore(state: dict, path: Path, model, optimizer, scheduler, generator, device) -> None:
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        raise RunError(f"{path}: does not fit this run ({str(err).splitlines()[0][:120]}); moved it to {aside.name}: "
                       "run the same command again to restart this run from epoch 0") from None
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _threads_for_resume(cfg: Config, recorded: int | None, log) -> None:
    """Keep the thread count the run was trained with (results depend on it), unless the
    config sets one; say so in one line when it differs from this process's."""
    current = torch.get_num_threads()
    if recorded is None or recorded == current:
        return
    if cfg.threads is not None:
        warn(f"resuming with threads={cfg.threads} as set, but epochs so far ran with {recorded}: the result "
             "will differ (at rounding level) from an uninterrupted run")
        return
    torch.set_num_threads(recorded)
    log(f"resuming with {recorded} torch threads as recorded in the checkpoint (this process had {current}; "
        "set threads=N to override)")


def _write_meta(run_dir: Path, device: torch.device, start_epoch: int, **extra) -> None:
    """meta.json: this start's environment, and every start's (a resumed run's history)."""
    path = run_dir / "meta.json"
    previous = {}
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = {}
    start = {**run_meta(), "device": describe_device(device), "device_type": device.type, "pid": os.getpid(),
             "start_epoch": start_epoch, **extra}
    starts = [s for s in previous.get("starts", []) if isinstance(s, dict)]
    if extra and starts and starts[-1].get("pid") == start["pid"] and starts[-1].get("start_epoch") == start_epoch:
        starts.pop()  # this start's entry, completed
    starts.append(start)
    atomic_write_json(path, {**start, "starts": starts})


def _train_locked(cfg, run_dir, device, data, teachers, probe, progress, stop_after_epoch, log):
    on_cuda = device.type == "cuda"
    if on_cuda:  # (torch.manual_seed above seeds the CUDA generators too)
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    removed = remove_stale_temporaries(run_dir)
    if removed:
        warn(f"{run_dir}: removed {len(removed)} temporary file(s) of an interrupted write")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    checkpoint_path = run_dir / "checkpoint.pt"
    state = _load_checkpoint(checkpoint_path) if checkpoint_path.exists() else None
    if state is not None:
        _threads_for_resume(cfg, state.get("torch_threads"), log)
    if not (run_dir / "config.yaml").exists():
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    start_epoch = state["epoch"] if state is not None else 0
    _write_meta(run_dir, device, start_epoch)
    log(f"{run_dir}: training on {describe_device(device)}")
    if len(data.noisy_indices):
        atomic_save_npz(run_dir / "label_noise.npz", flipped_indices=data.noisy_indices,
                        clean_labels=data.clean_train_y.numpy(), noisy_labels=data.train_y.numpy())

    model = build_model(cfg.model.name, data.num_classes, input_shape=data.input_shape)
    weight_files = list(teachers.weight_files) if teachers is not None else []
    if cfg.model.pretrained_path:
        digest = load_weights(model, Path(cfg.model.pretrained_path), "model.pretrained_path")
        weight_files.insert(0, {"model.pretrained_path": str(Path(cfg.model.pretrained_path).resolve()),
                                "sha256": digest})
    if weight_files:
        _write_meta(run_dir, device, start_epoch, weight_files=weight_files)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt_cfg, loss_cfg = cfg.optim, cfg.loss
    optimizer = torch.optim.SGD(
        _param_groups(model, opt_cfg.weight_decay, opt_cfg.decay_bn_bias),
        lr=opt_cfg.lr, momentum=opt_cfg.momentum, nesterov=opt_cfg.nesterov and opt_cfg.momentum > 0,
    )
    scheduler = _scheduler(optimizer, opt_cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    if state is not None:
        _restore(state, checkpoint_path, model, optimizer, scheduler, generator, device)
        log(f"{run_dir}: resuming after epoch {start_epoch}")
    metrics_path = run_dir / "metrics.jsonl"
    previous = []
    if metrics_path.exists():
        previous, partial = parse_metrics(metrics_path)
        if partial:
            warn(f"{metrics_path}: dropped a partial last line (an interrupted write)")
    atomic_write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in previous if m.get("epoch", 0) <= start_epoch))
    test_teacher = val_teacher = None
    if teachers is not None:
        val_teacher = teachers.predict(data, "val", cfg.eval_batch_size, cfg.channels_last)
        test_teacher = teachers.predict(data, "test", cfg.eval_batch_size, cfg.channels_last)
    use_teacher_in_step = teachers is not None and loss_cfg.alpha > 0
    cache = store = None
    if use_teacher_in_step and data.streamed and cfg.teacher.store.crops:
        store = TeacherStore(teachers, data, cfg.teacher.store, Path(cfg.out_dir) / ".teacher-store", log, cfg.bf16,
                             loss_cfg.tau)
        store.build(cfg.eval_batch_size, progress)
        cache = store  # looked up by (image, crop number): the same call as the exact table
    if use_teacher_in_step and cfg.teacher.cache.mode != "off" and not data.streamed:
        try:
            cache = TeacherCache(teachers, data, cfg.teacher.cache, Path(cfg.out_dir) / ".teacher-cache", log, cfg.bf16)
        except MemoryError as err:
            log(f"{err}: running the teacher online instead")
        if cache is not None and cfg.teacher.cache.mode == "full":
            cache.build(cfg.eval_batch_size, progress)
    loss_kwargs = dict(alpha=loss_cfg.alpha, kd=loss_cfg.kd, tau=loss_cfg.tau, kl_scaling=loss_cfg.kl_scaling,
                       mse_reduction=loss_cfg.mse_reduction, smoothing=loss_cfg.smoothing,
                       smoothing_mode=loss_cfg.smoothing_mode)
    steps_per_epoch = math.ceil(len(data.train_y) / opt_cfg.batch_size)
    warmup_steps = opt_cfg.warmup_epochs * steps_per_epoch
    params = list(model.parameters())
    n_train, batch_size = len(data.train_y), opt_cfg.batch_size
    done_epochs = [m for m in previous if "train_loss" in m and m["epoch"] <= start_epoch]
    train_time = sum(m["epoch_time_s"] for m in done_epochs)

    bar = tqdm(range(start_epoch, opt_cfg.epochs), desc=run_dir.name, disable=not progress, leave=False,
               initial=start_epoch, total=opt_cfg.epochs, unit="ep", dynamic_ncols=True)
    record = done_epochs[-1] if done_epochs else {}
    for epoch in bar:
        model.train()
        started = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen, skipped = 0, 0
        epoch_lrs = [group["lr"] for group in optimizer.param_groups]  # the schedule's lr of this epoch
        # the data order and each sample's view come from the checkpointed generator (drawn
        # on the CPU); in-memory data is augmented on the device, streamed data by the loader
        batches = data.epoch_batches(generator, batch_size, device, store) if store else \
            data.epoch_batches(generator, batch_size, device)
        for step_in_epoch, (raw, y, index, views, bad) in enumerate(batches):
            skipped += bad
            if raw is None:  # every image of the batch unreadable (data.on_bad_image=skip)
                continue
            seen += len(index)
            x = _to_device_layout(data.prepare(raw), cfg.channels_last)
            y = y.to(device, non_blocking=True)
            with _autocast(cfg.bf16, device.type):
                logits = model(x)
            if cache is not None:
                teacher_logits = cache.lookup(index, views, x)
            else:
                teacher_logits = teachers(x, cfg.bf16) if use_teacher_in_step else None
            loss = distillation_loss(logits, y, teacher_logits, **loss_kwargs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if opt_cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, opt_cfg.grad_clip)
            step = epoch * steps_per_epoch + step_in_epoch + 1
            if step <= warmup_steps:  # linear warm-up (Goyal et al. 2017): lr · step / warm-up steps
                for group, base in zip(optimizer.param_groups, epoch_lrs):
                    group["lr"] = base * step / warmup_steps
            optimizer.step()
            loss_sum += loss.detach().double() * len(index)
            correct += (logits.detach().argmax(1) == y).sum()
            if probe is not None and step % cfg.mutual_information.every_steps == 0:
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps({"epoch": epoch + 1, "step": step, "mutual_information": probe(model)}) + "\n")
        for group, base in zip(optimizer.param_groups, epoch_lrs):
            group["lr"] = base  # (after warm-up steps) the schedule goes on from its own value
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if on_cuda:
            torch.cuda.synchronize(device)  # the epoch's kernels are queued, not finished
        epoch_time = time.perf_counter() - started
        train_time += epoch_time
        train_loss = (loss_sum / max(seen, 1)).item()
        if not math.isfinite(train_loss):
            kept = (f"epoch {epoch} is checkpointed: the run resumes from it" if epoch > 0 else
                    "no epoch finished, so nothing was kept")
            raise RunError(f"{run_dir}: training loss became {train_loss} in epoch {epoch + 1} "
                           f"(lower optim.lr or set optim.grad_clip; {kept})")
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": correct.item() / max(seen, 1),
                  "epoch_time_s": epoch_time, "images_per_s": seen / epoch_time}
        if skipped:
            record["skipped_images"] = skipped
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == opt_cfg.epochs:
            for split, teacher_logits in (("val", val_teacher), ("test", test_teacher)):
                y = data.split_labels(split)
                if len(y):
                    logits = predict_split(model, data, split, cfg.eval_batch_size, bf16=cfg.bf16,
                                           channels_last=cfg.channels_last)
                    record.update(_metrics(split, logits, y, teacher_logits))
        with open(metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        checkpoint = {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                      "torch_rng": torch.get_rng_state(), "torch_threads": torch.get_num_threads()}
        if on_cuda:
            checkpoint["cuda_rng"] = torch.cuda.get_rng_state(device)
        atomic_torch_save(checkpoint, checkpoint_path)
        bar.set_postfix(loss=f"{train_loss:.3f}", test_acc=f"{record.get('test_acc', float('nan')):.3f}",
                        img_s=f"{record['images_per_s']:.0f}")
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < opt_cfg.epochs:
            bar.close()
            if cache is not None and store is None:
                cache.save()
            return None
    bar.close()
    if cache is not None and store is None:
        cache.save()

    for split in ("train", "val", "test"):
        y = data.split_labels(split)
        if data.streamed and split == "train" and len(y) > STREAMED_TRAIN_EVAL_MAX:
            continue  # ImageNet-size: 1.28M × 2048 features; analyses use val/test
        logits, features = predict_split(model, data, split, cfg.eval_batch_size, features=True, bf16=cfg.bf16,
                                         channels_last=cfg.channels_last)
        # train: unaugmented, with the (possibly noisy) training labels; features in fp16 to keep it small
        arrays = {"logits": logits.numpy(), "labels": y.numpy(),
                  "features": features.half().numpy() if split == "train" else features.numpy()}
        teacher_logits = {"val": val_teacher, "test": test_teacher}.get(split)
        if split == "train" and teachers is not None:
            teacher_logits = teachers.predict(data, "train", cfg.eval_batch_size, cfg.channels_last)
        if teacher_logits is not None:
            arrays["teacher_logits"] = teacher_logits.numpy()
        atomic_save_npz(run_dir / f"eval_{split}.npz", **arrays)
    atomic_torch_save(model.state_dict(), run_dir / "model.pt")
    result = {
        "run_dir": str(run_dir), "name": cfg.name, "hash": cfg.run_hash(), "device": describe_device(device),
        "device_type": device.type, "torch_threads": torch.get_num_threads(),
        "model": cfg.model.name,
        "dataset": cfg.data.name, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
        "num_params": count_parameters(model), "epochs": opt_cfg.epochs, "train_time_s": train_time,
        "images_per_s": n_train * opt_cfg.epochs / train_time if train_time > 0 else None,
        "final": {k: v for k, v in record.items() if k.startswith(("val_", "test_", "train_"))},
    }
    if getattr(data, "classes", None):  # an image folder's class folders: analysis names classes by them
        result["class_names"] = list(data.classes)
    atomic_write_json(run_dir / "result.json", result)
    checkpoint_path.unlink(missing_ok=True)
    return result
