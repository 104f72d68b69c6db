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


# --- Modern logit-based objectives: DKD (Zhao et al. 2022), logit standardisation (Sun et al. 2024)

DKDTargetMask = Literal["exact", "mdistiller"]

DKD_ALPHA = 1.0  # mdistiller cfg.DKD.ALPHA
DKD_BETA = 8.0  # mdistiller cfg.DKD.BETA; some CIFAR-100 configs set 6.0 (e.g. vgg13→vgg8, wrn-40-2→wrn-16-2)
DKD_TAU = 4.0  # mdistiller cfg.DKD.T
DKD_WARMUP_EPOCHS = 20  # mdistiller cfg.DKD.WARMUP
DKD_MDISTILLER_MASK = 1000.0  # what mdistiller subtracts from the target's z/τ to drop it from the NCKD softmax


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = DKD_ALPHA,
    beta: float = DKD_BETA,
    tau: float = DKD_TAU,
    target_mask: DKDTargetMask = "exact",
) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022, CVPR; arXiv 2203.08679): α·TCKD + β·NCKD, batch mean.

    With p = softmax(z/τ) and t the label, the binary split b = [p_t, 1 − p_t] and the
    distribution among the non-target classes p̂_k = p_k / (1 − p_t), k ≠ t:

        TCKD = τ² · KL(b_T ‖ b_S)          NCKD = τ² · KL(p̂_T ‖ p̂_S)

    and plain KD decomposes as KD = TCKD + (1 − p_t^T)·NCKD (the paper's reformulation of
    KD; both sides at the same τ and with the same τ² factor). α weights TCKD, β NCKD:
    this is *not* the α of :func:`distillation_loss` (which weights KD against CE). The
    reference (mdistiller ``DKD.py``) adds CE with weight 1 and multiplies this loss by
    :func:`dkd_warmup_factor`; both belong to the caller.

    ``target_mask="exact"`` (default) computes log p_t, log(1 − p_t) and the non-target
    log-softmax with log-sum-exps over the K−1 non-target logits, so it stays finite when
    a network puts (numerically) all its mass on one class. ``"mdistiller"`` reproduces
    the reference: TCKD takes the log of summed softmax probabilities (log 0 = −inf, and
    0·inf = NaN once both networks saturate the target, e.g. z_t − z_k ≳ 104·τ in float32)
    and NCKD drops the target by subtracting 1000 from z_t/τ before a K-way softmax (exact
    to float32 unless z_t/τ exceeds the other logits/τ by ~900). On ordinary logits the two
    agree to float32 rounding; they differ only at saturation.
    """
    tau = _check_tau(tau)
    if math.isinf(tau):
        raise ValueError("dkd_loss needs a finite tau")
    if target_mask not in ("exact", "mdistiller"):
        raise ValueError(f"unknown DKD target_mask {target_mask!r}: use 'exact' or 'mdistiller'")
    zs, zt = student_logits.float() / tau, teacher_logits.float() / tau
    target = F.one_hot(labels.long(), zs.shape[-1]).bool()
    if target_mask == "mdistiller":
        tckd, nckd = _dkd_parts_mdistiller(zs, zt, target)
    else:
        tckd, nckd = _dkd_parts_exact(zs, zt, target)
    return tau * tau * (alpha * tckd + beta * nckd).mean()


def _dkd_parts_exact(zs: torch.Tensor, zt: torch.Tensor, target: torch.Tensor):
    """Per-sample (TCKD, NCKD) without the τ² factor, from the tempered logits."""
    batch, classes = zs.shape

    def split(z):
        others = z[~target].view(batch, classes - 1)
        log_all = torch.logsumexp(z, dim=-1)
        log_others = torch.logsumexp(others, dim=-1)
        log_binary = torch.stack([z[target] - log_all, log_others - log_all], dim=-1)  # log [p_t, 1 − p_t]
        return log_binary, others - log_others.unsqueeze(-1)  # log p̂ over the non-target classes

    log_bs, log_ps = split(zs)
    log_bt, log_pt = split(zt)
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum(-1)
    nckd = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return tckd, nckd


def _dkd_parts_mdistiller(zs: torch.Tensor, zt: torch.Tensor, target: torch.Tensor):
    """The reference's arithmetic (mdistiller DKD.py), per sample, without τ²."""
    ps, pt = F.softmax(zs, dim=-1), F.softmax(zt, dim=-1)
    bs = torch.stack([(ps * target).sum(-1), (ps * ~target).sum(-1)], dim=-1)
    bt = torch.stack([(pt * target).sum(-1), (pt * ~target).sum(-1)], dim=-1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="none").sum(-1)
    shift = DKD_MDISTILLER_MASK * target
    nckd = F.kl_div(F.log_softmax(zs - shift, dim=-1), F.softmax(zt - shift, dim=-1), reduction="none").sum(-1)
    return tckd, nckd


def dkd_warmup_factor(epoch: float, warmup_epochs: int = DKD_WARMUP_EPOCHS) -> float:
    """min(epoch / warmup_epochs, 1): mdistiller's linear warm-up of the whole DKD term
    (``DKD.forward_train``: ``min(kwargs["epoch"] / self.warmup, 1.0) * dkd_loss(...)``).

    mdistiller counts epochs from 1 (``BaseTrainer.train`` starts at ``epoch = 1``), so its
    first epoch uses 1/20 and the factor is 1 from epoch 20 on; a loop counting from 0
    passes ``epoch + 1`` to match. The factor is constant within an epoch. CE is not warmed
    up. A schedule, not part of the objective: it is the caller's to apply.
    """
    if warmup_epochs <= 0:
        raise ValueError(f"warmup_epochs must be > 0, got {warmup_epochs}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return min(float(epoch) / warmup_epochs, 1.0)


LS_BASE_TAU = 2.0  # logit-standardization-KD README: --base-temp 2 (3 for some pairs); tools/train.py default 2
LS_KD_WEIGHT = 9.0  # its --kd-weight default; its cfg.py keeps CE weight 1 for KD


def standardize_logits(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score over the classes, float32: (z − mean(z)) / (std(z) + eps) (Sun et al. 2024).

    std is torch's default, Bessel-corrected (divides by K − 1), and eps is added to it, as
    in the reference (sunshangquan/logit-standardization-KD, ``normalize`` in
    ``mdistiller/distillers/KD.py``). A population std would scale every standardised
    logit by √(K/(K−1)), which a change of τ absorbs. A constant logit vector maps to 0.
    """
    z = z.float()
    centered = z - z.mean(dim=-1, keepdim=True)
    return centered / (z.std(dim=-1, keepdim=True) + eps)


def logit_standardized_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float = LS_BASE_TAU,
    scaling: KLScaling = "tau2",
    eps: float = 1e-7,
) -> torch.Tensor:
    """KD on z-scored logits (Sun et al. 2024, CVPR): :func:`kl_loss` applied to
    :func:`standardize_logits` of both networks, batch mean.

        L = c(τ) · KL( softmax(Z(z_t)/τ) ‖ softmax(Z(z_s)/τ) ),   Z(z) = (z − z̄)/σ(z)

    Each network's effective temperature is τ·σ(z) (its own), so the student need not match
    the teacher's logit range, only its relations; the loss is invariant to adding a
    constant to, or multiplying by a positive constant, either network's logits (up to
    eps). τ is what the reference calls the *base* temperature (README: ``--base-temp 2``,
    3 for some pairs), and it keeps the τ² factor: ``kd_loss`` multiplies by
    ``temperature**2`` after standardising, so ``scaling="tau2"`` is the reference's form.
    Its KD weight is 9 with CE weight 1 (``--kd-weight 9``; cfg.py ``KD.LOSS``); for DKD
    the reference standardises the logits and then runs DKD unchanged (use
    :func:`standardize_logits` then :func:`dkd_loss`).
    """
    return kl_loss(standardize_logits(student_logits, eps), standardize_logits(teacher_logits, eps), tau, scaling)
