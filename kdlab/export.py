"""``kdlab export RUN [--out DIR]``: a finished run as a folder to publish (the Hugging Face Hub's layout).

The folder (default ``exports/<run name>``) holds::

    model.safetensors  the weights; a ``timm:`` model's under timm's own keys (no ``net.``), so
                       ``timm.create_model(NAME, num_classes=K).load_state_dict(...)`` takes them
    config.json        architecture, classes and their names, what to do to a raw input (shape,
                       scale, mean, std, resize and crop), kdlab's version, the run's name and hash;
                       a ``timm:`` model's also timm's keys (architecture, num_classes, model_args,
                       pretrained_cfg), so ``timm.create_model("local-dir:DIR" / "hf-hub:USER/REPO")`` works
    README.md          the model card: Hub metadata as YAML front matter (library_name, tags, datasets,
                       metrics, model-index), then data, objective, teacher, schedule, accuracy,
                       calibration with 95% intervals (from ``kdlab analyze``), hash, commit, how to load
    config.yaml        the run's own files, unchanged: kdlab opens the folder as a finished run
    result.json        (``teacher.runs: [DIR]``, ``kdlab.load_run(DIR)``; runs.load_finished_model
    metrics.jsonl      reads model.safetensors where there is no model.pt)

The default keeps the run's name because a teacher enters its students' run hash by its folder's
name: a student distilled from the export hashes as one distilled from the run (same weights, same
logits). Everything is written into a temporary folder beside ``--out`` and renamed into place, so
``--out`` holds a whole export or nothing. Uploading is the user's (``hf upload USER/REPO DIR .``,
docs/export.md).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from .errors import ConfigError, KdlabError, RunError
from .files import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable_dir
from .runs import load_finished_model, load_run_config, read_json
from .version import __version__

WEIGHTS = "model.safetensors"
COPIED = ("config.yaml", "result.json", "metrics.jsonl")  # the run's own files: kdlab reads the folder as a run
HUB_DATASETS = {"mnist": "ylecun/mnist", "fashion-mnist": "zalando-datasets/fashion_mnist",
                "cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}  # ids on the Hub, where there is one
RAW_INPUTS = {  # what the dataset reader hands the model before normalisation (kdlab/data/sources.py, formats.py)
    "digits": "scikit-learn's load_digits images (0..16) × 16, clipped to 255, as uint8 (1, 8, 8)",
    "mnist1d": "an MNIST-1D signal: float32, 40 points, as (1, 40)",
    "mnist": "an IDX image: uint8 grey levels 0..255, (1, 28, 28)",
    "fashion-mnist": "an IDX image: uint8 grey levels 0..255, (1, 28, 28)",
    "cifar10": "a CIFAR image: uint8 RGB 0..255, channels first (3, 32, 32)",
    "cifar100": "a CIFAR image: uint8 RGB 0..255, channels first (3, 32, 32)",
}
CARD_METRICS = (("accuracy", "accuracy"), ("ece", "ECE (15 bins)"), ("adaptive_ece", "adaptive ECE"),
                ("classwise_ece", "classwise ECE"), ("mce", "MCE"), ("nll", "NLL"), ("brier", "Brier score"))


def default_out(run_dir: Path) -> Path:
    """``exports/<run name>`` under the current folder."""
    return Path("exports") / Path(run_dir).resolve().name


def is_export(folder: Path) -> bool:
    """A folder ``kdlab export`` wrote (what ``--force`` may replace)."""
    return all((Path(folder) / name).is_file() for name in (WEIGHTS, "config.json", "README.md"))


def export_run(run_dir: str | Path, out: str | Path | None = None, force: bool = False) -> Path:
    """Write the export of the finished run ``run_dir`` to ``out`` (default `default_out`) and
    return it. Bad input (an unfinished run, a non-empty ``out``) is a one-line error before
    anything is written; ``force`` replaces an earlier export (never another folder)."""
    run_dir = Path(run_dir)
    cfg, result = _check_run(run_dir)
    out = Path(out) if out is not None else default_out(run_dir)
    _check_out(out, run_dir, force)
    try:
        from safetensors.torch import save as safetensors_bytes
    except ImportError:
        raise ConfigError("kdlab export writes model.safetensors: pip install 'kdlab[export]' (safetensors)") from None
    model = load_finished_model(run_dir)
    timm_name = getattr(model, "timm_name", None)
    state = (model.net if timm_name else model).state_dict()  # timm's own keys: timm loads the file as it is
    preprocessing = input_preprocessing(run_dir, cfg, result)
    names = _class_names(cfg, result)
    meta = read_json(run_dir / "meta.json") if (run_dir / "meta.json").is_file() else {}
    analysis_path = run_dir / "analysis" / "analysis.json"
    analysis = read_json(analysis_path) if analysis_path.is_file() else None
    config = hub_config(cfg, result, meta, preprocessing, names, model if timm_name else None)
    card = model_card(run_dir, cfg, result, meta, analysis, config)
    weights = safetensors_bytes({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                                metadata={"format": "pt", "kdlab_model": cfg.model.name})

    missing = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # made here, removed on failure
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".export-tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: an export is readable as usual
        atomic_write_bytes(tmp / WEIGHTS, weights)
        atomic_write_json(tmp / "config.json", config)
        atomic_write_text(tmp / "README.md", card)
        for name in COPIED:
            if (run_dir / name).is_file():
                atomic_write_bytes(tmp / name, (run_dir / name).read_bytes())
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_run(run_dir: Path):
    """The run's config and result, or a one-line error: a finished classification run."""
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a folder: kdlab export takes a finished run dir (`kdlab runs` lists them)")
    cfg = load_run_config(run_dir)
    if not (run_dir / "result.json").is_file():
        raise RunError(f"run {run_dir} is not finished (no result.json): train it first (the same command resumes it)")
    result = read_json(run_dir / "result.json")
    if cfg.data.name == "translation" or "token_calibration" in result:
        raise RunError(f"{run_dir} is a translation run: kdlab export writes classifiers (a translation model also "
                       "needs its sentencepiece model and decoder settings)")
    if not (run_dir / "model.pt").is_file() and not (run_dir / WEIGHTS).is_file():
        raise RunError(f"{run_dir} has no model.pt: its final weights are missing")
    return cfg, result


def _check_out(out: Path, run_dir: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder for the export")
    if out.exists() and out.resolve() == run_dir.resolve():
        raise ConfigError(f"--out {out} is the run dir itself: give another folder (default exports/<run name>)")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"--out {out} exists and is not empty: give another folder, or --force to replace "
                              "an earlier export there")
        if not is_export(out):
            raise ConfigError(f"--out {out} is not empty and holds no kdlab export (model.safetensors, config.json, "
                              "README.md): --force replaces only an earlier export; give another folder")
    check_writable_dir(out.parent, "--out", probe=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to ``out``; an earlier export there (``--force``) is moved
    aside first and removed after, or put back if the rename fails."""
    if not out.exists() or not any(out.iterdir()):
        os.replace(tmp, out)  # (a rename onto an empty folder replaces it)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".export-old"))
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def input_preprocessing(run_dir: Path, cfg, result: dict) -> dict:
    """What to do to a raw input before the model, exactly as the run's evaluation did: image
    folders resize, crop and normalise with ImageNet's mean/std; in-memory datasets normalise with
    their training split's per-channel mean/std, computed again here from the run's data."""
    shape = list(result["input_shape"])
    formula = "x[c] = (raw[c] / divide_by - mean[c]) / std[c] in float32, c the channel (the first axis of a sample)"
    if cfg.data.name == "imagefolder":
        from .data.imagefolder import IMAGENET_MEAN, IMAGENET_STD

        size = cfg.data.image_size
        resize = cfg.data.eval_resize or int(round(size / 0.875))  # (as data.imagefolder.load_imagefolder)
        return {"input_shape": shape, "raw": "an RGB image file decoded to uint8 (0..255)",
                "resize_shorter_side": resize, "centre_crop": size, "interpolation": "bilinear, antialiased",
                "divide_by": 255.0, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "formula": f"resize the shorter side to {resize}, take the centre {size}×{size}, then {formula}"}
    from .data import load_dataset

    try:
        data = load_dataset(cfg.data)
    except KdlabError as err:
        raise type(err)(f"{run_dir}: its input normalisation is its training split's mean/std, so export reads the "
                        f"run's data: {str(err).splitlines()[0]}") from None
    if list(data.input_shape) != shape or data.num_classes != result["num_classes"]:
        raise RunError(f"{run_dir} trained on inputs {tuple(shape)} with {result['num_classes']} classes but its data "
                       f"now gives {tuple(data.input_shape)} with {data.num_classes}: the data changed since")
    return {"input_shape": shape, "raw": RAW_INPUTS.get(cfg.data.name, f"a {cfg.data.name} sample"),
            "divide_by": 255.0 if data.train_x.dtype == torch.uint8 else 1.0,
            "mean": data.mean.tolist(), "std": data.std.tolist(), "formula": formula}


def _class_names(cfg, result: dict) -> list[str]:
    """An image folder's class folders (result.json), else the dataset's names or the indices."""
    from .analysis.analyze import class_names

    return list(result.get("class_names") or class_names(cfg.data.name, result["num_classes"]))


def hub_config(cfg, result: dict, meta: dict, preprocessing: dict, names: list[str], timm_model=None) -> dict:
    """config.json: kdlab's description of the model; for a timm model also timm's own keys."""
    kdlab = {"model": cfg.model.name, "run": f"{result['name']}-{result['hash']}", "hash": result["hash"],
             "dataset": cfg.data.name, "objective": _objective(cfg), "kdlab_version": meta.get("kdlab_version"),
             "exported_by": __version__, "torch_version": meta.get("torch_version"),
             "git_commit": meta.get("git_commit"), "weights": WEIGHTS}
    config = {"architecture": cfg.model.name, "num_classes": result["num_classes"], "label_names": names,
              "preprocessing": preprocessing, "kdlab": kdlab}
    if timm_model is None:
        return config
    net, shape = timm_model.net, preprocessing["input_shape"]
    crop = preprocessing.get("centre_crop")
    return {**config, "architecture": timm_model.timm_name, "num_features": timm_model.feature_dim,
            "model_args": {"in_chans": shape[0]},
            "pretrained_cfg": {  # what timm's transforms need to preprocess as the run did
                "input_size": shape, "fixed_input_size": bool(net.pretrained_cfg.get("fixed_input_size", False)),
                "interpolation": "bilinear", "crop_pct": _crop_pct(crop, preprocessing["resize_shorter_side"]) if crop
                else 1.0,
                "crop_mode": "center", "mean": preprocessing["mean"], "std": preprocessing["std"],
                "num_classes": result["num_classes"], "first_conv": net.pretrained_cfg.get("first_conv"),
                "classifier": net.pretrained_cfg.get("classifier"), "custom_load": False}}


def _crop_pct(size: int, resize: int) -> float:
    """timm's crop_pct for "resize the shorter side to ``resize``, crop ``size``": timm resizes to
    floor(size / crop_pct), which size / resize can put one pixel short in floating point."""
    pct = size / resize
    while math.floor(size / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    return pct


def _objective(cfg) -> str:
    from .run_list import objective

    return objective(cfg)


def _tag(text: str) -> str:
    """A Hub tag from words: ``KL τ=4 α=1`` -> ``kl-tau-4-alpha-1``."""
    for symbol, word in (("τ", "tau"), ("α", "alpha"), ("ε", "eps"), ("∞", "inf"), ("+", "plus")):
        text = text.replace(symbol, f" {word} ")
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def front_matter(cfg, result: dict, analysis: dict | None, config: dict) -> dict:
    """The card's Hub metadata (huggingface.co/docs/hub/model-cards)."""
    timm = "pretrained_cfg" in config
    images = len(result["input_shape"]) == 3
    distilled = cfg.teacher is not None and (cfg.loss.alpha > 0 or cfg.distill.method != "logit")
    tags = ["kdlab"] + (["knowledge-distillation"] if distilled else []) + \
        (["label-smoothing"] if cfg.loss.smoothing else []) + [_tag(_objective(cfg)), cfg.data.name] + \
        (["image-classification"] if images else [])
    final = result["final"]
    metrics = [{"type": "accuracy", "name": "Test accuracy", "value": round(final["test_acc"], 4)}]
    if final.get("test_nll") is not None:
        metrics.append({"type": "nll", "name": "Test NLL", "value": round(final["test_nll"], 4)})
    calibration = (analysis or {}).get("calibration_test", {})
    for key, name in (("ece", "Test ECE (15 bins)"), ("brier", "Test Brier score")):
        if key in calibration:
            metrics.append({"type": key, "name": name, "value": round(calibration[key]["value"], 4)})
    task = {"type": "image-classification", "name": "Image Classification"} if images else \
        {"type": "other", "name": "Classification"}
    dataset = HUB_DATASETS.get(cfg.data.name, cfg.data.name)
    matter = {"library_name": "timm" if timm else "kdlab", "tags": tags, "datasets": [dataset],
              "metrics": [m["type"] for m in metrics]}
    if images:
        matter["pipeline_tag"] = "image-classification"
    matter["model-index"] = [{"name": config["kdlab"]["run"], "results": [
        {"task": task, "dataset": {"name": cfg.data.name, "type": dataset, "split": "test"}, "metrics": metrics}]}]
    return matter


def model_card(run_dir: Path, cfg, result: dict, meta: dict, analysis: dict | None, config: dict) -> str:
    """README.md: YAML front matter, then what the run was and what it gave."""
    run, final, prep = config["kdlab"]["run"], result["final"], config["preprocessing"]
    names = config["label_names"]
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    matter = yaml.safe_dump(front_matter(cfg, result, analysis, config), sort_keys=False, allow_unicode=True)
    lines = ["---", "# license: (choose one before uploading: https://hf.co/docs/hub/repositories-licenses)",
             matter.rstrip(), "---", "", f"# {run}", "",
             f"`{cfg.model.name}`, a classifier of `{cfg.data.name}` ({result['num_classes']} classes), trained with kdlab "
             f"{meta.get('kdlab_version', '(version not recorded)')}: {_objective(cfg)}; test accuracy "
             f"{100 * final['test_acc']:.2f}%.", "",
             "## Data", "",
             f"- dataset: `{cfg.data.name}`" + (f" (`{cfg.data.root}`)" if cfg.data.root else "") +
             f", input shape {tuple(prep['input_shape'])}, augmentation `{cfg.data.augment}`" +
             (f", {100 * cfg.data.label_noise:g}% {cfg.data.noise_type} label noise" if cfg.data.label_noise else ""),
             f"- classes: {shown}", f"- raw input: {prep['raw']}",
             f"- preprocessing: {prep['formula']}; divide_by = {prep['divide_by']:g}, mean = "
             f"{_numbers(prep['mean'])}, std = {_numbers(prep['std'])} (config.json: `preprocessing`)", "",
             "## Objective", "", *_objective_lines(cfg), "",
             "## Teacher", "", *_teacher_lines(cfg), "",
             "## Schedule", "", *_schedule_lines(cfg), "",
             "## Accuracy", "", "| split | accuracy | NLL |", "|---|---|---|"]
    for split in ("val", "test", "ema_val", "ema_test"):
        if final.get(f"{split}_acc") is not None:
            nll = final.get(f"{split}_nll")
            lines.append(f"| {split} | {100 * final[f'{split}_acc']:.2f}% | {'' if nll is None else f'{nll:.4f}'} |")
    lines += ["", "## Calibration", "", *_calibration_lines(run_dir, analysis), "",
              "## Provenance", "",
              f"- run: `{run}` (hash `{result['hash']}`: the SHA-256 of its resolved config, config.yaml here)",
              f"- git commit: `{meta.get('git_commit') or 'not recorded (kdlab was not a git checkout)'}`",
              f"- kdlab {meta.get('kdlab_version', '?')}, torch {meta.get('torch_version', '?')}, on "
              f"{result.get('device', '?')}, {result.get('train_time_s', 0):.0f} s of training; exported by "
              f"kdlab {__version__}", "",
              "## How to load", "", *_loading_lines(cfg, config), ""]
    return "\n".join(lines)


def _numbers(values) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def _objective_lines(cfg) -> list[str]:
    loss = cfg.loss
    lines = [f"- {_objective(cfg)}" + (": cross-entropy on the labels" + (" (smoothed)" if loss.smoothing else "")
                                       + ", no teacher" if cfg.teacher is None else "")]
    if cfg.teacher is not None and loss.alpha > 0:
        kd = f"KL at τ = {loss.tau:g} (scaling {loss.kl_scaling})" if loss.kd == "kl" else \
            f"MSE on logits ({loss.mse_reduction})"
        lines.append(f"- loss (1 − α)·CE + α·KD with α = {loss.alpha:g}, KD = {kd}")
    if loss.smoothing:
        lines.append(f"- label smoothing ε = {loss.smoothing:g} ({loss.smoothing_mode})")
    if cfg.distill.method != "logit":
        lines.append(f"- distillation method: {cfg.distill.method}" +
                     (f" ({cfg.distill.variant})" if cfg.distill.variant else ""))
    return lines


def _teacher_lines(cfg) -> list[str]:
    if cfg.teacher is None:
        return ["None: trained on the labels alone."]
    lines = []
    for run in cfg.teacher.runs:
        path, name = Path(run), Path(run).name
        described = f"- `{name}`" + (f" (hash `{name[-8:]}`)" if re.search(r"-[0-9a-f]{8}$", name) else "")
        try:
            teacher = read_json(path / "result.json")
            described += (f": {teacher['model']}, {_objective(load_run_config(path))}, test accuracy "
                          f"{100 * teacher['final']['test_acc']:.2f}%")
        except (KdlabError, KeyError, TypeError):
            pass  # (the teacher's run dir is not here: its name and hash still identify it)
        lines.append(described)
    lines += [f"- weights file `{Path(w.path).name}` ({w.model})" for w in cfg.teacher.weights]
    if len(lines) > 1:
        lines.append("- an ensemble: the mean of the teachers' logits")
    return lines


def _schedule_lines(cfg) -> list[str]:
    opt = cfg.optim
    if opt.optimizer == "sgd":
        optimizer = f"SGD, momentum {opt.momentum:g}" + (", Nesterov" if opt.nesterov else "")
    else:
        optimizer = f"Adam, betas {tuple(opt.betas)}, eps {opt.eps:g}"
    schedule = {"multistep": f"multistep: lr × {opt.gamma:g} at epochs {', '.join(map(str, opt.milestones))}",
                "cosine": "cosine to 0", "constant": "constant",
                "inverse_sqrt": f"inverse square root after {opt.warmup_steps} warm-up steps"}[opt.schedule]
    lines = [f"- {optimizer}; lr {opt.lr:g}, weight decay {opt.weight_decay:g}, batch {opt.batch_size}"
             + (f" (× {opt.accumulate} accumulated)" if opt.accumulate > 1 else ""),
             f"- {opt.epochs} epochs, schedule {schedule}" +
             (f", {opt.warmup_epochs} warm-up epochs" if opt.warmup_epochs else ""), f"- seed {cfg.seed}"]
    if opt.grad_clip:
        lines.append(f"- gradient norm clipped at {opt.grad_clip:g}")
    if opt.ema_decay:
        lines.append(f"- weight EMA, decay {opt.ema_decay:g} (model.safetensors holds the trained weights, not the "
                     "EMA's)")
    return lines


def _calibration_lines(run_dir: Path, analysis: dict | None) -> list[str]:
    report = (analysis or {}).get("calibration_test")
    if not report:
        return [f"Not computed: run `kdlab analyze {run_dir}` and export again (`--force`) for ECE, NLL and Brier "
                "score with 95% intervals."]
    lines = ["Test split; 95% bootstrap intervals (percentiles over resamples of the test set), `kdlab analyze`.",
             "", "| metric | value | 95% interval |", "|---|---|---|"]
    for key, name in CARD_METRICS:
        if key in report:
            entry = report[key]
            lines.append(f"| {name} | {entry['value']:.4f} | [{entry['low']:.4f}, {entry['high']:.4f}] |")
    scaling = analysis.get("temperature_scaling")
    if scaling:
        lines += ["", f"Temperature scaling (fitted on {scaling['fitted_on']}): T = {scaling['temperature']:.3f}, "
                      f"ECE {scaling['ece_before']:.4f} → {scaling['ece_after']:.4f}."]
    return lines


def _loading_lines(cfg, config: dict) -> list[str]:
    shape, k = tuple(config["preprocessing"]["input_shape"]), config["num_classes"]
    lines = ["With kdlab (`pip install kdlab`), this folder opens as a finished run:", "", "```python",
             "import kdlab", "", 'run = kdlab.load_run("PATH/TO/THIS/FOLDER")',
             "model = run.model()  # eval mode, logits of a preprocessed batch", "```", "",
             "or teaches students: `teacher.runs: [PATH/TO/THIS/FOLDER]` in a kdlab config.", ""]
    if "pretrained_cfg" in config:
        name = config["architecture"]
        return lines + ["With timm alone:", "", "```python", "import timm", "from safetensors.torch import load_file",
                        "", f'model = timm.create_model("{name}", num_classes={k}, in_chans={shape[0]})',
                        'model.load_state_dict(load_file("model.safetensors"))',
                        '# or, config.json included: timm.create_model("local-dir:PATH/TO/THIS/FOLDER", '
                        'pretrained=True)', '# after `hf upload USER/REPO`: timm.create_model("hf-hub:USER/REPO", '
                        'pretrained=True)', "```"]
    return lines + ["Or with kdlab's model and the weights file:", "", "```python",
                    "from safetensors.torch import load_file", "from kdlab.models import build_model", "",
                    f'model = build_model("{cfg.model.name}", {k}, input_shape={shape})',
                    'model.load_state_dict(load_file("model.safetensors"))', "model.eval()", "```"]
