"""Translation speed: training tokens/s and decoding sentences/s of kdlab's Transformers.

    python benchmarks/translation_speed.py [--models transformer-2-128-4,...] [--vocab 2000]
                                           [--max-tokens 3000] [--device cpu|cuda] [--bf16]

Synthetic token batches of the real shapes (sentences of 8-30 target tokens, sources of
similar length, token-budget batches as kdlab.data.text.token_batches makes them), so it
runs on a GPU machine that carries no corpus. Per model:

1. a training step as the loop does it (forward to target-token rows, label-smoothed CE
   on rows, backward, Adam step): target tokens per second, median of 5 timed repeats of
   ``--steps`` steps after 3 warm-up steps;
2. the same step with a word-level-KD teacher (transformer-base-like ``--teacher``) run
   online beside it (KL at τ = 1), when ``--teacher`` is given;
3. greedy decoding (batched, key/value cache) and beam 4 (per sentence, cache) of 64
   sentences of 20 source tokens, ``max_len`` = source + 50, on an untrained model
   stopped at 25 tokens by forcing EOS (a trained model's typical output length).

Prints a table and writes benchmarks/results/translation_speed[-DEVICE].json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from kdlab.data.text import BOS, EOS, PAD, token_batches
from kdlab.losses import distillation_loss
from kdlab.models import build_model, count_parameters


def _batches(vocab: int, max_tokens: int, n_sentences: int = 4000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tgt_len = torch.randint(8, 31, (n_sentences,), generator=g).tolist()
    src_len = [max(3, t + int(d)) for t, d in zip(tgt_len, torch.randint(-3, 4, (n_sentences,), generator=g))]
    out = []
    for group in token_batches(src_len, tgt_len, max_tokens, g):
        s, t = max(src_len[i] for i in group), max(tgt_len[i] for i in group)
        src = torch.randint(4, vocab, (len(group), s), generator=g)
        tgt = torch.randint(4, vocab, (len(group), t), generator=g)
        for row, i in enumerate(group):
            src[row, src_len[i]:] = PAD
            tgt[row, tgt_len[i]:] = PAD
        tgt_in = torch.cat([torch.full((len(group), 1), BOS), tgt[:, :-1]], 1)
        out.append((src, tgt_in, tgt))
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(name, vocab, batches, device, bf16, steps, teacher=None) -> float:
    torch.manual_seed(0)
    model = build_model(name, vocab).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    cast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else None

    def step(src, tgt_in, tgt):
        src, tgt_in, tgt = src.to(device), tgt_in.to(device), tgt.to(device)
        keep = tgt_in != PAD
        if cast:
            with cast():
                logits = model(src, tgt_in)[keep]
        else:
            logits = model(src, tgt_in)[keep]
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                if cast:
                    with cast():
                        teacher_logits = teacher(src, tgt_in)[keep].float()
                else:
                    teacher_logits = teacher(src, tgt_in)[keep]
        loss = distillation_loss(logits, tgt[keep], teacher_logits, alpha=1.0 if teacher is not None else 0.0,
                                 kd="kl", tau=1.0, smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return int(keep.sum())

    k = 0
    for _ in range(3):
        step(*batches[k % len(batches)])
        k += 1
    rates = []
    for _ in range(5):
        _sync(device)
        start, tokens = time.perf_counter(), 0
        for _ in range(steps):
            tokens += step(*batches[k % len(batches)])
            k += 1
        _sync(device)
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


@torch.inference_mode()
def decode_rates(name, vocab, device, sentences=64, length=20, stop=25) -> dict:
    torch.manual_seed(0)
    model = build_model(name, vocab).to(device).eval()
    with torch.no_grad():  # EOS forced after `stop` tokens: an untrained model would run to max_len
        model.fc_bias[EOS] = -1e4
    src = torch.randint(4, vocab, (sentences, length), device=device)
    out = {}
    for label, fn in (("greedy", lambda: model.greedy(src, length + 50)),
                      ("beam4", lambda: model.beam_search(src[:16], length + 50, 4, 0.6))):
        # make EOS win at step `stop`: raise its bias once the prefix is long enough (hook on step)
        original = model.step

        def stepped(tokens, state, original=original):
            logits = original(tokens, state)
            if state["length"] >= stop:
                logits[:, EOS] = 1e4
            return logits

        model.step = stepped
        _sync(device)
        start = time.perf_counter()
        n = len(fn())
        _sync(device)
        model.step = original
        out[f"{label}_sentences_per_s"] = n / (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="transformer-2-64-4,transformer-2-128-4,transformer-3-128-4,"
                        "transformer-3-256-4")
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--teacher", default=None, help="a teacher model name for the online-KD row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = _batches(args.vocab, args.max_tokens)
    teacher = None
    if args.teacher:
        teacher = build_model(args.teacher, args.vocab).to(device).eval()
    rows = []
    for name in args.models.split(","):
        row = {"model": name, "params_M": count_parameters(build_model(name, args.vocab)) / 1e6,
               "train_tokens_per_s": train_rate(name, args.vocab, batches, device, args.bf16, args.steps)}
        if teacher is not None:
            row["train_tokens_per_s_online_teacher"] = train_rate(name, args.vocab, batches, device, args.bf16,
                                                                  args.steps, teacher)
        row.update(decode_rates(name, args.vocab, device))
        rows.append(row)
        print("  ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    header = list(rows[0])
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:,.1f}" if isinstance(row[k], float) else str(row[k]) for k in header) + " |")
    info = {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor(),
            "vocab": args.vocab, "max_tokens": args.max_tokens, "bf16": args.bf16, "teacher": args.teacher,
            "rows": rows}
    out = Path(__file__).parent / "results" / (
        "translation_speed.json" if device.type == "cpu" else f"translation_speed-{device.type}.json")
    out.write_text(json.dumps(info, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
