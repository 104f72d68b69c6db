"""Mutual information between an example's index and a network's output on it under
augmentation (Müller et al. 2019 §4, A.2).

X is uniform over N training examples; Y is a scalar of the network on an augmented
view of x (the difference of two class logits). Y | x is modelled as Gaussian with mean
μ_x (the average over L augmentations of x) and a variance σ² pooled over examples,
σ² = (1/N) Σ_x (y_x − μ_x)²:

    Î = (1/N) Σ_x [ −(y_x − μ_x)² / (2σ²) − log( (1/N) Σ_x' exp(−(y_x − μ_x')² / (2σ²)) ) ]

computed with logsumexp. Since the x' = x term is in the inner sum, Î ≤ log N.
"""

from __future__ import annotations

import math

import numpy as np


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    peak = a.max(axis=axis, keepdims=True)
    return (peak + np.log(np.exp(a - peak).sum(axis=axis, keepdims=True))).squeeze(axis)


def _estimate(evaluated: np.ndarray, means: np.ndarray, scale: float) -> float:
    n = len(means)
    variance = float(np.mean((evaluated - means) ** 2))
    variance = max(variance, 1e-12 * scale)  # identical views: σ² → 0, Î → log N
    # log-density of y_x under every example's Gaussian: (N evaluated, N candidates)
    log_density = -((evaluated[:, None] - means[None, :]) ** 2) / (2 * variance)
    own = np.diagonal(log_density)
    return float(np.mean(own - (_logsumexp(log_density, axis=1) - math.log(n))))


def mutual_information(values, evaluated=None) -> float:
    """Müller's Gaussian estimate of I(X; Y) in nats, between 0-ish and log N.

    ``values`` (N, L): the scalar for L augmentations of each of N examples; μ_x is
    their mean. ``evaluated`` (N,), optional: a *fresh* augmentation y_x of each example,
    not among the L. Without it, each of the L draws is used as y_x in turn (so y_x is
    one of the draws that form μ_x) and the L estimates are averaged; this is what
    :class:`kdlab.train` logs during training.

    Bias, measured over 20 seeds with no dependence on the example (all N·L draws
    i.i.d., true I = 0) at N = 600, L = 5: the in-sample estimate is +0.114 nats (sd
    0.006) — μ_x contains y_x, so y_x sits closer to its own mean; with fresh draws it is
    −0.071 nats (sd 0.010) — y_x − μ_x then has variance σ²(1 + 1/L), which inflates the
    pooled σ². Either is under 2% of log 600 = 6.40: compare curves, not small absolute
    values. Two separated groups of 300 (true I = log 2 = 0.693) read 0.80 in-sample.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] < 1 or values.shape[0] < 2:
        raise ValueError(f"values must be (N >= 2 examples, L >= 1 augmentations), got {values.shape}")
    means = values.mean(axis=1)
    scale = 1.0 + float(np.mean(values**2))
    if evaluated is not None:
        evaluated = np.asarray(evaluated, dtype=np.float64)
        if evaluated.shape != means.shape:
            raise ValueError(f"evaluated must have shape ({len(means)},), got {evaluated.shape}")
        return _estimate(evaluated, means, scale)
    return float(np.mean([_estimate(values[:, l], means, scale) for l in range(values.shape[1])]))
