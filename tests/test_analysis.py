"""Analysis functions against hand-computed cases and an independent ECE implementation."""

import math

import numpy as np
import pytest
import torch

from kdlab.analysis import (
    adaptive_calibration_error,
    bootstrap_interval,
    brier_score,
    calibration_bins,
    classwise_calibration_error,
    cluster_tightness,
    equivalent_smoothing,
    expected_calibration_error,
    fit_temperature,
    logit_gap,
    logit_sums,
    maximum_calibration_error,
    mutual_information,
    negative_log_likelihood,
    project_templates,
    template_basis,
)
from kdlab.losses import smooth_labels

# four two-class examples with top-label confidence 0.9 (right), 0.9 (wrong), 0.55 (right), 1.0 (right)
HAND_PROBS = np.array([[0.9, 0.1], [0.9, 0.1], [0.55, 0.45], [1.0, 0.0]])
HAND_LABELS = np.array([0, 1, 0, 0])


def _hand_logits():
    with np.errstate(divide="ignore"):
        logits = np.log(HAND_PROBS)
    logits[3] = [100.0, 0.0]  # softmax is exactly 1.0 in float64
    return logits


def test_ece_by_hand_and_confidence_one_in_last_bin():
    logits = _hand_logits()
    # bins of 1/15: 0.9 -> (13/15, 14/15], 0.55 -> (8/15, 9/15], 1.0 -> (14/15, 1]
    expected = 2 / 4 * abs(0.5 - 0.9) + 1 / 4 * abs(1 - 0.55) + 1 / 4 * abs(1 - 1.0)
    assert expected_calibration_error(logits, HAND_LABELS) == pytest.approx(expected, abs=1e-12)
    bins = calibration_bins(logits, HAND_LABELS)
    assert bins["count"][14] == 1 and bins["count"][13] == 2 and bins["count"][8] == 1
    assert maximum_calibration_error(logits, HAND_LABELS) == pytest.approx(0.45)


def test_other_metrics_by_hand():
    logits = _hand_logits()
    # one equal-mass bin: |accuracy − mean confidence|
    assert adaptive_calibration_error(logits, HAND_LABELS, n_bins=1) == pytest.approx(abs(0.75 - (0.9 + 0.9 + 0.55 + 1) / 4))
    assert negative_log_likelihood(logits, HAND_LABELS) == pytest.approx(-np.mean(np.log([0.9, 0.1, 0.55, 1.0])))
    brier = np.mean([(0.1**2) * 2, (0.9**2) * 2, (0.45**2) * 2, 0.0])
    assert brier_score(logits, HAND_LABELS) == pytest.approx(brier)
    # classwise, class 0: p = .9,.9,.55,1 vs hits 1,0,1,1; class 1: p = .1,.1,.45,0 vs 0,1,0,0
    class0 = (abs(1 - 1.8) + abs(1 - 0.55) + abs(1 - 1.0)) / 4  # bins: {.9,.9}, {.55}, {1.0}
    class1 = (abs(1 - 0.2) + abs(0 - 0.45) + abs(0 - 0.0)) / 4  # bins: {.1,.1}, {.45}, {0}
    assert classwise_calibration_error(logits, HAND_LABELS) == pytest.approx((class0 + class1) / 2)


def test_ece_matches_torchmetrics_on_random_inputs():
    torchmetrics = pytest.importorskip("torchmetrics")
    rng = np.random.default_rng(0)
    for trial in range(5):
        k = int(rng.integers(2, 20))
        logits = rng.normal(size=(500, k)) * rng.uniform(0.5, 4)
        labels = rng.integers(0, k, 500)
        metric = torchmetrics.classification.MulticlassCalibrationError(num_classes=k, n_bins=15, norm="l1")
        theirs = metric(torch.softmax(torch.tensor(logits), 1).float(), torch.tensor(labels)).item()
        assert expected_calibration_error(logits, labels) == pytest.approx(theirs, abs=1e-5)
        metric = torchmetrics.classification.MulticlassCalibrationError(num_classes=k, n_bins=15, norm="max")
        theirs = metric(torch.softmax(torch.tensor(logits), 1).float(), torch.tensor(labels)).item()
        assert maximum_calibration_error(logits, labels) == pytest.approx(theirs, abs=1e-5)


def test_bootstrap_interval_brackets_the_value():
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(400, 5)) * 3, rng.integers(0, 5, 400)
    low, high = bootstrap_interval(expected_calibration_error, logits, labels, n_resamples=200)
    assert low < expected_calibration_error(logits, labels) < high


def _calibrated_sample(n=20000, k=10, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 2.0
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = (probs.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    return logits, labels


@pytest.mark.parametrize("scale", [1.0, 4.0, 0.25])
def test_fit_temperature_recovers_the_miscalibration(scale):
    logits, labels = _calibrated_sample()
    temperature = fit_temperature(logits * scale, labels)  # over- (4) or under-confident (0.25)
    assert temperature == pytest.approx(scale, rel=0.08)
    assert expected_calibration_error(logits * scale / temperature, labels) < 0.02


def test_projection_preserves_logit_differences_and_template_geometry():
    rng = np.random.default_rng(2)
    weight, bias = rng.normal(size=(6, 16)), rng.normal(size=6)
    features = rng.normal(size=(90, 16))
    labels = np.repeat([1, 3, 4, 0, 2, 5], 15)
    proj = project_templates(features, labels, weight, bias, classes=[1, 3, 4], per_class=None)
    basis, templates = template_basis(weight, bias, [1, 3, 4])
    np.testing.assert_allclose(basis.T @ basis, np.eye(2), atol=1e-12)
    t = proj["templates"]
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert np.linalg.norm(t[i] - t[j]) == pytest.approx(np.linalg.norm(templates[i] - templates[j]))
    chosen = np.isin(labels, [1, 3, 4])
    logits = features[chosen] @ weight.T + bias
    np.testing.assert_allclose(proj["points"] @ (t[0] - t[2]), logits[:, 1] - logits[:, 4], atol=1e-9)
    assert len(proj["points"]) == 45


def test_projection_samples_per_class():
    rng = np.random.default_rng(3)
    proj = project_templates(rng.normal(size=(600, 8)), np.arange(600) % 3, rng.normal(size=(3, 8)),
                             np.zeros(3), [0, 1, 2], per_class=100)
    assert np.bincount(proj["labels"]).tolist() == [100, 100, 100]


def test_cluster_tightness_by_hand():
    centres = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0]])
    offsets = np.array([[1.0, 0.0], [-1.0, 0.0]])
    points = np.concatenate([c + offsets for c in centres])
    labels = np.repeat([0, 1, 2], 2)
    # spread 1 for every class; centroid distances 4, 3, 5 -> mean 4
    assert cluster_tightness(points, labels, [0, 1, 2]) == pytest.approx(1 / 4)


def test_mutual_information_known_answers():
    rng = np.random.default_rng(4)
    n, views = 600, 5
    assert abs(mutual_information(rng.normal(size=(n, views)))) < 0.15  # no dependence on the example
    assert abs(mutual_information(rng.normal(size=(n, views)), evaluated=rng.normal(size=n))) < 0.15
    distinct = np.repeat(np.arange(n, dtype=float)[:, None], views, axis=1)
    assert mutual_information(distinct) == pytest.approx(math.log(n), abs=1e-9)  # identical within, distinct between
    groups = np.where(np.arange(n) < n // 2, -50.0, 50.0)[:, None] + rng.normal(size=(n, views))
    assert mutual_information(groups) == pytest.approx(math.log(2), abs=0.15)
    for seed in range(5):
        r = np.random.default_rng(seed)
        values = r.normal(size=(50, 3)) * r.uniform(0, 10, size=(50, 1)) + r.normal(size=(50, 1)) * 5
        assert mutual_information(values) <= math.log(50) + 1e-9
    with pytest.raises(ValueError):
        mutual_information(np.zeros(10))


def test_equivalent_smoothing_of_a_label_smoothed_teacher():
    labels = torch.arange(10) % 4
    targets = smooth_labels(labels, 4, 0.2, "uniform").numpy()
    assert equivalent_smoothing(np.log(targets), labels.numpy(), 1.0) == pytest.approx(0.2)
    one_hot_like = np.log(smooth_labels(labels, 4, 1e-9, "uniform").numpy())
    assert equivalent_smoothing(one_hot_like, labels.numpy()) == pytest.approx(0.0, abs=1e-6)


def test_logit_statistics():
    logits = np.array([[1.0, 2.0, 5.0], [0.0, -1.0, -2.0]])
    np.testing.assert_allclose(logit_sums(logits), [8.0, -3.0])
    np.testing.assert_allclose(logit_gap(logits), [3.0, 1.0])


def test_calibration_report_value_inside_interval_where_the_percentile_interval_excluded_it():
    # the case (classwise ECE 0.0153 outside [0.0162, 0.0203]): 1,000 examples of a
    # calibrated 10-class model. The plug-in classwise ECE is biased upward, a resample more
    # so, and every resample lies above the value: the old percentile interval excluded it.
    from kdlab.analysis.calibration import bootstrap_values, calibration_report

    logits, labels = _calibrated_sample(n=1000, k=10, seed=0)
    value = classwise_calibration_error(logits, labels)
    values = bootstrap_values(classwise_calibration_error, logits, labels, n_resamples=200)
    assert values.min() > value  # all 200 resamples above the point estimate
    low, high = bootstrap_interval(classwise_calibration_error, logits, labels, 200, method="percentile")
    assert value < low  # the old interval
    report = calibration_report(logits, labels)
    for name, entry in report.items():
        assert entry["low"] <= entry["value"] <= entry["high"], name
        assert entry["interval"].startswith("basic bootstrap")
    cw = report["classwise_ece"]
    assert cw["value"] == value and cw["high"] == value  # the basic interval lies below; widened to the value
    q_lo, q_hi = np.quantile(values, [0.025, 0.975])
    assert cw["low"] == pytest.approx(max(0.0, 2 * value - q_hi), abs=1e-15)


def test_basic_bootstrap_interval_equation():
    from kdlab.analysis.calibration import bootstrap_values

    rng = np.random.default_rng(3)
    logits, labels = rng.normal(size=(300, 4)) * 2, rng.integers(0, 4, 300)
    values = bootstrap_values(expected_calibration_error, logits, labels, n_resamples=150, seed=7)
    q_lo, q_hi = np.quantile(values, [0.05, 0.95])
    theta = expected_calibration_error(logits, labels)
    low, high = bootstrap_interval(expected_calibration_error, logits, labels, 150, level=0.9, seed=7)
    assert (low, high) == pytest.approx((min(2 * theta - q_hi, theta), max(2 * theta - q_lo, theta)), abs=1e-15)
    assert bootstrap_interval(expected_calibration_error, logits, labels, 150, level=0.9, seed=7,
                              method="percentile") == pytest.approx((q_lo, q_hi), abs=1e-15)
    assert bootstrap_interval(expected_calibration_error, logits, labels, 150, seed=7, bounds=(0.0, 1.0))[0] >= 0
    with pytest.raises(ValueError, match="method"):
        bootstrap_interval(expected_calibration_error, logits, labels, 10, method="bca")


@pytest.mark.parametrize("seed", range(4))
def test_every_report_interval_contains_its_value_on_random_inputs(seed):
    from kdlab.analysis.calibration import METRIC_RANGE, calibration_report

    rng = np.random.default_rng(100 + seed)
    n, k = int(rng.integers(20, 600)), int(rng.integers(2, 12))
    logits = rng.normal(size=(n, k)) * rng.uniform(0.3, 5)
    labels = rng.integers(0, k, n) if seed % 2 else _calibrated_sample(n, k, seed)[1]
    if not seed % 2:
        logits = _calibrated_sample(n, k, seed)[0]
    for name, entry in calibration_report(logits, labels, n_resamples=60, seed=seed).items():
        lo_b, hi_b = METRIC_RANGE[name]
        assert lo_b <= entry["low"] <= entry["value"] <= entry["high"] <= hi_b, name


def test_token_calibration_report_interval_contains_its_value():
    from kdlab.analysis.calibration import ece_of_confidence, token_calibration_report

    rng = np.random.default_rng(0)  # calibrated tokens: P(correct) = confidence
    confidence = rng.uniform(0.05, 1, 1000)
    correct = (rng.uniform(size=1000) < confidence).astype(float)
    columns = np.stack([confidence, correct], 1)
    token_ece = lambda c, _: ece_of_confidence(c[:, 0], c[:, 1])
    low, _ = bootstrap_interval(token_ece, columns, np.zeros(1000), 200, method="percentile")
    assert token_ece(columns, None) < low  # the old interval excluded this ECE
    report = token_calibration_report(confidence, correct, np.log(np.where(correct > 0, confidence, 1 - confidence)))
    for name, entry in report.items():
        assert 0 <= entry["low"] <= entry["value"] <= entry["high"], name
    assert report["accuracy"]["high"] <= 1
