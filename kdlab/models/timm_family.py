"""``timm:<name>``: any architecture of timm (ImageNet ResNets, Inception-v4, ViTs, ...).

Built with ``timm.create_model(name, pretrained=False, num_classes, in_chans)``: kdlab
never downloads weights at run time; ``model.pretrained_path`` (or a teacher's
``teacher.weights``) loads a local file instead. The penultimate features are timm's
own pre-logits, ``forward_head(forward_features(x), pre_logits=True)`` (after global
pooling and head dropout), and the logits are the classifier applied to them — the same
numbers as the model's own ``forward`` (checked for ResNet-50, Inception-v4, ViT,
ConvNeXt, EfficientNet in tests/test_timm.py). Models whose classifier is not one linear
layer (e.g. DeiT's distilled pair of heads) are refused: the template analysis needs the
last layer's rows.

The timm model is ``self.net``: a kdlab ``model.pt`` holds its weights under ``net.``;
``load_weights`` takes plain timm / torchvision files (no prefix) as well.
timm is an extra (``pip install 'kdlab[timm]'``); it needs a torchvision that imports
beside the installed torch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .registry import register_family
from .taps import StageTap

EXAMPLES = ["timm:resnet50", "timm:resnet152", "timm:inception_v4"]


def import_timm():
    """timm, or a ValueError with the one line that says how to get it."""
    try:
        import timm
    except Exception as err:  # ImportError, or torchvision failing to load beside this torch
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"timm models need timm and a torchvision that loads beside torch {torch.__version__} "
                         f"(pip install 'kdlab[timm]'): {reason}") from None
    return timm


class TimmClassifier(nn.Module):
    def __init__(self, name: str, num_classes: int, in_channels: int = 3):
        super().__init__()
        timm = import_timm()
        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r} (`kdlab models --timm 'PATTERN*'` lists timm's names)")
        self.net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        classifier = self.net.get_classifier()
        if not isinstance(classifier, nn.Linear):
            raise ValueError(f"timm:{name}'s classifier is {type(classifier).__name__}, not one linear layer: kdlab "
                             "needs the penultimate features and the last layer's rows")
        (self.classifier_name,) = ["net." + n for n, m in self.net.named_modules() if m is classifier]
        self.feature_dim = classifier.in_features
        self.timm_name = name

    @property
    def fc(self) -> nn.Linear:
        return self.net.get_classifier()

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        logits = self.net.get_classifier()(features)
        return (logits, features) if return_features else logits

    def stage_taps(self) -> list[StageTap]:
        """The last four of timm's feature levels (``feature_info``: what ``features_only=True``
        returns): a ResNet's layer1–layer4 — its stem (``act1``, the first level) left out, as
        Heo et al. tap four stages on ImageNet. Where a level ends in a ReLU module ``actK`` with
        a sibling ``bnK`` (ResNets: each stage's last block's act3 / act2) the pre-ReLU feature
        is that ReLU's input and ``bn`` is ``bnK``; elsewhere (GELU nets, ...) None."""
        levels = [info["module"] for info in getattr(self.net, "feature_info", None) or []]
        if not levels:
            raise ValueError(f"timm:{self.timm_name} has no feature_info (timm's stage list): pass module names "
                             f"to Taps(model, ['net.NAME', ...]) (`kdlab models --layers timm:{self.timm_name}`)")
        return [StageTap(f"net.{level}", *self._before_relu(level)) for level in levels[-4:]]

    def _before_relu(self, level: str) -> tuple[str | None, str | None]:
        """(pre-ReLU spec, norm name) of one feature level, or (None, None)."""
        module = self.net.get_submodule(level)
        if isinstance(module, nn.Sequential) and len(module):  # a stage of blocks: its last block's last ReLU
            block = f"{level}.{len(module) - 1}"
            candidates = [(f"{block}.act{k}", f"{block}.bn{k}") for k in (3, 2)]
        else:  # the level is a ReLU itself, actK after bnK (a ResNet's stem)
            parent, _, attr = level.rpartition(".")
            candidates = [(level, parent + "." * bool(parent) + "bn" + attr[3:])] if attr.startswith("act") else []
        for act, norm in candidates:
            if isinstance(self._find(act), nn.ReLU) and isinstance(self._find(norm), _BatchNorm):
                return f"net.{act}:in", f"net.{norm}"
        return None, None

    def _find(self, name: str) -> nn.Module | None:
        try:
            return self.net.get_submodule(name)
        except AttributeError:
            return None


@register_family(r"timm:([A-Za-z0-9_.-]+)", EXAMPLES,
                 "any timm architecture, e.g. timm:resnet50 (needs kdlab[timm]; weights only from local files)")
def _build(match, num_classes, in_channels, input_shape):
    return TimmClassifier(match[1], num_classes, in_channels)
