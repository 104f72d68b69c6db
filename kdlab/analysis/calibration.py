"""Calibration of a classifier from its logits (Müller et al. 2019 §3; Guo et al. 2017).

All functions take ``logits`` (N, K) and integer ``labels`` (N,) as numpy arrays or
tensors and return Python floats. Confidence is the top-label softmax probability.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


def _as_tensors(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return logits, labels


def _confidence_and_correct(logits, labels):
    logits, labels = _as_tensors(logits, labels)
    probs = F.softmax(logits, dim=1)
    confidence, prediction = probs.max(dim=1)
    return confidence, (prediction == labels).double()


def _bin_index(confidence: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin m (0-based) holds confidences in (m/M, (m+1)/M]; a confidence of 0 joins the
    first bin and exactly 1.0 the last."""
    return (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)


def calibration_bins(logits, labels, n_bins: int = 15) -> dict:
    """Per equal-width bin: count, mean confidence, accuracy (for reliability diagrams)."""
    return confidence_bins(*_confidence_and_correct(logits, labels), n_bins)


def confidence_bins(confidence, correct, n_bins: int = 15) -> dict:
    """``calibration_bins`` of given top-label confidences and 0/1 correctness (what a
    translation run keeps per token instead of full-vocabulary logits)."""
    confidence = torch.as_tensor(np.asarray(confidence), dtype=torch.float64)
    correct = torch.as_tensor(np.asarray(correct), dtype=torch.float64)
    index = _bin_index(confidence, n_bins)
    count = torch.bincount(index, minlength=n_bins).double()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    safe = count.clamp_min(1)
    return {"edges": np.linspace(0, 1, n_bins + 1), "count": count.numpy(),
            "confidence": (conf_sum / safe).numpy(), "accuracy": (acc_sum / safe).numpy()}


def expected_calibration_error(logits, labels, n_bins: int = 15) -> float:
    """ECE = Σ_m |B_m|/n · |acc(B_m) − conf(B_m)| over M equal-width bins ((m−1)/M, m/M]
    of top-label confidence (Müller et al. §3, Guo et al. Eq. 3). M = 15 as both use."""
    return _ece_of_bins(calibration_bins(logits, labels, n_bins))


def _ece_of_bins(bins: dict) -> float:
    n = bins["count"].sum()
    return float((bins["count"] / n * np.abs(bins["accuracy"] - bins["confidence"])).sum())


def ece_of_confidence(confidence, correct, n_bins: int = 15) -> float:
    """ECE of given confidences and correctness (the same bins as expected_calibration_error)."""
    return _ece_of_bins(confidence_bins(confidence, correct, n_bins))


def token_calibration_report(confidence, correct, label_logprob, n_bins: int = 15, n_resamples: int = 200,
                             seed: int = 0) -> dict:
    """accuracy, ECE and NLL with bootstrap 95% intervals from per-token confidence,
    correctness and the label's log-probability (translation runs); the intervals are
    :func:`bootstrap_interval`'s basic bootstrap, as in :func:`calibration_report`."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    columns = np.stack([confidence, correct, -np.asarray(label_logprob, np.float64)], 1)
    metrics = {"accuracy": lambda c, _: float(c[:, 1].mean()),
               "ece": lambda c, _: ece_of_confidence(c[:, 0], c[:, 1], n_bins),
               "nll": lambda c, _: float(c[:, 2].mean())}
    out = {}
    for name, metric in metrics.items():
        low, high = bootstrap_interval(metric, columns, np.zeros(len(columns)), n_resamples, seed=seed,
                                       bounds=METRIC_RANGE[name])
        out[name] = {"value": metric(columns, None), "low": low, "high": high, "interval": INTERVAL_METHOD}
    return out


def maximum_calibration_error(logits, labels, n_bins: int = 15) -> float:
    """MCE = max over non-empty bins of |acc(B_m) − conf(B_m)| (Guo et al. Eq. 5)."""
    bins = calibration_bins(logits, labels, n_bins)
    gaps = np.abs(bins["accuracy"] - bins["confidence"])[bins["count"] > 0]
    return float(gaps.max()) if gaps.size else 0.0


def adaptive_calibration_error(logits, labels, n_bins: int = 15) -> float:
    """Equal-mass ECE: the same sum over M bins that each hold ~N/M examples sorted by
    confidence (Nguyen & O'Connor 2015; Nixon et al. 2019)."""
    confidence, correct = _confidence_and_correct(logits, labels)
    order = torch.argsort(confidence)
    total = 0.0
    for chunk in torch.tensor_split(order, n_bins):
        if len(chunk):
            total += len(chunk) * abs(correct[chunk].mean().item() - confidence[chunk].mean().item())
    return total / len(confidence)


def classwise_calibration_error(logits, labels, n_bins: int = 15) -> float:
    """Classwise ECE (Kull et al. 2019): for each class k, the equal-width-bin ECE of
    p_k against 1[y = k] over all examples; averaged over classes."""
    logits, labels = _as_tensors(logits, labels)
    probs = F.softmax(logits, dim=1)
    n, k = probs.shape
    total = 0.0
    for c in range(k):
        p, hit = probs[:, c], (labels == c).double()
        index = _bin_index(p, n_bins)
        p_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, p)
        hit_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, hit)
        total += (hit_sum - p_sum).abs().sum().item() / n
    return total / k


def negative_log_likelihood(logits, labels) -> float:
    logits, labels = _as_tensors(logits, labels)
    return F.cross_entropy(logits, labels).item()


def brier_score(logits, labels) -> float:
    """Σ_k (p_k − 1[y = k])², mean over examples (multi-class Brier, range [0, 2])."""
    logits, labels = _as_tensors(logits, labels)
    probs = F.softmax(logits, dim=1)
    return (probs - F.one_hot(labels, probs.shape[1]).double()).pow(2).sum(1).mean().item()


def accuracy(logits, labels) -> float:
    logits, labels = _as_tensors(logits, labels)
    return (logits.argmax(1) == labels).double().mean().item()


CALIBRATION_METRICS: dict[str, Callable] = {
    "accuracy": accuracy,
    "ece": expected_calibration_error,
    "mce": maximum_calibration_error,
    "adaptive_ece": adaptive_calibration_error,
    "classwise_ece": classwise_calibration_error,
    "nll": negative_log_likelihood,
    "brier": brier_score,
}

# the range each metric can take, to which its interval is clipped
METRIC_RANGE: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0), "ece": (0.0, 1.0), "mce": (0.0, 1.0), "adaptive_ece": (0.0, 1.0),
    "classwise_ece": (0.0, 1.0), "nll": (0.0, math.inf), "brier": (0.0, 2.0),
}

# what the reports' ``interval`` key says about ``low`` and ``high``
INTERVAL_METHOD = "basic bootstrap 95%, widened to include the value"


def bootstrap_bytes(n_resamples: int, rows: int) -> int:
    """Memory of :func:`bootstrap_interval`: its resample index matrix (int64) and the values."""
    return n_resamples * (8 * rows + 32)


def check_bootstrap_memory(n_resamples: int, rows: int, limit_bytes: int | None = None) -> None:
    """A one-line error, before any work, when the bootstrap would not fit in memory
    (default limit: 90% of physical memory)."""
    from ..device import memory_limit_bytes
    from ..errors import ConfigError

    if limit_bytes is None:
        limit_bytes = memory_limit_bytes(None, torch.device("cpu"))
    need = bootstrap_bytes(n_resamples, rows)
    if limit_bytes is not None and need > limit_bytes:
        most = max(1, int(limit_bytes // (8 * rows + 32)))
        raise ConfigError(f"--bootstrap {n_resamples}: {n_resamples:,} resamples of {rows:,} rows would need "
                          f"~{need / 1e9:,.3g} GB, above the {limit_bytes / 1e9:,.3g} GB limit (90% of memory); "
                          f"use at most {most:,} (the default is 200)")


def bootstrap_values(metric: Callable, logits, labels, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """``metric`` of ``n_resamples`` resamples of the examples (rows of ``logits`` and
    ``labels`` together) drawn with replacement."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    check_bootstrap_memory(n_resamples, len(labels))
    rng = np.random.default_rng(seed)
    return np.array([metric(logits[idx], labels[idx])
                     for idx in rng.integers(0, len(labels), (n_resamples, len(labels)))], dtype=np.float64)


def bootstrap_interval(metric: Callable, logits, labels, n_resamples: int = 1000, level: float = 0.95,
                       seed: int = 0, method: str = "basic",
                       bounds: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float]:
    """Bootstrap interval of ``metric`` over examples resampled with replacement.

    With θ̂ the metric on the data and q_lo, q_hi the (1 − level)/2 and (1 + level)/2
    quantiles of its resampled values θ*:

    - ``method="basic"`` (the default; the reports use it): the basic (reverse-percentile)
      bootstrap [2θ̂ − q_hi, 2θ̂ − q_lo], widened to include θ̂ and clipped to ``bounds``:
      low = max(lo_b, min(2θ̂ − q_hi, θ̂)), high = min(hi_b, max(2θ̂ − q_lo, θ̂)).
    - ``method="percentile"``: [q_lo, q_hi] (what kdlab reported before 2026-11-30).

    Why basic: binned calibration errors (ECE, MCE, adaptive and classwise ECE) are sums of
    |mean gap| per bin, biased upward by noise, and a resample (~63% distinct examples) is
    biased further; the resamples then sit above θ̂ and the percentile interval can exclude
    its own point estimate (always, for classwise ECE on 1,000 examples of a calibrated
    model). The basic interval assumes θ* − θ̂ ≈ θ̂ − θ, so it moves down by the bootstrap's
    estimate of the bias; it is the percentile interval reflected about θ̂, so it excludes θ̂
    exactly when the percentile one does, and lies then wholly below θ̂: widening it to θ̂
    keeps the value inside and can only add coverage. For smooth, unbiased metrics
    (accuracy, NLL, Brier) the two coincide up to skew. Measured coverage: docs/operations.md.
    """
    if method not in ("basic", "percentile"):
        raise ValueError(f"method must be 'basic' or 'percentile', got {method!r}")
    values = bootstrap_values(metric, logits, labels, n_resamples, seed)
    q_lo, q_hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    if method == "percentile":
        return float(q_lo), float(q_hi)
    theta = float(metric(logits, labels))
    low, high = min(2 * theta - q_hi, theta), max(2 * theta - q_lo, theta)
    return float(np.clip(low, *bounds)), float(np.clip(high, *bounds))


def calibration_report(logits, labels, n_bins: int = 15, n_resamples: int = 200, seed: int = 0) -> dict:
    """Every metric above with its bootstrap 95% interval:
    {name: {value, low, high, interval}}; ``low``/``high`` are :func:`bootstrap_interval`'s
    basic bootstrap widened to include ``value`` (so low ≤ value ≤ high always) and
    ``interval`` names that method."""
    out = {}
    for name, fn in CALIBRATION_METRICS.items():
        metric = (lambda lg, lb, fn=fn: fn(lg, lb, n_bins)) if "ece" in name or name == "mce" else fn
        low, high = bootstrap_interval(metric, logits, labels, n_resamples, seed=seed, bounds=METRIC_RANGE[name])
        out[name] = {"value": metric(logits, labels), "low": low, "high": high, "interval": INTERVAL_METHOD}
    return out


def fit_temperature(logits, labels, low: float = 1e-2, high: float = 1e2, iterations: int = 100) -> float:
    """The T > 0 minimising NLL(softmax(z / T), y) on held-out logits (Guo et al. 2017).

    NLL is convex in β = 1/T (log-sum-exp of a linear function minus a linear term), so
    a golden-section search over log β in [log(1/high), log(1/low)] finds the global
    minimum whether the model is over- or under-confident. Returns T; the bounds are
    returned when the optimum lies beyond them (e.g. perfectly separable logits).
    """
    logits, labels = _as_tensors(logits, labels)
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)

    def nll(log_beta: float) -> float:
        beta = math.exp(log_beta)
        return (torch.logsumexp(logits * beta, dim=1) - beta * true_logit).mean().item()

    a, b = math.log(1 / high), math.log(1 / low)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return 1.0 / math.exp((a + b) / 2)
