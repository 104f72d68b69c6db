"""The ``kdlab`` command: ``train``, ``configs``, ``models``, ``analyze``, ``compare``, ``export``, ``translate``,
``sweep``, ``report``, ``reproduce``, ``demo``.

Bad input (config, data, teacher, command line) prints one line ``kdlab: error: ...``
and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ConfigError, KdlabError, first_line


def _cmd_train(args) -> int:
    from .config import load_config
    from .train import train

    if args.help_config:
        from .config import describe_config

        print(describe_config())
        return 0
    if not args.config and not args.overrides:  # the defaults alone are no run anybody wants
        from .examples import list_example_configs

        examples = ", ".join(p.stem for p in list_example_configs())
        raise_usage(f"train needs a config: a YAML file or a packaged example ({examples}; `kdlab configs`), "
                    "and/or key=value settings, e.g. `kdlab train teacher-mnist1d`")
    if args.config:  # a YAML path, or a packaged example by name (`kdlab configs`)
        from .examples import resolve_config_path

        args.config = resolve_config_path(args.config)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    result = train(cfg, progress=not args.no_progress, epoch_log=print if args.no_progress else None)
    if result is None or os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return 0
    final = result["final"]
    print(f"{result['run_dir']}: test acc {final['test_acc']:.4f}, test NLL {final['test_nll']:.4f}, "
          f"{result['train_time_s']:.1f} s training")
    return 0


def _cmd_configs(args) -> int:
    from .examples import example_config_path, list_example_configs

    if args.name:
        print(example_config_path(args.name).read_text(encoding="utf-8"), end="")
        return 0
    for path in list_example_configs():
        first = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
        print(f"{path.stem:20s} {first}")
    print("\nkdlab train NAME [key=value ...] trains one; kdlab configs NAME > my.yaml copies it")
    return 0


def _cmd_runs(args) -> int:
    from pathlib import Path

    from .run_list import format_rows, list_runs

    rows = list_runs([Path(f) for f in (args.folders or ["runs"])])
    if args.json:
        import json

        print(json.dumps(rows, indent=1))
    elif rows:
        print(format_rows(rows))
    else:
        print("no run dirs there (a run dir holds config.yaml)")
    return 0


def _cmd_models(args) -> int:
    from .models.listing import models_command

    return models_command(args)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs, seeds=args.seeds,
             progress=not args.no_progress)
    return 0


def _cmd_analyze(args) -> int:
    from .analysis.analyze import analyze_run

    if len(args.run_dir) > 1:  # several runs: the comparison on shared axes (`kdlab compare`)
        if args.teacher or args.classes:
            raise ConfigError("--teacher and --classes are for one run; several runs are compared with the teacher "
                              "logits stored with each (`kdlab compare RUN RUN ...`)")
        from .compare import compare_runs

        compare_runs(args.run_dir, args.out)
        return 0
    if args.bootstrap < 1:
        raise ConfigError(f"--bootstrap takes the number of resamples for the intervals (>= 1), got {args.bootstrap}")
    classes = None
    if args.classes:
        classes = [[c.strip() for c in triple.split(",")] for triple in args.classes]
        for triple in classes:
            if len(triple) != 3 or not all(triple):
                raise ConfigError(f"--classes takes three classes like 0,1,2 (indices or class names), "
                                  f"got {','.join(triple)!r}")
    analyze_run(args.run_dir[0], args.teacher, classes, args.out, n_bootstrap=args.bootstrap)
    return 0


def _cmd_compare(args) -> int:
    from .compare import compare_runs

    compare_runs(args.run_dirs, args.out)
    return 0


def _cmd_export(args) -> int:
    from .export import export_run

    out = export_run(args.run_dir, args.out, force=args.force)
    print(f"{out}: {', '.join(sorted(p.name for p in out.iterdir()))}\n"
          f"review README.md (add a license), then publish: hf upload USER/REPO {out} .")
    return 0


def _cmd_translate(args) -> int:
    """Decode a finished translation run again with other settings, without training
    (decoding settings are not part of the run hash): RUN_DIR/decode/SETTINGS/ gets the
    translations and bleu.json; the run's own outputs stay as they are."""
    from .translate import decode_run

    temperatures = None
    if args.temperatures is not None:
        try:
            temperatures = [float(t) for t in args.temperatures.split(",")]
        except ValueError:
            raise ConfigError(f"--temperatures takes comma-separated numbers like 0.5,1,2, got {args.temperatures!r}") \
                from None
    decode_run(args.run_dir, beam=args.beam, alpha=args.alpha, extra_length=args.extra_length,
               temperatures=temperatures, temperature_sentences=args.temperature_sentences, split=args.split,
               device=args.device, memory_limit_gb=args.memory_limit_gb, progress=not args.no_progress)
    return 0


def _sweep_args(p, with_recipe=True):
    if with_recipe:
        p.add_argument("recipe", nargs="?", help="recipe id (`kdlab reproduce --list`) or a YAML path")
    p.add_argument("--scale", default="quick", choices=["quick", "paper"])
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--workers", type=int, default=1, help="parallel runs (local: processes sharing the cores)")
    p.add_argument("--threads", type=int, help="torch threads per local worker (default: cores / workers)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, e.g. --set device=cuda --set bf16=true (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--out", help="output directory (default runs/RECIPE-SCALE)")
    p.add_argument("--no-progress", action="store_true")


def _cmd_sweep(args) -> int:
    from .recipes import load_recipe
    from .sweep import run_sweep

    if not args.recipe:
        raise_usage("sweep needs a RECIPE")
    manifest = run_sweep(load_recipe(args.recipe), args.scale, args.out, executor=args.executor,
                         workers=args.workers, threads=args.threads, address=args.address,
                         settings=args.settings, progress=not args.no_progress)
    return 1 if any(r["status"] == "failed" for r in manifest["runs"]) else 0


def _cmd_report(args) -> int:
    from .report import write_report

    write_report(args.dir)
    return 0


def _cmd_reproduce(args) -> int:
    from .recipes import expand, list_recipes, load_recipe

    if args.list:
        for path in list_recipes():
            recipe = load_recipe(path)
            print(f"{recipe.id:28s} {recipe.title}  [{', '.join(recipe.scales)}]")
        return 0
    if not args.recipe:
        raise_usage("reproduce needs a RECIPE (or --list)")
    from pathlib import Path

    from .analysis.analyze import analyze_run
    from .report import write_report
    from .sweep import run_sweep

    recipe = load_recipe(args.recipe)
    out = Path(args.out or Path("runs") / f"{recipe.id}-{args.scale}")
    manifest = run_sweep(recipe, args.scale, out, executor=args.executor, workers=args.workers, threads=args.threads,
                         address=args.address, settings=args.settings, progress=not args.no_progress)
    todo = [run for run in expand(recipe, args.scale, out, args.settings)
            if run.analyze and (run.run_dir / "result.json").is_file()
            and not (run.run_dir / "analysis" / "analysis.json").is_file()]
    if todo:  # (minutes for a large recipe: say what is happening)
        from tqdm.auto import tqdm

        print(f"analysing {len(todo)} run(s) for the report", flush=True)
        for number, run in enumerate(tqdm(todo, desc="analyse", unit="run", disable=args.no_progress), start=1):
            teacher = str(run.teacher_of[0].run_dir) if len(run.teacher_of) == 1 else None
            analyze_run(run.run_dir, teacher, run.projections, n_bootstrap=100, log=lambda *a: None)
            if args.no_progress:
                print(f"  analysed {number}/{len(todo)}: {run.describe()}", flush=True)
    print("writing the report", flush=True)
    write_report(out)
    return 1 if any(r["status"] == "failed" for r in manifest["runs"]) else 0


def raise_usage(message: str):
    from .errors import ConfigError

    raise ConfigError(message)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``kdlab: error: ...``, exit 2) like every other."""

    def error(self, message: str):
        command = self.prog.removeprefix("kdlab").strip()
        hint = f"`kdlab {command} --help`" if command else "`kdlab --help`"
        self.exit(2, f"kdlab: error: {message.splitlines()[0]} (see {hint})\n")


def _version() -> str:
    """kdlab's version and torch's, without importing torch (``kdlab --version`` stays instant)."""
    from importlib.metadata import PackageNotFoundError, version

    from .version import __version__

    try:
        torch = version("torch")
    except PackageNotFoundError:
        torch = "not installed"
    return f"kdlab {__version__} (torch {torch}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdlab", description="knowledge distillation and label smoothing")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a teacher, or a student when the config has a teacher section")
    p.add_argument("config", nargs="?", help="YAML config (defaults apply to what it leaves out)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. loss.tau=inf optim.epochs=10")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: a line per epoch instead")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("configs", help="list the example configs (`kdlab train NAME` trains one), or print one")
    p.add_argument("name", nargs="?", help="print this example's YAML")
    p.set_defaults(func=_cmd_configs)
    p = sub.add_parser("runs", help="list run dirs: model, data, objective, teacher, state, accuracy")
    p.add_argument("folders", nargs="*", help="folders holding run dirs, or run dirs (default runs/)")
    p.add_argument("--json", action="store_true", help="the rows as JSON")
    p.set_defaults(func=_cmd_runs)
    p = sub.add_parser("models", help="list registered models")
    p.add_argument("--timm", metavar="PATTERN", help="list timm's architectures matching a glob, e.g. 'resnet*'")
    p.add_argument("--layers", metavar="NAME", help="a model's modules with their output shapes (tap points for "
                   "feature distillation) and its family's stage taps, e.g. --layers wrn-16-2 or timm:resnet50")
    p.add_argument("--input-shape", metavar="C,H,W", help="with --layers: one sample's shape (default 3,32,32; "
                   "1,40 for cnn1d; 3,224,224 for timm)")
    p.add_argument("--num-classes", type=int, default=100, help="with --layers: the number of classes (default 100)")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("analyze", help="calibration, logit statistics, projections, MI of a finished run "
                       "(several runs: as `kdlab compare`)")
    p.add_argument("run_dir", nargs="+", help="a finished run dir; several: compared on shared axes")
    p.add_argument("--teacher", help="teacher run dir (default: the teacher logits stored with the run, if any)")
    p.add_argument("--classes", action="append", help="three classes for the template projection, as indices or "
                   "class names (an image folder's folder names): default 0,1,2; repeat for more projections")
    p.add_argument("--out", help="output directory (default RUN_DIR/analysis)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    p.set_defaults(func=_cmd_analyze)
    p = sub.add_parser("compare", help="several finished runs on shared axes, labelled by objective, seeds "
                       "aggregated: Kim Figs. 2 and 4, reliability, accuracy against τ, with their table")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run dirs of one dataset (two or more)")
    p.add_argument("--out", help="output directory (default compare-HASH beside the first run, HASH of the runs' "
                   "names)")
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("export", help="a finished run as a folder to publish: model.safetensors, config.json, "
                       "a Hub model card (README.md); kdlab and timm load it back")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output folder (default exports/RUN_NAME: the run's name, by which a student's "
                   "run hash names its teacher)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("translate", help="decode a finished translation run again (beam, length penalty, "
                       "temperatures) without training; writes RUN_DIR/decode/SETTINGS/")
    p.add_argument("run_dir")
    p.add_argument("--beam", type=int, help="beam width; 0 or 1: greedy (default: the run's decode.beam)")
    p.add_argument("--alpha", type=float, help="length penalty exponent (default: the run's decode.alpha)")
    p.add_argument("--extra-length", type=int, help="decode at most source length + this many tokens "
                   "(default: the run's decode.extra_length)")
    p.add_argument("--temperatures", metavar="T1,T2,...", help="also validation BLEU of beam search with the logits "
                   "divided by each T (needs --beam >= 2; default: none)")
    p.add_argument("--temperature-sentences", type=int, metavar="N", help="the first N validation sentences for "
                   "--temperatures (default: the run's decode.temperature_sentences, else all)")
    p.add_argument("--split", choices=["val", "test"], default="test", help="the split decoded (default test)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the run's device setting)")
    p.add_argument("--memory-limit-gb", type=float, help="refuse a beam search estimated above this (default: the "
                   "run's memory_limit_gb, else 90%% of the device's memory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_translate)
    p = sub.add_parser("sweep", help="run every run of a recipe (resumable; skips finished runs)")
    _sweep_args(p)
    p.set_defaults(func=_cmd_sweep)
    p = sub.add_parser("report", help="HTML + Markdown report of a sweep directory")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("reproduce", help="sweep + analyze + report for a paper recipe")
    _sweep_args(p)
    p.add_argument("--list", action="store_true", help="list the recipes")
    p.set_defaults(func=_cmd_reproduce)
    p = sub.add_parser("demo", help="teacher + 7 students × 5 seeds on MNIST-1D, with a table (a few minutes)")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--teacher-epochs", type=int, default=100)
    p.add_argument("--student-epochs", type=int, default=100)
    p.add_argument("--seeds", type=int, default=5, help="student seeds per objective (paired by seed)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return parser


def _parse(argv: list[str] | None):
    """Parse, letting ``key=value`` overrides come after flags too
    (``kdlab train CFG --no-progress optim.epochs=2``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


class _Terminated(BaseException):
    """SIGTERM (a job scheduler, or torchrun stopping the ranks after one ended): unwinds
    like Ctrl-C, so the run's lock, loader workers and an empty run dir are cleaned up."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _torchrun() -> tuple[int, int] | None:
    """(rank, world size) under torchrun, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ.get("RANK", "0") or 0), world) if world > 1 else None


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
              "Socket Timeout", "Timed out", "recvBytes", "failed to recv", "ProcessGroupNCCL")


def _peer_lost(err: BaseException) -> bool:
    """A collective failed because another process of the run is gone (gloo or NCCL)."""
    import torch.distributed as dist

    return isinstance(err, getattr(dist, "DistError", ())) or (
        isinstance(err, RuntimeError) and any(s in str(err) for s in _PEER_LOST))


def _other_rank(rank: int, world: int) -> str:
    """The rank a surviving process can name: the other one of two, else any."""
    return f"rank {1 - rank}" if world == 2 else "another rank"


def _error(message: str, code: int) -> int:
    """``kdlab: error: MESSAGE`` on stderr; under torchrun also in the rank's error file,
    so torchrun's own failure report shows this line instead of "To enable traceback see"."""
    line = f"kdlab: error: {message}"
    print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and _torchrun() is not None:
        import json
        import time
        from pathlib import Path

        from .files import atomic_write_text

        try:  # whole or not at all: torchrun may stop this process (SIGTERM) while it writes, and then
            # reads the file for its report (a half-written one made that report a JSONDecodeError)
            atomic_write_text(Path(error_file), json.dumps({"message": line, "timestamp": int(time.time())}))
        except OSError:
            pass
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # a config path given as "key=value" is an override: `kdlab train loss.tau=3`
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    import signal
    import threading

    handled = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if handled else None
    torchrun = _torchrun()
    resume = "run the same torchrun command again to resume" if torchrun else "run the same command again to resume"
    try:
        return args.func(args)
    except KdlabError as err:
        return _error(str(err), 2)
    except KeyboardInterrupt:
        print(f"kdlab: interrupted (the last checkpoint is kept; {resume})", file=sys.stderr)
        return 130
    except _Terminated:
        if torchrun is not None:
            rank, world = torchrun
            return _error(f"rank {rank}: stopped by SIGTERM: torchrun stops every rank when one ends "
                          f"({_other_rank(rank, world)} of this {world}-process run?) or the job was cancelled — "
                          f"torchrun's report says which; the last checkpoint is kept: {resume}", 143)
        print(f"kdlab: stopped by SIGTERM (the last checkpoint is kept; {resume})", file=sys.stderr)
        return 143
    except BrokenPipeError:  # `kdlab reproduce --list | head`: the reader left, not an error
        sys.stderr.close()
        return 0
    except Exception as err:
        if torchrun is None or not _peer_lost(err):
            raise
        rank, world = torchrun
        reason = first_line(err).split("] ", 1)[-1].split(". ", 1)[0]  # (gloo: "[file:line] what. advice ...")
        return _error(f"rank {rank}: lost {_other_rank(rank, world)} of this {world}-process run ({reason}): it died "
                      f"or was killed; the last checkpoint is kept: {resume}", 1)
    finally:
        if handled:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
