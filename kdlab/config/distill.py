"""The ``distill`` section: which distillation method a student uses beyond the logit
objective of the ``loss`` section, where it taps the networks, and the method's own
settings (``distill.options``, checked by the method's model below: an unknown option is
an error naming the method's options).

The loss of a run is always the ``loss`` section's logit objective — (1 − α)·CE(ỹ) +
α·KD at τ — plus the method's term(s), each a named part of ``metrics.jsonl``
(``train_at``, ``train_ofd``, ...). ``method: logit`` (the default) adds nothing and is
not part of the run hash, so every run dir made before this section keeps its hash.
Equations, sources and constants: ``docs/methods.md`` and ``kdlab.feature_losses``.
"""

from __future__ import annotations

import difflib
from typing import Literal, Optional

from pydantic import Field, ValidationError, model_validator

from .sections import _Strict


class LogitOptions(_Strict):
    """The ``loss`` section's objective alone (CE, LS, KL at any τ, MSE)."""


class ATOptions(_Strict):
    """Attention transfer (Zagoruyko & Komodakis 2016): β/2·Σ_j ‖Q_s/‖Q_s‖ − Q_t/‖Q_t‖‖ over the stage outputs."""
    p: float = Field(2.0, gt=0, description="attention map mean_c |f|^p")
    beta: float = Field(1000.0, ge=0, description="weight of the attention term")
    normalization: Literal["paper", "code"] = Field(
        "paper", description="paper: the L2 distance of the normalised maps; code: the mean squared difference, "
        "as the authors' public code (see docs/methods.md)")


class FitNetsOptions(_Strict):
    """FitNets (Romero et al. 2014) at a hint layer: the paper's first stage alone (``hint``:
    ½‖u − r(v)‖², a convolutional regressor, nothing else trained), or one stage as CRD and
    mdistiller run it (``one_stage``: CE + 100·MSE(regressor(f_s), f_t))."""
    variant: Literal["one_stage", "hint"] = Field(
        "one_stage", description="one_stage: hint and task trained together (CRD/mdistiller); hint: the paper's "
        "stage 1 — the hint loss alone, then KD in a second run started from it (model.init_run)")
    beta: Optional[float] = Field(None, ge=0, description="weight of the hint term; default 100 (one_stage), "
                                  "1 (hint)")

    @model_validator(mode="after")
    def _default_beta(self):  # resolved here, so that the default and the same value given hash alike
        if self.beta is None:
            self.beta = 1.0 if self.variant == "hint" else 100.0
        return self


class OFDOptions(_Strict):
    """A Comprehensive Overhaul of Feature Distillation (Heo et al. 2019a)."""
    beta: float = Field(1e-3, ge=0, description="weight of the summed partial-L2 term (divided by the batch size): "
                        "the paper's 1/1000")
    margin: Literal["exact", "reference"] = Field(
        "exact", description="the per-channel margin E[x | x < 0], x ~ N(β, γ²): exact, or as the reference code "
        "(−3|γ| where the probability below 0 is under 0.001)")
    teacher_bn: Literal["train", "eval"] = Field(
        "train", description="the teacher's batch norms during distillation: train as in Heo's code (batch "
                             "statistics; running statistics are not updated by kdlab), or eval")


class ABOptions(_Strict):
    """Activation boundaries (Heo et al. 2019b): the initialisation stage — the AB loss alone on
    pre-ReLU features through conv 1×1 + BN connectors; CE/KD follows in the next run (model.init_run)."""
    margin: float = Field(1.0, gt=0, description="μ: how far past the teacher's boundary a response must be")
    beta: float = Field(3e-3, ge=0, description="weight of the stage-weighted sum (the reference's 3/1000)")


class FTOptions(_Strict):
    """Factor transfer (Kim, Park & Kwak 2018) on the last group's output: a paraphraser stage
    (the teacher's feature reconstructed through a factor; only the paraphraser trains), then
    a translator stage (CE + β·‖F_T/‖F_T‖ − F_S/‖F_S‖‖₁) started from it with model.init_run."""
    stage: Literal["translator", "paraphraser"] = Field(
        "translator", description="paraphraser: train the paraphraser alone (the student is untouched); "
        "translator: distil, the paraphraser frozen (needs model.init_run = the paraphraser run)")
    rate: float = Field(0.5, gt=0, description="paraphrase rate k: factor channels = k · teacher channels")
    beta: float = Field(500.0, ge=0, description="weight of the factor loss (the reference's 500 on its L1 mean)")
    reduction: Literal["code", "paper"] = Field(
        "code", description="code: mean |F_T − F_S| over all elements (the reference's nn.L1Loss, with β = 500); "
        "paper: the L1 norm per sample (then scale beta down by the factor's size)")
    reconstruction: Literal["l1", "l2"] = Field("l1", description="the paraphraser's loss: L1 (the reference) or L2 "
                                                "(RepDistiller)")


class JacobianOptions(_Strict):
    """Jacobian matching (Srinivas & Fleuret 2018): CE(+KD) + β·mean_b ‖ĝ_S − ĝ_T‖², g = ∇_x z_c."""
    beta: float = Field(1.0, ge=0, description="weight of the Jacobian term (no reference constant exists: "
                        "kdlab's choice, see docs/methods.md)")
    target: Literal["label", "teacher"] = Field("label", description="the output z_c differentiated: the true "
                                                "class, or the teacher's top-1 class")


class CRDOptions(_Strict):
    """Contrastive representation distillation (Tian et al. 2020): penultimate features embedded
    (linear + L2 norm, both networks), a memory bank per network indexed by training example,
    NCE against K negatives drawn from other classes."""
    beta: float = Field(0.8, ge=0, description="weight of the contrastive term")
    feat_dim: int = Field(128, gt=0, description="embedding size")
    nce_k: int = Field(16384, gt=0, description="negatives per sample (drawn with replacement)")
    nce_t: float = Field(0.07, gt=0, description="temperature of the scores")
    momentum: float = Field(0.5, ge=0, lt=1, description="memory bank update: m·old + (1 − m)·new, renormalised")


class DKDOptions(_Strict):
    """Decoupled KD (Zhao et al. 2022): CE + warm-up·(α·TCKD + β·NCKD) at the loss section's τ."""
    alpha: float = Field(1.0, ge=0, description="weight of the target-class term TCKD")
    beta: float = Field(8.0, ge=0, description="weight of the non-target term NCKD")
    warmup_epochs: int = Field(20, ge=0, description="the KD term ramps up linearly over these epochs (0: none)")


class LSKDOptions(_Strict):
    """Logit-standardised KD (Sun et al. 2024): the loss section's KL on z-scored logits."""


METHODS: dict[str, type[_Strict]] = {
    "logit": LogitOptions, "at": ATOptions, "fitnets": FitNetsOptions, "ofd": OFDOptions, "ab": ABOptions,
    "ft": FTOptions, "crd": CRDOptions, "jacobian": JacobianOptions, "dkd": DKDOptions, "lskd": LSKDOptions,
}
FEATURE_METHODS = ("at", "fitnets", "ofd", "ab", "ft", "crd")  # tap the networks: the teacher runs online
ONLINE_METHODS = FEATURE_METHODS + ("jacobian",)  # need the teacher itself on the batch (not cached logits)
VARIANT_OPTION = {"fitnets": "variant", "ft": "stage"}  # methods whose option picks what kind of run it is
# a first stage that trains with its term alone (the loss section must be plain CE: alpha 0, no smoothing)
ALONE_VARIANTS = {"hint", "paraphraser"}


class DistillConfig(_Strict):
    method: str = Field("logit", description="logit (the loss section alone), at, fitnets, ofd, ab, ft, crd "
                        "(feature methods: tap the student's and teacher's layers; the teacher runs online), "
                        "jacobian (input gradients; teacher online), dkd, lskd (logit methods); docs/methods.md")
    options: dict = Field(default_factory=dict, description="the method's own settings (docs/methods.md), e.g. "
                          "{beta: 1000, p: 2} for at")
    student_layers: Optional[list[str]] = Field(
        None, description="feature methods: the student's tap points by module name (NAME, or NAME:in for a "
        "module's input; `kdlab models --layers MODEL`); default: the stage taps its family declares")
    teacher_layers: Optional[list[str]] = Field(None, description="the same for the teacher, pairwise with "
                                                "student_layers")

    @model_validator(mode="after")
    def _known_method(self):
        if self.method not in METHODS:
            close = difflib.get_close_matches(self.method, METHODS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown method {self.method!r}{hint}: use one of {', '.join(METHODS)}")
        _check_options(self.method, self.options)
        if (self.student_layers is None) != (self.teacher_layers is None) or \
                (self.student_layers is not None and len(self.student_layers) != len(self.teacher_layers)):
            raise ValueError("student_layers and teacher_layers go in pairs: give both, of the same length")
        if self.student_layers == []:
            raise ValueError("student_layers/teacher_layers: name at least one layer each, or leave them out "
                             "(the family's stage taps)")
        if self.method not in FEATURE_METHODS and self.student_layers is not None:
            raise ValueError(f"student_layers/teacher_layers: method {self.method} taps no layers")
        return self

    def settings(self):
        """The method's options as its model (defaults filled in)."""
        return METHODS[self.method](**self.options)

    @property
    def feature(self) -> bool:
        return self.method in FEATURE_METHODS

    @property
    def online(self) -> bool:
        """The teacher runs on the batch (its features or input gradients): no cache, no store, one teacher."""
        return self.method in ONLINE_METHODS

    @property
    def variant(self) -> str | None:
        """The option that says what kind of run this method's is (FitNets' ``variant``, FT's
        ``stage``), resolved; None for methods without one."""
        option = VARIANT_OPTION.get(self.method)
        return getattr(self.settings(), option) if option else None

    @property
    def alone(self) -> bool:
        """A first stage trained with the method's term alone (FitNets' hint, AB, FT's paraphraser)."""
        return self.method == "ab" or self.variant in ALONE_VARIANTS


def _check_options(method: str, options: dict) -> None:
    """A one-line ValueError for an unknown or bad option of ``method`` (with a close match)."""
    model = METHODS[method]
    try:
        model(**options)
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        known = list(model.model_fields)
        if first["type"] == "extra_forbidden":
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            listed = ", ".join(known) if known else "none"
            raise ValueError(f"method {method} has no option {name!r}{hint}; its options: {listed}") from None
        raise ValueError(f"options.{name} of method {method}: {first['msg'].removeprefix('Value error, ')}") from None
