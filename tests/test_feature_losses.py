"""Closed forms of the feature-based and modern logit-based objectives on random inputs.

Each loss is checked against an independent computation written differently (float64
NumPy, explicit loops), for zero where the student equals the teacher (where that holds),
for finite gradients, and for the documented relations between its options.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import truncnorm

from kdlab.feature_losses import (
    AB_LOSS_SCALE,
    FITNETS_CRD_WEIGHT,
    OFD_STAGE_WEIGHTS,
    ab_loss,
    at_loss,
    attention_map,
    crd_contrast_loss,
    crd_normalization_constant,
    fitnets_loss,
    ft_factor,
    ft_loss,
    ft_reconstruction_loss,
    jacobian_loss,
    jacobian_output,
    ofd_loss,
    ofd_margin,
    stage_weights,
)
from kdlab.losses import (
    dkd_loss,
    dkd_warmup_factor,
    kl_loss,
    logit_standardized_kl,
    standardize_logits,
)

B, K = 6, 7


def _randn(seed, *shape, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _np(x):
    return x.detach().double().numpy()


def _grad_finite(fn, student, *others):
    """The loss's gradient with respect to its first (student) argument exists and is finite."""
    leaf = student.clone().requires_grad_(True)
    fn(leaf, *others).backward()
    return leaf.grad is not None and bool(torch.isfinite(leaf.grad).all())


def _softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


# --- DKD


def _dkd_reference(zs, zt, labels, alpha, beta, tau):
    """TCKD and NCKD from their definitions, one sample and one class at a time."""
    total = 0.0
    for b in range(zs.shape[0]):
        ps, pt = _softmax(zs[b] / tau), _softmax(zt[b] / tau)
        y = labels[b]
        others = [k for k in range(zs.shape[1]) if k != y]
        mass_s, mass_t = sum(ps[k] for k in others), sum(pt[k] for k in others)  # 1 − p_t, summed
        tckd = _kl([pt[y], mass_t], [ps[y], mass_s])
        nckd = _kl([pt[k] / mass_t for k in others], [ps[k] / mass_s for k in others])
        total += tau**2 * (alpha * tckd + beta * nckd)
    return total / zs.shape[0]


def test_dkd_matches_its_definition():
    zs, zt = _randn(0, B, K, scale=3), _randn(1, B, K, scale=3)
    labels = torch.arange(B) % K
    for tau, alpha, beta in ((4.0, 1.0, 8.0), (1.0, 2.0, 0.5)):
        expected = _dkd_reference(_np(zs), _np(zt), labels.numpy(), alpha, beta, tau)
        for mask in ("exact", "mdistiller"):
            value = dkd_loss(zs, zt, labels, alpha, beta, tau, target_mask=mask)
            assert value.dtype == torch.float32
            assert value.item() == pytest.approx(expected, rel=1e-5)


def test_dkd_reformulation_kd_is_tckd_plus_weighted_nckd():
    """Zhao et al.'s reformulation: KD = TCKD + (1 − p_t^T)·NCKD, per sample, same τ and τ²."""
    zs, zt = _randn(2, B, K, scale=2), _randn(3, B, K, scale=2)
    labels = torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(4))
    tau = 3.0
    for b in range(B):
        s, t, y = zs[b:b + 1], zt[b:b + 1], labels[b:b + 1]
        teacher_target_prob = torch.softmax(t / tau, dim=1)[0, y].item()
        decomposed = dkd_loss(s, t, y, alpha=1.0, beta=1.0 - teacher_target_prob, tau=tau)
        torch.testing.assert_close(decomposed, kl_loss(s, t, tau), rtol=1e-5, atol=1e-6)


def test_dkd_zero_for_equal_logits_and_finite_gradients():
    z, labels = _randn(5, B, K, scale=3), torch.arange(B) % K
    assert dkd_loss(z, z.clone(), labels).abs().item() < 1e-6
    assert _grad_finite(lambda s, t: dkd_loss(s, t, labels), _randn(6, B, K), z)


def test_dkd_exact_mask_stays_finite_where_the_reference_arithmetic_saturates():
    labels = torch.zeros(2, dtype=torch.long)
    # the target beats the rest by > 104 (float32's exp underflows there, float64's does not)
    zs = torch.tensor([[140.0, 0.0, 1.0, 2.0], [120.0, 3.0, 0.0, 1.0]])
    zt = torch.tensor([[150.0, 1.0, 0.0, 0.5], [130.0, 0.0, 2.0, 1.0]])
    exact = dkd_loss(zs, zt, labels, tau=1.0)
    expected = _dkd_reference(_np(zs), _np(zt), labels.numpy(), 1.0, 8.0, 1.0)
    assert exact.item() == pytest.approx(expected, rel=1e-4)
    assert _grad_finite(lambda s, t: dkd_loss(s, t, labels, tau=1.0), zs, zt)
    # the reference's log of summed probabilities: log(0) for the non-target mass
    assert not torch.isfinite(dkd_loss(zs, zt, labels, tau=1.0, target_mask="mdistiller"))


def test_dkd_warmup_is_mdistillers_linear_ramp():
    assert dkd_warmup_factor(1) == pytest.approx(0.05)
    assert dkd_warmup_factor(10) == pytest.approx(0.5)
    assert dkd_warmup_factor(20) == 1.0 and dkd_warmup_factor(240) == 1.0
    assert dkd_warmup_factor(0) == 0.0
    assert dkd_warmup_factor(5, warmup_epochs=10) == 0.5
    with pytest.raises(ValueError):
        dkd_warmup_factor(1, warmup_epochs=0)
    with pytest.raises(ValueError):
        dkd_loss(_randn(0, B, K), _randn(1, B, K), torch.zeros(B), target_mask="approx")


# --- Logit standardisation


def test_standardized_logits_are_z_scores_with_bessel_std():
    z = _randn(7, B, K, scale=5) + 3.0
    expected = (_np(z) - _np(z).mean(1, keepdims=True)) / (_np(z).std(1, ddof=1, keepdims=True) + 1e-7)
    np.testing.assert_allclose(_np(standardize_logits(z)), expected, rtol=1e-5, atol=1e-6)
    assert standardize_logits(torch.ones(2, K)).abs().max().item() == 0.0


def test_logit_standardized_kl_is_kl_of_z_scores_with_tau_squared():
    zs, zt = _randn(8, B, K, scale=3), _randn(9, B, K, scale=6)
    tau = 2.0
    ps = _np(torch.softmax(standardize_logits(zs) / tau, 1))
    pt = _np(torch.softmax(standardize_logits(zt) / tau, 1))
    expected = tau**2 * np.mean([_kl(pt[b], ps[b]) for b in range(B)])
    assert logit_standardized_kl(zs, zt, tau).item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(logit_standardized_kl(zs, zt, tau, "none") * tau**2, logit_standardized_kl(zs, zt, tau))


def test_logit_standardized_kl_ignores_shift_and_scale_of_the_logits():
    zs, zt = _randn(10, B, K, scale=2), _randn(11, B, K, scale=4)
    base = logit_standardized_kl(zs, zt, 2.0)
    for scale, shift in ((3.0, 5.0), (0.25, -7.0)):
        torch.testing.assert_close(logit_standardized_kl(scale * zs + shift, zt, 2.0), base, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(logit_standardized_kl(zs, scale * zt + shift, 2.0), base, rtol=1e-4, atol=1e-6)
    # a student that is an affine copy of the teacher has nothing left to learn; plain KD does
    assert logit_standardized_kl(0.5 * zt + 1.0, zt, 2.0).item() < 1e-6
    assert kl_loss(0.5 * zt + 1.0, zt, 2.0).item() > 1e-2
    assert _grad_finite(lambda s, t: logit_standardized_kl(s, t, 2.0), zs, zt)


# --- FitNets


def test_fitnets_paper_and_crd_forms():
    s, t = _randn(12, B, 3, 4, 5), _randn(13, B, 3, 4, 5)
    diff = _np(s) - _np(t)
    paper = np.mean([0.5 * (diff[b] ** 2).sum() for b in range(B)])
    assert fitnets_loss(s, t).item() == pytest.approx(paper, rel=1e-5)
    assert fitnets_loss(s, t, "crd").item() == pytest.approx((diff**2).mean(), rel=1e-5)
    # paper = crd · C·H·W / 2: the factor between the two
    assert fitnets_loss(s, t).item() == pytest.approx(fitnets_loss(s, t, "crd").item() * 3 * 4 * 5 / 2, rel=1e-5)
    assert FITNETS_CRD_WEIGHT == 100.0
    assert fitnets_loss(t, t.clone()).item() == 0.0
    assert _grad_finite(fitnets_loss, s, t)
    with pytest.raises(ValueError, match=r"\(6, 3, 4, 5\)"):
        fitnets_loss(s, t[:, :2])


# --- AT


def _attention_np(f, p):
    q = (np.abs(f) ** p).mean(axis=1).reshape(f.shape[0], -1)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_attention_map_is_normalised_channel_mean_of_powers():
    f = _randn(14, B, 5, 4, 4)
    for p in (1, 2, 3):
        np.testing.assert_allclose(_np(attention_map(f, p)), _attention_np(_np(f), p), rtol=1e-5, atol=1e-7)


def test_at_loss_paper_and_code_forms_over_groups():
    sizes = [(4, 8, 8), (6, 4, 4), (8, 2, 2)]
    students = [_randn(20 + i, B, c, h, w) for i, (c, h, w) in enumerate(sizes)]
    teachers = [_randn(30 + i, B, 2 * c, h, w) for i, (c, h, w) in enumerate(sizes)]  # channels may differ
    beta = 1000.0
    paper = code = 0.0
    for f_s, f_t in zip(students, teachers):
        d = _attention_np(_np(f_s), 2) - _attention_np(_np(f_t), 2)
        n = d.shape[1]
        paper += beta / 2 * np.mean([np.sqrt((d[b] ** 2).sum()) for b in range(B)]) / n
        code += beta * np.mean([(d[b] ** 2).sum() for b in range(B)]) / n
    assert at_loss(students, teachers).item() == pytest.approx(paper, rel=1e-5)
    assert at_loss(students, teachers, normalization="code").item() == pytest.approx(code, rel=1e-5)
    # for one sample and one pair they differ by the square and the ½: code = 2‖d‖ · paper
    one_s, one_t = students[1][:1], teachers[1][:1]
    distance = torch.linalg.vector_norm(attention_map(one_s) - attention_map(one_t)).item()
    ratio = at_loss(one_s, one_t, normalization="code") / at_loss(one_s, one_t)
    assert ratio.item() == pytest.approx(2 * distance, rel=1e-5)
    # one pair may be passed as bare tensors
    single = at_loss(students[0], teachers[0], normalization="code")
    assert single.item() == pytest.approx(at_loss(students[:1], teachers[:1], normalization="code").item())


def test_at_loss_zero_for_matching_maps_and_invariant_to_feature_scale():
    f = _randn(40, B, 4, 6, 6)
    for mode in ("paper", "code"):
        assert at_loss([f], [f.clone()], normalization=mode).item() == 0.0
        assert at_loss([f], [3.0 * f], normalization=mode).item() < 1e-4  # rounding only
        assert _grad_finite(lambda s, t: at_loss([s], [t], normalization=mode), f, f.clone())  # norm at 0
        assert _grad_finite(lambda s, t: at_loss([s], [t], normalization=mode), f, _randn(41, B, 4, 6, 6))


def test_at_loss_refuses_different_spatial_sizes():
    with pytest.raises(ValueError, match=r"\(6, 4, 8, 8\).*\(6, 4, 4, 4\)"):
        at_loss([_randn(0, B, 4, 8, 8)], [_randn(1, B, 4, 4, 4)])
    with pytest.raises(ValueError, match="as many"):
        at_loss([_randn(0, B, 4, 8, 8)], [])


# --- AB


def test_ab_loss_is_the_hinge_squared_sum_over_batch():
    s, t = _randn(50, B, 3, 4, 4, scale=2), _randn(51, B, 3, 4, 4, scale=2)
    margin = 1.0
    total = 0.0
    for si, ti in zip(_np(s).ravel(), _np(t).ravel()):
        if ti <= 0 and si > -margin:
            total += (si + margin) ** 2
        elif ti > 0 and si <= margin:
            total += (si - margin) ** 2
    assert ab_loss(s, t, margin).item() == pytest.approx(total / B, rel=1e-5)
    assert _grad_finite(ab_loss, s, t)
    # zero once the student is on the teacher's side of 0 by the margin
    settled = torch.where(t > 0, t.abs() + margin, -t.abs() - margin)
    assert ab_loss(settled, t, margin).item() == 0.0
    assert AB_LOSS_SCALE == pytest.approx(0.003)
    assert stage_weights(3) == [0.25, 0.5, 1.0] and stage_weights(4) == [0.125, 0.25, 0.5, 1.0]
    assert list(OFD_STAGE_WEIGHTS[-3:]) == stage_weights(3) and list(OFD_STAGE_WEIGHTS) == stage_weights(4)


# --- Overhaul (OFD)


def test_ofd_margin_is_the_truncated_normal_mean():
    gamma = _randn(60, 32) * 2 + 0.1
    beta = _randn(61, 32) * 2
    margin = ofd_margin(gamma, beta)
    expected = [
        truncnorm(-np.inf, -b / abs(g), loc=b, scale=abs(g)).mean() for g, b in zip(_np(gamma), _np(beta))
    ]
    np.testing.assert_allclose(_np(margin), expected, rtol=1e-5, atol=1e-6)
    assert margin.dtype == torch.float32 and (margin < 0).all()


def test_ofd_margin_tail_exact_vs_reference_fallback():
    gamma = torch.tensor([1.0, -2.0, 0.5, 1.0, 0.0, 0.0])
    beta = torch.tensor([0.5, 10.0, 1.0, 50.0, -0.7, 0.7])  # β/|γ| = 0.5, 5, 2, 50; then γ = 0
    exact, reference = ofd_margin(gamma, beta), ofd_margin(gamma, beta, "reference")
    # Φ(−β/|γ|) > 0.001 (β/|γ| < 3.09): the same formula
    torch.testing.assert_close(exact[[0, 2]], reference[[0, 2]])
    # beyond: the reference's −3|γ|; exact tends to 0⁻ like −|γ|·(1/a − 2/a³) (Mills ratio)
    torch.testing.assert_close(reference[[1, 3]], torch.tensor([-6.0, -3.0]))
    a = 50.0
    assert exact[3].item() == pytest.approx(-(1 / a - 2 / a**3), rel=1e-3)
    assert -2.0 * 0.2 < exact[1].item() < 0
    # γ = 0: a point mass at β; the limit min(β, 0)
    torch.testing.assert_close(exact[4:], torch.tensor([-0.7, 0.0]))
    torch.testing.assert_close(reference[4:], torch.tensor([-0.7, 0.0]))


def test_ofd_loss_partial_l2_and_the_older_three_term_form():
    s, t = _randn(70, B, 3, 4, 4, scale=2), _randn(71, B, 3, 4, 4, scale=2)
    margin = ofd_margin(_randn(72, 3).abs() + 0.5, _randn(73, 3))
    m = _np(margin)
    total = older = 0.0
    for b in range(B):
        for c in range(3):
            for si, ti in zip(_np(s)[b, c].ravel(), _np(t)[b, c].ravel()):
                target = max(ti, m[c])
                if si > target or target > 0:
                    total += (si - target) ** 2
                # overhaul-distillation distiller.py at 93bbcd2 / mdistiller feat_loss
                older += ((si - m[c]) ** 2 * (si > m[c] and ti <= m[c])
                          + (si - ti) ** 2 * (si > ti and m[c] < ti <= 0) + (si - ti) ** 2 * (ti > 0))
    value = ofd_loss(s, t, margin)
    assert value.item() == pytest.approx(total / B, rel=1e-5)
    assert value.item() == pytest.approx(older / B, rel=1e-5)
    assert ofd_loss(torch.maximum(t, margin.view(1, 3, 1, 1)), t, margin).item() == 0.0
    below = torch.minimum(t, margin.view(1, 3, 1, 1)) - 1.0  # under a non-positive target: free
    assert ofd_loss(torch.where(t > 0, t, below), t, margin).item() == 0.0
    assert _grad_finite(lambda a, b: ofd_loss(a, b, margin), s, t)
    with pytest.raises(ValueError, match="margin"):
        ofd_loss(s, t, margin[:2])


# --- FT


def test_ft_loss_paper_and_code_reductions():
    s, t = _randn(80, B, 2, 3, 3), _randn(81, B, 2, 3, 3)
    fs = _np(s).reshape(B, -1)
    ft = _np(t).reshape(B, -1)
    d = fs / np.linalg.norm(fs, axis=1, keepdims=True) - ft / np.linalg.norm(ft, axis=1, keepdims=True)
    assert ft_loss(s, t).item() == pytest.approx(np.abs(d).sum(1).mean(), rel=1e-5)
    assert ft_loss(s, t, p=2).item() == pytest.approx(np.sqrt((d**2).sum(1)).mean(), rel=1e-5)
    assert ft_loss(s, t, reduction="code").item() == pytest.approx(np.abs(d).mean(), rel=1e-5)
    assert ft_loss(s, t, reduction="code").item() == pytest.approx(ft_loss(s, t).item() / fs.shape[1], rel=1e-5)
    torch.testing.assert_close(ft_factor(s).norm(dim=1), torch.ones(B))
    assert ft_loss(ft_factor(t), 5.0 * t).item() < 1e-6
    assert _grad_finite(ft_loss, s, t)


def test_ft_reconstruction_l1_and_l2():
    o, x = _randn(82, B, 4, 3, 3), _randn(83, B, 4, 3, 3)
    d = _np(o) - _np(x)
    assert ft_reconstruction_loss(o, x).item() == pytest.approx(np.abs(d).mean(), rel=1e-5)
    assert ft_reconstruction_loss(o, x, "l2").item() == pytest.approx((d**2).mean(), rel=1e-5)


# --- Jacobian matching


def test_jacobian_loss_is_squared_distance_of_unit_gradients():
    gs, gt = _randn(90, B, 3, 4, 4), _randn(91, B, 3, 4, 4)
    a, b = _np(gs).reshape(B, -1), _np(gt).reshape(B, -1)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert jacobian_loss(gs, gt).item() == pytest.approx((2 - 2 * cos).mean(), rel=1e-5)
    assert jacobian_loss(2.0 * gt, gt).item() < 1e-6


def test_jacobian_pipeline_double_backprop_on_a_small_network():
    """The caller's recipe: ∇_x of jacobian_output, then the loss, trained through g."""
    g = torch.Generator().manual_seed(92)
    student = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, K))
    teacher = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, K))
    x = torch.randn(B, 5, generator=g)
    classes = torch.arange(B) % K
    xs = x.clone().requires_grad_(True)
    g_s = torch.autograd.grad(jacobian_output(student(xs), classes), xs, create_graph=True)[0]
    xt = x.clone().requires_grad_(True)
    g_t = torch.autograd.grad(jacobian_output(teacher(xt), classes), xt)[0]
    # the summed output gives each sample's own gradient (no BatchNorm here)
    for b in range(B):
        xb = x[b:b + 1].clone().requires_grad_(True)
        own = torch.autograd.grad(student(xb)[0, classes[b]], xb)[0]
        torch.testing.assert_close(g_s[b:b + 1].detach(), own)
    jacobian_loss(g_s, g_t).backward()
    grads = [p.grad for p in student.parameters()]
    assert grads[-1] is None  # the last bias does not move ∇_x z
    assert all(torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads[:-1])


# --- CRD


def _crd_reference(pos, neg, n_data, tau, z, eps=1e-7):
    k = neg.shape[1]
    c = k / n_data
    total = 0.0
    for b in range(pos.shape[0]):
        p = math.exp(pos[b] / tau) / z
        total += math.log(p / (p + c + eps))
        for j in range(k):
            total += math.log(c / (math.exp(neg[b, j] / tau) / z + c + eps))
    return -total / pos.shape[0]


def test_crd_contrast_loss_matches_the_nce_formula():
    emb = torch.nn.functional.normalize(_randn(100, B, 16), dim=1)
    bank = torch.nn.functional.normalize(_randn(101, B, 33, 16), dim=2)
    scores = torch.einsum("bd,bkd->bk", emb, bank)
    pos, neg = scores[:, 0], scores[:, 1:]
    n_data, tau = 500, 0.07
    z = crd_normalization_constant(pos, neg, n_data, tau)
    assert z.item() == pytest.approx(np.exp(_np(scores) / tau).mean() * n_data, rel=1e-5)
    expected = _crd_reference(_np(pos), _np(neg), n_data, tau, z.item())
    assert crd_contrast_loss(pos, neg, n_data, tau).item() == pytest.approx(expected, rel=1e-5)
    # a stored Z from an earlier batch is used as given
    fixed = crd_contrast_loss(pos, neg, n_data, tau, z=123.0)
    assert fixed.item() == pytest.approx(_crd_reference(_np(pos), _np(neg), n_data, tau, 123.0), rel=1e-5)
    assert _grad_finite(lambda p, q: crd_contrast_loss(p, q, n_data, tau, z=z), pos, neg)
    with pytest.raises(ValueError, match="must be"):
        crd_contrast_loss(pos, neg[:2], n_data)
