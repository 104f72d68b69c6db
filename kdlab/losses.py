"""The objectives of kdlab: pure functions on logits.

Notation (Kim et al. 2021, Table 1): z_s, z_t are student / teacher logits of shape
(B, K); d = z_s - z_t; p(τ) = softmax(z / τ). Every loss returns the mean over the
batch of a per-sample value, computed in float32 whatever the input dtype (so bf16
autocast never reaches a softmax or a log).

One convention everywhere: α weights the KD term,

    L = (1 - α) · CE(targets, z_s) + α · KD(z_s, z_t)          (Kim Eq. 2, Hinton 2015)

torchdistill's ``KDLoss`` uses the opposite convention (α on the CE term).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

SmoothingMode = Literal["uniform", "others"]
KLScaling = Literal["tau2", "max", "none"]
MSEReduction = Literal["sum", "mean", "half_sum"]


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if math.isnan(tau) or tau <= 0:
        raise ValueError(f"tau must be > 0 (math.inf for the τ→∞ limit), got {tau}")
    return tau


def smooth_labels(
    labels: torch.Tensor, num_classes: int, smoothing: float = 0.0, mode: SmoothingMode = "uniform"
) -> torch.Tensor:
    """Soft targets (B, K) in float32 from integer labels (B,).

    ``mode="uniform"`` (Müller et al. 2019 §1.1, PyTorch ``label_smoothing``):
        y_k = (1 - ε) · 1[k = y] + ε / K
    ``mode="others"`` (Kim et al. 2021 Eq. 1):
        y_k = 1 - β if k = y, else β / (K - 1)
    The two agree when ε = β·K/(K-1).
    """
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    onehot = F.one_hot(labels.long(), num_classes).float()
    if mode == "uniform":
        return onehot * (1.0 - smoothing) + smoothing / num_classes
    if mode == "others":
        return onehot * (1.0 - smoothing) + (1.0 - onehot) * (smoothing / (num_classes - 1))
    raise ValueError(f"unknown smoothing mode {mode!r}: use 'uniform' or 'others'")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE(y, p_s(1)) = -Σ_k y_k log p_s,k(1), batch mean (Kim Eq. 2, first term).

    ``targets`` is either integer labels (B,) or soft targets (B, K), e.g. from
    :func:`smooth_labels`.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if targets.dim() == 1:
        return F.nll_loss(log_probs, targets.long())
    return -(targets.float() * log_probs).sum(dim=-1).mean()


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float,
    scaling: KLScaling = "tau2",
) -> torch.Tensor:
    """Scaled KL(p_t(τ) ‖ p_s(τ)) = c(τ) · Σ_k p_t,k(τ) log(p_t,k(τ) / p_s,k(τ)), batch mean.

    c(τ) = τ² for ``scaling="tau2"`` (Hinton 2015; Kim Eq. 2), max(τ, τ²) for
    ``"max"`` (Kim Eq. 7, which keeps the gradient from vanishing as τ → 0, see Eq. 6)
    and 1 for ``"none"``. Its gradient is c(τ)/τ · (p_s(τ) - p_t(τ)) (Kim Eq. 3 for τ²).

    ``tau=math.inf`` returns the limit of the τ²-scaled loss (Kim Prop. 1):
    see :func:`kl_loss_infinite`; with scaling ``"max"`` the limit is the same since
    max(τ, τ²) = τ² for τ ≥ 1. With ``"none"`` the τ→∞ limit is 0 and is refused.
    """
    tau = _check_tau(tau)
    if scaling not in ("tau2", "max", "none"):
        raise ValueError(f"unknown KL scaling {scaling!r}: use 'tau2', 'max' or 'none'")
    if math.isinf(tau):
        if scaling == "none":
            raise ValueError("kl_loss with tau=inf needs scaling 'tau2' or 'max' (unscaled KL tends to 0)")
        return kl_loss_infinite(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1).mean()
    factor = {"tau2": tau * tau, "max": max(tau, tau * tau), "none": 1.0}[scaling]
    return factor * kl


def kl_loss_infinite(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """lim_{τ→∞} τ²·KL(p_t(τ) ‖ p_s(τ)) = (1 / 2K) · Σ_j (d_j - mean(d))², batch mean.

    d = z_s - z_t. Its gradient is (1/K)·d_k - (1/K²)·Σ_j d_j, exactly Kim Eq. 5, so
    the limit needs no gradient hook: the logit-mean term that Hinton's zero-mean
    approximation drops is kept (Kim §4.2, Eq. 8).
    """
    d = student_logits.float() - teacher_logits.float()
    centered = d - d.mean(dim=-1, keepdim=True)
    return centered.pow(2).sum(dim=-1).mean() / (2 * d.shape[-1])


def mse_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: MSEReduction = "sum"
) -> torch.Tensor:
    """Logit matching.

    ``"sum"``: ‖z_s - z_t‖² per sample, batch mean (Kim Eq. 9).
    ``"mean"``: mean over batch *and* classes, i.e. ‖d‖²/K per sample, as the paper's
    public code does with ``nn.MSELoss()``.
    ``"half_sum"``: ½‖z_s - z_t‖² per sample (Müller et al. 2019, A.5 MNIST student).
    """
    d = student_logits.float() - teacher_logits.float()
    per_sample = d.pow(2).sum(dim=-1)
    if reduction == "sum":
        return per_sample.mean()
    if reduction == "mean":
        return per_sample.mean() / d.shape[-1]
    if reduction == "half_sum":
        return 0.5 * per_sample.mean()
    raise ValueError(f"unknown MSE reduction {reduction!r}: use 'sum', 'mean' or 'half_sum'")


def ensemble_logits(teacher_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Average the logits of a teacher ensemble (Kim §4.3 text). The paper's public
    code sums them instead, which equals the mean times the ensemble size."""
    if len(teacher_logits) == 0:
        raise ValueError("an ensemble needs at least one teacher")
    return torch.stack([t.float() for t in teacher_logits]).mean(dim=0)


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """L = (1 - α)·CE(ỹ, z_s) + α·KD(z_s, z_t)   (Kim Eq. 2; Müller A.5 with α = 0.6).

    ỹ are the labels smoothed by :func:`smooth_labels`; KD is :func:`kl_loss` or
    :func:`mse_loss`. α = 0 needs no teacher; α > 0 does. A term whose weight is zero is
    not computed. Keywords as :func:`distillation_loss_parts`, which also names the terms.
    """
    return distillation_loss_parts(student_logits, labels, teacher_logits, **kwargs)[0]


def distillation_loss_parts(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    alpha: float = 0.0,
    kd: Literal["kl", "mse"] = "kl",
    tau: float = 1.0,
    kl_scaling: KLScaling = "tau2",
    mse_reduction: MSEReduction = "sum",
    smoothing: float = 0.0,
    smoothing_mode: SmoothingMode = "uniform",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`distillation_loss` and its weighted terms, which sum to it: ``ce`` = (1 − α)·CE
    with hard labels, or ``ls`` = (1 − α)·CE with smoothed ones (ε > 0), and ``kd`` =
    α·KD. A term whose weight is zero is neither computed nor named."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    total = student_logits.new_zeros((), dtype=torch.float32)
    parts = {}
    if alpha < 1.0:
        targets = labels if smoothing == 0.0 else smooth_labels(
            labels, student_logits.shape[-1], smoothing, smoothing_mode
        )
        part = (1.0 - alpha) * cross_entropy(student_logits, targets)
        parts["ce" if smoothing == 0.0 else "ls"] = part
        total = total + part
    if alpha > 0.0:
        if teacher_logits is None:
            raise ValueError("alpha > 0 needs teacher logits")
        if kd == "kl":
            term = kl_loss(student_logits, teacher_logits, tau, kl_scaling)
        elif kd == "mse":
            term = mse_loss(student_logits, teacher_logits, mse_reduction)
        else:
            raise ValueError(f"unknown KD objective {kd!r}: use 'kl' or 'mse'")
        parts["kd"] = alpha * term
        total = total + parts["kd"]
    return total, parts
