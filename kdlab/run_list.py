"""``kdlab runs [DIR ...]``: the run dirs under a folder, one line each — what trained (model,
data, objective in words: CE, LS, KL τ=4, MSE, a distillation method), its state (finished,
resumable, empty) and its accuracy — so runs named ``student-<hash>`` can be told apart."""

from __future__ import annotations

import math
from pathlib import Path

from .errors import ConfigError
from .runs import load_run_config, read_json


def objective(cfg) -> str:
    """A run's training objective in a few words, e.g. ``KL τ=4 α=1``, ``MSE α=1``, ``LS ε=0.1``,
    ``OFD + CE``; a teacher-free run is ``CE`` (or ``LS``)."""
    loss = cfg.loss
    base = f"LS ε={loss.smoothing:g}" if loss.smoothing else "CE"
    if cfg.teacher is None or (loss.alpha == 0 and cfg.distill.method == "logit"):
        return base
    tau = "∞" if math.isinf(loss.tau) else f"{loss.tau:g}"
    kd = f"MSE α={loss.alpha:g}" if loss.kd == "mse" else f"KL τ={tau} α={loss.alpha:g}"
    if loss.alpha == 1:
        logit = kd
    elif loss.alpha == 0:
        logit = base
    else:
        logit = f"{kd} + {base}"
    method = cfg.distill.method
    if method == "logit":
        return logit
    name = {"lskd": "logit-standardised", "jacobian": "Jacobian", "fitnets": "FitNets"}.get(method, method.upper())
    if cfg.distill.variant:
        name += f" ({cfg.distill.variant})"
    if cfg.distill.alone:
        return f"{name} alone"
    return f"{name} + {logit}" if method != "lskd" else f"{name} {logit}"


def describe_run(run_dir: Path) -> dict:
    """One run dir's row: name, model, data, objective, teachers, state, epochs, accuracy."""
    cfg = load_run_config(run_dir)
    started = f", from {Path(cfg.model.init_run).name}" if cfg.model.init_run else ""
    row = {"run": run_dir.name, "model": cfg.model.name, "data": cfg.data.name, "objective": objective(cfg) + started,
           "teachers": [Path(t).name for t in cfg.teacher.runs] if cfg.teacher else [], "seed": cfg.seed}
    if (run_dir / "result.json").is_file():
        result = read_json(run_dir / "result.json")
        final = result.get("final", {})
        row.update(state="finished", epochs=result.get("epochs"), test_acc=final.get("test_acc"),
                   val_acc=final.get("val_acc"))
    elif (run_dir / "checkpoint.pt").is_file():
        row.update(state="resumable")
    else:
        row.update(state="started")
    return row


def list_runs(folders: list[Path]) -> list[dict]:
    """Every run dir (a folder with config.yaml) directly in ``folders`` (or a folder that is one)."""
    rows = []
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(f"{folder} is not a folder (kdlab runs lists the run dirs in folders, default runs/)")
        candidates = [folder] if (folder / "config.yaml").is_file() else sorted(folder.iterdir())
        for run_dir in candidates:
            if run_dir.is_dir() and (run_dir / "config.yaml").is_file():
                try:
                    rows.append(describe_run(run_dir))
                except Exception as err:  # one unreadable run dir must not hide the others
                    rows.append({"run": run_dir.name, "state": f"unreadable ({type(err).__name__})"})
    return rows


def format_rows(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    header = ("run", "model", "data", "objective", "teacher", "state", "test acc")
    lines = [header]
    for r in rows:
        teachers = r.get("teachers") or []
        teacher = teachers[0] + (f" +{len(teachers) - 1}" if len(teachers) > 1 else "") if teachers else "–"
        acc = r.get("test_acc")
        lines.append((r["run"], r.get("model", ""), r.get("data", ""), r.get("objective", ""), teacher,
                      r["state"] + (f" ({r['epochs']} ep)" if r.get("epochs") else ""),
                      f"{100 * acc:.2f}" if isinstance(acc, float) else ""))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)
