"""Probes run during training: Müller §4's mutual information between the example and
the logit difference of two classes (logged to ``metrics.jsonl`` every N steps)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Config
from ..data import Dataset
from ..errors import ConfigError
from .evaluate import predict


class MutualInformationProbe:
    """Müller §4: a fixed set of training examples of two classes, each under L fixed
    views; Y = z_a − z_b of the network being trained, in eval mode. Its own generator,
    so the training data order is the same with the probe on or off."""

    def __init__(self, cfg: Config, data: Dataset, bf16: bool):
        mi = cfg.mutual_information
        generator = torch.Generator().manual_seed(mi.seed)
        chosen = []
        for cls in mi.classes:
            if not 0 <= cls < data.num_classes:
                raise ConfigError(f"mutual_information.classes: class {cls} is not in 0..{data.num_classes - 1}")
        counts = [int((data.train_y == cls).sum()) for cls in mi.classes]
        if min(counts) < mi.per_class:
            cls = mi.classes[counts.index(min(counts))]
            raise ConfigError(f"mutual_information.per_class={mi.per_class}: class {cls} has only {min(counts)} "
                              f"training examples here; set per_class to at most {min(counts)}")
        for cls in mi.classes:
            idx = torch.nonzero(data.train_y == cls).flatten()
            chosen.append(idx[torch.randperm(len(idx), generator=generator)[: mi.per_class]])
        self.index = torch.cat(chosen)
        self.views = data.augmentation.sample(len(self.index) * mi.views, generator).view(len(self.index), mi.views)
        self.classes, self.data, self.cfg = mi.classes, data, cfg
        self.inputs = self.data.train_x[self.index].repeat_interleave(mi.views, dim=0)
        self.bf16 = bf16

    def __call__(self, model: nn.Module) -> float:
        from ..analysis.mutual_information import mutual_information

        x = self.data.augmentation.apply(self.inputs, self.views.flatten())
        logits = predict(model, self.data, x, self.cfg.eval_batch_size, bf16=self.bf16,
                         channels_last=self.cfg.channels_last)
        values = (logits[:, self.classes[0]] - logits[:, self.classes[1]]).view(len(self.index), -1)
        return mutual_information(values.double().numpy())
