"""What kind of task a run is, chosen once from its data: how the loop evaluates an epoch,
what the run keeps at its end, and how its speed is counted. Two kinds:

- :class:`ClassificationTask` (every image, signal and digit dataset): validation and
  test metrics per evaluated epoch (with a teacher: agreement and logit distance on its
  logits, computed once), and at the end ``eval_{train,val,test}.npz`` — logits, labels,
  penultimate features, teacher logits; speed in images/s;
- :class:`kdlab.training.translation.TranslationTask` (token batches): teacher-forced
  token metrics, token calibration, translations and BLEU; speed in target tokens/s.

Each has ``evaluate(model, ema) -> dict`` (metrics.jsonl keys), ``finish(run_dir, model,
progress, log) -> dict`` (extra result.json entries), ``speed(epochs, train_time)``,
``final_extra(extra)`` (extra ``final`` entries), and ``speed_key`` / ``bar_key``.
"""

from __future__ import annotations

from pathlib import Path

from ..runs import atomic_save_npz
from .evaluate import predict_split, split_metrics
from .translation import TranslationTask

STREAMED_TRAIN_EVAL_MAX = 100_000  # streamed data: eval_train.npz only up to this many images


def task_for(cfg, data, teachers, ctx, bf16: bool):
    """The task of this run's data. A classification teacher's val/test logits are
    computed now (a collective in a multi-process run)."""
    if data.tokens:
        return TranslationTask(cfg, data, teachers, ctx, bf16)
    return ClassificationTask(cfg, data, teachers, ctx, bf16)


class ClassificationTask:
    """A classifier's evaluation and finishing."""

    speed_key, bar_key = "images_per_s", "img_s"

    def __init__(self, cfg, data, teachers, ctx, bf16: bool):
        self.cfg, self.data, self.teachers, self.ctx, self.bf16 = cfg, data, teachers, ctx, bf16
        self.teacher_logits = {"val": None, "test": None}
        if teachers is not None:
            for split in ("val", "test"):
                self.teacher_logits[split] = teachers.predict(data, split, cfg.eval_batch_size, cfg.channels_last, ctx)

    def _predict(self, model, split: str, **kwargs):
        return predict_split(model, self.data, split, self.cfg.eval_batch_size, bf16=self.bf16,
                             channels_last=self.cfg.channels_last, ctx=self.ctx, **kwargs)

    def evaluate(self, model, ema) -> dict:
        """Validation and test metrics (a split without rows is left out), and the EMA weights'."""
        record = {}
        for split in ("val", "test"):
            y = self.data.split_labels(split)
            if len(y):
                teacher_logits = self.teacher_logits[split]
                record.update(split_metrics(split, self._predict(model, split), y, teacher_logits))
                if ema is not None:
                    record.update({f"ema_{k}": v for k, v in
                                   split_metrics(split, self._predict(ema.module, split), y, teacher_logits).items()})
        return record

    def finish(self, run_dir: Path, model, progress: bool, log) -> dict:
        """``eval_{split}.npz`` of the final weights (rank 0 writes); the class names of an image folder."""
        for split in ("train", "val", "test"):
            y = self.data.split_labels(split)
            if self.data.streamed and split == "train" and len(y) > STREAMED_TRAIN_EVAL_MAX:
                continue  # ImageNet-size: 1.28M × 2048 features; analyses use val/test
            if not len(y):
                continue  # data.val_size=0: no validation split, no eval_val.npz (analyses then fit nothing on it)
            logits, features = self._predict(model, split, features=True)
            # train: unaugmented, with the (possibly noisy) training labels; features in fp16 to keep it small
            arrays = {"logits": logits.numpy(), "labels": y.numpy(),
                      "features": features.half().numpy() if split == "train" else features.numpy()}
            teacher_logits = self.teacher_logits.get(split)
            if split == "train" and self.teachers is not None:
                teacher_logits = self.teachers.predict(self.data, "train", self.cfg.eval_batch_size,
                                                       self.cfg.channels_last, self.ctx)
            if teacher_logits is not None:
                arrays["teacher_logits"] = teacher_logits.numpy()
            if self.ctx.main:
                atomic_save_npz(run_dir / f"eval_{split}.npz", **arrays)
        classes = getattr(self.data, "classes", None)  # an image folder's class folders: analyses name classes by them
        return {"class_names": list(classes)} if classes else {}

    def speed(self, epochs: int, train_time: float) -> dict:
        return {"images_per_s": self.data.num_train * epochs / train_time if train_time > 0 else None}

    def final_extra(self, extra: dict) -> dict:
        return {}
