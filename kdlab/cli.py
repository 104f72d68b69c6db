"""The ``kdlab`` command: ``train``, ``models``, ``analyze``, ``demo``.

Bad input (config, data, teacher) prints one line ``kdlab: error: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import KdlabError


def _cmd_train(args) -> int:
    from .config import load_config
    from .train import train

    if args.help_config:
        from .config import describe_config

        print(describe_config())
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    result = train(cfg, progress=not args.no_progress)
    final = result["final"]
    print(f"{result['run_dir']}: test acc {final['test_acc']:.4f}, test NLL {final['test_nll']:.4f}, "
          f"{result['train_time_s']:.1f} s training")
    return 0


def _cmd_models(args) -> int:
    from .models import build_model, count_parameters, describe_models, list_models

    print("families (any size the pattern allows):")
    for pattern, help in describe_models():
        print(f"  {pattern:24s} {help}")
    print("\nexamples (parameters with 100 classes, 32×32×3 inputs; 1×40 for cnn1d):")
    for name in list_models():
        shape = (1, 40) if name.startswith("cnn1d") else (3, 32, 32)
        print(f"  {name:16s} {count_parameters(build_model(name, 100, input_shape=shape)) / 1e6:8.3f}M")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs,
             progress=not args.no_progress)
    return 0


def _cmd_analyze(args) -> int:
    from .analysis.analyze import analyze_run
    from .errors import ConfigError

    classes = None
    if args.classes:
        try:
            classes = [int(c) for c in args.classes.split(",")]
        except ValueError:
            raise ConfigError(f"--classes takes three class indices like 0,1,2, got {args.classes!r}") from None
    analyze_run(args.run_dir, args.teacher, classes, args.out, n_bootstrap=args.bootstrap)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdlab", description="knowledge distillation and label smoothing")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a teacher, or a student when the config has a teacher section")
    p.add_argument("config", nargs="?", help="YAML config (defaults apply to what it leaves out)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. loss.tau=inf optim.epochs=10")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("models", help="list registered models")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("analyze", help="calibration, logit statistics, projections, MI of a finished run")
    p.add_argument("run_dir")
    p.add_argument("--teacher", help="teacher run dir (default: the teacher logits stored with the run, if any)")
    p.add_argument("--classes", help="three class indices for the template projection (default 0,1,2)")
    p.add_argument("--out", help="output directory (default RUN_DIR/analysis)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    p.set_defaults(func=_cmd_analyze)
    p = sub.add_parser("demo", help="teacher + 7 students on MNIST-1D, with a table (a few minutes)")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--student-epochs", type=int, default=30)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a config path given as "key=value" is an override: `kdlab train loss.tau=3`
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    try:
        return args.func(args)
    except KdlabError as err:
        print(f"kdlab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdlab: interrupted (the last finished epoch is checkpointed; run again to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
