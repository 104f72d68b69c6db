"""The run config as a whole: :class:`Config` (its sections, the checks across them, the
run hash and run dir) and :func:`describe_config` (``kdlab train --help-config``).
Re-exported by :mod:`kdlab.config`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Literal, Optional, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, model_validator

from .distill import DistillConfig
from .sections import (
    SEED_MAX,
    DataConfig,
    DecodeConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    MutualInformationConfig,
    OptimConfig,
    TeacherConfig,
    _Strict,
)

_DATA_KEYS_HASHED_OFF_DEFAULT = ("image_size", "eval_resize", "crop_scale", "crop_ratio", "on_bad_image", "extra_test")
_ALONE_WHAT = {"fitnets": "variant hint: Romero et al.'s first stage", "ab": "Heo et al.'s initialisation stage",
               "ft": "stage paraphraser"}
_TRANSLATION_DATA_KEYS = ("vocab_size", "max_tokens", "min_words", "max_words", "calibration_tokens")


class Config(_Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9_.+-]+$", description="prefix of the run dir name; auto: what "
                      "the run is, e.g. student-kl-tau4, student-mse, student-ofd, ce (the name stays in the hash as auto)")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the model's initialisation and the data order")
    out_dir: str = Field("runs", description="parent directory of run dirs (not part of the hash)")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    teacher: Optional[TeacherConfig] = None
    distill: DistillConfig = Field(DistillConfig(), description="the distillation method beyond the loss section")
    mutual_information: MutualInformationConfig = MutualInformationConfig()
    decode: DecodeConfig = Field(DecodeConfig(), description="translation: decoding for BLEU")
    device: str = Field("auto", pattern=r"^(cpu|auto|cuda(:[0-9]+)?)$",
                        description="auto (cuda when available, else cpu), cpu, cuda or cuda:N; not part of the hash")
    threads: Optional[int] = Field(
        None, ge=1, description="torch CPU threads; default: as the process has them (a sweep: cores / workers). "
        "Results depend on it at rounding level: recorded in meta/result, and a resume keeps the checkpoint's "
        "count unless this is set. Not part of the hash")
    memory_limit_gb: Optional[float] = Field(
        None, gt=0, description="refuse a run whose big allocations (model and optimizer state, MI probe, teacher "
        "cache) are estimated above this; default 90% of physical memory (of the GPU's for cuda). Not part of the hash")
    bf16: Optional[bool] = Field(None, description="bf16 autocast for the model (losses stay float32); default "
                                 "(null = auto): on for CUDA, off on the CPU. Auto hashes as false: like the device, "
                                 "the precision auto picks is recorded in meta.json and result.json")
    channels_last: bool = False
    eval_batch_size: int = Field(1000, gt=0)
    eval_every: int = Field(1, ge=1, description="evaluate val/test every N epochs (and always after the last)")
    sync_batchnorm: bool = Field(False, description="multi-process runs (torchrun): BatchNorm statistics over the "
                                 "global batch (SyncBatchNorm) instead of each process's part")
    checkpoint_every_steps: Optional[int] = Field(
        None, ge=1, description="also checkpoint within an epoch every N steps (with the data order's position; a "
        "resume ends exactly as an uninterrupted run). Default: epoch ends only for in-memory data, every 5 minutes "
        "for streamed data. Not part of the hash")
    checkpoint_every_minutes: Optional[float] = Field(
        None, gt=0, description="also checkpoint within an epoch every M minutes of training. Not part of the hash")
    tensorboard: bool = Field(True, description="write TensorBoard scalars to RUN_DIR/tensorboard when the "
                              "tensorboard package is installed (kdlab[tensorboard]); not part of the hash")
    logging: LoggingConfig = Field(LoggingConfig(), description="W&B and MLflow loggers (off unless asked); not "
                                   "part of the hash")

    @model_validator(mode="after")
    def _teacher_needed(self):
        if self.loss.alpha > 0 and self.teacher is None:
            raise ValueError("loss.alpha > 0 needs a teacher section (teacher.runs)")
        return self

    @model_validator(mode="after")
    def _one_start(self):
        if self.model.init_run and self.model.pretrained_path:
            raise ValueError("model.init_run and model.pretrained_path both set the starting weights: give one")
        return self

    @model_validator(mode="after")
    def _method_needs(self):  # noqa: C901  (one check per method, in one place)
        """What a distillation method needs from the other sections, named before anything runs."""
        method = self.distill.method
        if method == "logit":
            return self
        if self.teacher is None:
            raise ValueError(f"distill.method={method} needs a teacher section (teacher.runs)")
        if self.data.name == "translation":
            raise ValueError(f"distill.method={method}: translation takes the logit objective of the loss section")
        if self.distill.online:
            if self.teacher.cache.mode != "off" or self.teacher.store.crops:
                raise ValueError(f"distill.method={method} runs its teacher online (it needs the teacher's features "
                                 "or input gradients on the same batch): drop teacher.cache / teacher.store")
            if len(self.teacher.runs) + len(self.teacher.weights) != 1:
                raise ValueError(f"distill.method={method} uses one teacher's layers: give one teacher, not an "
                                 "ensemble")
        if self.distill.alone and (self.loss.alpha or self.loss.smoothing):
            raise ValueError(f"distill.method={method} ({_ALONE_WHAT[method]}) trains its term alone: set "
                             "loss.alpha=0 and loss.smoothing=0, and distil in the next stage (model.init_run)")
        if method == "ft" and self.distill.settings().stage == "translator" and not self.model.init_run:
            raise ValueError("distill.method=ft distils through a trained paraphraser: set model.init_run to the "
                             "run of its paraphraser stage (distill.options.stage=paraphraser)")
        if method == "jacobian" and self.sync_batchnorm:
            raise ValueError("distill.method=jacobian differentiates through the batch norms twice, which torch's "
                             "SyncBatchNorm does not support: drop sync_batchnorm")
        if method == "dkd" and self.loss.alpha:
            raise ValueError("distill.method=dkd replaces the loss section's KD term: set loss.alpha=0 (DKD's "
                             "weights are distill.options alpha and beta)")
        if method == "dkd" and math.isinf(self.loss.tau):
            raise ValueError("distill.method=dkd needs a finite loss.tau (DKD's temperature)")
        if method == "lskd" and self.teacher.store.top_k is not None:
            raise ValueError("distill.method=lskd z-scores the teacher's logits, which a top-k store does not keep "
                             "(its tail is flattened): drop teacher.store.top_k")
        if method == "lskd" and (self.loss.alpha == 0 or self.loss.kd != "kl" or math.isinf(self.loss.tau)):
            raise ValueError("distill.method=lskd standardises the logits of the loss section's KL term: it needs "
                             "loss.alpha > 0, loss.kd=kl and a finite loss.tau")
        return self

    @model_validator(mode="after")
    def _translation(self):
        """What translation (token sequences) cannot take, named before anything runs."""
        translation = self.data.name == "translation"
        if translation != self.model.name.startswith("transformer-"):
            raise ValueError(f"data.name=translation takes a transformer-* model (e.g. transformer-base), not "
                             f"{self.model.name}" if translation else f"model.name: {self.model.name} is a "
                             f"translation model: it needs data.name=translation, not {self.data.name}")
        if not translation:
            return self
        if self.data.label_noise:
            raise ValueError("data.label_noise: label noise is for classification data, not translation")
        if self.mutual_information.every_steps:
            raise ValueError("mutual_information.every_steps: the MI probe is for image classification")
        if self.teacher is not None and (self.teacher.cache.mode != "off" or self.teacher.store.crops):
            raise ValueError("teacher.cache / teacher.store: translation runs its teacher online (token logits of "
                             "the same batch; no (sample, view) table)")
        if self.channels_last:
            raise ValueError("channels_last: is for image models")
        return self

    @model_validator(mode="after")
    def _accumulate_counts_rows(self):
        if self.optim.accumulate > 1 and self.data.on_bad_image == "skip":
            raise ValueError("optim.accumulate > 1 with data.on_bad_image=skip: a step's rows would only be known "
                             "after its last batch; use one or the other")
        return self

    @property
    def teacher_in_step(self) -> bool:
        """Whether training needs the teacher's logits on its batches (a KD term, or a method
        beyond the logit objective)."""
        return self.teacher is not None and (self.loss.alpha > 0 or self.distill.method != "logit")

    def run_hash(self) -> str:
        """8 hex digits of the SHA-256 of the resolved config; out_dir and the teachers'
        parent directories excluded, so a tree of runs can be moved, and the device and
        thread count, so a run started on one machine resumes (or is found finished) on
        another (both are recorded in meta.json and result.json instead). The decode
        section is excluded too (decoding is not training: `kdlab translate` decodes a
        finished run again with other settings)."""
        payload = self.model_dump(mode="json", exclude={"out_dir", "device", "threads", "memory_limit_gb",
                                                        "tensorboard", "logging", "checkpoint_every_steps",
                                                        "checkpoint_every_minutes"})
        defaults = DataConfig().model_dump(mode="json")
        for key in _DATA_KEYS_HASHED_OFF_DEFAULT:  # keys newer than existing run dirs: their hashes stay
            if payload["data"][key] == defaults[key]:
                del payload["data"][key]
        del payload["data"]["loader_workers"]
        if self.data.name != "imagefolder" or self.data.decoder == "pillow":  # newer than existing run dirs, which
            del payload["data"]["decoder"]  # decoded with Pillow: a torchcodec run hashes apart from them
        if self.data.name != "translation":  # newer than existing run dirs, and meaningless for images
            for key in _TRANSLATION_DATA_KEYS:
                del payload["data"][key]
        # decoding is not training: a finished run decodes again with other settings (`kdlab translate`)
        del payload["decode"]
        if self.distill.method == "logit":  # newer than existing run dirs: the logit objective hashes as before
            del payload["distill"]
        else:  # the options as the method resolves them (defaults filled in): an explicit default hashes the same
            payload["distill"]["options"] = self.distill.settings().model_dump(mode="json")
        if self.optim.optimizer == "sgd":
            for key in ("optimizer", "betas", "eps"):
                del payload["optim"][key]
        if self.optim.warmup_steps is None:
            del payload["optim"]["warmup_steps"]
        for key, off in (("warmup_epochs", 0), ("ema_decay", None), ("accumulate", 1)):  # newer than existing run dirs:
            if payload["optim"][key] == off:  # off = the old hash
                del payload["optim"][key]
        if self.loss.kd != "mse" and payload["loss"]["mse_reduction"] == "mean":
            payload["loss"]["mse_reduction"] = "sum"  # (unused by KL; the old default keeps KL runs' hashes)
        if payload["bf16"] is None:  # auto: the hash of the old default (false), as the device is not hashed
            payload["bf16"] = False
        if not payload["sync_batchnorm"]:
            del payload["sync_batchnorm"]
        if payload["model"]["init_run"] is None:  # newer than existing run dirs
            del payload["model"]["init_run"]
        else:  # by its run dir's name, which holds its hash (not where it lies)
            payload["model"]["init_run"] = Path(self.model.init_run).name
        if payload["model"]["pretrained_path"] is None:
            del payload["model"]["pretrained_path"]
        else:  # by file name, as teacher runs (the file's SHA-256 is recorded in meta.json)
            payload["model"]["pretrained_path"] = Path(self.model.pretrained_path).name
        if self.teacher is not None:
            if self.teacher.weights:
                payload["teacher"]["weights"] = [{"model": w.model, "path": Path(w.path).name}
                                                 for w in self.teacher.weights]
            else:
                del payload["teacher"]["weights"]  # a teacher is identified by its run dir's name (which holds its hash),
            payload["teacher"]["runs"] = [Path(r).name for r in self.teacher.runs]  # not where it lies
            # the cache is exact in float32: only float16 storage can change a result
            cache = payload["teacher"].pop("cache")
            if cache["dtype"] != "float32":
                payload["teacher"]["cache_dtype"] = cache["dtype"]
            # a store decides which crops the student sees (and fp16 logits): in the hash when on
            store = payload["teacher"].pop("store")
            if store["crops"]:
                payload["teacher"]["store"] = {k: store[k] for k in ("crops", "dtype", "seed")}
                if store["top_k"] is not None:
                    payload["teacher"]["store"]["top_k"] = store["top_k"]
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    def run_name(self) -> str:
        """The run dir's prefix: ``name``, or with ``name: auto`` what the run is (its objective)."""
        return self.name if self.name != "auto" else _auto_name(self)

    def run_dir(self) -> Path:
        return Path(self.out_dir) / f"{self.run_name()}-{self.run_hash()}"

    def to_yaml(self) -> str:
        data = self.model_dump(mode="python")
        if self.distill == DistillConfig():  # the logit objective alone: config.yaml as before the section
            del data["distill"]
        if self.model.init_run is None:  # (newer than existing run dirs, as the distill section)
            del data["model"]["init_run"]
        return yaml.safe_dump(data, sort_keys=False)


def describe_config(model: type[BaseModel] = None, prefix: str = "") -> str:
    """Every config key, its type, default and description (``kdlab train --help-config``)."""
    model = model or Config
    lines = []
    for name, field in model.model_fields.items():
        key = prefix + name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(describe_config(annotation, key + "."))
            continue
        if key == "teacher":
            lines.append(describe_config(TeacherConfig, "teacher."))
            continue
        if get_origin(annotation) is Literal:
            kind = "|".join(str(a) for a in get_args(annotation))
        else:
            kind = str(annotation).replace("typing.", "") if get_args(annotation) else annotation.__name__
        default = "required" if field.is_required() else repr(field.default)
        text = f"{key} ({kind}, default {default})"
        lines.append(text + (f": {field.description}" if field.description else ""))
    return "\n".join(lines)


def _auto_name(cfg: "Config") -> str:
    """``name: auto``: e.g. ``ce``, ``ls0.1``, ``student-kl-tau4``, ``student-kl-tauinf-a0.5``,
    ``student-mse``, ``student-ofd``, ``student-fitnets-hint`` (characters of the name pattern only)."""
    loss, method = cfg.loss, cfg.distill.method
    plain = f"ls{loss.smoothing:g}" if loss.smoothing else "ce"
    if cfg.teacher is None:
        return plain
    if method != "logit":
        variant = cfg.distill.variant
        return f"student-{method}" + (f"-{variant}".replace("_", "-") if variant else "")
    if loss.alpha == 0:
        return f"student-{plain}"
    kd = "mse" if loss.kd == "mse" else f"kl-tau{'inf' if math.isinf(loss.tau) else f'{loss.tau:g}'}"
    return f"student-{kd}" + (f"-a{loss.alpha:g}" if loss.alpha != 1 else "")

