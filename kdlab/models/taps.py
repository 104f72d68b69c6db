"""Layer taps: the tensors named modules give (or take) in a forward, by module name, through
forward hooks — the features of feature-based distillation (FitNets, AT, AB, OFD, FT).

    taps = Taps(student, ["layers.2", "layers.2.relu:in"])   # a CIFAR ResNet-20
    logits = student(x)
    features = taps.features   # this forward's tensors, in spec order, in the autograd graph

A spec is ``NAME``, the module's output, or ``NAME:in``, its first positional input (a
post-activation ResNet's pre-ReLU sum is the input of its block's last ReLU). The hooks only
read: no module runs a second time (re-applying a batch norm to get its output, as some KD
code does, updates its running statistics twice), so the model's outputs, gradients and
running statistics are those it has without taps. Each tensor is kept as a copy taken when the
module runs (``clone``, which stays in the autograd graph): an in-place op after the module
(``ReLU(inplace=True)``, timm's ``x += shortcut``) would otherwise change it; the copies are
held until the next forward of the model the taps were set on (which clears them first) or
``clear()``. Under DDP the hooks go on the inner module (``Taps(ddp_model, ...)`` unwraps it;
names are the inner module's).

``stage_taps(name, model)`` gives what a family declares (its models' ``stage_taps()``) per
stage: the output (AT, FitNets, FT), the feature before the ReLU and the norm before that ReLU
(AB, OFD: Heo et al.'s margin reads its weight and bias). ``list_taps(model, input_shape)`` is
every module with its output shape (``kdlab models --layers NAME``).
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn

LIST_HINT = "`kdlab models --layers MODEL` lists a model's modules"


@dataclass(frozen=True)
class StageTap:
    """One stage's tap specs (module names relative to the model; ``:in`` = the module's input).
    ``pre_relu`` has the shape of ``out``; None where the family has no ReLU there, ``bn`` None
    where no norm comes before that ReLU."""

    out: str  # the stage's output: AT, FitNets, FT
    pre_relu: str | None  # the feature before the stage's last ReLU: AB, OFD
    bn: str | None  # the norm before that ReLU, whose weight and bias set OFD's margin


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (the model itself otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def parse_spec(model: nn.Module, spec: str) -> tuple[nn.Module, bool]:
    """(module, tap its input?) for ``NAME`` or ``NAME:in``; a one-line ValueError for a name the
    model lacks, with the closest of its module names."""
    name, colon, where = spec.rpartition(":")
    if not colon:
        name = spec
    elif where != "in":
        raise ValueError(f"tap {spec!r}: write NAME for a module's output or NAME:in for its input")
    try:
        return model.get_submodule(name), bool(colon)
    except AttributeError:
        pass
    close = difflib.get_close_matches(name, [n for n, _ in model.named_modules() if n], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"tap {spec!r}: the model has no module {name!r}{hint} ({LIST_HINT})")


class Taps:
    """Forward hooks on the modules named by ``specs``; ``features`` holds the last forward's
    tensors. Use as a context manager, or call ``remove()``. ``active`` (default True) turns
    the hooks on and off without removing them: a distiller keeps its taps off outside its
    own forwards (``capturing()``), so evaluation copies nothing."""

    def __init__(self, model: nn.Module, specs: Sequence[str]):
        model = unwrap(model)
        self.specs = list(specs)
        targets = [parse_spec(model, spec) for spec in self.specs]  # every name checked before any hook
        self._tensors: list[torch.Tensor | None] = [None] * len(self.specs)
        self._calls = [0] * len(self.specs)
        self._problems: list[str | None] = [None] * len(self.specs)
        self._forwards = 0
        self.active = True
        self._handles = [model.register_forward_pre_hook(self._new_forward, prepend=True)]
        for i, (module, is_input) in enumerate(targets):
            if is_input:
                self._handles.append(module.register_forward_pre_hook(partial(self._take_input, i)))
            else:
                self._handles.append(module.register_forward_hook(partial(self._take_output, i)))

    def _new_forward(self, module, args) -> None:
        if self.active:
            self.clear()
            self._forwards += 1

    def _take_input(self, i, module, args) -> None:
        if self.active:
            self._keep(i, args[0] if args else None, "its first input")

    def _take_output(self, i, module, args, output) -> None:
        if self.active:
            self._keep(i, output, "its output")

    @contextmanager
    def capturing(self):
        """The hooks on for the forwards inside the block (off again after it)."""
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def _keep(self, i: int, value, what: str) -> None:
        self._calls[i] += 1
        if isinstance(value, torch.Tensor):
            self._tensors[i], self._problems[i] = value.clone(), None
        else:
            self._tensors[i] = None
            self._problems[i] = f"{what} is {type(value).__name__}, not a tensor (a keyword argument or a tuple?)"

    @property
    def features(self) -> list[torch.Tensor]:
        """The tensors of the model's last forward, in spec order."""
        for spec, calls, problem in zip(self.specs, self._calls, self._problems):
            if calls == 0:
                when = "the model has not run since the taps were set" if self._forwards == 0 else \
                    "its module did not run in the model's last forward"
                raise ValueError(f"tap {spec!r}: {when}")
            if calls > 1:
                raise ValueError(f"tap {spec!r}: its module ran {calls} times in one forward (one module used in "
                                 "several places?): tap a module that runs once")
            if problem:
                raise ValueError(f"tap {spec!r}: {problem}; tap a module that gives or takes one tensor")
        return list(self._tensors)

    def clear(self) -> None:
        """Drop the kept tensors (the next forward of the model does this itself)."""
        self._tensors = [None] * len(self.specs)
        self._calls = [0] * len(self.specs)
        self._problems = [None] * len(self.specs)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> Taps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def stage_taps(model_name: str, model: nn.Module, require: Sequence[str] = ()) -> list[StageTap]:
    """The stage taps ``model_name``'s family declares. ``require`` ("pre_relu", "bn") turns a
    stage without that point into a one-line ValueError that says how to name modules instead."""
    declare = getattr(unwrap(model), "stage_taps", None)
    explicit = ("name the layers yourself (distill.student_layers and teacher_layers; in Python "
                f"Taps(model, ['NAME', 'NAME:in', ...])) ({LIST_HINT})")
    if declare is None:
        raise ValueError(f"{model_name}: kdlab declares no stage taps for this model; {explicit}")
    stages = declare()
    for what in require:
        if what not in ("pre_relu", "bn"):
            raise ValueError(f"stage_taps: require takes 'pre_relu' or 'bn', not {what!r}")
        missing = [stage.out for stage in stages if getattr(stage, what) is None]
        if missing:
            label = "pre-ReLU feature" if what == "pre_relu" else "batch norm before the ReLU"
            raise ValueError(f"{model_name}: no {label} found for stage {', '.join(missing)}; {explicit}")
    return stages


def relu_stages(sequence: nn.Sequential, prefix: str, before: tuple[type, ...]) -> list[StageTap]:
    """For each ReLU of ``sequence`` right after a module of a type in ``before``: its output, and
    that module's output as the pre-ReLU feature (a norm is also ``bn``)."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    stages, modules = [], list(sequence)
    for i in range(1, len(modules)):
        previous = modules[i - 1]
        if isinstance(modules[i], nn.ReLU) and isinstance(previous, before):
            pre = f"{prefix}{i - 1}"
            stages.append(StageTap(f"{prefix}{i}", pre, pre if isinstance(previous, norms) else None))
    return stages


class TapRow(NamedTuple):
    name: str
    type: str
    shape: tuple[int, ...] | None  # one sample's output shape; None: did not run, or no tensor out
    parameters: int


@contextmanager
def probing(model: nn.Module):
    """Eval mode (no batch-norm statistics updated) and no_grad; each module's mode restored."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def example_input(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """Two random inputs of ``input_shape`` on the model's device, from a generator of their own
    (the global random state is left as it was)."""
    first = next((t for t in chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)
    x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0))
    return x if first is None else x.to(first.device, first.dtype)


def list_taps(model: nn.Module, input_shape: Sequence[int]) -> list[TapRow]:
    """Every named module with its output shape for one sample (one forward of two random inputs
    in eval mode under no_grad: the model's state is left as it was)."""
    model = unwrap(model)
    named = [(name, module) for name, module in model.named_modules() if name]
    shapes: dict[str, tuple[int, ...] | None] = {}

    def record(name, module, args, output):
        shapes[name] = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None

    handles = [module.register_forward_hook(partial(record, name)) for name, module in named]
    try:
        with probing(model):
            model(example_input(model, input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return [TapRow(name, type(module).__name__, shapes.get(name), sum(p.numel() for p in module.parameters()))
            for name, module in named]


def tap_shapes(model: nn.Module, specs: Sequence[str], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """One sample's shape of each spec's tensor (a forward as in ``list_taps``)."""
    model = unwrap(model)
    with Taps(model, specs) as taps, probing(model):
        model(example_input(model, input_shape))
        return [tuple(t.shape[1:]) for t in taps.features]
