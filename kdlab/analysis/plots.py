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


def template_projection(panels: dict[str, dict], class_names: list[str], path, title: str | None = None) -> Path:
    """``panels``: {title: output of project_templates}; one scatter per panel, in a row;
    ``title`` above them (the run's objective)."""
    return _save(projection_figure(panels, class_names, title=title), path)


def projection_figure(panels: dict[str, dict], class_names: list[str], ncols: int | None = None,
                      title: str | None = None):
    """The scatters of ``template_projection`` in rows of ``ncols`` panels (default: one
    row). Returns the Figure."""
    plt = _plt()
    ncols = ncols or len(panels)
    nrows = -(-len(panels) // ncols)
    size = 3.6 if ncols <= 3 else 2.9  # many panels: smaller, so that their titles stay legible when scaled down
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, (size + 0.1) * nrows + (0.3 if title else 0)),
                             squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green"]
    for ax, (panel, proj) in zip(axes.flat, panels.items()):
        for color, cls, name in zip(colors, proj["classes"], class_names):
            pts = proj["points"][proj["labels"] == cls]
            ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.6, color=color, label=name)
        ax.scatter(proj["templates"][:, 0], proj["templates"][:, 1], marker="*", s=160, c=colors,
                   edgecolors="black", linewidths=0.8, label="templates")
        ax.set_title(f"{panel}\ntightness {proj['tightness']:.3f}", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes[0][0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=11, y=1.02)
    return fig


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


# --- comparison figures: several runs on shared axes, one label per setting, seeds aggregated ------------------

def save(fig, path) -> Path:
    """Write ``fig`` as PNG and SVG (atomically); the PNG path."""
    return _save(fig, path)


def legend_labels(fig) -> list[str]:
    """The legend entries of every axis of ``fig``, in order (what a reader of the figure sees)."""
    return [text.get_text() for ax in fig.axes if ax.get_legend() for text in ax.get_legend().get_texts()]


def _seeds_note(label: str, n: int) -> str:
    return f"{label} ({n} seeds)" if n > 1 else label


def overlaid_densities(groups: dict[str, list[np.ndarray]], xlabel: str, title: str,
                       references: dict[str, list[np.ndarray]] | None = None, bins: int = 50):
    """Kim Figs. 2 and 4 on one axis: per label, the mean over its seeds of each seed's
    density on shared bins (line) and the seeds' min–max (band); ``references`` (the
    teacher) dashed. Bins span the 0.5–99.5 percentiles of all values, so one outlier does
    not squeeze the rest; each density is normalised by its seed's sample count. Returns
    the Figure (``save`` writes it)."""
    plt = _plt()
    references = references or {}
    pooled = np.concatenate([np.asarray(v, float) for series in (*groups.values(), *references.values())
                             for v in series])
    low, high = np.percentile(pooled, [0.5, 99.5])
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    fig, ax = plt.subplots(figsize=(6.2, 3.9))
    for style, items in (("solid", groups.items()), ("dashed", references.items())):
        for index, (label, series) in enumerate(items):
            dens = np.array([np.histogram(np.asarray(v, float), edges)[0] / (len(v) * width) for v in series])
            color = f"C{index}" if style == "solid" else ("black" if index == 0 else f"0.{4 + index}")
            ax.plot(centres, dens.mean(0), color=color, linestyle=style, linewidth=1.6,
                    label=_seeds_note(label, len(series)))
            if len(series) > 1:
                ax.fill_between(centres, dens.min(0), dens.max(0), color=color, alpha=0.18, linewidth=0)
    ax.set(xlabel=xlabel, ylabel="density", title=title, xlim=(low, high))
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return fig


def overlaid_reliability(groups: dict[str, list[tuple]], title: str, n_bins: int = 15, min_count: int = 10):
    """Reliability diagrams of several labels on one axis: ``groups`` {label: [(logits,
    labels) per seed]}. Per bin, the seeds' mean accuracy at their mean confidence (line)
    and min–max accuracy (band); bins with fewer than ``min_count`` examples over all seeds
    are left out (one example is an accuracy of 0 or 1); ECE (all bins) mean ± std over
    seeds in the legend; each label's fraction of examples per bin below. Returns the Figure."""
    from .calibration import calibration_bins, expected_calibration_error

    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.6, 6.2), height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    for index, (label, seeds) in enumerate(groups.items()):
        per_seed = [calibration_bins(logits, labels, n_bins) for logits, labels in seeds]
        used = np.array([b["count"] > 0 for b in per_seed])
        counts = np.array([b["count"] for b in per_seed])
        conf = np.array([b["confidence"] for b in per_seed])
        acc = np.where(used, np.array([b["accuracy"] for b in per_seed]), np.nan)
        keep = counts.sum(0) >= min_count
        weights = np.where(used, counts, 0)[:, keep]
        mean_conf = (conf[:, keep] * weights).sum(0) / weights.sum(0)
        eces = [expected_calibration_error(logits, labels, n_bins) for logits, labels in seeds]
        ece = f"ECE {np.mean(eces):.3f}" + (f" ± {np.std(eces):.3f}" if len(eces) > 1 else "")
        color = f"C{index}"
        top.plot(mean_conf, np.nanmean(acc[:, keep], 0), marker="o", markersize=3.5, color=color,
                 label=f"{_seeds_note(label, len(seeds))}, {ece}")
        if len(seeds) > 1:
            top.fill_between(mean_conf, np.nanmin(acc[:, keep], 0), np.nanmax(acc[:, keep], 0), color=color,
                             alpha=0.18, linewidth=0)
        centres = (per_seed[0]["edges"][:-1] + per_seed[0]["edges"][1:]) / 2
        fraction = (counts / counts.sum(1, keepdims=True)).mean(0)
        bottom.plot(centres[keep], fraction[keep], marker=".", color=color)
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    top.legend(fontsize=7.5, loc="upper left")
    bottom.set(xlabel="confidence (top-label probability)", ylabel="fraction", yscale="log")
    return fig


def band_curves(curves: dict[str, tuple], xlabel: str, ylabel: str, title: str,
                levels: dict[str, tuple] | None = None, xticks: tuple | None = None, xscale: str = "linear"):
    """Lines with bands: ``curves`` {label: (xs, mean, low, high)}; ``levels`` {label: (mean,
    low, high)} are settings without the x (MSE beside KL's τ axis), drawn as horizontal
    lines with bands across the plot. ``xticks``: (positions, labels). Returns the Figure."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 3.9))
    for index, (label, (xs, mean, low, high)) in enumerate(curves.items()):
        ax.plot(xs, mean, marker="o", markersize=4, color=f"C{index}", label=label)
        ax.fill_between(xs, low, high, color=f"C{index}", alpha=0.18, linewidth=0)
    ax.set_xscale(xscale)
    if xticks is not None:
        ax.set_xticks(*xticks)
        ax.minorticks_off()
    for offset, (label, (mean, low, high)) in enumerate((levels or {}).items(), start=len(curves)):
        ax.axhline(mean, color=f"C{offset}", linestyle="--", linewidth=1.4, label=label)
        ax.axhspan(low, high, color=f"C{offset}", alpha=0.12, linewidth=0)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return fig
