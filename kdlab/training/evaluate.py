"""Evaluation of a classifier on a split: logits (and penultimate features) batch by
batch, in memory or streamed, sharded over the ranks of a torchrun run and gathered in
batch order; and the per-split metrics written to ``metrics.jsonl``."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..data import Dataset
from ..device import autocast, model_device, to_device_layout


@torch.inference_mode()
def predict_batches(model: nn.Module, data: Dataset, batches, *, features: bool = False, bf16: bool = False,
                    channels_last: bool = False, ctx=None):
    """Logits (float32, on the CPU) of ``model`` on raw batches (and penultimate features).
    With a multi-process ``ctx`` each rank got its share of the batches (round-robin):
    the outputs are gathered, in batch order, on every rank."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    logits, feats = [], []
    for raw in batches:
        batch = to_device_layout(data.prepare(raw.to(device)), channels_last)
        with autocast(bf16, device.type):
            out = model(batch, return_features=True)
        logits.append(out[0].float().cpu())
        feats.append(out[1].float().cpu())
    model.train(was_training)
    if ctx is not None and ctx.active:
        pairs = ctx.gather_batches(list(zip(logits, feats if features else [None] * len(logits))))
        logits, feats = [p[0] for p in pairs], [p[1] for p in pairs]
    logits = torch.cat(logits) if logits else torch.zeros(0)
    return (logits, torch.cat(feats) if feats else torch.zeros(0)) if features else logits


def predict(model: nn.Module, data: Dataset, x: torch.Tensor, batch_size: int = 1000, **kwargs):
    """``predict_batches`` on raw inputs held in memory, ``batch_size`` at a time."""
    return predict_batches(model, data, (x[s : s + batch_size] for s in range(0, len(x), batch_size)), **kwargs)


def predict_split(model: nn.Module, data, split: str, batch_size: int = 1000, ctx=None, **kwargs):
    """``predict_batches`` on a split under its evaluation view (in memory or streamed;
    sharded over the ranks of a multi-process ``ctx``)."""
    return predict_batches(model, data, data.eval_batches(split, batch_size, model_device(model), ctx=ctx), ctx=ctx,
                           **kwargs)


def split_metrics(prefix: str, logits: torch.Tensor, labels: torch.Tensor, teacher_logits=None) -> dict:
    out = {
        f"{prefix}_acc": (logits.argmax(1) == labels).float().mean().item(),
        f"{prefix}_nll": nn.functional.cross_entropy(logits, labels).item(),
        f"{prefix}_logit_sum": logits.sum(1).mean().item(),
    }
    if teacher_logits is not None:
        out[f"{prefix}_agreement"] = (logits.argmax(1) == teacher_logits.argmax(1)).float().mean().item()
        out[f"{prefix}_logit_distance"] = (logits - teacher_logits).norm(dim=1).mean().item()
    return out
