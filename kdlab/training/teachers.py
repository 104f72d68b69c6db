"""Frozen teachers: finished runs and plain weights files, one or an ensemble (mean
logits), on the student's device and layout; for token batches, the logits rows of the
batch's target tokens (and a check that a translation teacher speaks the student's
vocabulary)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import Dataset
from ..device import autocast
from ..errors import ConfigError
from ..losses import ensemble_logits
from ..runs import file_sha256, load_finished_model, load_weights_model, read_json
from .evaluate import predict_split


class Teachers:
    """Frozen teacher(s); several are an ensemble whose logits are averaged."""

    def __init__(self, teacher_cfg, data: Dataset, channels_last: bool = False,
                 device: torch.device = torch.device("cpu")):
        self.models = [load_finished_model(Path(r), data.num_classes, data.input_shape).to(device)
                       for r in teacher_cfg.runs]
        # each teacher's model name (feature methods find its stage taps by its family)
        self.names = [read_json(Path(r) / "result.json")["model"] for r in teacher_cfg.runs] + \
            [spec.model for spec in teacher_cfg.weights]
        self.weight_files = []  # plain weights files: path and SHA-256, for meta.json
        for i, spec in enumerate(teacher_cfg.weights):
            model = load_weights_model(spec.model, Path(spec.path), data.num_classes, data.input_shape,
                                       f"teacher.weights.{i}")
            self.models.append(model.to(device))
            self.weight_files.append({"model": spec.model, "path": str(Path(spec.path).resolve()),
                                      "sha256": file_sha256(Path(spec.path))})
        if channels_last:  # the same layout as the student's batches: no conversion per step
            self.models = [m.to(memory_format=torch.channels_last) for m in self.models]
        self.device, self.channels_last = device, channels_last
        self.rows = data.forward if data.tokens else None  # token batches: logits rows of their target tokens
        if data.tokens:
            _check_translation_teachers(teacher_cfg, data)

    @torch.no_grad()
    def __call__(self, x, bf16: bool) -> torch.Tensor:
        """Float32 logits on the teachers' device of a prepared batch (moved there if needed);
        of a token batch, the logits rows of its target tokens."""
        if self.rows is not None:
            x = tuple(part.to(self.device, non_blocking=True) for part in x)
            with autocast(bf16, self.device.type):
                return ensemble_logits([self.rows(m, x) for m in self.models])
        x = x.to(self.device, non_blocking=True)
        with autocast(bf16, self.device.type):
            return ensemble_logits([m(x) for m in self.models])

    def predict(self, data: Dataset, split: str, batch_size: int, channels_last: bool = False,
                ctx=None) -> torch.Tensor:
        return ensemble_logits([predict_split(m, data, split, batch_size, channels_last=channels_last, ctx=ctx)
                                for m in self.models])


def _check_translation_teachers(teacher_cfg, data) -> None:
    """A translation teacher must speak the student's vocabulary: the same corpus and
    sentencepiece model (by the hashes its result.json records)."""
    for run in teacher_cfg.runs:
        result = read_json(Path(run) / "result.json")
        corpus = result.get("corpus", {})
        if corpus.get("sha256") != data.corpus.sha256 or corpus.get("vocab_size") != data.num_classes:
            raise ConfigError(f"teacher {run} was trained on another corpus or vocabulary (corpus "
                              f"{str(corpus.get('sha256'))[:12]}, {corpus.get('vocab_size')} pieces) than this run "
                              f"({data.corpus.sha256[:12]}, {data.num_classes} pieces)")
