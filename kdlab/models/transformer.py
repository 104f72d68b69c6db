"""Transformer encoder-decoder for translation (Vaswani et al. 2017; Müller A.3).

``transformer-base``: 6 + 6 layers, d_model 512, 8 heads, feed-forward 2048, dropout 0.1
(tensor2tensor's ``transformer_base``); ``transformer-L-D-H``: L layers on each side,
d_model D, H heads, feed-forward 4·D (e.g. ``transformer-2-128-4`` for the quick scale);
a ``-dropP`` suffix sets the dropout to P% (``transformer-base-drop30``).

Plain torch: attention is ``F.scaled_dot_product_attention``; pre-layer-norm blocks with
a final norm on each side (as tensor2tensor v1 does); sinusoidal positions; one embedding
matrix shared by source, target and the softmax projection (joint vocabulary), embeddings
scaled by √D. The decoder's output before the softmax projection is the penultimate
feature (Müller's Fig. 7 projects it), and the projection has a bias so that the
template analysis (rows with the bias appended) applies as for classifiers.

Decoding: ``greedy`` (batched) and ``beam_search`` (length penalty ((5 + |y|) / 6)^α of
GNMT, α = 0.6 and beam 4 as tensor2tensor; batched over sentences and their beams); both feed one token a
step and keep each decoder layer's self-attention keys/values (``start``/``step``: equal
to ``decode`` on the whole prefix, tested), and the memory's cross-attention keys/values
once per sentence.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import positive_sizes, register_family

PAD, BOS, EOS = 0, 2, 3  # kdlab.data.text's sentencepiece ids


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        # no biases, as tensor2tensor (a key bias would have a zero gradient: softmax ignores it)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x, memory, mask=None, causal: bool = False):
        b, t, d = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(memory)), self._split(self.v(memory))
        if causal:  # (mask is None then) the lower-triangular mask of SDPA
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                                 is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(b, t, d))

    def _split(self, z):
        b, t, d = z.shape
        return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, memory):
        """(K, V) of ``memory`` (B, H, S, D/H): cross-attention's, computed once per sentence."""
        return self._split(self.k(memory)), self._split(self.v(memory))

    def attend(self, x, keys, values, mask=None):
        """Attention of the queries of ``x`` (eval mode) to given keys and values."""
        b, t, d = x.shape
        out = F.scaled_dot_product_attention(self._split(self.q(x)), keys, values, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, dropout: float, cross: bool):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), _Attention(d, heads, dropout)
        self.cross = _Attention(d, heads, dropout) if cross else None
        self.norm2 = nn.LayerNorm(d) if cross else None
        self.norm3 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, self_mask=None, memory=None, memory_mask=None, causal=False):
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, self_mask, causal=causal))
        if self.cross is not None:
            x = x + self.drop(self.cross(self.norm2(x), memory, memory_mask))
        return x + self.drop(self.ff(self.norm3(x)))

    def step(self, x, cache: dict, memory_kv, memory_mask):
        """One new decoder position ``x`` (B, 1, D), eval mode: its self-attention keys and
        values join ``cache`` (the earlier positions'), so the prefix is not recomputed."""
        h = self.norm1(x)
        k, v = self.attn.keys_values(h)
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
        cache["k"], cache["v"] = k, v
        x = x + self.attn.attend(h, k, v)
        x = x + self.cross.attend(self.norm2(x), *memory_kv, memory_mask)
        return x + self.ff(self.norm3(x))


def _positions(length: int, d: int, device) -> torch.Tensor:
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    rate = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(length, d, device=device)
    table[:, 0::2], table[:, 1::2] = torch.sin(position * rate), torch.cos(position * rate)
    return table


class Transformer(nn.Module):
    def __init__(self, vocab: int, layers: int = 6, d: int = 512, heads: int = 8, ff: int = 2048,
                 dropout: float = 0.1):
        super().__init__()
        if d % heads or d % 2:
            raise ValueError(f"transformer: d_model {d} must be even and divisible by the {heads} heads")
        self.d, self.vocab = d, vocab
        self.embed = nn.Embedding(vocab, d, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, std=d ** -0.5)
        self.encoder = nn.ModuleList(_Block(d, heads, ff, dropout, cross=False) for _ in range(layers))
        self.decoder = nn.ModuleList(_Block(d, heads, ff, dropout, cross=True) for _ in range(layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)
        self.fc_bias = nn.Parameter(torch.zeros(vocab))  # the softmax projection is the embedding + this bias
        self.feature_dim = d

    def _embed(self, tokens):
        x = self.embed(tokens) * math.sqrt(self.d) + _positions(tokens.shape[1], self.d, tokens.device)
        return self.drop(x)

    def encode(self, src: torch.Tensor):
        """(memory, key mask) of source tokens (B, S), PAD-padded."""
        keep = (src != PAD)[:, None, None, :]  # (B, 1, 1, S): True = attend
        x = self._embed(src)
        for block in self.encoder:
            x = block(x, self_mask=keep)
        return self.enc_norm(x), keep

    def decode(self, tgt_in: torch.Tensor, memory, memory_mask, return_features: bool = False):
        """Logits (B, T, V) of the next token after each prefix of ``tgt_in`` (BOS first)."""
        x = self._embed(tgt_in)
        for block in self.decoder:
            x = block(x, memory=memory, memory_mask=memory_mask, causal=True)
        features = self.dec_norm(x)
        logits = F.linear(features, self.embed.weight, self.fc_bias)
        return (logits, features) if return_features else logits

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, return_features: bool = False):
        memory, mask = self.encode(src)
        return self.decode(tgt_in, memory, mask, return_features)

    @property
    def classifier_name(self) -> str:  # the template analysis reads these rows
        return "embed"

    # --- decoding --------------------------------------------------------------------

    def start(self, memory, memory_mask) -> dict:
        """Decoding state: cross-attention keys/values of the memory and empty caches."""
        return {"memory_kv": [block.cross.keys_values(memory) for block in self.decoder], "mask": memory_mask,
                "caches": [{} for _ in self.decoder], "length": 0}

    def step(self, tokens: torch.Tensor, state: dict) -> torch.Tensor:
        """Logits (B, V) of the next token after feeding ``tokens`` (B,) at the next position
        (eval mode; key/value caches in ``state``: the same as ``decode`` on the prefix)."""
        t = state["length"]
        x = self.embed(tokens[:, None]) * math.sqrt(self.d) + _positions(t + 1, self.d, tokens.device)[t]
        for block, cache, memory_kv in zip(self.decoder, state["caches"], state["memory_kv"]):
            x = block.step(x, cache, memory_kv, state["mask"])
        state["length"] = t + 1
        return F.linear(self.dec_norm(x[:, 0]), self.embed.weight, self.fc_bias)

    @staticmethod
    def reorder(state: dict, rows: torch.Tensor, memory: bool = True) -> None:
        """Keep (and repeat) the given rows of a decoding state (beam search's parents).
        ``memory=False``: the rows move only within each sentence's beam, whose memory rows
        are the same, so the memory's keys/values stay where they are."""
        if memory:
            state["memory_kv"] = [(k[rows], v[rows]) for k, v in state["memory_kv"]]
            state["mask"] = state["mask"][rows]
        for cache in state["caches"]:
            for key in cache:
                cache[key] = cache[key][rows]

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: int) -> list[list[int]]:
        """The most probable next token (PAD excluded) at each step, until EOS or ``max_len``
        tokens; batched over sentences."""
        state = self.start(*self.encode(src))
        out = torch.full((len(src), 1), BOS, dtype=torch.long, device=src.device)
        done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            logits = self.step(out[:, -1], state).float()
            logits[:, PAD] = -math.inf
            step = torch.where(done, torch.full_like(done, PAD, dtype=torch.long), logits.argmax(-1))
            out = torch.cat([out, step[:, None]], 1)
            done |= step == EOS
            if done.all():
                break
        return [_strip(row) for row in out[:, 1:].tolist()]

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, max_len: int, beam: int = 4, alpha: float = 0.6,
                    temperature: float = 1.0) -> list[list[int]]:
        """Per sentence, the hypothesis of highest log p(y|x) / ((5 + |y|) / 6)^α (|y| counts
        EOS). Each step keeps the ``beam`` best expansions of the live hypotheses; those
        ending in EOS (or reaching ``max_len`` tokens) are finished and leave the beam, so a
        beam of 1 is greedy decoding and a beam wider than every hypothesis an exhaustive
        search. ``temperature`` divides the logits (Müller's BLEU against T; greedy decoding
        ignores it). It stops early once no live hypothesis can beat the best finished one
        (log-probabilities only fall, and the penalty is largest at ``max_len``). The
        decoder runs once a step for every sentence's beam together (sentence × beam rows;
        empty slots score -inf), so a batch decodes as fast as its longest sentence."""
        n, device = len(src), src.device
        memory, mask = self.encode(src)
        state = self.start(memory, mask)
        self.reorder(state, torch.arange(n, device=device).repeat_interleave(beam))  # n·beam rows
        prefixes = [[[BOS]] for _ in range(n)]  # live hypotheses of each sentence, by slot
        scores = torch.full((n, beam), -math.inf, device=device)
        scores[:, 0] = 0.0
        finished: list[list] = [[] for _ in range(n)]
        live = [True] * n
        last = torch.full((n * beam,), BOS, dtype=torch.long, device=device)
        for step in range(1, max_len + 1):
            logp = F.log_softmax(self.step(last, state).float() / temperature, -1)
            logp[:, PAD] = -math.inf
            vocab = logp.shape[1]
            top = (scores.view(-1, 1) + logp).view(n, beam * vocab).topk(beam, dim=1)
            values, indices = top.values.tolist(), top.indices.tolist()
            new_scores = [[-math.inf] * beam for _ in range(n)]
            rows = list(range(n * beam))  # each slot's parent row (empty slots: any)
            tokens = [PAD] * (n * beam)
            for i in range(n):
                if not live[i]:
                    continue
                kept = []
                for value, flat in zip(values[i], indices[i]):
                    if value == -math.inf:
                        break
                    parent, token = divmod(flat, vocab)
                    hypothesis = prefixes[i][parent] + [token]
                    if token == EOS or step == max_len:
                        finished[i].append((hypothesis, value))
                    else:
                        slot = i * beam + len(kept)
                        rows[slot], tokens[slot], new_scores[i][len(kept)] = i * beam + parent, token, value
                        kept.append(hypothesis)
                prefixes[i] = kept
                best = max((_normalised(p, v, alpha) for p, v in finished[i]), default=-math.inf)
                if not kept or best >= new_scores[i][0] / _penalty(max_len, alpha):
                    live[i] = False  # (slots in score order: slot 0 is the best live one)
                    new_scores[i] = [-math.inf] * beam
            if not any(live):
                break
            scores = torch.tensor(new_scores, device=device)
            last = torch.tensor(tokens, device=device)
            self.reorder(state, torch.tensor(rows, device=device), memory=False)
        return [_strip(max(f, key=lambda h: _normalised(h[0], h[1], alpha))[0][1:]) for f in finished]


def _penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


def _normalised(prefix: list[int], score: float, alpha: float) -> float:
    return score / _penalty(len(prefix) - 1, alpha)


def _strip(tokens: list[int]) -> list[int]:
    """Tokens up to (not including) EOS, without padding."""
    out = []
    for token in tokens:
        if token == EOS:
            break
        if token != PAD:
            out.append(token)
    return out


@register_family(r"transformer-(?:base|(\d+)-(\d+)-(\d+))(?:-drop(\d+))?",
                 ["transformer-base", "transformer-2-128-4", "transformer-2-128-4-drop30"],
                 "Transformer encoder-decoder: base (6+6, 512, 8 heads; Müller A.3) or L-D-H (ff 4·D); "
                 "-dropP sets the dropout to P% (default 10)")
def _build(match, num_classes, in_channels, input_shape):
    dropout = int(match[4]) / 100 if match[4] is not None else 0.1
    if not 0 <= dropout < 1:
        raise ValueError(f"{match[0]}: dropout must be below 100%, got {match[4]}%")
    if match[1] is None:
        return Transformer(num_classes, dropout=dropout)
    layers, d, heads = int(match[1]), int(match[2]), int(match[3])
    positive_sizes(match[0], layers=layers, d_model=d, heads=heads)
    return Transformer(num_classes, layers, d, heads, 4 * d, dropout)
