"""Penultimate-layer visualisation of Müller et al. 2019 §2 (used by Kim et al. Fig. 5).

Templates are the rows of the last layer with the bias appended, w_k = [W_k, b_k];
activations get a trailing 1, a = [r, 1], so that aᵀw_k is logit k. For three classes
(k1, k2, k3), the plane through the three templates has the orthonormal basis (u, v)
from the QR decomposition of A = [w1 − w3, w2 − w3] (d × 2); each activation is shown
at (aᵀu, aᵀv).
"""

from __future__ import annotations

import numpy as np


def template_basis(weight: np.ndarray, bias: np.ndarray, classes) -> tuple[np.ndarray, np.ndarray]:
    """(basis (d+1, 2), templates (3, d+1)) for the three ``classes``."""
    weight, bias = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
    templates = np.concatenate([weight, bias[:, None]], axis=1)[list(classes)]
    a = np.stack([templates[0] - templates[2], templates[1] - templates[2]], axis=1)
    q, r = np.linalg.qr(a)
    if np.min(np.abs(np.diag(r))) < 1e-12:
        raise ValueError(f"templates of classes {tuple(classes)} are collinear: no plane through them")
    return q, templates


def project_templates(features, labels, weight, bias, classes, per_class: int | None = 100, seed: int = 0) -> dict:
    """Project the activations of examples of ``classes`` on the plane of their templates.

    Returns ``points`` (n, 2), their ``labels``, ``templates`` (3, 2: the templates'
    own projections) and ``tightness`` (:func:`cluster_tightness`). ``per_class``
    examples of each class are drawn (seeded) as Müller does (100); None keeps all.
    """
    features, labels = np.asarray(features, np.float64), np.asarray(labels)
    classes = [int(c) for c in classes]
    if len(classes) != 3 or len(set(classes)) != 3:
        raise ValueError(f"need three distinct classes, got {classes}")
    basis, templates = template_basis(weight, bias, classes)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if per_class is not None and len(idx) > per_class:
            idx = np.sort(rng.choice(idx, per_class, replace=False))
        chosen.append(idx)
    chosen = np.concatenate(chosen)
    augmented = np.concatenate([features[chosen], np.ones((len(chosen), 1))], axis=1)
    points = augmented @ basis
    template_points = templates @ basis
    return {"points": points, "labels": labels[chosen], "classes": classes, "templates": template_points,
            "tightness": cluster_tightness(points, labels[chosen], classes)}


def cluster_tightness(points: np.ndarray, labels: np.ndarray, classes) -> float:
    """Mean within-class spread over mean between-centroid distance, in the projection.

    spread = RMS distance of a class's points to their centroid, averaged over the
    classes; separation = mean pairwise distance of the class centroids. Smaller is
    tighter: LS makes it smaller (Müller Fig. 1), KL with large τ larger (Kim Fig. 5).
    """
    centroids, spreads = [], []
    for c in classes:
        pts = points[labels == c]
        if len(pts) == 0:
            return float("nan")
        centroid = pts.mean(axis=0)
        centroids.append(centroid)
        spreads.append(np.sqrt(((pts - centroid) ** 2).sum(axis=1).mean()))
    centroids = np.stack(centroids)
    pairs = [np.linalg.norm(centroids[i] - centroids[j]) for i in range(3) for j in range(i + 1, 3)]
    return float(np.mean(spreads) / max(np.mean(pairs), 1e-12))
