"""kdlab's Python API: what ``import kdlab`` offers (``kdlab.fit``, ``kdlab.load_run``, ...).

Configs are validated objects (`~kdlab.config.Config`), made from a dict, a YAML
file or a packaged example, with ``key.sub=value`` overrides as on the command line
(`make_config`). A run is a directory named by its config's hash; `fit` trains
one (or resumes it, or returns it finished) and `load_run` opens one as a
`Run`: its config, per-epoch metrics, final result, the trained model and the
evaluation outputs, in one object. (The names avoid kdlab's module names: ``kdlab.train``
and ``kdlab.config`` are modules.)

Losses take their arguments in one order everywhere here: ``(student_logits,
teacher_logits, labels)`` — the teacher may be None where no teacher term is computed —
as functions (`kd_loss`) and as modules (`KDLoss`, `KLDivergence`,
`LogitMSE`). Nothing here changes process-wide state (figures are drawn with
matplotlib's object API, only when asked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
import torch.nn as nn

from .config import Config, build_config, load_config
from .errors import ConfigError
from .losses import distillation_loss_parts, kl_loss, mse_loss


def make_config(source: Config | dict | str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """A validated config from a Config (copied, overrides applied), a dict, a YAML path or a
    packaged example name (``"teacher-mnist1d"``; `kdlab configs`), plus ``key.sub=value``
    overrides. Bad input raises `kdlab.errors.ConfigError` with a one-line message."""
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)  # ("optim.epochs=10" alone)
    if isinstance(source, Config):
        return build_config(source.model_dump(mode="python"), overrides)
    if isinstance(source, dict):
        return build_config(source, overrides)
    if source is None:
        return build_config({}, overrides)
    from .examples import resolve_config_path

    return load_config(resolve_config_path(source), overrides)


@dataclass
class Run:
    """A run dir opened: ``config``, ``metrics`` (one dict per epoch), ``result`` (None until
    it finished), ``final`` (the last evaluation's metrics), ``model()`` and ``eval(split)``."""

    path: Path
    config: Config
    metrics: list[dict] = field(default_factory=list)
    result: dict | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None

    @property
    def final(self) -> dict:
        """The final evaluation (``test_acc``, ``test_nll``, ``val_acc``, ``train_loss``, ...)."""
        return dict(self.result["final"]) if self.result else {}

    @property
    def objective(self) -> str:
        """The training objective in words (``KL τ=4 α=1``, ``MSE α=1``, ``OFD + CE``)."""
        from .run_list import objective

        return objective(self.config)

    @property
    def teachers(self) -> list[Path]:
        return [Path(t) for t in self.config.teacher.runs] if self.config.teacher else []

    def model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The trained model, in eval mode with frozen parameters."""
        from .runs import load_finished_model

        self._need_finished("model()")
        return load_finished_model(self.path).to(device)

    def eval(self, split: Literal["train", "val", "test"] = "test") -> dict[str, Any]:
        """The saved evaluation outputs of a split: numpy arrays ``logits``, ``labels`` and
        ``features`` (penultimate), in the split's order."""
        from .runs import load_eval

        self._need_finished("eval()")
        arrays = load_eval(self.path, split)
        if arrays is None:
            raise ConfigError(f"{self.path} has no eval_{split}.npz (splits saved: "
                              f"{', '.join(p.stem[5:] for p in sorted(self.path.glob('eval_*.npz'))) or 'none'})")
        return arrays

    def analyze(self, teacher: str | Path | Run | None = None, figures: bool = False, **options) -> dict:
        """Calibration, logit statistics, projections (``kdlab analyze``) as a dict; figures are
        written to RUN/analysis only with ``figures=True``."""
        from .analysis.analyze import analyze_run

        self._need_finished("analyze()")
        teacher_dir = teacher.path if isinstance(teacher, Run) else teacher
        return analyze_run(self.path, teacher_dir, figures=figures, log=options.pop("log", lambda *a: None),
                           **options)

    def export(self, out: str | Path | None = None, force: bool = False) -> Path:
        """Write this finished run as a folder to publish (`export_run`, ``kdlab export``)."""
        return export_run(self.path, out, force)

    def _need_finished(self, what: str) -> None:
        if not self.finished:
            raise ConfigError(f"{self.path} has not finished (no result.json): {what} needs a finished run; "
                              "train it (kdlab.fit resumes it)")

    def __repr__(self) -> str:
        state = f"test_acc={self.final.get('test_acc', float('nan')):.4f}" if self.finished else "unfinished"
        return f"Run({str(self.path)!r}, {self.config.model.name}, {self.objective}, {state})"


def load_run(path: str | Path) -> Run:
    """Open a run dir (finished or not), or a folder `export_run` wrote (config, result, model;
    no evaluation outputs)."""
    from .runs import load_run_config, read_json, read_metrics

    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{path} is not a run dir (no config.yaml)")
    result = read_json(path / "result.json") if (path / "result.json").is_file() else None
    metrics = read_metrics(path) if (path / "metrics.jsonl").is_file() else []
    return Run(path, load_run_config(path), metrics, result)


def export_run(run: str | Path | Run, out: str | Path | None = None, force: bool = False) -> Path:
    """A finished run as a folder to publish (``kdlab export``): model.safetensors, config.json
    (architecture, classes, input preprocessing), a Hub model card (README.md) and the run's
    config.yaml / result.json, so that `load_run` and ``teacher.runs`` take it back. ``out``
    defaults to ``exports/<run name>``; a non-empty ``out`` is refused unless ``force`` and it
    holds an earlier export. Returns ``out``. (Not ``kdlab.export``: that is the module.)"""
    from .export import export_run as _export_run

    return _export_run(run.path if isinstance(run, Run) else run, out, force)


def fit(source: Config | dict | str | Path, overrides: Iterable[str] = (), *, progress: bool = True,
        log=print) -> Run:
    """Train the run a config describes — or resume it, or return it finished — and open it.
    ``source`` as `make_config`'s."""
    from .train import train as _train

    cfg = make_config(source, overrides)
    result = _train(cfg, progress=progress, log=log)
    return load_run(result["run_dir"] if result else cfg.run_dir())


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, *,
            alpha: float = 1.0, kd: Literal["kl", "mse"] = "kl", tau: float = 4.0,
            kl_scaling: Literal["tau2", "max", "none"] = "tau2",
            mse_reduction: Literal["sum", "mean", "half_sum"] = "mean", smoothing: float = 0.0,
            smoothing_mode: Literal["uniform", "others"] = "uniform") -> torch.Tensor:
    """(1 − α)·CE(ỹ, z_s) + α·KD(z_s, z_t), batch mean, float32 (Kim Eq. 2; KD = KL at τ, τ = ∞
    included, or MSE on logits; ỹ smoothed by ``smoothing``). The teacher may be None when α = 0."""
    return distillation_loss_parts(student_logits, labels, teacher_logits, alpha=alpha, kd=kd, tau=tau,
                                   kl_scaling=kl_scaling, mse_reduction=mse_reduction, smoothing=smoothing,
                                   smoothing_mode=smoothing_mode)[0]


class KDLoss(nn.Module):
    """`kd_loss` as a module: ``KDLoss(alpha=1, tau=4)(student_logits, teacher_logits, labels)``."""

    def __init__(self, alpha: float = 1.0, kd: Literal["kl", "mse"] = "kl", tau: float = 4.0, **options):
        super().__init__()
        self.options = dict(alpha=alpha, kd=kd, tau=tau, **options)
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), **self.options)  # (checked)

    def forward(self, student_logits, teacher_logits, labels):
        return kd_loss(student_logits, teacher_logits, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items())


class KLDivergence(nn.Module):
    """c(τ)·KL(p_t(τ) ‖ p_s(τ)), batch mean (`kdlab.losses.kl_loss`; τ = inf: Kim's limit)."""

    def __init__(self, tau: float = 4.0, scaling: Literal["tau2", "max", "none"] = "tau2"):
        super().__init__()
        self.tau, self.scaling = tau, scaling

    def forward(self, student_logits, teacher_logits, labels=None):
        return kl_loss(student_logits, teacher_logits, self.tau, self.scaling)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, scaling={self.scaling}"


class LogitMSE(nn.Module):
    """MSE between student and teacher logits (`kdlab.losses.mse_loss`; ``mean``: nn.MSELoss)."""

    def __init__(self, reduction: Literal["sum", "mean", "half_sum"] = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, student_logits, teacher_logits, labels=None):
        return mse_loss(student_logits, teacher_logits, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction}"


def list_models() -> list[dict]:
    """The registered model families: pattern, examples and what they are (`kdlab models`)."""
    from .models import _FAMILIES

    return [{"pattern": pattern, "examples": list(examples), "help": help}
            for pattern, (_, _, help, examples) in _FAMILIES.items()]
