"""Figures (matplotlib's object API, no pyplot): reliability diagrams, template projections,
logit-sum histograms, densities. Each function writes PNG and SVG next to each other
and returns the PNG path."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class _Figures:
    """The two pyplot calls kdlab makes, on matplotlib's object API: figures are drawn and
    saved without pyplot's global state or a process-wide backend switch (a notebook keeps
    its inline plots)."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, figsize=None, **kwargs):
        from matplotlib.figure import Figure

        figure = Figure(figsize=figsize)
        return figure, figure.subplots(nrows, ncols, **kwargs)

    @staticmethod
    def close(figure) -> None:
        """(nothing to release: the figure was never registered with pyplot)"""


def _plt():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from ..errors import KdlabError

        raise KdlabError("figures need matplotlib: pip install 'kdlab[analysis]'") from None
    return _Figures


def _save(fig, path: Path) -> Path:
    from ..runs import atomic_write_bytes
    import io

    path = Path(path).with_suffix("")
    for ext in ("png", "svg"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, dpi=130, bbox_inches="tight")
        atomic_write_bytes(path.with_suffix(f".{ext}"), buffer.getvalue())
    _plt().close(fig)
    return path.with_suffix(".png")


def reliability_diagram(models: dict[str, tuple], path, n_bins: int = 15) -> Path:
    """``models``: {name: (logits, labels)} or {name: (confidence, correct)} with 1-D
    confidences (translation tokens). Accuracy per confidence bin against the diagonal,
    one line per model, with ECE in the legend; bin counts below."""
    import numpy as np

    from .calibration import _ece_of_bins, calibration_bins, confidence_bins

    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.2, 6), height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    for name, (logits, labels) in models.items():
        one_d = np.ndim(logits) == 1
        bins = confidence_bins(logits, labels, n_bins) if one_d else calibration_bins(logits, labels, n_bins)
        used = bins["count"] > 0
        ece = _ece_of_bins(bins)
        top.plot(bins["confidence"][used], bins["accuracy"][used], marker="o", markersize=4,
                 label=f"{name} (ECE {ece:.3f})")
        centres = (bins["edges"][:-1] + bins["edges"][1:]) / 2
        bottom.plot(centres[used], (bins["count"] / bins["count"].sum())[used], marker=".", label=name)
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"Reliability ({n_bins} equal-width bins)")
    top.legend(fontsize=8, loc="lower right")
    bottom.set(xlabel="confidence (top-label probability)", ylabel="fraction", yscale="log")
    return _save(fig, path)


def template_projection(panels: dict[str, dict], class_names: list[str], path) -> Path:
    """``panels``: {title: output of project_templates}; one scatter per panel."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green"]
    for ax, (title, proj) in zip(axes[0], panels.items()):
        for color, cls, name in zip(colors, proj["classes"], class_names):
            pts = proj["points"][proj["labels"] == cls]
            ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.6, color=color, label=name)
        ax.scatter(proj["templates"][:, 0], proj["templates"][:, 1], marker="*", s=160, c=colors,
                   edgecolors="black", linewidths=0.8, label="templates")
        ax.set_title(f"{title}\ntightness {proj['tightness']:.3f}", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    axes[0][0].legend(fontsize=7, loc="best")
    return _save(fig, path)


def histograms(series: dict[str, np.ndarray], path, xlabel: str, title: str, bins: int = 60, density=True) -> Path:
    """Overlaid histograms (Kim Fig. 2 for logit sums, Fig. 4 for distances and norms)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    all_values = np.concatenate([np.asarray(v, float) for v in series.values()])
    edges = np.histogram_bin_edges(all_values, bins=bins)
    for name, values in series.items():
        ax.hist(values, bins=edges, density=density, histtype="step", linewidth=1.4, label=name)
    ax.set(xlabel=xlabel, ylabel="density" if density else "count", title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def curve(xs, ys_by_name: dict[str, np.ndarray], path, xlabel: str, ylabel: str, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, ys in ys_by_name.items():
        ax.plot(xs, ys, marker=".", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)
