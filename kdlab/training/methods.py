"""Distillers beyond the logit objective (``distill.method``): the feature methods, which
tap student and teacher layers and may train adapters beside the student, and the logit
methods DKD and logit standardisation. Equations, sources and constants are in
``kdlab.losses`` / ``kdlab.feature_losses`` and ``docs/methods.md``; this module wires
them into the distiller contract of :mod:`kdlab.training.distill`:

- ``module``: what trains and what DDP wraps. For a feature method a
  :class:`DistillModule` — the student and its adapters in one module whose forward returns
  the logits and the adapted features of the taps, so every trainable parameter is used
  inside the forward DDP sees; the adapters join the optimizer (their own parameter
  groups), the checkpoint (``adapters``) and the run dir (``adapters.pt``, never inside
  ``model.pt``).
- ``__call__(data, module, x, y, index, views)`` → (loss, student logits, named parts):
  the loss section's parts (``ce``/``ls``, ``kd``) plus the method's (``at``, ``fitnets``,
  ``ofd``, ``dkd``).

The teacher runs online in eval mode under ``torch.no_grad`` (OFD: its batch norms in
train mode if asked, as Heo's code, with their running statistics left untouched).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn as nn

from ..device import autocast
from ..errors import ConfigError, first_line
from ..feature_losses import (FITNETS_CRD_WEIGHT, ab_loss, at_loss, crd_contrast_loss, crd_normalization_constant,
                              fitnets_loss, ft_loss, ft_reconstruction_loss, jacobian_loss, jacobian_output,
                              ofd_loss, ofd_margin, stage_weights)
from ..losses import distillation_loss_parts, dkd_loss, dkd_warmup_factor, standardize_logits
from ..models import build_model
from ..runs import torch_load
from ..models.taps import Taps, stage_taps, tap_shapes, unwrap
from .distill import LogitDistiller


class DistillModule(nn.Module):
    """The student and its adapters: forward(x, teacher features) → (logits,
    [adapter_i(student tap_i)], [teacher_adapter_i(teacher feature_i)] or the teacher features
    as given). Teacher-side adapters (CRD's embedding, FT's paraphraser) train inside this
    forward, so DDP sees every trainable parameter used in it."""

    def __init__(self, student: nn.Module, adapters: nn.ModuleList, specs: list[str],
                 teacher_adapters: nn.ModuleList | None = None, student_frozen: bool = False):
        super().__init__()
        self.student, self.adapters, self.teacher_adapters = student, adapters, teacher_adapters
        self.student_frozen = student_frozen  # FT's paraphraser stage: the student runs, untouched, in eval mode
        self.taps = Taps(student, specs)
        self.taps.active = False  # on only in this forward: evaluation of the student copies nothing

    def forward(self, x, teacher_features=()):
        if self.student_frozen:
            training = self.student.training
            self.student.eval()
            with torch.no_grad(), self.taps.capturing():
                logits = self.student(x)
            self.student.train(training)
        else:
            with self.taps.capturing():
                logits = self.student(x)
        features = self.taps.features
        self.taps.clear()  # (the adapted features below hold what the loss needs)
        student = [adapter(f) for adapter, f in zip(self.adapters, features)]
        if self.teacher_adapters is None:
            return logits, student, list(teacher_features)
        return logits, student, [adapter(f) for adapter, f in zip(self.teacher_adapters, teacher_features)]


def _conv(rank: int):
    """The convolution for features of ``rank`` spatial dimensions: (C, L) → Conv1d, (C, H, W) → Conv2d."""
    if rank not in (1, 2):
        raise ValueError(f"features with {rank} spatial dimensions are not supported (vectors, (C, L) or (C, H, W))")
    return (nn.Conv1d, nn.Conv2d)[rank - 1], (nn.BatchNorm1d, nn.BatchNorm2d)[rank - 1]


def _conv_bn(c_in: int, c_out: int, rank: int = 2) -> nn.Module:
    """OFD's and AB's connector (Heo et al. 2019a/b): conv 1×1 + BN, initialised as the
    reference; ``rank`` spatial dimensions (0: a fully connected layer's features, linear + BN)."""
    if rank == 0:
        return nn.Sequential(nn.Linear(c_in, c_out, bias=False), nn.BatchNorm1d(c_out))
    conv_type, norm = _conv(rank)
    conv = conv_type(c_in, c_out, 1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, norm(c_out))


def _conv_reg(c_in: int, c_out: int, rank: int = 2) -> nn.Module:
    """FitNets' regressor as CRD/mdistiller build it for equal spatial sizes: conv 3×3 + BN +
    ReLU (a fully connected layer's features: one linear layer, as Romero et al.'s MLP hints)."""
    if rank == 0:
        return nn.Linear(c_in, c_out)
    conv_type, norm = _conv(rank)
    return nn.Sequential(conv_type(c_in, c_out, 3, 1, 1), norm(c_out), nn.ReLU(inplace=False))


def _hint_reg(c_in: int, c_out: int, rank: int) -> nn.Module:
    """FitNets' paper regressor: a plain convolution (it can output the hint's negative values)."""
    return nn.Linear(c_in, c_out) if rank == 0 else _conv(rank)[0](c_in, c_out, 3, 1, 1)


def _same_spatial(student_shapes, teacher_shapes, method: str) -> None:
    for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes)):
        if len(s) != len(t) or tuple(s[1:]) != tuple(t[1:]):
            raise ValueError(f"{method}: tap pair {i} has student features {tuple(s)} and teacher features "
                             f"{tuple(t)} per sample: their spatial sizes must match (choose other layers)")


class FeatureMethod:
    """Which taps a method uses, which adapters it trains, and its term."""

    name = ""
    replaces_loss = False  # a pre-stage (FitNets' hint stage): its term alone, not added to the loss section's

    def __init__(self, settings):
        self.settings = settings

    def default_specs(self, model_name: str, model: nn.Module) -> list[str]:
        return [tap.out for tap in stage_taps(model_name, model)]

    def adapters(self, student_shapes, teacher_shapes) -> nn.ModuleList:
        return nn.ModuleList(nn.Identity() for _ in student_shapes)

    def teacher_adapters(self, teacher_shapes) -> nn.ModuleList | None:
        """Trainable modules on the teacher's side (CRD's embedding, FT's paraphraser), or None."""
        return None

    def prepare(self, teacher: nn.Module, teacher_name: str, teacher_specs: list[str], defaulted: bool) -> None:
        """Anything the term needs from the teacher once (OFD: the margins)."""

    def term(self, student_features, teacher_features, y, index, raw) -> torch.Tensor:
        """The method's term; ``teacher_features`` went through the teacher-side adapters, ``raw`` did not."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What the method keeps beside its adapters (CRD's memory bank)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class AT(FeatureMethod):
    name = "at"

    def adapters(self, student_shapes, teacher_shapes):
        for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes)):
            if len(s) < 2 or len(t) < 2:
                raise ValueError(f"attention maps need spatial features ((C, L) or (C, H, W)); tap pair {i} gives "
                                 f"{tuple(s)} and {tuple(t)} per sample: use a convolutional student and teacher")
        _same_spatial(student_shapes, teacher_shapes, self.name)
        return super().adapters(student_shapes, teacher_shapes)

    def term(self, s, t, y, index, raw):
        o = self.settings
        return at_loss(s, t, p=o.p, beta=o.beta, normalization=o.normalization)


class FitNets(FeatureMethod):
    """The hint is the middle stage's output. One stage (CRD/mdistiller): CE + 100·MSE with a
    conv-BN-ReLU regressor. The paper's hint stage: ½‖u − r(v)‖² alone, with a plain
    convolutional regressor (it must be able to output the hint's negative values)."""
    name = "fitnets"

    def __init__(self, settings):
        super().__init__(settings)
        self.hint_stage = settings.variant == "hint"
        self.beta = settings.beta if settings.beta is not None else (1.0 if self.hint_stage else FITNETS_CRD_WEIGHT)

    @property
    def replaces_loss(self) -> bool:
        return self.hint_stage

    def default_specs(self, model_name, model):
        taps = stage_taps(model_name, model)
        return [taps[len(taps) // 2].out]

    def adapters(self, student_shapes, teacher_shapes):
        _same_spatial(student_shapes, teacher_shapes, self.name)
        if self.hint_stage:
            return nn.ModuleList(_hint_reg(s[0], t[0], len(s) - 1) for s, t in zip(student_shapes, teacher_shapes))
        return nn.ModuleList(_conv_reg(s[0], t[0], len(s) - 1) for s, t in zip(student_shapes, teacher_shapes))

    def term(self, s, t, y, index, raw):
        variant = "paper" if self.hint_stage else "crd"
        return self.beta * sum(fitnets_loss(a, b, variant=variant) for a, b in zip(s, t))


class OFD(FeatureMethod):
    """Pre-ReLU taps, conv-BN connectors, margins from the teacher's BN before each ReLU."""
    name = "ofd"

    def default_specs(self, model_name, model):
        return [tap.pre_relu for tap in stage_taps(model_name, model, require=("pre_relu", "bn"))]

    def adapters(self, student_shapes, teacher_shapes):
        _same_spatial(student_shapes, teacher_shapes, self.name)
        return nn.ModuleList(_conv_bn(s[0], t[0], len(s) - 1) for s, t in zip(student_shapes, teacher_shapes))

    def prepare(self, teacher, teacher_name, teacher_specs, defaulted):
        """The margins: from the batch norm before each tapped ReLU — the family's declared
        one, or (layers given) the tapped module itself, which must then be that batch norm."""
        if not defaulted and any(spec.endswith(":in") for spec in teacher_specs):
            raise ValueError("OFD's margins come from the batch norm whose output is tapped: name batch norms in "
                             "distill.teacher_layers, not a module's input (NAME:in)")
        names = [tap.bn for tap in stage_taps(teacher_name, teacher, require=("pre_relu", "bn"))] if defaulted else \
            list(teacher_specs)
        self.margins = []
        for name in names:
            bn = teacher.get_submodule(name)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                raise ValueError(f"OFD's margin needs the batch norm before the tapped ReLU; teacher module {name} is "
                                 f"a {type(bn).__name__}: tap batch norms (pre-ReLU) with distill.teacher_layers")
            self.margins.append(ofd_margin(bn.weight.detach().float(), bn.bias.detach().float(),
                                           variant=self.settings.margin))
        self.weights = stage_weights(len(self.margins))  # the last stage weighs 1, each earlier one half the next

    def term(self, s, t, y, index, raw):  # Heo et al.: CE + β·Σ_i w_i·Σ partial L2 / B (ofd_loss divides by B)
        return self.settings.beta * sum(w * ofd_loss(a, b, m.to(a.device))
                                        for w, a, b, m in zip(self.weights, s, t, self.margins))


class AB(FeatureMethod):
    """Activation boundaries (Heo et al. 2019b), the initialisation stage: pre-ReLU taps, conv 1×1
    + BN connectors, β·Σ_i w_i·ab_loss(connector(s_i), t_i) alone (the reference's 3/1000 and
    stage weights 1/4, 1/2, 1); the next run (model.init_run) trains with CE/KD, connectors dropped."""
    name = "ab"
    replaces_loss = True

    def default_specs(self, model_name, model):
        return [tap.pre_relu for tap in stage_taps(model_name, model, require=("pre_relu",))]

    def adapters(self, student_shapes, teacher_shapes):
        _same_spatial(student_shapes, teacher_shapes, self.name)
        self.weights = stage_weights(len(student_shapes))
        return nn.ModuleList(_conv_bn(s[0], t[0], len(s) - 1) for s, t in zip(student_shapes, teacher_shapes))

    def term(self, s, t, y, index, raw):
        o = self.settings
        return o.beta * sum(w * ab_loss(a, b, o.margin) for w, a, b in zip(self.weights, s, t))


def _ft_block(rank: int, c_in: int, c_out: int, transpose: bool = False) -> list[nn.Module]:
    """FT's layer (Kim et al.'s code): conv 3×3 stride 1 (transposed in the decoder), BN, LeakyReLU 0.1."""
    conv, norm = _conv(rank)
    if transpose:
        conv = (nn.ConvTranspose1d, nn.ConvTranspose2d)[rank - 1]
    return [conv(c_in, c_out, 3, 1, 1, bias=False), norm(c_out), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """FT's paraphraser: an encoder (C → C → kC → kC) to the factor and a decoder back
    (kC → kC → C → C), each layer conv 3×3 + BN + LeakyReLU(0.1) as the reference's."""

    def __init__(self, rank: int, channels: int, factor: int):
        super().__init__()
        self.encoder = nn.Sequential(*_ft_block(rank, channels, channels), *_ft_block(rank, channels, factor),
                                     *_ft_block(rank, factor, factor))
        self.decoder = nn.Sequential(*_ft_block(rank, factor, factor, True), *_ft_block(rank, factor, channels, True),
                                     *_ft_block(rank, channels, channels, True))
        self.reconstruct = True  # (the translator stage uses the encoder alone)
        self.frozen = False

    def freeze(self) -> "Paraphraser":
        """A trained paraphraser as a fixed function (the translator stage): no gradients, eval mode."""
        self.frozen, self.reconstruct = True, False
        return self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    def forward(self, t):
        factor = self.encoder(t)
        return (factor, self.decoder(factor)) if self.reconstruct else (factor, None)


class FT(FeatureMethod):
    """Factor transfer (Kim, Park & Kwak 2018) at the last stage's output. Paraphraser stage: the
    reconstruction loss alone trains the paraphraser (the student is not trained). Translator
    stage: the paraphraser frozen (from model.init_run's adapters), a translator (C_s → kC_t,
    three conv-BN-LeakyReLU layers) on the student, CE(+KD) + β·ft_loss(translator, factor)."""
    name = "ft"

    def __init__(self, settings):
        super().__init__(settings)
        self.paraphraser_stage = settings.stage == "paraphraser"

    @property
    def replaces_loss(self) -> bool:
        return self.paraphraser_stage

    def default_specs(self, model_name, model):
        return [stage_taps(model_name, model)[-1].out]

    def _check(self, student_shapes, teacher_shapes):
        if len(student_shapes) != 1:
            raise ValueError(f"FT transfers one feature map (the last stage's output): name one layer each, not "
                             f"{len(student_shapes)}")
        s, t = student_shapes[0], teacher_shapes[0]
        if len(s) not in (2, 3) or len(t) not in (2, 3):
            raise ValueError(f"FT's paraphraser is convolutional: it needs feature maps (C, L) or (C, H, W), got "
                             f"{tuple(s)} and {tuple(t)} per sample: use a convolutional student and teacher")
        _same_spatial(student_shapes, teacher_shapes, self.name)
        return len(s) - 1, s[0], t[0], max(1, int(t[0] * self.settings.rate))

    def adapters(self, student_shapes, teacher_shapes):
        rank, c_s, _, factor = self._check(student_shapes, teacher_shapes)
        translator = nn.Sequential(*_ft_block(rank, c_s, c_s), *_ft_block(rank, c_s, factor),
                                   *_ft_block(rank, factor, factor))
        return nn.ModuleList([translator])

    def teacher_adapters(self, teacher_shapes):
        rank, _, c_t, factor = self._check(teacher_shapes, teacher_shapes)
        paraphraser = Paraphraser(rank, c_t, factor)
        return nn.ModuleList([paraphraser if self.paraphraser_stage else paraphraser.freeze()])

    def term(self, s, t, y, index, raw):
        (translated,), ((factor, reconstruction),) = s, t
        o = self.settings
        if self.paraphraser_stage:
            return ft_reconstruction_loss(reconstruction, raw[0], norm=o.reconstruction)
        return o.beta * ft_loss(translated, factor, p=1, reduction=o.reduction)


def _classifier_input(model: nn.Module) -> str:
    """The input of the model's last linear layer (its penultimate features), as a tap spec."""
    names = [name for name, m in unwrap(model).named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("CRD embeds the penultimate features, the input of the last linear layer, and this model "
                         "has none: name the layers (distill.student_layers / teacher_layers)")
    return f"{names[-1]}:in"


class _Embed(nn.Module):
    """CRD's embedding: linear to the embedding size, then L2-normalised (flattened first)."""

    def __init__(self, c_in: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(c_in, dim)

    def forward(self, f):
        return nn.functional.normalize(self.linear(f.flatten(1).float()), dim=1)


class CRD(FeatureMethod):
    """Contrastive representation distillation (Tian et al. 2020; RepDistiller's CRDLoss and
    ContrastMemory): embeddings of both penultimate features, a memory bank per network with one
    row per training example (momentum update, renormalised), K negatives per sample drawn
    with replacement from the other classes' examples (RepDistiller's ``mode='exact'``), the
    NCE loss of each anchor with its normaliser Z fixed on the first batch, weighted β."""
    name = "crd"

    def __init__(self, settings):
        super().__init__(settings)
        self.bank = None

    def default_specs(self, model_name, model):
        return [_classifier_input(model)]

    def adapters(self, student_shapes, teacher_shapes):
        if len(student_shapes) != 1:
            raise ValueError(f"CRD contrasts one feature per network: name one layer each, not {len(student_shapes)}")
        flat = math.prod(student_shapes[0])
        return nn.ModuleList([_Embed(flat, self.settings.feat_dim)])

    def teacher_adapters(self, teacher_shapes):
        return nn.ModuleList([_Embed(math.prod(teacher_shapes[0]), self.settings.feat_dim)])

    def index(self, labels: torch.Tensor) -> None:
        """The negative sampler's index of the training set's (noisy) labels: examples by class."""
        labels = torch.as_tensor(labels).long().cpu()
        counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
        if int(counts.max()) == len(labels):
            raise ValueError("CRD draws negatives from other classes, and the training set has one class")
        self.n, self.labels, self.order = len(labels), labels, torch.argsort(labels, stable=True)
        self.counts, self.starts = counts, torch.cumsum(counts, 0) - counts

    def start(self, seed: int, device) -> None:
        """The memory banks, a row per training example, and the sampler's generator (after :meth:`index`)."""
        dim = self.settings.feat_dim
        self.device = device
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + 7919)  # (kdlab's own stream for CRD)
        std = 1.0 / math.sqrt(dim / 3)  # the reference's initialisation: uniform in ±1/√(dim/3)
        self.bank = {side: (torch.rand(self.n, dim, generator=self.generator) * 2 * std - std).to(device)
                     for side in ("student", "teacher")}
        self.z = {"student": None, "teacher": None}

    def negatives(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K) indices of other classes' examples, uniform with replacement."""
        y = self.labels[index.cpu()]
        n_c, start = self.counts[y].unsqueeze(1), self.starts[y].unsqueeze(1)
        u = (torch.rand(len(index), self.settings.nce_k, generator=self.generator) * (self.n - n_c)).long()
        u = torch.minimum(u, self.n - n_c - 1)
        return self.order[u + (u >= start) * n_c].to(self.device)

    def term(self, s, t, y, index, raw):
        (v_s,), (v_t,) = s, t
        o = self.settings
        index = index.to(self.device).long()
        rows = torch.cat([index.view(-1, 1), self.negatives(index)], dim=1)  # (B, K + 1): the positive first
        scores_s = torch.bmm(self.bank["teacher"][rows], v_s.unsqueeze(2)).squeeze(2)  # student anchor
        scores_t = torch.bmm(self.bank["student"][rows], v_t.unsqueeze(2)).squeeze(2)  # teacher anchor
        loss = 0.0
        for side, scores in (("student", scores_s), ("teacher", scores_t)):
            if self.z[side] is None:  # the reference fixes Z on the first batch
                self.z[side] = crd_normalization_constant(scores[:, 0], scores[:, 1:], self.n, o.nce_t)
            loss = loss + crd_contrast_loss(scores[:, 0], scores[:, 1:], self.n, o.nce_t, z=self.z[side])
        with torch.no_grad():
            for side, v in (("student", v_s), ("teacher", v_t)):
                mixed = self.bank[side][index] * o.momentum + v.detach().float() * (1 - o.momentum)
                self.bank[side][index] = nn.functional.normalize(mixed, dim=1)
        return o.beta * loss

    def state_dict(self):
        return {"bank": {k: v.cpu() for k, v in self.bank.items()}, "z": dict(self.z),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.bank = {k: v.to(self.device) for k, v in state["bank"].items()}
        self.z = dict(state["z"])
        self.generator.set_state(state["generator"])


FEATURE_METHODS = {m.name: m for m in (AT, FitNets, OFD, AB, FT, CRD)}


class FeatureDistiller:
    """A feature method over the loss section's logit objective (see the module docstring)."""

    def __init__(self, cfg, data, student: nn.Module, teacher: nn.Module, teacher_name: str, device, bf16: bool,
                 check_only: bool = False):
        settings = cfg.distill.settings()
        self.method = FEATURE_METHODS[cfg.distill.method](settings)
        self.student_specs = cfg.distill.student_layers or self.method.default_specs(cfg.model.name, student)
        self.teacher_specs = cfg.distill.teacher_layers or self.method.default_specs(teacher_name, teacher)
        if len(self.student_specs) != len(self.teacher_specs):
            raise ValueError(f"the student has {len(self.student_specs)} tap points and the teacher "
                             f"{len(self.teacher_specs)}: give distill.student_layers and teacher_layers in pairs")
        s_shapes = tap_shapes(student, self.student_specs, data.input_shape)  # per sample (C, H, W) or (D,)
        t_shapes = tap_shapes(teacher, self.teacher_specs, data.input_shape)
        self.method.prepare(teacher, teacher_name, self.teacher_specs, cfg.distill.teacher_layers is None)
        adapters = self.method.adapters(s_shapes, t_shapes).to(device)
        teacher_adapters = self.method.teacher_adapters(t_shapes)
        if teacher_adapters is not None:
            teacher_adapters = teacher_adapters.to(device)
        if cfg.channels_last:
            adapters = adapters.to(memory_format=torch.channels_last)
            if teacher_adapters is not None:
                teacher_adapters = teacher_adapters.to(memory_format=torch.channels_last)
        if cfg.sync_batchnorm and torch.distributed.is_available() and torch.distributed.is_initialized():
            # the adapters' batch norms as the student's: statistics over the global batch
            adapters = nn.SyncBatchNorm.convert_sync_batchnorm(adapters)
            if teacher_adapters is not None:
                teacher_adapters = nn.SyncBatchNorm.convert_sync_batchnorm(teacher_adapters)
        frozen = getattr(self.method, "paraphraser_stage", False)  # FT's paraphraser stage trains no student
        self.module = DistillModule(student, adapters, self.student_specs, teacher_adapters, frozen)
        # what trains (or is handed on) beside the student: saved as adapters.pt; None when nothing
        both = adapters if teacher_adapters is None else nn.ModuleDict({"student": adapters,
                                                                         "teacher": teacher_adapters})
        self.adapters = both if any(True for _ in both.parameters()) else None
        self.teacher, self.teacher_taps = teacher, Taps(teacher, self.teacher_specs)
        self.teacher_taps.active = False  # on only in the distiller's teacher forward (not its evaluation)
        self.teacher_bn_train = getattr(settings, "teacher_bn", "eval") == "train"
        # a pre-stage trains part of the student (FitNets' hint stage: up to the hint layer) or none of it
        self.unused_parameters = self.method.replaces_loss
        if isinstance(self.method, CRD):
            self.method.index(data.split_labels("train"))
            if not check_only:  # (the banks: a row per training example)
                self.method.start(cfg.seed, device)
        self.device_type, self.bf16 = device.type, bf16
        self.logit = LogitDistiller(student, None, cfg.loss, device.type, bf16)  # the loss section's parts
        self.source = None  # (attached by the caller; the teacher runs here, online, for its features)

    @property
    def part_names(self):
        return (() if self.method.replaces_loss else self.logit.part_names) + (self.method.name,)

    def start_epoch(self, epoch: int) -> None:
        pass

    @torch.no_grad()
    def _teacher(self, x):
        with _bn_train_frozen(self.teacher) if self.teacher_bn_train else contextlib.nullcontext():
            with autocast(self.bf16, self.device_type), self.teacher_taps.capturing():
                logits = self.teacher(x)
        features = [f.float() for f in self.teacher_taps.features]
        self.teacher_taps.clear()
        return logits.float(), features

    def __call__(self, data, module, x, y, index, views):
        teacher_logits, teacher_features = self._teacher(x)
        with autocast(self.bf16, self.device_type):
            logits, student_features, teacher_adapted = module(x, teacher_features)
        term = self.method.term(_float(student_features), _float(teacher_adapted), y, index, teacher_features)
        if self.method.replaces_loss:
            return term, logits, {self.method.name: term}
        loss, parts = distillation_loss_parts(logits, y, teacher_logits, **self.logit.loss_kwargs)
        parts[self.method.name] = term
        return loss + term, logits, parts

    def remove(self) -> None:
        """Take the hooks off student and teacher (a distiller built only to check a config)."""
        self.module.taps.remove()
        self.teacher_taps.remove()

    def state_dict(self) -> dict:
        state = {"adapters": self.adapters.state_dict()} if self.adapters is not None else {}
        extra = self.method.state_dict()
        return {**state, "method": extra} if extra else state

    def load_state_dict(self, state: dict) -> None:
        if self.adapters is not None:
            self.adapters.load_state_dict(state["adapters"])
        if "method" in state:
            self.method.load_state_dict(state["method"])

    def finish(self, main: bool) -> None:
        pass


class JacobianDistiller(LogitDistiller):
    """Jacobian matching (Srinivas & Fleuret 2018): CE(+KD) + β·mean_b ‖g_S/‖g_S‖ − g_T/‖g_T‖‖²,
    g = ∇_x z_c of one output per sample (the label's, or the teacher's top-1). The student's g
    comes from the training forward itself (train-mode batch norm: its batch statistics add
    O(1/B) cross-sample terms to each g, not removed) with ``create_graph`` — double backprop;
    the teacher's from its own eval-mode forward (exact per-sample gradients), a constant."""

    def __init__(self, student, teacher, cfg, device_type, bf16):
        super().__init__(student, None, cfg.loss, device_type, bf16)
        self.teacher, self.settings = teacher, cfg.distill.settings()

    @property
    def part_names(self):
        return super().part_names + ("jacobian",)

    def __call__(self, data, module, x, y, index, views):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            x_t = x.detach().requires_grad_(True)
            with autocast(self.bf16, self.device_type):
                teacher_logits = self.teacher(x_t)
            teacher_logits = teacher_logits.float()
            classes = y if self.settings.target == "label" else teacher_logits.detach().argmax(1)
            (g_t,) = torch.autograd.grad(jacobian_output(teacher_logits, classes), x_t)
        with autocast(self.bf16, self.device_type):
            logits = data.forward(module, x)
        (g_s,) = torch.autograd.grad(jacobian_output(logits, classes), x, create_graph=True)
        loss, parts = distillation_loss_parts(logits, y, teacher_logits.detach(), **self.loss_kwargs)
        parts["jacobian"] = self.settings.beta * jacobian_loss(g_s, g_t)
        return loss + parts["jacobian"], logits, parts


def _float(features):
    """Adapted features (tensors, or tuples of them: FT's paraphraser) in float32, None kept:
    the terms compute in float32 whatever the forward's autocast gave."""
    if isinstance(features, (list, tuple)):
        return type(features)(_float(f) for f in features)
    return features.float() if features is not None else None


@contextlib.contextmanager
def _bn_train_frozen(model: nn.Module):
    """The model's batch norms normalise with batch statistics (train mode) while their
    running statistics and counters are not touched at all (``track_running_stats`` off for
    the call: no update, so a non-finite batch cannot reach them either)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in bns]
    for m in bns:
        m.train()
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, (training, tracking) in zip(bns, saved):
            m.train(training)
            m.track_running_stats = tracking


class DKDDistiller(LogitDistiller):
    """Decoupled KD (Zhao et al. 2022): CE (the loss section's, α = 0) + warm-up·(α·TCKD + β·NCKD) at τ."""

    def __init__(self, student, source, cfg, device_type, bf16):
        super().__init__(student, source, cfg.loss, device_type, bf16)
        self.settings, self.tau, self.factor = cfg.distill.settings(), cfg.loss.tau, 1.0

    @property
    def part_names(self):
        return super().part_names + ("dkd",)

    def start_epoch(self, epoch: int) -> None:  # (epochs counted from 1, as mdistiller's)
        warmup = self.settings.warmup_epochs
        self.factor = dkd_warmup_factor(epoch + 1, warmup) if warmup else 1.0

    def __call__(self, data, module, x, y, index, views):
        with autocast(self.bf16, self.device_type):
            logits = data.forward(module, x)
        teacher_logits = self.source(x, index, views)
        loss, parts = distillation_loss_parts(logits, y, None, **self.loss_kwargs)
        o = self.settings
        parts["dkd"] = self.factor * dkd_loss(logits, teacher_logits, y, alpha=o.alpha, beta=o.beta, tau=self.tau)
        return loss + parts["dkd"], logits, parts


class LSKDDistiller(LogitDistiller):
    """Logit-standardised KD (Sun et al. 2024): the loss section's objective on z-scored logits in its KL term."""

    def __init__(self, student, source, cfg, device_type, bf16):
        super().__init__(student, source, cfg.loss, device_type, bf16)

    def __call__(self, data, module, x, y, index, views):
        with autocast(self.bf16, self.device_type):
            logits = data.forward(module, x)
        teacher_logits = self.source(x, index, views)
        ce, parts = distillation_loss_parts(logits, y, None, **{**self.loss_kwargs, "alpha": 0.0})
        alpha = self.loss_kwargs["alpha"]
        _, kd_parts = distillation_loss_parts(standardize_logits(logits.float()), y, standardize_logits(teacher_logits),
                                              **{**self.loss_kwargs, "alpha": 1.0})
        parts = {name: (1.0 - alpha) * value for name, value in parts.items()} if alpha < 1 else {}
        parts["kd"] = alpha * kd_parts["kd"]
        return sum(parts.values()), logits, parts


def build_distiller(cfg, data, student: nn.Module, teachers, device, bf16: bool):
    """The run's distiller, before the optimizer (which takes its adapters); its teacher
    source is attached later (``distiller.source = open_teacher_source(...)``)."""
    method = cfg.distill.method
    if method in FEATURE_METHODS:
        return FeatureDistiller(cfg, data, student, teachers.models[0], teachers.names[0], device, bf16)
    if method == "jacobian":
        return JacobianDistiller(student, teachers.models[0], cfg, device.type, bf16)
    kind = {"dkd": DKDDistiller, "lskd": LSKDDistiller}.get(method)
    if kind is not None:
        return kind(student, None, cfg, device.type, bf16)
    return LogitDistiller(student, None, cfg.loss, device.type, bf16)


def check_distiller(cfg, data, teachers) -> None:
    """Build the feature method once on a throwaway student, before the run dir exists, so
    a tap that does not exist, a family without the declared points, or features whose
    sizes do not pair are one-line ConfigErrors and nothing is written. The global RNG is
    left as it was (the run's student is initialised from it afterwards)."""
    if cfg.distill.method not in FEATURE_METHODS:
        return
    teacher = teachers.models[0]  # (a paraphraser stage's adapters are checked by _check_paraphraser below)
    with torch.random.fork_rng(devices=[]):
        student = build_model(cfg.model.name, data.num_classes, input_shape=data.input_shape).to(
            next(teacher.parameters()).device)
        try:
            distiller = FeatureDistiller(cfg, data, student, teacher, teachers.names[0],
                                         next(teacher.parameters()).device, False, check_only=True)
        except ValueError as err:
            raise ConfigError(f"distill.method={cfg.distill.method}: {first_line(err)}") from None
    distiller.remove()
    if cfg.distill.method == "crd" and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ConfigError("distill.method=crd: its memory banks are not shared between processes yet: train CRD "
                          "in one process (no torchrun)")
    if cfg.distill.method == "ft" and not distiller.method.paraphraser_stage:
        _check_paraphraser(distiller, Path(cfg.model.init_run))


def _check_paraphraser(distiller, run: Path) -> None:
    """FT's translator stage starts from its paraphraser stage's adapters: they must be there and fit."""
    path = run / "adapters.pt"
    if not path.is_file():
        raise ConfigError(f"distill.method=ft: model.init_run {run} has no adapters.pt: point it at a finished run "
                          "of the paraphraser stage (distill.options.stage=paraphraser)")
    if _same_modules(torch_load(path), distiller.adapters) is None:
        raise ConfigError(f"distill.method=ft: {path} is not this FT's paraphraser (other layers, teacher or "
                          "distill.options.rate): train the paraphraser stage with the same teacher and options")


def start_adapters(distiller, run: Path, log) -> Path | None:
    """An earlier stage's adapters (``adapters.pt``) start this run's when they are the same
    modules (names and shapes): returns the file read; otherwise this run's start fresh, and a
    line says so."""
    path = run / "adapters.pt"
    if distiller.adapters is None or not path.is_file():
        return None
    saved = _same_modules(torch_load(path), distiller.adapters)
    if saved is not None:
        distiller.adapters.load_state_dict(saved)
        log(f"adapters start from {path}")
        return path
    log(f"{path} holds other adapters than this method's: this run's adapters start fresh")
    return None


def _same_modules(saved: dict, adapters: nn.Module) -> dict | None:
    """``saved`` when it is a state dict of these adapters (the same names and shapes), else None."""
    mine = adapters.state_dict()
    same = saved.keys() == mine.keys() and all(saved[k].shape == mine[k].shape for k in mine)
    return saved if same else None

