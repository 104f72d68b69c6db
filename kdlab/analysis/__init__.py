"""Why a student differs: calibration, representations, logit statistics, mutual
information. Pure functions on arrays; ``kdlab.analysis.analyze`` runs them all on a
run dir (``kdlab analyze``)."""

from .calibration import (
    adaptive_calibration_error,
    bootstrap_interval,
    brier_score,
    calibration_bins,
    calibration_report,
    classwise_calibration_error,
    expected_calibration_error,
    fit_temperature,
    maximum_calibration_error,
    negative_log_likelihood,
)
from .logits import (
    equivalent_smoothing,
    feature_norms,
    logit_distances,
    logit_gap,
    logit_sums,
    teacher_student_agreement,
    teacher_student_kl,
)
from .mutual_information import mutual_information
from .representations import cluster_tightness, project_templates, template_basis

__all__ = [
    "adaptive_calibration_error", "bootstrap_interval", "brier_score", "calibration_bins", "calibration_report",
    "classwise_calibration_error", "expected_calibration_error", "fit_temperature", "maximum_calibration_error",
    "negative_log_likelihood", "equivalent_smoothing", "feature_norms", "logit_distances", "logit_gap",
    "logit_sums", "teacher_student_agreement", "teacher_student_kl", "mutual_information", "cluster_tightness",
    "project_templates", "template_basis",
]
