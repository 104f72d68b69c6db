"""Evaluation of translation runs (data.name=translation): token metrics, decoding, BLEU,
and what the run dir keeps for token calibration and Fig. 7.

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
- ``translate``: greedy (batched) or beam search decoding of a split, detokenised by
  sentencepiece; BLEU by sacrebleu (uncased, 13a) against the raw references.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data.text import EOS
from .train import _autocast, _model_device

TEMPERATURE_GRID = tuple(round(0.5 + 0.1 * k, 2) for k in range(21))  # 0.5 .. 2.5


@torch.inference_mode()
def token_metrics(prefix: str, model, data, split: str, bf16: bool = False, ctx=None, teachers=None) -> dict:
    """{prefix}_acc / _nll / _logit_sum per target token (+ _agreement, _logit_distance
    with ``teachers``); with a multi-process ``ctx`` the batches are shared round-robin
    and the sums all-reduced."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # rows, nll, correct, logit sum, agree, distance
    for number, sentences in enumerate(data.eval_groups(split)):
        if ctx is not None and ctx.active and number % ctx.world != ctx.rank:
            continue
        x, y = data.batch(split, sentences, device)
        with _autocast(bf16, device.type):
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
    device = _model_device(model)
    parts = {}
    for group in data.eval_groups(split, sentences):
        x, _ = data.batch(split, group, device)
        with _autocast(bf16, device.type):
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
    from .analysis.calibration import expected_calibration_error, fit_temperature, negative_log_likelihood

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


@torch.inference_mode()
def translate(model, data, split: str, beam: int = 0, alpha: float = 0.6, extra_length: int = 50, ctx=None,
              progress: bool = False, temperature: float = 1.0, sentences=None) -> list[str]:
    """Detokenised translations of every sentence of ``split`` (or of the given
    ``sentences``) in corpus order: greedy (``beam`` 0 or 1: batched) or beam search (with
    the logits divided by ``temperature``). Sentences sorted by length into batches; with a
    multi-process ``ctx`` batches are shared round-robin and gathered."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    chosen = list(range(len(data.src[split]))) if sentences is None else list(sentences)
    groups = data.eval_groups(split, chosen)
    mine = [g for n, g in enumerate(groups) if ctx is None or not ctx.active or n % ctx.world == ctx.rank]
    done = []
    for group in tqdm(mine, desc=f"decode {split}" + (f" (beam {beam})" if beam > 1 else ""), disable=not progress,
                      leave=False, unit="batch"):
        src = data.batch(split, group, device)[0][0]
        max_len = data.max_decode_length(group, split, extra_length)
        if beam > 1:
            ids = model.beam_search(src, max_len, beam, alpha, temperature)
        else:
            ids = model.greedy(src, max_len)
        done.append([(i, data.decode_text(t)) for i, t in zip(group, ids)])
    model.train(was_training)
    if ctx is not None and ctx.active:
        done = ctx.gather_batches(done)
    by_sentence = {i: text for part in done for i, text in part}
    return [by_sentence[i] for i in chosen]


def bleu_of(data, split: str, hypotheses: list[str], sentences=None) -> tuple[float, str]:
    from .data.text import corpus_bleu

    references = data.references(split)
    return corpus_bleu(hypotheses, references if sentences is None else [references[i] for i in sentences])

