"""Logit statistics of Kim et al. 2021 (Figs. 2, 4) and Müller et al. 2019 (distillation)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def logit_sums(logits) -> np.ndarray:
    """Σ_k z_k per example (Kim Fig. 2: near 0 for a CE teacher, drifting for KL students)."""
    return np.asarray(logits, np.float64).sum(axis=1)


def logit_gap(logits) -> np.ndarray:
    """Top-1 minus top-2 logit per example."""
    top2 = np.sort(np.asarray(logits, np.float64), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def logit_distances(student_logits, teacher_logits) -> np.ndarray:
    """‖z_s − z_t‖₂ per example (Kim Fig. 4a)."""
    return np.linalg.norm(np.asarray(student_logits, np.float64) - np.asarray(teacher_logits, np.float64), axis=1)


def feature_norms(features) -> np.ndarray:
    """‖r‖₂ of the penultimate (pre-logit) features per example (Kim Fig. 4b)."""
    return np.linalg.norm(np.asarray(features, np.float64), axis=1)


def teacher_student_agreement(student_logits, teacher_logits) -> float:
    return float((np.argmax(student_logits, 1) == np.argmax(teacher_logits, 1)).mean())


def teacher_student_kl(student_logits, teacher_logits, tau: float = 1.0) -> float:
    """Mean KL(p_t(τ) ‖ p_s(τ)) on held-out data (unscaled)."""
    s = F.log_softmax(torch.as_tensor(np.asarray(student_logits), dtype=torch.float64) / tau, 1)
    t = F.log_softmax(torch.as_tensor(np.asarray(teacher_logits), dtype=torch.float64) / tau, 1)
    return (t.exp() * (t - s)).sum(1).mean().item()


def equivalent_smoothing(teacher_logits, labels, temperature: float = 1.0) -> float:
    """Müller et al. (distillation section): the label smoothing a teacher at
    temperature T amounts to, γ = E[Σ_k (1 − y_k)·p_k(T)·K/(K−1)] — the probability mass
    off the true class, rescaled so that uniform-LS targets with ε give γ = ε."""
    z = torch.as_tensor(np.asarray(teacher_logits), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    k = z.shape[1]
    p = F.softmax(z / temperature, 1)
    off_true = 1.0 - p.gather(1, labels[:, None]).squeeze(1)
    return (off_true * k / (k - 1)).mean().item()


def summarize(values: np.ndarray) -> dict:
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values)),
            "p05": float(np.quantile(values, 0.05)), "p95": float(np.quantile(values, 0.95))}
