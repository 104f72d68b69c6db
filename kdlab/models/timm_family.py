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

from .registry import register_family

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


@register_family(r"timm:([A-Za-z0-9_.-]+)", EXAMPLES,
                 "any timm architecture, e.g. timm:resnet50 (needs kdlab[timm]; weights only from local files)")
def _build(match, num_classes, in_channels, input_shape):
    return TimmClassifier(match[1], num_classes, in_channels)
