"""kdlab: knowledge distillation and label smoothing, exact objectives and analysis.

The Python API (``kdlab.api``, loaded on first use so that ``import kdlab`` stays instant)::

    import kdlab
    teacher = kdlab.fit("teacher-mnist1d", ["optim.epochs=10"])      # a Run
    student = kdlab.fit("student-mnist1d", ["loss.kd=mse"])
    student.final["test_acc"], student.metrics[-1], student.eval("test")["logits"]
    loss = kdlab.KDLoss(alpha=1.0, tau=4.0)(student_logits, teacher_logits, labels)
    student.export()  # exports/<run name>: model.safetensors, config.json, a Hub model card
"""

from .version import __version__  # noqa: F401  (re-exported)

__all__ = ["Config", "ConfigError", "KDLoss", "KLDivergence", "LogitMSE", "Run", "build_model", "export_run", "fit",
           "kd_loss", "list_models", "load_run", "make_config"]


def __getattr__(name: str):
    if name in ("Config",):
        from .config import Config

        return Config
    if name == "ConfigError":
        from .errors import ConfigError

        return ConfigError
    if name == "build_model":
        from .models import build_model

        return build_model
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdlab' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
