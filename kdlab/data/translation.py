"""``data.name: translation``: sentence pairs as the training loop's token rows.

The loop trains classifiers on rows (logits, label); a translation batch is one more kind
of rows: every non-padding target token of a teacher-forced batch is a row, its label
the next token, its logits the decoder's over the joint vocabulary. So the objectives of
kdlab/losses.py (CE with label smoothing, KL at any τ, τ = ∞, MSE: all means over rows)
apply unchanged to word-level distillation, and padding never reaches a loss: pad
positions are dropped before the loss, not masked inside it.

Batches are token-budget batches by length (kdlab.data.text.token_batches): the epoch's
batch *set* is fixed by the corpus and ``data.max_tokens``; their order is drawn from the
run's generator, so a resume within an epoch re-draws it and skips the batches done.
With a multi-process context each rank takes a contiguous slice of every global batch's
sentences; the global batch's token count (every rank knows it) weighs each rank's loss.

Token rows carry (sentence index, position) where images carry (sample, view).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..distributed import shard
from ..errors import DataError
from .text import BOS, BUILTIN, EOS, PAD, builtin_corpus, folder_corpus, token_batches, tokenizer_file

SPLITS = {"train": "train", "val": "valid", "test": "test"}


def load_corpus(cfg):
    """The corpus ``data.root`` names (default: the built-in German catalogues)."""
    root = cfg.root or BUILTIN
    if root == BUILTIN:
        return builtin_corpus(cfg.min_words or 3, cfg.max_words or 40)
    if root.startswith("builtin:"):
        raise DataError(f"data.root={root}: the built-in corpus is {BUILTIN}")
    return folder_corpus(Path(root), cfg.min_words or 1, cfg.max_words or 250)


def _pad(rows: list[list[int]], device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device, non_blocking=True)


class TranslationData:
    """Tokenised train/val/test splits of a corpus (source + EOS; BOS + target / target + EOS)."""

    name = "translation"
    tokens = True  # rows are target tokens (the loop's seam)
    streamed = False
    input_shape: tuple = ()
    noisy_indices = np.zeros(0, np.int64)  # (no label noise: the loop writes none)

    def __init__(self, cfg, log=print):
        import sentencepiece as spm

        self.corpus = load_corpus(cfg)
        self.tokenizer_path = tokenizer_file(self.corpus, cfg.vocab_size, log=log)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.tokenizer_path))
        self.num_classes = self.sp.get_piece_size()
        self.max_tokens = cfg.max_tokens
        self.calibration_tokens = cfg.calibration_tokens
        self.src, self.tgt, self.text = {}, {}, {}
        for split, name in SPLITS.items():
            pairs = self.corpus.splits[name]
            if not pairs:
                raise DataError(f"translation: the {name} split of {self.corpus.source} is empty")
            english = self.sp.encode([e for e, _ in pairs])
            german = self.sp.encode([g for _, g in pairs])
            self.src[split] = [ids + [EOS] for ids in english]
            self.tgt[split] = german  # BOS + ids in, ids + EOS out
            self.text[split] = pairs
        # the epoch's batches (order aside) are fixed: count them once, refuse an impossible budget now
        self._train_lengths = ([len(s) for s in self.src["train"]], [len(t) + 1 for t in self.tgt["train"]])
        self._batches = token_batches(*self._train_lengths, self.max_tokens)
        longest = max(max(len(s), len(t) + 1) for split in SPLITS for s, t in zip(self.src[split], self.tgt[split]))
        if longest > 4 * self.max_tokens:
            raise DataError(f"data.max_tokens={self.max_tokens}: a sentence has {longest} tokens")
        self._global_rows: list[int] = []

    # --- what the loop asks of any dataset ----------------------------------------------

    @property
    def num_train(self) -> int:
        return len(self.src["train"])

    def train_tokens(self) -> int:
        """Target tokens (rows) of one epoch."""
        return sum(self._train_lengths[1])

    def steps_per_epoch(self, batch_size: int | None = None) -> int:
        """Batches of an epoch (token-budget batches: ``batch_size`` plays no part)."""
        return len(self._batches)

    def smallest_batch(self) -> int:
        return min(len(b) for b in self._batches)

    def describe(self) -> dict:
        return {**self.corpus.describe(), "vocab_size": self.num_classes, "max_tokens": self.max_tokens,
                "train_tokens": self.train_tokens(), "steps_per_epoch": len(self._batches)}

    def global_rows(self, step_in_epoch: int, batch_size: int | None = None) -> int:
        """Target tokens of the whole global batch ``step_in_epoch`` of the current epoch."""
        return self._global_rows[step_in_epoch]

    @staticmethod
    def inputs(raw, channels_last: bool = False):
        """The model input of a batch as ``epoch_batches`` yields it: (src, tgt_in) as is."""
        return raw

    def batch(self, split: str, sentences, device):
        """(src, tgt_in) on ``device`` and the target rows (labels), for sentence indices."""
        src = _pad([self.src[split][i] for i in sentences], device)
        tgt_in = _pad([[BOS] + self.tgt[split][i] for i in sentences], device)
        tgt_out = _pad([self.tgt[split][i] + [EOS] for i in sentences], device)
        return (src, tgt_in), tgt_out[tgt_out != PAD]

    def epoch_batches(self, generator: torch.Generator, batch_size, device: torch.device, start_batch: int = 0,
                      ctx=None):
        """One epoch: ((src, tgt_in), target tokens, sentence index per token, position per
        token, 0) per batch, in an order drawn from ``generator``."""
        batches = token_batches(*self._train_lengths, self.max_tokens, generator)
        lengths = self._train_lengths[1]
        self._global_rows = [sum(lengths[i] for i in b) for b in batches]
        for number, sentences in enumerate(batches):
            if number < start_batch:
                continue
            if ctx is not None and ctx.active:
                sentences = sentences[shard(len(sentences), ctx)]
            x, y = self.batch("train", sentences, device)
            index = torch.tensor([i for i in sentences for _ in range(lengths[i])])
            position = torch.tensor([p for i in sentences for p in range(lengths[i])])
            yield x, y, index, position, 0

    @staticmethod
    def forward(model, x):
        """Logits rows (tokens, V) of the non-padding target positions."""
        src, tgt_in = x
        return model(src, tgt_in)[tgt_in != PAD]

    # --- evaluation ----------------------------------------------------------------------

    def eval_groups(self, split: str, sentences=None) -> list[list[int]]:
        """Sentences of ``split`` (all, or the given ones) in length-sorted batches of 4×
        the training token budget (evaluation keeps no gradients)."""
        chosen = list(range(len(self.src[split]))) if sentences is None else list(sentences)
        lengths = ([len(self.src[split][i]) for i in chosen], [len(self.tgt[split][i]) + 1 for i in chosen])
        return [[chosen[k] for k in b] for b in token_batches(*lengths, 4 * self.max_tokens)]

    def calibration_sentences(self) -> list[int]:
        """The first validation sentences (corpus order) holding ``calibration_tokens`` target tokens."""
        out, total = [], 0
        for i, t in enumerate(self.tgt["val"]):
            if total >= self.calibration_tokens:
                break
            out.append(i)
            total += len(t) + 1
        return out

    def decode_text(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def references(self, split: str) -> list[str]:
        return [g for _, g in self.text[split]]

    def max_decode_length(self, sentences, split: str, extra: int) -> int:
        return max(len(self.src[split][i]) for i in sentences) + extra

    def close(self) -> None:
        pass

