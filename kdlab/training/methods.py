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
from pathlib import Path

import torch
import torch.nn as nn

from ..device import autocast
from ..errors import ConfigError, first_line
from ..feature_losses import FITNETS_CRD_WEIGHT, at_loss, fitnets_loss, ofd_loss, ofd_margin, stage_weights
from ..losses import distillation_loss_parts, dkd_loss, dkd_warmup_factor, standardize_logits
from ..models import build_model
from ..runs import torch_load
from ..models.taps import Taps, stage_taps, tap_shapes
from .distill import LogitDistiller


class DistillModule(nn.Module):
    """The student and its adapters: forward → (logits, [adapter_i(tap_i)])."""

    def __init__(self, student: nn.Module, adapters: nn.ModuleList, specs: list[str]):
        super().__init__()
        self.student, self.adapters = student, adapters
        self.taps = Taps(student, specs)
        self.taps.active = False  # on only in this forward: evaluation of the student copies nothing

    def forward(self, x):
        with self.taps.capturing():
            logits = self.student(x)
        features = self.taps.features
        self.taps.clear()  # (the adapted features below hold what the loss needs)
        return logits, [adapter(f) for adapter, f in zip(self.adapters, features)]


def _conv_bn(c_in: int, c_out: int, spatial: bool = True) -> nn.Module:
    """OFD's connector (Heo et al. 2019a): conv 1×1 + BN, initialised as the reference
    (a fully connected layer's features: linear + BN)."""
    if not spatial:
        return nn.Sequential(nn.Linear(c_in, c_out, bias=False), nn.BatchNorm1d(c_out))
    conv = nn.Conv2d(c_in, c_out, 1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    bn = nn.BatchNorm2d(c_out)
    return nn.Sequential(conv, bn)


def _conv_reg(c_in: int, c_out: int, spatial: bool = True) -> nn.Module:
    """FitNets' regressor as CRD/mdistiller build it for equal spatial sizes: conv 3×3 + BN +
    ReLU (a fully connected layer's features: one linear layer, as Romero et al.'s MLP hints)."""
    if not spatial:
        return nn.Linear(c_in, c_out)
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=False))


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

    def prepare(self, teacher: nn.Module, teacher_name: str, teacher_specs: list[str], defaulted: bool) -> None:
        """Anything the term needs from the teacher once (OFD: the margins)."""

    def term(self, student_features, teacher_features) -> torch.Tensor:
        raise NotImplementedError


class AT(FeatureMethod):
    name = "at"

    def adapters(self, student_shapes, teacher_shapes):
        for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes)):
            if len(s) != 3 or len(t) != 3:
                raise ValueError(f"attention maps need spatial features (C, H, W); tap pair {i} gives {tuple(s)} "
                                 f"and {tuple(t)} per sample: use a convolutional student and teacher")
        _same_spatial(student_shapes, teacher_shapes, self.name)
        return super().adapters(student_shapes, teacher_shapes)

    def term(self, s, t):
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
            return nn.ModuleList(nn.Conv2d(s[0], t[0], 3, 1, 1) if len(s) == 3 else nn.Linear(s[0], t[0])
                                 for s, t in zip(student_shapes, teacher_shapes))
        return nn.ModuleList(_conv_reg(s[0], t[0], len(s) == 3) for s, t in zip(student_shapes, teacher_shapes))

    def term(self, s, t):
        variant = "paper" if self.hint_stage else "crd"
        return self.beta * sum(fitnets_loss(a, b, variant=variant) for a, b in zip(s, t))


class OFD(FeatureMethod):
    """Pre-ReLU taps, conv-BN connectors, margins from the teacher's BN before each ReLU."""
    name = "ofd"

    def default_specs(self, model_name, model):
        return [tap.pre_relu for tap in stage_taps(model_name, model, require=("pre_relu", "bn"))]

    def adapters(self, student_shapes, teacher_shapes):
        _same_spatial(student_shapes, teacher_shapes, self.name)
        return nn.ModuleList(_conv_bn(s[0], t[0], len(s) == 3) for s, t in zip(student_shapes, teacher_shapes))

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

    def term(self, s, t):  # Heo et al.: CE + β·Σ_i w_i·Σ partial L2 / B (ofd_loss divides by B)
        return self.settings.beta * sum(w * ofd_loss(a, b, m.to(a.device))
                                        for w, a, b, m in zip(self.weights, s, t, self.margins))


FEATURE_METHODS = {m.name: m for m in (AT, FitNets, OFD)}


class FeatureDistiller:
    """A feature method over the loss section's logit objective (see the module docstring)."""

    def __init__(self, cfg, data, student: nn.Module, teacher: nn.Module, teacher_name: str, device, bf16: bool):
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
        if cfg.channels_last:
            adapters = adapters.to(memory_format=torch.channels_last)
        self.module = DistillModule(student, adapters, self.student_specs)
        # what trains beside the student (None: the method has no parameters of its own)
        self.adapters = adapters if any(True for _ in adapters.parameters()) else None
        self.teacher, self.teacher_taps = teacher, Taps(teacher, self.teacher_specs)
        self.teacher_taps.active = False  # on only in the distiller's teacher forward (not its evaluation)
        self.teacher_bn_train = getattr(settings, "teacher_bn", "eval") == "train"
        # a pre-stage trains part of the student (FitNets' hint stage: up to the hint layer)
        self.unused_parameters = self.method.replaces_loss
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
        with autocast(self.bf16, self.device_type):
            logits, student_features = module(x)
        teacher_logits, teacher_features = self._teacher(x)
        term = self.method.term([f.float() for f in student_features], teacher_features)
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
        return {"adapters": self.adapters.state_dict()} if self.adapters is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.adapters is not None:
            self.adapters.load_state_dict(state["adapters"])

    def finish(self, main: bool) -> None:
        pass


@contextlib.contextmanager
def _bn_train_frozen(model: nn.Module):
    """The model's batch norms normalise with batch statistics (train mode) while their
    running statistics stay as they are (momentum 0 for the call; the counter restored)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in bns]
    for m in bns:
        m.train()
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (training, momentum, tracked) in zip(bns, saved):
            m.train(training)
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


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
    teacher = teachers.models[0]
    with torch.random.fork_rng(devices=[]):
        student = build_model(cfg.model.name, data.num_classes, input_shape=data.input_shape).to(
            next(teacher.parameters()).device)
        try:
            distiller = FeatureDistiller(cfg, data, student, teacher, teachers.names[0],
                                         next(teacher.parameters()).device, False)
        except ValueError as err:
            raise ConfigError(f"distill.method={cfg.distill.method}: {first_line(err)}") from None
    distiller.remove()


def start_adapters(distiller, run: Path, log) -> None:
    """An earlier stage's adapters (``adapters.pt``) start this run's when they are the same
    modules (names and shapes); otherwise this run's start fresh, and a line says so."""
    path = run / "adapters.pt"
    if distiller.adapters is None or not path.is_file():
        return
    saved, mine = torch_load(path), distiller.adapters.state_dict()
    if saved.keys() == mine.keys() and all(saved[k].shape == mine[k].shape for k in mine):
        distiller.adapters.load_state_dict(saved)
        log(f"adapters start from {path}")
    else:
        log(f"{path} holds other adapters than this method's: this run's adapters start fresh")
