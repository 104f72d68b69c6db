"""Closed forms of the objectives (Kim et al. 2021 Eqs. 1-9) on random inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdlab.losses import (
    cross_entropy,
    distillation_loss,
    ensemble_logits,
    kl_loss,
    kl_loss_infinite,
    mse_loss,
    smooth_labels,
)

B, K = 16, 10


def _logits(seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, K, generator=g) * scale).to(dtype)


def _grad(fn, student, teacher):
    student = student.clone().requires_grad_(True)
    fn(student, teacher).backward()
    return student.grad


def _eq5(student, teacher):
    """Kim Eq. 5, per sample: (1/K)(z_s,k - z_t,k) - (1/K²) Σ_j (z_s,j - z_t,j)."""
    d = student - teacher
    return d / K - d.sum(dim=1, keepdim=True) / K**2


def test_infinite_tau_gradient_is_eq5():
    for seed in range(5):
        zs, zt = _logits(seed), _logits(seed + 100) + 5.0  # nonzero logit means: the term Hinton drops
        grad = _grad(lambda s, t: kl_loss(s, t, math.inf), zs, zt) * B  # batch mean -> per sample
        torch.testing.assert_close(grad, _eq5(zs, zt), rtol=1e-5, atol=1e-6)


def test_infinite_tau_value_is_centered_half_squared_error():
    zs, zt = _logits(1), _logits(2)
    d = zs - zt
    expected = ((d - d.mean(1, keepdim=True)) ** 2).sum(1).mean() / (2 * K)
    torch.testing.assert_close(kl_loss(zs, zt, math.inf), expected)
    torch.testing.assert_close(kl_loss(zs, zt, math.inf, "max"), expected)
    # invariant to adding a constant to either logit vector (softmax is)
    torch.testing.assert_close(kl_loss_infinite(zs + 7.0, zt), expected)


def test_large_tau_approaches_the_limit_in_value_and_gradient():
    zs, zt = _logits(3, scale=1.0), _logits(4, scale=1.0)
    limit = kl_loss(zs, zt, math.inf)
    errors = []
    for tau in (10.0, 100.0):
        value = kl_loss(zs, zt, tau, "tau2")
        errors.append(abs(value - limit) / limit)
    assert errors[1] < 0.02 and errors[1] < errors[0]
    grad = _grad(lambda s, t: kl_loss(s, t, 100.0), zs, zt) * B
    torch.testing.assert_close(grad, _eq5(zs, zt), rtol=0.05, atol=2e-3)


def test_small_tau_gradient_over_tau_is_eq6_label_matching():
    g = torch.Generator().manual_seed(5)
    zs, zt = torch.randn(B, K, generator=g), torch.randn(B, K, generator=g)
    for z in (zs, zt):  # clear argmaxes: top-1 at least 1 above the rest
        top = z.argmax(1)
        z[torch.arange(B), top] = z.max(1).values + 1.0
    tau = 0.01
    grad = _grad(lambda s, t: kl_loss(s, t, tau, "tau2"), zs, zt) * B / tau
    expected = F.one_hot(zs.argmax(1), K).float() - F.one_hot(zt.argmax(1), K).float()
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-4)


def test_finite_tau_gradient_is_eq3():
    zs, zt = _logits(6), _logits(7)
    for tau in (0.5, 1.0, 4.0):
        grad = _grad(lambda s, t: kl_loss(s, t, tau, "tau2"), zs, zt) * B
        expected = tau * (F.softmax(zs / tau, 1) - F.softmax(zt / tau, 1))
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_max_scaling_is_eq7():
    zs, zt = _logits(8), _logits(9)
    for tau in (0.1, 0.5, 1.0, 3.0):
        plain = kl_loss(zs, zt, tau, "none")
        torch.testing.assert_close(kl_loss(zs, zt, tau, "max"), max(tau, tau * tau) * plain)
        torch.testing.assert_close(kl_loss(zs, zt, tau, "tau2"), tau * tau * plain)
    expected = F.kl_div(F.log_softmax(zs / 2, 1), F.log_softmax(zt / 2, 1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(kl_loss(zs, zt, 2.0, "none"), expected)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_bad_tau_is_a_value_error(tau):
    with pytest.raises(ValueError, match="tau"):
        kl_loss(_logits(0), _logits(1), tau)


def test_unscaled_infinite_tau_is_refused():
    with pytest.raises(ValueError):
        kl_loss(_logits(0), _logits(1), math.inf, "none")


def test_smoothing_modes_agree_when_eps_is_beta_k_over_k_minus_1():
    labels = torch.randint(0, K, (B,))
    beta = 0.09
    others = smooth_labels(labels, K, beta, "others")
    uniform = smooth_labels(labels, K, beta * K / (K - 1), "uniform")
    torch.testing.assert_close(others, uniform)
    torch.testing.assert_close(others.sum(1), torch.ones(B))
    assert torch.allclose(others[torch.arange(B), labels], torch.full((B,), 1 - beta))


def test_uniform_smoothing_matches_pytorch_label_smoothing():
    logits, labels = _logits(10), torch.randint(0, K, (B,))
    ours = cross_entropy(logits, smooth_labels(labels, K, 0.1, "uniform"))
    torch.testing.assert_close(ours, F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_mse_reductions_eq9_and_code_and_half():
    zs, zt = _logits(11), _logits(12)
    per_sample = ((zs - zt) ** 2).sum(1)
    torch.testing.assert_close(mse_loss(zs, zt, "sum"), per_sample.mean())
    torch.testing.assert_close(mse_loss(zs, zt, "mean"), F.mse_loss(zs, zt))  # the paper's nn.MSELoss()
    torch.testing.assert_close(mse_loss(zs, zt, "half_sum"), 0.5 * per_sample.mean())


def test_losses_are_float32_under_bf16_inputs():
    zs, zt = _logits(13, dtype=torch.bfloat16), _logits(14, dtype=torch.bfloat16)
    for value in (kl_loss(zs, zt, 4.0), kl_loss(zs, zt, math.inf), mse_loss(zs, zt),
                  cross_entropy(zs, torch.zeros(B, dtype=torch.long))):
        assert value.dtype == torch.float32


def test_combined_objective_weights_the_kd_term_with_alpha():
    zs, zt, labels = _logits(15), _logits(16), torch.randint(0, K, (B,))
    ce, kd = F.cross_entropy(zs, labels), kl_loss(zs, zt, 4.0)
    torch.testing.assert_close(distillation_loss(zs, labels, zt, alpha=0.0, tau=4.0), ce)
    torch.testing.assert_close(distillation_loss(zs, labels, zt, alpha=1.0, tau=4.0), kd)
    torch.testing.assert_close(distillation_loss(zs, labels, zt, alpha=0.3, tau=4.0), 0.7 * ce + 0.3 * kd)
    # Müller A.5: 0.4·CE + 0.6·½‖d‖²
    mixed = distillation_loss(zs, labels, zt, alpha=0.6, kd="mse", mse_reduction="half_sum")
    torch.testing.assert_close(mixed, 0.4 * ce + 0.6 * 0.5 * ((zs - zt) ** 2).sum(1).mean())
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(zs, labels, None, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(zs, labels, zt, alpha=1.5)


def test_ensemble_averages_logits():
    a, b = _logits(17), _logits(18)
    torch.testing.assert_close(ensemble_logits([a, b]), (a + b) / 2)
