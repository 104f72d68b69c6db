"""The sections of a run config: ``data``, ``model``, ``optim``, ``loss``, ``teacher``
(with its ``cache``, ``store`` and ``weights``), ``mutual_information`` and ``decode``,
each a strict pydantic model (an unknown key is an error). :class:`kdlab.config.Config`
puts them together; every name here is re-exported by :mod:`kdlab.config`.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


SEED_MAX = 2**32 - 1  # what every generator used accepts (numpy, torch, the mnist1d package)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    name: Literal["digits", "mnist1d", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder",
                  "translation"] = Field(
        "mnist1d", description="dataset: built in (digits, mnist1d), read from data.root into memory, "
        "imagefolder (root/train/<class>/*, root/val/<class>/*; JPEG/PNG streamed from disk), or translation "
        "(En->De sentence pairs: data.root = builtin:de-catalogues or a folder of train/valid/test .en/.de or .tsv)")
    root: Optional[str] = Field(None, description="directory of the dataset files (IDX or CIFAR pickles, image "
                                "folders, parallel text); translation: default builtin:de-catalogues")
    val_size: Optional[int] = Field(
        None, ge=0, description="training examples held out for validation; default 10k for MNIST/CIFAR "
        "(both papers), 10% of the training set for digits and MNIST-1D")
    split_seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the train/validation split")
    augment: Literal["auto", "none", "crop_flip", "shift2", "shift1d", "resized_crop_flip"] = Field(
        "auto", description="batch augmentation; auto = crop_flip for CIFAR, shift2 for 28×28, shift1d for MNIST-1D, "
        "resized_crop_flip (RandomResizedCrop + flip) for imagefolder")
    num_samples: int = Field(5000, gt=0, description="MNIST-1D: examples generated (80% train, 20% test)")
    generator_seed: int = Field(42, ge=0, le=SEED_MAX, description="MNIST-1D: seed of the generator")
    extra_test: int = Field(0, ge=0, le=1_000_000, description="MNIST-1D only: this many more held-out test signals, "
                            "drawn from the same generator under another seed (generator_seed + 1,000,000: none is a "
                            "training signal) and appended after the standard test split, which stays the first rows; "
                            "training is unchanged (more statistical power for test comparisons)")
    label_noise: float = Field(0.0, ge=0.0, le=1.0, description="fraction of training labels flipped")
    noise_type: Literal["symmetric", "asymmetric"] = Field("symmetric", description="label noise kind")
    noise_seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the label noise")
    # imagefolder only (streamed data); in the run hash only when set off their defaults
    image_size: int = Field(224, gt=0, le=4096, description="imagefolder: side of the training crop and the eval "
                            "crop (224; 299 for Inception-v4)")
    eval_resize: Optional[int] = Field(None, gt=0, le=8192, description="imagefolder: shorter side before the eval "
                                       "centre crop; default image_size / 0.875 (256 for 224, 342 for 299)")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="imagefolder: RandomResizedCrop area range")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="imagefolder: RandomResizedCrop aspect range")
    loader_workers: Optional[int] = Field(None, ge=0, le=256, description="imagefolder: DataLoader worker processes "
                                          "(default min(4, cores)); results do not depend on it: not in the hash")
    on_bad_image: Literal["error", "skip"] = Field("error", description="imagefolder: an unreadable image is an "
                                                   "error naming it, or left out of its batch and counted")
    decoder: Literal["torchcodec", "pillow"] = Field("torchcodec", description="imagefolder: what decodes images: "
                                                     "TorchCodec (torchvision.io's decoders, moved there; faster than "
                                                     "Pillow on JPEGs, benchmarks/data_speed.py) or Pillow (kdlab's "
                                                     "decoder before it; its runs keep their hashes)")

    # translation only; in the run hash only for translation
    vocab_size: int = Field(8000, ge=16, le=1_000_000, description="translation: pieces of the joint sentencepiece "
                            "model (Müller/t2t: 32k; cached by corpus hash)")
    max_tokens: int = Field(4096, gt=0, description="translation: token budget of a training batch (sentences × "
                            "their longest side, padding included); eval batches use 4× this")
    min_words: Optional[int] = Field(None, ge=1, description="translation: keep pairs with at least this many words "
                                     "on both sides (default 3 for the built-in corpus, 1 for folders)")
    max_words: Optional[int] = Field(None, ge=1, description="translation: ... and at most this many (default 40 "
                                     "built in, 250 for folders)")
    calibration_tokens: int = Field(10000, gt=0, description="translation: validation target tokens (in corpus "
                                    "order, EOS included, teacher-forced) for token calibration and Fig. 7 "
                                    "(Müller: ~10k)")

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _range(cls, pair):
        if not 0 < pair[0] <= pair[1] or not math.isfinite(pair[1]):
            raise ValueError(f"must be a range 0 < low <= high, got {list(pair)}")
        return pair

    @field_validator("crop_scale")
    @classmethod
    def _area_fraction(cls, pair):
        if pair[1] > 1:
            raise ValueError(f"is a range of fractions of the image's area (at most 1; ImageNet: [0.08, 1.0]), "
                             f"got {list(pair)}")
        return pair


def _check_model_name(name: str) -> str:
    import torch

    from ..models import _FAMILIES, build_model
    from ..models.registry import suggest_model

    if not any(regex.match(name) for regex, *_ in _FAMILIES.values()):
        raise ValueError(f"unknown model {name!r}{suggest_model(name)} (see `kdlab models`)")
    with torch.device("meta"):  # sizes the family cannot build (wrn-3-2, mlp-0); shapes only, no memory
        build_model(name, 10)
    return name


class ModelConfig(_Strict):
    name: str = Field("wrn-16-2", description="registered model name (`kdlab models`)")
    pretrained_path: Optional[str] = Field(
        None, description="local weights file loaded before training (a timm/torchvision state dict, .pt/.pth or "
        ".safetensors, or a run's model.pt); never a download. Hashed by file name; its SHA-256 goes in meta.json")
    init_run: Optional[str] = Field(
        None, description="a finished run dir whose student (model.pt) starts this run, and its adapters "
        "(adapters.pt) when this run trains the same ones: one stage handing its weights to the next (e.g. "
        "FitNets' hint stage, then KD). Hashed by the run dir's name (which holds its hash), as teachers")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        return _check_model_name(name)


class OptimConfig(_Strict):
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="sgd (momentum, nesterov) or adam (betas, eps; "
                                              "Vaswani et al. / tensor2tensor for translation)")
    betas: tuple[float, float] = Field((0.9, 0.98), description="adam: (β1, β2); t2t's transformer_base: β2 0.997")
    eps: float = Field(1e-9, gt=0, description="adam: ε")
    epochs: int = Field(200, gt=0)
    batch_size: int = Field(128, gt=0)
    accumulate: int = Field(1, ge=1, le=4096, description="batches whose gradients make one optimizer step "
                            "(gradient accumulation: the step is the mean over all their rows; schedules and "
                            "warm-up count optimizer steps)")
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    decay_bn_bias: bool = Field(False, description="apply weight decay to BN parameters and biases too")
    schedule: Literal["multistep", "cosine", "constant", "inverse_sqrt"] = Field(
        "multistep", description="per-epoch multistep/cosine/constant, or inverse_sqrt per step (Vaswani et al.: "
        "lr · min(step/warm-up, sqrt(warm-up/step)), peak lr at optim.warmup_steps)")
    milestones: list[int] = Field([100, 150], description="multistep: epochs where lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0)
    grad_clip: Optional[float] = Field(None, gt=0, description="clip the global gradient norm")
    warmup_epochs: int = Field(0, ge=0, description="linear lr warm-up from lr/steps to lr, step by step, over the "
                               "first N epochs (large batches, e.g. Müller A.4's 4096); the schedule runs as usual")
    warmup_steps: Optional[int] = Field(None, gt=0, description="linear warm-up over N steps instead of "
                                        "warmup_epochs (required by schedule=inverse_sqrt; t2t: 8000)")
    ema_decay: Optional[float] = Field(None, gt=0, lt=1, description="keep an exponential moving average of the "
                                       "weights and buffers, updated every step (Müller A.4: 0.9999); evaluated "
                                       "beside the raw weights (ema_* metrics) and saved as model_ema.pt")

    @field_validator("betas")
    @classmethod
    def _betas(cls, pair):
        if not all(0 <= b < 1 for b in pair):
            raise ValueError(f"adam betas must be in [0, 1), got {list(pair)}")
        return pair

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, milestones):
        if any(m < 1 for m in milestones) or any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"must be epochs >= 1 in increasing order, got {milestones}")
        return milestones

    @model_validator(mode="after")
    def _warmup_within_training(self):
        if self.schedule == "inverse_sqrt" and self.warmup_steps is None:
            raise ValueError("schedule=inverse_sqrt needs optim.warmup_steps (the step of the peak lr)")
        if self.warmup_steps is not None and self.warmup_epochs:
            raise ValueError("set optim.warmup_steps or optim.warmup_epochs, not both")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} is longer than the {self.epochs} epochs of training")
        return self


class LossConfig(_Strict):
    alpha: float = Field(0.0, ge=0.0, le=1.0, description="weight of the KD term: (1-α)·CE + α·KD")
    kd: Literal["kl", "mse"] = "kl"
    tau: float = Field(4.0, description="KL temperature τ > 0; inf for the τ→∞ limit")
    kl_scaling: Literal["tau2", "max", "none"] = "tau2"
    mse_reduction: Literal["sum", "mean", "half_sum"] = Field(
        "mean", description="loss.kd=mse: mean over batch and classes (nn.MSELoss, Kim's code; the default), sum "
        "(‖z_s − z_t‖² per sample, Kim Eq. 9: K times larger steps), half_sum (½‖·‖², Müller A.5)")
    smoothing: float = Field(0.0, ge=0.0, le=1.0, description="label smoothing of the CE targets")
    smoothing_mode: Literal["uniform", "others"] = "uniform"

    @field_validator("tau")
    @classmethod
    def _positive(cls, tau: float) -> float:
        if math.isnan(tau) or tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        return tau


class TeacherCacheConfig(_Strict):
    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, mode):
        return "off" if mode is False else mode  # YAML 1.1 reads a bare `off` as false

    mode: Literal["off", "lazy", "full"] = Field(
        "off", description="teacher logits by (sample, view): off = run the teacher every step; lazy = fill the "
        "table as views are met; full = build it all before training")
    dtype: Literal["float32", "float16"] = Field("float32", description="storage of the table (float32 is exact)")
    max_gb: float = Field(4.0, gt=0, description="largest table allowed in memory; beyond it, the online teacher")
    dir: Optional[str] = Field(None, description="where tables are kept and shared (default OUT_DIR/.teacher-cache)")


class TeacherStoreConfig(_Strict):
    crops: int = Field(0, ge=0, le=10000, description="streamed data (imagefolder): FKD-style store of M crops per "
                       "training image, drawn once, with the teacher's logits for each; training draws among them "
                       "and no teacher runs. 0 = off (teacher online)")
    dtype: Literal["float16", "float32"] = Field("float16", description="storage of the logits (float32: exact "
                                                 "to float rounding)")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the stored crops")
    top_k: Optional[int] = Field(None, ge=1, description="store only the k largest teacher probabilities at the "
                                 "loss's τ (FKD): smaller, KL at finite τ only; the missing mass is spread evenly")
    shard_size: int = Field(4096, gt=0, description="images per shard file (not part of the hash)")
    dir: Optional[str] = Field(None, description="where stores are kept and shared (default OUT_DIR/.teacher-store)")

    @model_validator(mode="after")
    def _top_k_needs_store(self):
        if self.top_k is not None and not self.crops:
            raise ValueError(f"top_k={self.top_k} is a setting of the crop store, which is off (teacher.store.crops=0): "
                             "set teacher.store.crops=M too, or drop top_k")
        return self


class TeacherWeightsConfig(_Strict):
    model: str = Field(description="registered model name, e.g. timm:resnet152")
    path: str = Field(description="plain weights file (e.g. torchvision's ResNet-152 checkpoint)")

    @field_validator("model")
    @classmethod
    def _known(cls, name: str) -> str:
        return _check_model_name(name)


class TeacherConfig(_Strict):
    runs: list[str] = Field([], description="finished run dirs; several = ensemble (mean logits)")
    weights: list[TeacherWeightsConfig] = Field(
        [], description="teachers from plain weights files, [{model: NAME, path: FILE}]; join the runs' ensemble")
    cache: TeacherCacheConfig = TeacherCacheConfig()
    store: TeacherStoreConfig = TeacherStoreConfig()

    @field_validator("runs", mode="before")
    @classmethod
    def _one_run(cls, value):  # teacher.runs=runs/teacher-1234: one teacher, without the brackets
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _some_teacher(self):
        if not self.runs and not self.weights:
            raise ValueError("a teacher section needs teacher.runs (run dirs) or teacher.weights ([{model, path}])")
        return self


class MutualInformationConfig(_Strict):
    every_steps: int = Field(0, ge=0, description="log Müller's I(example; logit difference) every N steps; 0 = off")
    classes: list[int] = Field([0, 5], min_length=2, max_length=2,
                               description="the two classes whose logit difference is Y (CIFAR-10: airplane, dog)")
    per_class: int = Field(300, gt=0, description="training examples per class (Müller: 300)")
    views: int = Field(5, ge=2, description="augmentations per example, L (Müller: 5)")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the example and view choice")

    @field_validator("classes")
    @classmethod
    def _two_classes(cls, classes):
        if classes[0] == classes[1]:
            raise ValueError(f"needs two different classes (Y is the difference of their logits), got {classes}")
        return classes


class DecodeConfig(_Strict):
    """How a translation run decodes at its end. Not part of the run hash: decoding is not
    training, and ``kdlab translate RUN --beam N ...`` decodes a finished run again with
    other settings (into RUN/decode/), without training it again."""

    beam: int = Field(4, ge=0, description="translation: beam width of the final test-set BLEU (t2t: 4); 0 = greedy "
                      "only (greedy BLEU is always reported). The decode section is not part of the hash: "
                      "`kdlab translate RUN --beam N` decodes a finished run again")
    alpha: float = Field(0.6, ge=0, description="translation: GNMT length penalty ((5 + |y|) / 6)^α (t2t: 0.6)")
    extra_length: int = Field(50, ge=1, description="translation: decode at most source length + this many tokens "
                              "(t2t: 50)")
    temperatures: list[float] = Field([], description="translation: also beam-search BLEU on validation with the "
                                      "logits divided by each T (Müller's BLEU against temperature; needs beam >= 2); "
                                      "[] = off")
    temperature_sentences: Optional[int] = Field(None, gt=0, description="translation: the first N validation "
                                                 "sentences for the BLEU-against-T curve (default all)")

    @field_validator("temperatures")
    @classmethod
    def _positive_temperatures(cls, values):
        if any(not (t > 0 and math.isfinite(t)) for t in values):
            raise ValueError(f"temperatures must be finite and > 0, got {values}")
        return values

    @model_validator(mode="after")
    def _beam_for_temperatures(self):
        if self.temperatures and self.beam < 2:
            raise ValueError("decode.temperatures: BLEU against T needs beam search (decode.beam >= 2); greedy "
                             "decoding does not depend on T")
        return self


class LoggingConfig(_Strict):
    """Loggers beside metrics.jsonl and TensorBoard (:mod:`kdlab.loggers`): each off unless
    asked, each an extra; rank 0 logs; not part of the run hash."""

    wandb: bool = Field(False, description="log to Weights & Biases (pip install 'kdlab[wandb]'); offline with "
                        "WANDB_MODE=offline or wandb_mode=offline (files in RUN_DIR/wandb, `wandb sync` uploads them)")
    wandb_project: str = Field("kdlab", min_length=1, description="W&B project")
    wandb_entity: Optional[str] = Field(None, description="W&B entity (user or team); default: W&B's own")
    wandb_mode: Optional[Literal["online", "offline"]] = Field(None, description="W&B mode; default: WANDB_MODE or "
                                                                "W&B's own (online)")
    wandb_tags: list[str] = Field([], description="extra W&B tags (kdlab adds the objective, model and dataset)")
    mlflow: bool = Field(False, description="log to MLflow (pip install 'kdlab[mlflow]')")
    mlflow_tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI; default: a local SQLite store "
                                               "beside the run dirs, sqlite:///OUT_DIR/mlflow.db (`mlflow ui "
                                               "--backend-store-uri` it)")
    mlflow_experiment: str = Field("kdlab", min_length=1, description="MLflow experiment name")
