"""Feature-based distillation objectives: pure functions on feature tensors.

The methods of Kim et al. 2021, Table 3 (FitNets, AT, Jacobian, FT, AB, Overhaul) and
CRD. Each function takes tensors and returns a scalar tensor computed in float32; the
modules that produce its inputs (regressors, connectors, paraphraser, embedding heads,
memory bank), the layer taps and the stage loop belong to the caller. Teacher tensors
are used as given: compute them under ``torch.no_grad()``. Each docstring states the
equation, its source, the reduction, the reference code's constants and where the
reference departs from the paper; where they disagree the paper's form is the default
and the reference's a named option. docs/methods.md tabulates the same facts.

Shapes: features (B, C, H, W) (any (B, ...) where noted), B the batch.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

# FitNets: weight of the one-stage hint term in CRD/RepDistiller (`-b 100`) and mdistiller
# (cfg.FITNET.LOSS.FEAT_WEIGHT) on top of CE with weight 1.
FITNETS_CRD_WEIGHT = 100.0
# AT: β of the reference (`--beta 1e+3`, RepDistiller `-b 1000`, mdistiller FEAT_WEIGHT).
AT_BETA = 1000.0
# AB (official CIFAR code): margin μ, and the factor 3/1000 on the stage-weighted sum.
AB_MARGIN = 1.0
AB_LOSS_SCALE = 3.0 / 1000.0
# Overhaul: weight of Σ_stages/B in CE + weight·Σ (CIFAR-100 script; ImageNet uses 1e-4),
# and the normal-cdf level below which the reference's margin falls back to −3|γ|.
OFD_LOSS_WEIGHT = 1e-3
OFD_IMAGENET_LOSS_WEIGHT = 1e-4
OFD_CDF_THRESHOLD = 1e-3
# Overhaul's stage weights, shallow to deep; n stages take the last n (= stage_weights(n)):
# CIFAR WRN, 3 groups: 1/4, 1/2, 1; ImageNet ResNet, 4 stages: 1/8, 1/4, 1/2, 1.
OFD_STAGE_WEIGHTS = (0.125, 0.25, 0.5, 1.0)
# FT (official CIFAR code): β on nn.L1Loss, paraphrase rate k.
FT_BETA = 500.0
FT_PARAPHRASE_RATE = 0.5
# CRD (RepDistiller train_student.py defaults, mdistiller cfg.CRD).
CRD_FEAT_DIM = 128
CRD_NCE_K = 16384
CRD_NCE_T = 0.07
CRD_NCE_M = 0.5
CRD_WEIGHT = 0.8


def stage_weights(num_stages: int) -> list[float]:
    """1 / 2^(n−1−i) for stages i = 0..n−1 (shallow to deep): [1/4, 1/2, 1] for the three
    WRN groups, [1/8, 1/4, 1/2, 1] for four ImageNet stages. Overhaul (distiller.py:
    ``/ 2 ** (feat_num - i - 1)``) and AB (official CIFAR code: deepest /1, then /2, /4;
    RepDistiller ABLoss: ``2**(i-feat_num+1)``) weight their per-stage losses this way."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    return [2.0 ** (i - num_stages + 1) for i in range(num_stages)]


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}")


# --- FitNets (Romero et al. 2015, ICLR; arXiv 1412.6550)

def fitnets_loss(
    regressed_student: torch.Tensor,
    teacher_feature: torch.Tensor,
    variant: Literal["paper", "crd"] = "paper",
) -> torch.Tensor:
    """Hint loss between the regressor's output r(v) and the teacher's hint u.

    ``"paper"`` (Romero Eq. 3): ½‖u − r‖² per sample, summed over all C·H·W elements, then
    averaged over the batch (the paper states the per-example loss; the batch mean is our
    reduction). The paper trains it alone as stage 1, then the student with KD.
    ``"crd"``: mean squared error over all B·C·H·W elements (RepDistiller ``HintLoss`` =
    ``nn.MSELoss()``, mdistiller ``F.mse_loss``), used in one stage as CE + 100·MSE: the
    caller applies :data:`FITNETS_CRD_WEIGHT`. The two differ by the constant factor
    C·H·W/2 (``paper = crd · C·H·W / 2``). Their regressor (mdistiller ``ConvReg``) ends in
    BN + ReLU, so the regressed output cannot reach a negative target.
    """
    _check_same_shape(regressed_student, teacher_feature, "fitnets_loss")
    diff = regressed_student.float() - teacher_feature.float()
    if variant == "paper":
        return 0.5 * diff.pow(2).flatten(1).sum(1).mean()
    if variant == "crd":
        return diff.pow(2).mean()
    raise ValueError(f"unknown FitNets variant {variant!r}: use 'paper' or 'crd'")


# --- Attention transfer (Zagoruyko & Komodakis 2017, ICLR; arXiv 1612.03928)

def attention_map(feature: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Q = mean_c |A_c|^p, flattened per sample and L2-normalised: (B, H·W).

    The paper's F_sum^p sums over channels; the mean differs by the factor C, which the
    normalisation removes. The references (attention-transfer ``at``, RepDistiller,
    mdistiller) use ``f.pow(p)`` without |·|: the same for even p or non-negative
    features, different for odd p on signed features. Zero maps stay zero (eps 1e-12).
    """
    q = feature.float().abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(q, dim=1)


def at_loss(
    student_features: torch.Tensor | Sequence[torch.Tensor],
    teacher_features: torch.Tensor | Sequence[torch.Tensor],
    p: float = 2,
    beta: float = AT_BETA,
    normalization: Literal["paper", "code"] = "paper",
) -> torch.Tensor:
    """Attention transfer summed over the group pairs j (one tensor = one pair).

    With q_j = :func:`attention_map` (unit vectors of length N_j = H_j·W_j):

    ``"paper"``: (β/2) · Σ_j (1/N_j) · mean_b ‖q_s,j − q_t,j‖₂ — Eq. 2's unsquared norm
    (p-norm with p = 2) and β/2, with the paper's setting "β = 10³ divided by number of
    elements in attention map and batch size for each layer" (quoted in
    szagoruyko/attention-transfer issue #32) read as 1/N_j and a batch mean.
    ``"code"``: β · Σ_j mean over (b, i) of (q_s − q_t)² = β · Σ_j (1/N_j) · mean_b ‖q_s − q_t‖₂²
    (attention-transfer ``at_loss``: ``(at(x) - at(y)).pow(2).mean()``, summed over groups
    and times ``--beta 1e+3``; RepDistiller and mdistiller the same with β = 1000).

    Both carry the same 1/(B·N_j) (the code's ``.mean()`` *is* the paper's division by map
    size and batch), so β = 1000 means the same in both; they differ by the square and ½.
    ‖q_s − q_t‖₂ ≤ √2, so the square is smaller and its gradient vanishes as the maps meet,
    while the norm's gradient keeps unit length. torchdistill's ``mode='paper'`` instead
    returns Σ_b ‖q_s − q_t‖₂ / B per pair with no β/2 and no 1/N_j: our ``"paper"`` with
    β = 2·N_j. The p of the map is this function's ``p``; the distance is always the 2-norm.

    Student and teacher maps of a pair must have the same spatial size (the references
    average-pool the larger one; here that is the caller's choice): a ValueError names both
    shapes otherwise. Channel counts may differ.
    """
    if normalization not in ("paper", "code"):
        raise ValueError(f"unknown AT normalization {normalization!r}: use 'paper' or 'code'")
    if isinstance(student_features, torch.Tensor):
        student_features, teacher_features = [student_features], [teacher_features]
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(f"at_loss needs as many student as teacher features (>= 1), got "
                         f"{len(student_features)} and {len(teacher_features)}")
    total = student_features[0].new_zeros((), dtype=torch.float32)
    for f_s, f_t in zip(student_features, teacher_features):
        if f_s.shape[0] != f_t.shape[0] or f_s.shape[2:] != f_t.shape[2:]:
            raise ValueError(f"at_loss needs equal batch and spatial sizes: student {tuple(f_s.shape)}, "
                             f"teacher {tuple(f_t.shape)}")
        diff = attention_map(f_s, p) - attention_map(f_t, p)
        size = diff.shape[1]
        if normalization == "paper":
            total = total + 0.5 * beta * torch.linalg.vector_norm(diff, dim=1).mean() / size
        else:
            total = total + beta * diff.pow(2).mean()
    return total


# --- AB: activation boundaries (Heo et al. 2019b, AAAI; arXiv 1811.03233)

def ab_loss(student_pre: torch.Tensor, teacher_pre: torch.Tensor, margin: float = AB_MARGIN) -> torch.Tensor:
    """The alternative (hinge-squared) loss on pre-ReLU responses s (connector output) and
    t (teacher), summed over all elements and divided by the batch size:

        Σ [ (s + μ)² · 1(s > −μ, t ≤ 0) + (s − μ)² · 1(s ≤ μ, t > 0) ] / B

    It is zero once every student response is on the teacher's side of 0 by at least μ. The
    reference (bhheo/AB_distillation ``criterion_alternative_L2``, RepDistiller ``ABLoss``)
    returns this sum per stage; the caller divides by B (done here), weights the stages by
    :func:`stage_weights` and multiplies the total by :data:`AB_LOSS_SCALE` (3/1000). AB
    trains with this loss alone first (RepDistiller: ``--init_epochs 30``), then with CE/KD.
    """
    _check_same_shape(student_pre, teacher_pre, "ab_loss")
    s, t = student_pre.float(), teacher_pre.float()
    off = (s + margin).pow(2) * ((s > -margin) & (t <= 0)) + (s - margin).pow(2) * ((s <= margin) & (t > 0))
    return off.sum() / s.shape[0]


# --- Overhaul / OFD (Heo et al. 2019a, ICCV; arXiv 1904.01866)

def ofd_margin(
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    variant: Literal["exact", "reference"] = "exact",
) -> torch.Tensor:
    """Per-channel margin m = E[x | x < 0] for x ~ N(β, γ²), from the teacher's pre-ReLU
    BatchNorm (γ = weight, β = bias), float32 of shape (C,).

        m = β − |γ| · φ(β/|γ|) / Φ(−β/|γ|)    (φ, Φ: standard normal pdf, cdf)

    ``"exact"`` (default) evaluates the ratio as exp(log φ − log Φ) in float64 with
    ``torch.special.log_ndtr``, finite for every β/|γ|; the margin then tends to 0⁻ as
    Φ(−β/|γ|) → 0. ``"reference"`` reproduces ``get_margin_from_BN`` (overhaul-distillation
    CIFAR-100/distiller.py, also mdistiller OFD.py): the same formula while
    Φ(−β/|γ|) > 0.001, else −3|γ| — a jump (just above β/|γ| = 3.09 the exact margin is
    ≈ −0.28|γ|, the reference's −3|γ|). A channel with γ = 0 is a point mass at β: both give
    min(β, 0) (the limit); the reference divides by zero there.
    """
    if variant not in ("exact", "reference"):
        raise ValueError(f"unknown OFD margin variant {variant!r}: use 'exact' or 'reference'")
    _check_same_shape(bn_weight, bn_bias, "ofd_margin")
    scale = bn_weight.detach().double().abs()
    mean = bn_bias.detach().double()
    degenerate = scale == 0
    safe_scale = torch.where(degenerate, torch.ones_like(scale), scale)
    a = mean / safe_scale
    log_pdf = -0.5 * a * a - 0.5 * math.log(2 * math.pi)
    log_cdf = torch.special.log_ndtr(-a)
    margin = mean - safe_scale * torch.exp(log_pdf - log_cdf)
    if variant == "reference":
        margin = torch.where(log_cdf.exp() > OFD_CDF_THRESHOLD, margin, -3.0 * safe_scale)
    margin = torch.where(degenerate, mean.clamp(max=0.0), margin)
    return margin.float()


def ofd_loss(student_pre: torch.Tensor, teacher_pre: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Partial L2 distance to the margin-ReLU teacher target (Heo 2019a), summed over all
    elements and divided by the batch size:

        t' = max(t, m)   (m per channel, broadcast over (B, ·, H, W))
        Σ (s − t')² · 1(s > t' or t' > 0) / B

    i.e. no loss where the student is already below a non-positive target. s is the
    connector's output (conv1×1 + BN) of the student's pre-ReLU feature, t the teacher's
    pre-ReLU feature, m = :func:`ofd_margin` of the teacher BN that produced t. This is the
    later reference form (distiller.py at commit 76344a8, ImageNet distiller.py); the
    earlier three-term form (commit 93bbcd2, mdistiller ``feat_loss``) is the same function
    because m < 0. The CIFAR reference sums the stages with :func:`stage_weights` and trains
    CE + Σ/B · :data:`OFD_LOSS_WEIGHT` (``loss_distill.sum() / batch_size / 1000``);
    mdistiller's ``.mean(dim=0).sum()`` is the same Σ/B.
    """
    _check_same_shape(student_pre, teacher_pre, "ofd_loss")
    s, t = student_pre.float(), teacher_pre.float()
    m = margin.float()
    if m.dim() == 1:
        if m.shape[0] != s.shape[1]:
            raise ValueError(f"ofd_loss: margin has {m.shape[0]} channels, features {tuple(s.shape)}")
        m = m.view(1, -1, *([1] * (s.dim() - 2)))
    target = torch.maximum(t, m)
    mask = (s > target) | (target > 0)
    return ((s - target).pow(2) * mask).sum() / s.shape[0]


# --- FT: factor transfer (Kim, Park & Kwak 2018, NeurIPS; arXiv 1802.04977)

def ft_factor(x: torch.Tensor) -> torch.Tensor:
    """F / ‖F‖₂: the factor flattened per sample and L2-normalised, (B, C·H·W), float32
    (official code ``utils.FT``: ``F.normalize(x.view(x.size(0), -1))``)."""
    return F.normalize(x.float().flatten(1), dim=1)


def ft_loss(
    student_factor: torch.Tensor,
    teacher_factor: torch.Tensor,
    p: float = 1,
    reduction: Literal["paper", "code"] = "paper",
) -> torch.Tensor:
    """‖F_T/‖F_T‖₂ − F_S/‖F_S‖₂‖_p between the paraphraser's teacher factor and the
    translator's student factor (FT paper, p = 1). Inputs are the raw factors (B, ...);
    :func:`ft_factor` is applied here (idempotent, so normalised inputs are fine too).

    ``"paper"``: the p-norm per sample, batch mean. ``"code"``: the mean over all B·D
    elements of |d|^p — for p = 1 the official ``nn.L1Loss()`` (Jangho-Kim/
    Factor-Transfer-pytorch train_student.py), i.e. the paper's value divided by D. The
    official β = 500 (:data:`FT_BETA`, on CE with weight 1) belongs to ``"code"``; with
    ``"paper"`` the same weighting is 500/D. RepDistiller's FT differs in kind: it matches
    AT-style maps of the factors (mean_c f², normalised) with weight 200.
    """
    s, t = ft_factor(student_factor), ft_factor(teacher_factor)
    _check_same_shape(s, t, "ft_loss")
    diff = s - t
    if reduction == "paper":
        return torch.linalg.vector_norm(diff, ord=p, dim=1).mean()
    if reduction == "code":
        return diff.abs().pow(p).mean()
    raise ValueError(f"unknown FT reduction {reduction!r}: use 'paper' or 'code'")


def ft_reconstruction_loss(
    output: torch.Tensor, target: torch.Tensor, norm: Literal["l1", "l2"] = "l1"
) -> torch.Tensor:
    """The paraphraser's training loss: its reconstruction vs the teacher feature, mean over
    all elements. ``"l1"``: mean |o − x| — the official code (train_Paraphraser.py,
    ``nn.L1Loss()``; ``--epoch 5`` looped as ``range(0, 5 + 1)``, i.e. 6 passes; lr 0.1). ``"l2"``:
    mean (o − x)² — RepDistiller's init stage (``nn.MSELoss()``). We did not check which
    norm the paper's reconstruction equation uses; the default is the authors' code."""
    _check_same_shape(output, target, "ft_reconstruction_loss")
    diff = output.float() - target.float()
    if norm == "l1":
        return diff.abs().mean()
    if norm == "l2":
        return diff.pow(2).mean()
    raise ValueError(f"unknown reconstruction norm {norm!r}: use 'l1' or 'l2'")


# --- Jacobian matching (Srinivas & Fleuret 2018, ICML; arXiv 1803.00443)

def jacobian_output(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Σ_b z_b,c_b: the scalar whose input gradient gives every sample's ∇_x z_c at once.

    The caller (for student and teacher, with the same ``classes``) does
    ``x.requires_grad_(True)``; ``z = net(x)``;
    ``g = torch.autograd.grad(jacobian_output(z, classes), x, create_graph=True)[0]``
    (``create_graph`` for the student only: the loss is trained through g, which is double
    backprop; the teacher's g is a constant). Summing over the batch is exact only if
    samples do not interact: with BatchNorm in training mode ∇_x of the sum picks up
    cross-sample terms, so put the networks in eval mode for this pass or use per-sample
    gradients. kdlab's choice of c is the ground-truth label (we could not confirm from the
    stored sources which output the paper differentiates; one public re-implementation uses
    the teacher's top-1 class) — any choice is the caller's, this function takes it.
    """
    return logits.float().gather(1, classes.long().view(-1, 1)).sum()


def jacobian_loss(student_input_grad: torch.Tensor, teacher_input_grad: torch.Tensor) -> torch.Tensor:
    """‖ g_S/‖g_S‖₂ − g_T/‖g_T‖₂ ‖₂² per sample, batch mean, g = ∇_x z_c flattened per sample
    (the normalised, squared Jacobian penalty of Srinivas & Fleuret; see
    :func:`jacobian_output` for what the caller passes). Equals 2 − 2·cos(g_S, g_T). No
    public reference code of the authors was found, so no weight is set here: the caller's."""
    _check_same_shape(student_input_grad, teacher_input_grad, "jacobian_loss")
    diff = F.normalize(student_input_grad.float().flatten(1), dim=1) - F.normalize(
        teacher_input_grad.float().flatten(1), dim=1
    )
    return diff.pow(2).sum(1).mean()


# --- CRD (Tian, Krishnan & Isola 2020, ICLR; arXiv 1910.10699)

def crd_normalization_constant(
    positive_scores: torch.Tensor, negative_scores: torch.Tensor, n_data: int, tau: float = CRD_NCE_T
) -> torch.Tensor:
    """Z = n_data · mean over all B·(K+1) scores of exp(s/τ), detached, float32.

    The reference (RepDistiller crd/memory.py ``ContrastMemory``, mdistiller CRD.py)
    computes Z once, on the first batch, separately for each of the two anchors, and keeps
    it fixed for the rest of training: the caller stores the two values and passes them to
    :func:`crd_contrast_loss` afterwards.
    """
    scores = torch.cat([positive_scores.float().view(-1, 1), negative_scores.float()], dim=1).detach()
    return torch.exp(scores / tau).mean() * n_data


def crd_contrast_loss(
    positive_scores: torch.Tensor,
    negative_scores: torch.Tensor,
    n_data: int,
    tau: float = CRD_NCE_T,
    z: float | torch.Tensor | None = None,
    eps: float = 1e-7,
) -> torch.Tensor:
    """The NCE critic loss of one anchor (RepDistiller crd/criterion.py ``ContrastLoss``,
    which its docstring ties to the paper's Eq. 18):

        P = exp(s/τ) / Z,  c = K / n_data (K negatives, noise 1/n_data per sample)
        L = −(1/B) · [ Σ_b log(P⁺ / (P⁺ + c + eps)) + Σ_b Σ_k log(c / (P⁻_k + c + eps)) ]

    ``positive_scores`` (B,) and ``negative_scores`` (B, K) are dot products of unit-norm
    128-d embeddings (``Embed``: linear + L2 normalise): in the reference the positive is
    the *memory bank's* entry for the sample's index (the other network's momentum-averaged
    embedding, momentum 0.5), the negatives K = 16384 other indices' entries. ``z`` is the
    fixed constant of :func:`crd_normalization_constant`; None computes it from this batch
    (the reference's first batch). Evaluated in log space; equal to the reference's
    arithmetic. CRD's objective is this loss for the student anchor plus the one for the
    teacher anchor, times :data:`CRD_WEIGHT` (0.8), on CE (1) and optionally KD.
    """
    pos = positive_scores.float().view(-1)
    neg = negative_scores.float()
    if neg.dim() != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(f"crd_contrast_loss: positives {tuple(pos.shape)} and negatives {tuple(neg.shape)} "
                         "must be (B,) and (B, K)")
    if z is None:
        z = crd_normalization_constant(pos, neg, n_data, tau)
    log_z = torch.log(torch.as_tensor(z, dtype=torch.float32, device=pos.device))
    noise = neg.shape[1] / float(n_data)
    log_noise = math.log(noise)
    log_noise_eps = torch.tensor(math.log(noise + eps), device=pos.device)
    log_p_pos = pos / tau - log_z
    log_p_neg = neg / tau - log_z
    log_d1 = log_p_pos - torch.logaddexp(log_p_pos, log_noise_eps)
    log_d0 = log_noise - torch.logaddexp(log_p_neg, log_noise_eps)
    return -(log_d1.sum() + log_d0.sum()) / pos.shape[0]
