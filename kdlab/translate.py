"""Decoding of translation models (data.name=translation): greedy and beam search, BLEU,
and decoding a finished run again. What a translation run measures while it trains and
keeps at its end is ``kdlab.training.translation``.

- ``translate``: greedy (batched) or beam search decoding of a split, detokenised by
  sentencepiece; BLEU by sacrebleu (uncased, 13a) against the raw references.
- ``beam_search_bytes``: the memory beam search will hold for the largest batch
  (sentences × beam rows: key/value caches, a step's logits over the vocabulary, the
  hypotheses), estimated before anything runs: training refuses a ``decode.beam`` whose
  estimate exceeds the memory limit before it trains (``training.checks.estimate_memory``), and
  ``decode_run`` before it decodes.
- ``decode_run`` (``kdlab translate RUN --beam N ...``): a finished run decoded again with
  other settings, without training — decoding settings are not part of the run hash. It
  writes ``RUN/decode/<settings>/`` (``translations_{split}_{kind}.txt``, ``bleu.json``)
  and leaves the run's own outputs as they are.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import load_dataset
from .device import describe_device, memory_limit_bytes, model_device, resolve_device
from .errors import ConfigError, RunError
from .runs import (
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    load_finished_model,
    load_run_config,
    make_dirs,
    read_json,
)

@torch.inference_mode()
def translate(model, data, split: str, beam: int = 0, alpha: float = 0.6, extra_length: int = 50, ctx=None,
              progress: bool = False, temperature: float = 1.0, sentences=None) -> list[str]:
    """Detokenised translations of every sentence of ``split`` (or of the given
    ``sentences``) in corpus order: greedy (``beam`` 0 or 1: batched) or beam search (with
    the logits divided by ``temperature``). Sentences sorted by length into batches; with a
    multi-process ``ctx`` batches are shared round-robin and gathered."""
    was_training = model.training
    model.eval()
    device = model_device(model)
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


# --- what beam search holds, estimated before it runs ---------------------------------------

# What glibc's malloc holds beyond the live bytes while the key/value caches grow a step at
# a time (blocks freed on the way stay in the heap). Measured (CPU, torch 2.13, built-in
# corpus, 8k pieces, peak RSS of one beam_search call): with every block mmapped
# (MALLOC_MMAP_THRESHOLD_=131072) the peak is 0.94-1.0x of the unscaled estimate; with
# the default malloc 1.0-1.64x of it (worst: 150-step batches, beam 4-16). So the
# estimate is 1.1-1.8x the measured peak, never below it.
ALLOCATOR_SLACK = 1.8


def decoder_size(model_name: str, vocab: int) -> tuple[int, int, int, int]:
    """(decoder layers, d_model, heads, parameters) of a registered transformer, built on
    the meta device (nothing allocated)."""
    from .models import build_model, count_parameters

    with torch.device("meta"):
        model = build_model(model_name, vocab, input_shape=())
    return len(model.decoder), model.d, model.decoder[0].attn.heads, count_parameters(model)


def beam_search_bytes(data, split: str, beam: int, extra_length: int, size: tuple, sentences=None,
                      threads: int | None = None) -> tuple[int, dict]:
    """(bytes, the batch that needs them) of the largest batch of decoding ``split`` (or the
    given ``sentences``) by beam search (``beam`` >= 2) or greedily: an upper bound of what
    ``Transformer.beam_search`` holds at once (float32) for the batches ``translate`` makes
    (``data.eval_groups``), ``size`` being :func:`decoder_size`. With R = sentences × beam
    rows, S the batch's longest source, T = S + extra_length steps at most, V pieces, L
    decoder layers of width D and H heads:

    - the memory's cross-attention keys/values repeated for every beam row: 2·L·R·S·D;
    - the self-attention key/value caches at the last step: 2·L·R·T·D;
    - and the largest of: a layer's key/value pair being concatenated (2·R·T·D); a step's
      logits — the projection, its division by the temperature, its log-softmax: 3·R·V —
      with the top-k's working queue of beam·V (value, index) pairs per thread; the
      encoder's activations for the batch (n·S·(16·D + 3·H·S), before the rest exists);
    - Python's hypotheses: each live one a list of up to T + 1 tokens, and the finished
      ones (at most ``beam`` a sentence a step: R·T lists of up to T + 1 tokens);
    - times ALLOCATOR_SLACK: the caches grow a step at a time, and glibc's malloc keeps
      the smaller blocks freed on the way (measured, see ALLOCATOR_SLACK).
    """
    layers, width, heads = size[:3]
    vocab, threads, beam = data.num_classes, threads or torch.get_num_threads(), max(beam, 1)
    worst, where = 0, {}
    for group in data.eval_groups(split, sentences):
        n = len(group)
        source = max(len(data.src[split][i]) for i in group)
        steps = data.max_decode_length(group, split, extra_length)
        rows = n * beam
        topk = min(threads, n) * beam * vocab * 16 if beam > 1 else 0
        held = 4 * (2 * layers * rows * source * width + 2 * layers * rows * steps * width)
        passing = max(4 * 2 * rows * steps * width, 4 * 3 * rows * vocab + topk,
                      4 * n * source * (16 * width + 3 * heads * source))
        python = rows * (200 + 40 * steps) + (rows * steps * (136 + 4 * steps) if beam > 1 else 0)
        total = int(ALLOCATOR_SLACK * (held + passing + python))
        if total > worst:
            worst, where = total, {"split": split, "sentences": n, "beam": beam, "steps": steps, "source": source,
                                   "vocab": vocab}
    return worst, where


def decode_passes_bytes(data, decode, size: tuple, split: str = "test",
                        threads: int | None = None) -> tuple[int, dict]:
    """The largest :func:`beam_search_bytes` of the beam-search passes ``decode`` (a
    DecodeConfig) makes: ``split`` at decode.beam, and with decode.temperatures the first
    decode.temperature_sentences validation sentences (greedy passes hold less)."""
    if decode.beam < 2:
        return 0, {}
    passes = [(split, None)]
    if decode.temperatures:
        passes.append(("val", temperature_sentences(data, decode)))
    return max((beam_search_bytes(data, name, decode.beam, decode.extra_length, size, sentences, threads)
                for name, sentences in passes), key=lambda pair: pair[0])


def temperature_sentences(data, decode) -> list[int]:
    """The validation sentences of the BLEU-against-T curve: the first
    decode.temperature_sentences (all by default)."""
    count = len(data.src["val"]) if decode.temperature_sentences is None else decode.temperature_sentences
    return list(range(min(count, len(data.src["val"]))))


def bleu_against_temperature(model, data, decode, ctx=None, progress: bool = True) -> dict:
    """Müller's curve: validation BLEU of beam search (decode.beam) with the logits divided
    by each of decode.temperatures (with a multi-process ``ctx`` every rank decodes its
    share; the scores are rank 0's, None elsewhere)."""
    sentences = temperature_sentences(data, decode)
    main = ctx is None or ctx.main
    curve = {"temperature": list(decode.temperatures), "bleu": [], "beam": decode.beam,
             "sentences": len(sentences), "split": "val"}
    for temperature in decode.temperatures:
        hypotheses = translate(model, data, "val", decode.beam, decode.alpha, decode.extra_length, ctx, progress,
                               temperature, sentences)
        curve["bleu"].append(bleu_of(data, "val", hypotheses, sentences)[0] if main else None)
    return curve


def describe_beam_batch(where: dict) -> str:
    """The batch a beam-search estimate is for, in words."""
    return (f"{where['sentences']:,} {where['split']} sentences × {where['beam']:,} beams × "
            f"{where['vocab']:,} pieces, up to {where['steps']} steps")


def _decode_tag(split: str, decode) -> str:
    """The directory name of a set of decoding settings (RUN/decode/<tag>/)."""
    if decode.beam > 1:
        tag = f"{split}-beam{decode.beam}-alpha{decode.alpha:g}-extra{decode.extra_length}"
    else:
        tag = f"{split}-greedy-extra{decode.extra_length}"
    if decode.temperatures:
        grid = "_".join(f"{t:g}" for t in decode.temperatures)
        if len(grid) > 40:
            grid = hashlib.sha256(grid.encode()).hexdigest()[:8]
        tag += f"-T{grid}" + (f"-first{decode.temperature_sentences}" if decode.temperature_sentences else "")
    return tag


def _decode_settings(cfg, beam, alpha, extra_length, temperatures, temperature_sentences):
    """The run's decode section with the given settings in its place (one-line errors
    named by the command's flags)."""
    from pydantic import ValidationError

    from .config import DecodeConfig

    if beam is not None and beam < 0:
        raise ConfigError(f"--beam takes a beam width (0 or 1: greedy decoding), got {beam}")
    if alpha is not None and not (alpha >= 0 and math.isfinite(alpha)):
        raise ConfigError(f"--alpha takes the length penalty's exponent (>= 0), got {alpha}")
    if extra_length is not None and extra_length < 1:
        raise ConfigError(f"--extra-length takes the tokens decoded beyond the source's length (>= 1), "
                          f"got {extra_length}")
    if temperatures is not None:
        if not temperatures or any(not (t > 0 and math.isfinite(t)) for t in temperatures):
            raise ConfigError(f"--temperatures takes finite temperatures > 0, got {','.join(map(str, temperatures))}")
    if temperature_sentences is not None and temperature_sentences < 1:
        raise ConfigError(f"--temperature-sentences takes a number of sentences (>= 1), got {temperature_sentences}")
    settings = cfg.decode.model_dump()
    settings["temperatures"] = []  # the BLEU-against-T curve only when asked for (a pass per T)
    for key, value in (("beam", beam), ("alpha", alpha), ("extra_length", extra_length),
                       ("temperatures", temperatures), ("temperature_sentences", temperature_sentences)):
        if value is not None:
            settings[key] = value
    if settings["temperatures"] and settings["beam"] < 2:
        raise ConfigError(f"--temperatures: BLEU against T needs beam search (--beam >= 2; this is beam "
                          f"{settings['beam']}): greedy decoding does not depend on T")
    try:
        return DecodeConfig.model_validate(settings)
    except ValidationError as err:
        raise ConfigError(f"decoding settings: {err.errors()[0]['msg']}") from None


def decode_run(run_dir, *, beam: int | None = None, alpha: float | None = None, extra_length: int | None = None,
               temperatures: list[float] | None = None, temperature_sentences: int | None = None,
               split: str = "test", device: str | None = None, memory_limit_gb: float | None = None,
               progress: bool = True, log=print) -> dict:
    """Decode a finished translation run again, without training (``kdlab translate``).

    The settings default to the run's decode section (config.yaml), the BLEU-against-T
    curve aside (only with ``temperatures``). Decoding settings are not part of the run
    hash, so this is the way to other beams, length penalties or temperatures for a
    trained model. Writes ``RUN/decode/<settings>/`` (e.g. ``test-beam8-alpha0.6-extra50``):
    ``translations_{split}_{greedy|beamN}.txt`` and ``bleu.json`` (BLEU, sacrebleu's
    signature, the settings, the decoding speed; with temperatures the validation BLEU
    against T), written atomically once decoding is done; the run's own outputs
    (result.json, model.pt, its translations) are not touched. The memory of beam search
    is estimated and refused above the limit (``memory_limit_gb`` or the run's, default
    90% of the device's memory) before anything is decoded. Returns bleu.json's dict
    with ``dir`` added.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run dir {run_dir} does not exist")
    cfg = load_run_config(run_dir)
    if cfg.data.name != "translation":
        raise ConfigError(f"{run_dir} is a {cfg.data.name} run: kdlab translate decodes translation runs "
                          "(data.name=translation)")
    if not (run_dir / "result.json").is_file():
        raise RunError(f"run {run_dir} is not finished (no result.json): train it first (kdlab train)")
    for name in ("model.pt", "tokenizer.model"):
        if not (run_dir / name).is_file():
            raise RunError(f"run {run_dir} has no {name}: not a finished translation run")
    if split not in ("val", "test"):
        raise ConfigError(f"--split takes val or test, got {split}")
    decode = _decode_settings(cfg, beam, alpha, extra_length, temperatures, temperature_sentences)
    if device is not None and not re.fullmatch(r"cpu|auto|cuda(:[0-9]+)?", device):
        raise ConfigError(f"--device takes cpu, auto, cuda or cuda:N, got {device!r}")
    if memory_limit_gb is not None and not memory_limit_gb > 0:
        raise ConfigError(f"--memory-limit-gb takes a size in GB (> 0), got {memory_limit_gb}")
    check_writable_dir(run_dir, "the run dir")
    target = resolve_device(device or cfg.device)
    size = decoder_size(cfg.model.name, read_json(run_dir / "result.json")["num_classes"])

    data = load_dataset(cfg.data)
    recorded = read_json(run_dir / "result.json").get("corpus", {}).get("sha256")
    if recorded and recorded != data.corpus.sha256:
        raise RunError(f"data.root={cfg.data.root}: the corpus differs from the one {run_dir.name} was trained and "
                       f"scored on (SHA-256 {data.corpus.sha256[:12]}…, the run's {recorded[:12]}…)")
    if data.tokenizer_path.read_bytes() != (run_dir / "tokenizer.model").read_bytes():
        raise RunError(f"{run_dir / 'tokenizer.model'}: the run's subwords differ from the corpus's cached "
                       f"sentencepiece model {data.tokenizer_path}")
    need, where = decode_passes_bytes(data, decode, size, split)
    limit = memory_limit_bytes(memory_limit_gb or cfg.memory_limit_gb, target)
    if limit is not None and need + 4 * size[3] > limit:
        raise ConfigError(f"--beam {decode.beam}: beam search would need ~{(need + 4 * size[3]) / 1e9:,.3g} GB "
                          f"({describe_beam_batch(where)}) but the limit is {limit / 1e9:,.3g} GB "
                          f"(--memory-limit-gb or the run's memory_limit_gb; default 90% of {target.type} memory)")

    model = load_finished_model(run_dir).to(target)
    kind = f"beam{decode.beam}" if decode.beam > 1 else "greedy"
    started = time.perf_counter()
    hypotheses = translate(model, data, split, decode.beam, decode.alpha, decode.extra_length, progress=progress)
    seconds = time.perf_counter() - started
    score, signature = bleu_of(data, split, hypotheses)
    out = {"run_dir": str(run_dir), "run_hash": cfg.run_hash(), "split": split, "kind": kind, "bleu": score,
           "signature": signature, "sentences": len(hypotheses), "decode_s": seconds,
           "sentences_per_s": len(hypotheses) / seconds if seconds > 0 else None,
           "decode": decode.model_dump(mode="json"), "device": describe_device(target),
           "torch_threads": torch.get_num_threads(), "memory_estimate_bytes": need}
    if decode.temperatures:
        out["bleu_temperature"] = curve = bleu_against_temperature(model, data, decode, None, progress)
    directory = run_dir / "decode" / _decode_tag(split, decode)
    make_dirs(directory, "the run dir")
    atomic_write_text(directory / f"translations_{split}_{kind}.txt", "".join(h + "\n" for h in hypotheses))
    atomic_write_json(directory / "bleu.json", out)
    out["dir"] = str(directory)
    log(f"{directory}: {split} BLEU ({kind}) {score:.2f} ({len(hypotheses) / max(seconds, 1e-9):.1f} sentences/s)")
    if decode.temperatures:
        log(f"{directory}: validation BLEU (beam {decode.beam}) against T: " +
            ", ".join(f"T={t:g} {b:.2f}" for t, b in zip(curve["temperature"], curve["bleu"])))
    return out

