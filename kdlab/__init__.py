"""kdlab: knowledge distillation and label smoothing, exact objectives and analysis."""

__version__ = "0.1.0"
