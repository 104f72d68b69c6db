"""The batch protocol: what the training loop asks of every kind of data, so that it never
asks which kind it has.

- ``num_train``: training rows' sources (samples; sentences for token batches);
- ``steps_per_epoch(batch_size)``: batches of an epoch;
- ``global_rows(step_in_epoch, batch_size)``: loss rows of the whole global batch (every
  rank knows them: the gradient is the global batch's mean);
- ``inputs(raw, channels_last)``: the model input of a batch as ``epoch_batches`` yields it;
- ``forward(model, x)``: the logits rows of a batch.

Here for data whose rows are samples (in memory, image folders), used as their methods;
token batches (``data/translation.py``) answer the same names with target tokens as rows.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from ..device import to_device_layout


def num_train(data) -> int:
    return len(data.split_labels("train"))


def steps_per_epoch(data, batch_size: int) -> int:
    return math.ceil(data.num_train / batch_size)


def global_rows(data, step_in_epoch: int, batch_size: int) -> int:
    """Samples of the whole global batch ``step_in_epoch`` (the last one may be short)."""
    return min(batch_size, data.num_train - step_in_epoch * batch_size)


def inputs(data, raw: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Normalised (``data.prepare``), channels-last if asked."""
    return to_device_layout(data.prepare(raw), channels_last)


def forward(model, x: torch.Tensor) -> torch.Tensor:
    """One logits row per sample."""
    return model(x)


# what kdlab.data.Dataset and ImageFolderData take as their methods
sample_rows = SimpleNamespace(num_train=num_train, steps_per_epoch=steps_per_epoch, global_rows=global_rows,
                              inputs=inputs, forward=forward)
