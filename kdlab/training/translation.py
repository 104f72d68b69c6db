"""The translation task (data.name=translation): what the loop asks of it each evaluated
epoch and at the end, and the measurements behind them.

- ``TranslationTask``: per-epoch teacher-forced token metrics of validation and test (and
  of the EMA weights); at the end ``translation_outputs``; speed in target tokens/s.
- ``token_metrics``: teacher-forced NLL, accuracy, logit sum per target token (EOS
  included, padding excluded), and against a teacher its agreement and logit distance,
  as the image metrics but summed batch by batch (a split's full-vocabulary logits are
  never held: 3k sentences × 30 tokens × 32k pieces would be 11 GB).
- ``calibration_outputs``: Müller's token calibration. The first ``data.calibration_tokens``
  validation target tokens (corpus order, teacher-forced; EOS included, padding and the
  BOS input excluded) are evaluated with their full logits in memory, and the existing
  calibration code runs on them: ``fit_temperature`` (T on these validation tokens, as
  Müller fits it), ECE (15 bins) and NLL at T = 1, at the fitted T and on a grid of T
  (Fig. 6's shape). The run dir keeps per token what the analyses need and no logits
  dump: label, confidence and correctness at T = 1 and at T*, the label's
  log-probability, the top-5 pieces, and the penultimate (decoder) features in float16.
- ``translation_outputs``: the run's final outputs — token calibration arrays, the
  translations of validation and test (``kdlab.translate``) as text, and their BLEU.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..analysis.calibration import expected_calibration_error, fit_temperature, negative_log_likelihood
from ..data.text import EOS
from ..device import autocast, model_device
from ..runs import atomic_save_npz, atomic_write_bytes, atomic_write_text
from ..translate import bleu_against_temperature, bleu_of, translate

TEMPERATURE_GRID = tuple(round(0.5 + 0.1 * k, 2) for k in range(21))  # 0.5 .. 2.5


@torch.inference_mode()
def token_metrics(prefix: str, model, data, split: str, bf16: bool = False, ctx=None, teachers=None) -> dict:
    """{prefix}_acc / _nll / _logit_sum per target token (+ _agreement, _logit_distance
    with ``teachers``); with a multi-process ``ctx`` the batches are shared round-robin
    and the sums all-reduced."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # rows, nll, correct, logit sum, agree, distance
    for number, sentences in enumerate(data.eval_groups(split)):
        if ctx is not None and ctx.active and number % ctx.world != ctx.rank:
            continue
        x, y = data.batch(split, sentences, device)
        with autocast(bf16, device.type):
            logits = data.forward(model, x).float()
        sums[0] += len(y)
        sums[1] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[2] += (logits.argmax(1) == y).sum()
        sums[3] += logits.sum().double()
        if teachers is not None:
            teacher = teachers(x, bf16).to(device)
            sums[4] += (logits.argmax(1) == teacher.argmax(1)).sum()
            sums[5] += (logits - teacher).norm(dim=1).sum().double()
    model.train(was_training)
    if ctx is not None:
        ctx.all_reduce_(sums)
    n = max(sums[0].item(), 1.0)
    out = {f"{prefix}_acc": sums[2].item() / n, f"{prefix}_nll": sums[1].item() / n,
           f"{prefix}_logit_sum": sums[3].item() / n}
    if teachers is not None:
        out[f"{prefix}_agreement"] = sums[4].item() / n
        out[f"{prefix}_logit_distance"] = sums[5].item() / n
    return out


@torch.inference_mode()
def token_outputs(model, data, split: str, sentences: list[int], bf16: bool = False):
    """(logits float32, labels, features, sentence index, position) of every target token
    of ``sentences``, in the order given (sentence by sentence, position by position)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    parts = {}
    for group in data.eval_groups(split, sentences):
        x, _ = data.batch(split, group, device)
        with autocast(bf16, device.type):
            logits, feats = model(*x, return_features=True)
        for row, i in enumerate(group):
            n = len(data.tgt[split][i]) + 1
            parts[i] = (logits[row, :n].float().cpu(), feats[row, :n].float().cpu())
    model.train(was_training)
    logits = torch.cat([parts[i][0] for i in sentences])
    feats = torch.cat([parts[i][1] for i in sentences])
    labels = torch.tensor([t for i in sentences for t in data.tgt[split][i] + [EOS]])
    sentence = torch.tensor([i for i in sentences for _ in range(len(data.tgt[split][i]) + 1)])
    position = torch.tensor([p for i in sentences for p in range(len(data.tgt[split][i]) + 1)])
    return logits, labels, feats, sentence, position


def _per_token(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> dict:
    logp = F.log_softmax(logits.double() / temperature, dim=1)
    confidence, prediction = logp.max(dim=1)
    return {"confidence": confidence.exp().float().numpy(), "correct": (prediction == labels).numpy(),
            "label_logprob": logp.gather(1, labels[:, None]).squeeze(1).float().numpy()}


def calibration_outputs(model, data, bf16: bool = False) -> tuple[dict, dict, dict]:
    """(arrays of eval_val_tokens.npz, arrays of eval_train_tokens.npz, summary for
    result.json) — see the module docstring."""
    sentences = data.calibration_sentences()
    logits, labels, feats, sentence, position = token_outputs(model, data, "val", sentences, bf16)
    temperature = fit_temperature(logits, labels)
    grid = {"temperature": list(TEMPERATURE_GRID), "ece": [], "nll": []}
    for t in TEMPERATURE_GRID:
        grid["ece"].append(expected_calibration_error(logits / t, labels))
        grid["nll"].append(negative_log_likelihood(logits / t, labels))
    plain, scaled = _per_token(logits, labels), _per_token(logits, labels, temperature)
    top = F.log_softmax(logits.double(), 1).topk(5, dim=1)
    val = {"labels": labels.numpy(), "sentence": sentence.numpy(), "position": position.numpy(),
           **plain, **{f"{k}_ts": v for k, v in scaled.items() if k != "correct"},
           "top5_ids": top.indices.int().numpy(), "top5_logprob": top.values.float().numpy(),
           "features": feats.half().numpy(), "temperature": np.float64(temperature)}
    summary = {"tokens": len(labels), "sentences": len(sentences), "eos_included": True,
               "ece": expected_calibration_error(logits, labels), "nll": negative_log_likelihood(logits, labels),
               "accuracy": float(plain["correct"].mean()), "temperature": temperature,
               "ece_ts": expected_calibration_error(logits / temperature, labels),
               "nll_ts": negative_log_likelihood(logits / temperature, labels), "grid": grid}
    del logits
    # the same number of training tokens (corpus order) for the train panel of Fig. 7
    train_sentences, total = [], 0
    for i, t in enumerate(data.tgt["train"]):
        if total >= len(labels):
            break
        train_sentences.append(i)
        total += len(t) + 1
    t_logits, t_labels, t_feats, t_sentence, t_position = token_outputs(model, data, "train", train_sentences, bf16)
    train = {"labels": t_labels.numpy(), "sentence": t_sentence.numpy(), "position": t_position.numpy(),
             **_per_token(t_logits, t_labels), "features": t_feats.half().numpy()}
    return val, train, summary


def translation_outputs(cfg, run_dir: Path, model, data, bf16: bool, ctx, progress: bool, log) -> dict:
    """A translation run's final outputs (``train`` calls it at the end): token calibration arrays for
    the analyses, translations of val and test as text, BLEU. Every rank decodes its share."""
    out = {"corpus": data.describe(), "decode": cfg.decode.model_dump(mode="json")}  # (not in the hash: as decoded)

    def token_calibration():  # rank 0; the other ranks wait to decode with it (and hear if it fails)
        atomic_write_bytes(run_dir / "tokenizer.model", data.tokenizer_path.read_bytes())  # the run's own copy
        val, train_tokens, summary = calibration_outputs(model, data, bf16)
        atomic_save_npz(run_dir / "eval_val_tokens.npz", **val)
        atomic_save_npz(run_dir / "eval_train_tokens.npz", **train_tokens)
        return summary

    summary, _ = ctx.rank0_decides(token_calibration, share=lambda summary: None)
    if ctx.main:
        out["token_calibration"] = summary
        log(f"{run_dir.name}: token calibration on {summary['tokens']:,} validation tokens: ECE {summary['ece']:.4f}, "
            f"T = {summary['temperature']:.3f} -> ECE {summary['ece_ts']:.4f}")
    bleu, decode = {}, cfg.decode
    passes = [("val", 0), ("test", 0)] + ([("test", decode.beam)] if decode.beam > 1 else [])
    for split, beam in passes:
        started = time.perf_counter()
        hypotheses = translate(model, data, split, beam, decode.alpha, decode.extra_length, ctx, progress)
        seconds = time.perf_counter() - started
        kind = f"beam{beam}" if beam > 1 else "greedy"
        if ctx.main:
            score, signature = bleu_of(data, split, hypotheses)
            atomic_write_text(run_dir / f"translations_{split}_{kind}.txt", "".join(h + "\n" for h in hypotheses))
            references = run_dir / f"references_{split}.txt"  # what BLEU compared against
            if not references.exists():
                atomic_write_text(references, "".join(r + "\n" for r in data.references(split)))
            bleu[f"{split}_{kind}"] = {"bleu": score, "sentences": len(hypotheses), "decode_s": seconds,
                                       "sentences_per_s": len(hypotheses) / seconds if seconds > 0 else None}
            bleu["signature"] = signature
            log(f"{run_dir.name}: {split} BLEU ({kind}) {score:.2f} ({len(hypotheses) / seconds:.1f} sentences/s)")
    out["bleu"] = bleu
    if decode.temperatures:  # Müller: BLEU against the softmax temperature (beam search on validation)
        curve = bleu_against_temperature(model, data, decode, ctx, progress)
        if ctx.main:
            out["bleu_temperature"] = curve
            log(f"{run_dir.name}: validation BLEU (beam {decode.beam}) against T: " +
                ", ".join(f"T={t:g} {b:.2f}" for t, b in zip(curve["temperature"], curve["bleu"])))
    return out


class TranslationTask:
    """A translation run's evaluation and finishing (see :mod:`kdlab.training.tasks`)."""

    speed_key, bar_key = "tokens_per_s", "tok_s"  # rows are target tokens

    def __init__(self, cfg, data, teachers, ctx, bf16: bool):
        self.cfg, self.data, self.teachers, self.ctx, self.bf16 = cfg, data, teachers, ctx, bf16

    def evaluate(self, model, ema) -> dict:
        """Teacher-forced token metrics of validation and test (the teacher run beside the
        student), and of the EMA weights."""
        record = {}
        for split in ("val", "test"):
            record.update(token_metrics(split, model, self.data, split, self.bf16, self.ctx, self.teachers))
            if ema is not None:
                record.update({f"ema_{k}": v for k, v in
                               token_metrics(split, ema.module, self.data, split, self.bf16, self.ctx,
                                             self.teachers).items()})
        return record

    def finish(self, run_dir: Path, model, progress: bool, log) -> dict:
        """Token calibration arrays, translations and BLEU; the result's corpus, decode and BLEU entries."""
        return translation_outputs(self.cfg, run_dir, model, self.data, self.bf16, self.ctx, progress, log)

    def speed(self, epochs: int, train_time: float) -> dict:
        return {"tokens_per_s": self.data.train_tokens() * epochs / train_time if train_time > 0 else None}

    def final_extra(self, extra: dict) -> dict:
        """The BLEU scores beside the token metrics in ``final``, for reports (val_bleu, test_bleu_beam)."""
        return {f"{key.split('_')[0]}_bleu" + ("" if key.endswith("greedy") else "_beam"): v["bleu"]
                for key, v in extra.get("bleu", {}).items() if key != "signature"}
