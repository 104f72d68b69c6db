"""``kdlab models``: the registered families with example sizes, timm's architectures
(``--timm PATTERN``), and one model's modules with their output shapes and the stage taps
its family declares (``--layers NAME``), so a user can distil a model kdlab has never seen."""

from __future__ import annotations

import sys

from ..errors import ConfigError, first_line
from . import build_model, check_model, count_parameters, describe_models, list_models
from .taps import list_taps, stage_taps, tap_shapes
from .timm_family import import_timm


def _example_shape(name: str) -> tuple[int, ...]:
    """The input shape `kdlab models` uses for a model unless told: 1×40 for cnn1d (MNIST-1D),
    224×224×3 for timm, 32×32×3 otherwise."""
    return (1, 40) if name.startswith("cnn1d") else (3, 224, 224) if name.startswith("timm:") else (3, 32, 32)


def _models_layers(name: str, input_shape: str | None, num_classes: int) -> int:
    """`kdlab models --layers NAME`: every module with its output shape, and the family's stage taps."""

    shape = _example_shape(name)
    if input_shape is not None:
        try:
            shape = tuple(int(s) for s in input_shape.replace("x", ",").replace("×", ",").split(","))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise ConfigError(f"--input-shape takes one sample's shape like 3,32,32 (C,H,W) or 1,40 (C,L), "
                              f"got {input_shape!r}")
    if num_classes < 1:
        raise ConfigError(f"--num-classes must be at least 1, got {num_classes}")
    try:
        check_model(name, num_classes, shape)
        model = build_model(name, num_classes, input_shape=shape)
        rows = list_taps(model, shape)
    except ValueError as err:
        raise ConfigError(f"--layers {name}: {first_line(err)}") from None
    try:
        stages = stage_taps(name, model)
        out_shapes = tap_shapes(model, [stage.out for stage in stages], shape)  # pre-ReLU: the same shapes
    except ValueError as err:
        stages, no_stages = [], first_line(err)
    marks: dict[str, list[str]] = {}
    for number, stage in enumerate(stages, 1):
        marks.setdefault(stage.out, []).append(f"stage {number} output")
        if stage.pre_relu:
            module, _, where = stage.pre_relu.partition(":")
            what = " = its input" if where else " (the norm's output)" if stage.bn == stage.pre_relu else ""
            marks.setdefault(module, []).append(f"stage {number} pre-ReLU{what}")
        if stage.bn and stage.bn != stage.pre_relu:
            marks.setdefault(stage.bn, []).append(f"stage {number} norm before the ReLU")

    def size(dims) -> str:
        return "×".join(map(str, dims)) if dims is not None else "—"

    width = max(len(row.name) for row in rows) + 2
    kinds = max(len(row.type) for row in rows) + 2
    print(f"{name}: {count_parameters(model) / 1e6:.3f}M parameters, {num_classes} classes, input {size(shape)} "
          f"(shapes per sample; --input-shape, --num-classes to change)\n")
    print(f"{'module':{width}s}{'type':{kinds}s}{'output':>16s}  {'parameters':>12s}  stage tap")
    for row in rows:
        print(f"{row.name:{width}s}{row.type:{kinds}s}{size(row.shape):>16s}  {row.parameters:>12,d}  "
              f"{', '.join(marks.get(row.name, []))}".rstrip())
    if not stages:
        print(f"\nstage taps: {no_stages}")
        return 0
    print(f"\nstage taps ({name}'s family declares them; Taps(model, [spec, ...]) takes these specs, "
          "NAME:in = the module's input):")
    table = [("stage", "output (AT, FitNets, FT)", "pre-ReLU (AB, OFD)", "norm before the ReLU", "shape")]
    table += [(str(number), stage.out, stage.pre_relu or "—", stage.bn or "—", size(out_shape))
              for number, (stage, out_shape) in enumerate(zip(stages, out_shapes), 1)]
    widths = [max(len(row[column]) for row in table) + 2 for column in range(4)]
    for row in table:
        print("  " + "".join(f"{cell:{width}s}" for cell, width in zip(row, widths)) + row[4])
    return 0


def models_command(args) -> int:
    if args.layers is not None:
        return _models_layers(args.layers, args.input_shape, args.num_classes)
    try:
        timm = import_timm()
    except ValueError as err:
        timm, no_timm = None, str(err)
    if args.timm is not None:
        if timm is None:
            raise ConfigError(no_timm)
        names = timm.list_models(args.timm)
        for name in names:
            print(f"timm:{name}")
        print(f"{len(names)} of timm {timm.__version__}'s {len(timm.list_models())} architectures match "
              f"{args.timm!r}", file=sys.stderr)
        return 0
    print("families (any size the pattern allows):")
    for pattern, help in describe_models():
        print(f"  {pattern:24s} {help}")
    print("\nexamples (parameters with 100 classes, 32×32×3 inputs; 1×40 for cnn1d; 224×224×3 for timm):")
    for name in list_models():
        if name.startswith("timm:") and timm is None:
            continue
        print(f"  {name:16s} {count_parameters(build_model(name, 100, input_shape=_example_shape(name))) / 1e6:8.3f}M")
    if timm is None:
        print(f"\ntimm family unavailable here: {no_timm}")
    else:
        print(f"\ntimm {timm.__version__}: {len(timm.list_models())} architectures; "
              "`kdlab models --timm 'resnet*'` lists names")
    return 0
