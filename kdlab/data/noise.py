"""Label noise (Kim §6): a seeded, exact fraction of training labels flipped."""

from __future__ import annotations

import numpy as np


def add_label_noise(labels: np.ndarray, num_classes: int, rate: float, kind: str, seed: int):
    """Flip exactly round(rate·N) labels, chosen uniformly without replacement.

    ``symmetric`` (Kim §6): each chosen label becomes a uniformly drawn *different*
    class (so ``rate`` is the true fraction of wrong labels; the convention that draws
    from all K classes corrupts only rate·(K−1)/K). ``asymmetric``: class k → (k+1) mod K.
    Returns (noisy labels, sorted flipped indices).
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label noise rate must be in [0, 1], got {rate}")
    rng = np.random.default_rng(seed)
    labels = labels.copy()
    count = int(round(rate * len(labels)))
    chosen = np.sort(rng.choice(len(labels), size=count, replace=False))
    if kind == "symmetric":
        offsets = rng.integers(1, num_classes, size=count)
    elif kind == "asymmetric":
        offsets = np.ones(count, dtype=np.int64)
    else:
        raise ValueError(f"unknown label noise {kind!r}: use 'symmetric' or 'asymmetric'")
    labels[chosen] = (labels[chosen] + offsets) % num_classes
    return labels, chosen
