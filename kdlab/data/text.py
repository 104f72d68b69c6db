"""Parallel text for translation (Müller A.3): sentence pairs and joint subwords.

Two sources:

- a folder of parallel text (``data.root``): ``train.en``/``train.de``, ``valid.*``,
  ``test.*``, one sentence a line (e.g. WMT'14 En→De prepared by the user), or
  ``train.tsv``/``valid.tsv``/``test.tsv`` with ``english<TAB>german`` lines;
- ``builtin:de-catalogues``: the German message catalogues of installed programs
  (``/usr/share/locale/de/LC_MESSAGES/*.mo``), each entry an English message and its
  human German translation, read with Python's own ``gettext`` parser. Which catalogues
  is pinned by name (:data:`PINNED_CATALOGUES`, with the Debian package that ships each):
  machines differ in what is installed, and a missing one is a one-line error naming the
  package. Pairs are cleaned (printf/format placeholders, line breaks and runs of spaces
  removed; untranslated, empty and repeated sources dropped, the first in pinned order
  kept), kept when both sides have ``min_words``..``max_words`` words, and split by a
  hash of the source sentence (6% validation, 6% test), so the split of a sentence never
  depends on what else is in the corpus. The corpus's SHA-256 and sizes go into the run.

Subwords: one joint sentencepiece model (unigram) trained on the training pairs of both
languages, cached under ``$KDLAB_CACHE/tokenizers`` (or ``~/.cache/kdlab``) by the hash
of the corpus and the tokenizer settings, so every run of a corpus shares it.
"""

from __future__ import annotations

import gettext
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

LOCALE_DIR = Path("/usr/share/locale/de/LC_MESSAGES")
BUILTIN = "builtin:de-catalogues"

# catalogue -> Debian package that ships it (`.ci/run` installs the missing ones)
PINNED_CATALOGUES = {
    "git": "git", "postgres-15": "postgresql-15", "coreutils": "coreutils", "gnupg2": "gnupg-l10n",
    "mit-krb5": "krb5-locales", "gtk30": "libgtk-3-common", "gtk30-properties": "libgtk-3-common",
    "libc": "libc-l10n", "psql-15": "postgresql-client-15", "glib20": "libglib2.0-data", "dpkg": "dpkg",
    "gettext-tools": "gettext", "dpkg-dev": "libdpkg-perl", "procps-ng": "procps", "wget": "wget", "tar": "tar",
    "shadow": "login", "bash": "bash", "pg_dump-15": "postgresql-client-15", "make": "make", "apt": "apt",
    "libapt-pkg6.0": "libapt-pkg6.0", "grep": "grep", "findutils": "findutils", "sed": "sed",
}

SPLIT_PERCENT = {"valid": 6, "test": 6}  # the rest is training data

_PRINTF = re.compile(r"%(?:\d+\$)?[-+ #0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?(?:hh|h|ll|l|L|q|j|z|t|I64|I32)?"
                     r"[diouxXeEfFgGaAcspn]|%\([A-Za-z_][A-Za-z0-9_]*\)[sdrif]|%<PRI[a-zA-Z0-9]+>|\{[A-Za-z0-9_]*\}")
_SPACES = re.compile(r"\s+")


def clean(text: str) -> str:
    """Placeholders out, ``%%`` -> ``%``, line breaks and runs of whitespace -> one space."""
    text = _PRINTF.sub("", text).replace("%%", "%")
    return _SPACES.sub(" ", text).strip()


def read_catalogue(path: Path) -> list[tuple[str, str]]:
    """(English, German) pairs of a compiled gettext catalogue, in file order: singular
    messages and the first form of plural ones, message context removed."""
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read the message catalogue ({err.strerror})") from None
    try:
        with handle:
            catalogue = gettext.GNUTranslations(handle)._catalog
    except (OSError, UnicodeDecodeError, ValueError, IndexError, KeyError, struct.error) as err:
        # what gettext raises on broken files (OSError "Bad magic number", truncated tables, bad charsets)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise DataError(f"{path}: not a readable gettext catalogue ({reason})") from None
    pairs = []
    for key, german in catalogue.items():
        if isinstance(key, tuple):
            if key[1] != 0:
                continue
            key = key[0]
        english = key.split("\x04", 1)[-1]  # msgctxt\x04msgid
        if english and german:
            pairs.append((english, german))
    return pairs


@dataclass
class Corpus:
    """Cleaned sentence pairs by split, and where they came from."""

    splits: dict[str, list[tuple[str, str]]]
    source: str
    sha256: str
    details: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"source": self.source, "sha256": self.sha256,
                "pairs": {name: len(pairs) for name, pairs in self.splits.items()}, **self.details}


def split_of(english: str) -> str:
    """valid / test / train by the source sentence's hash (stable whatever the corpus)."""
    bucket = int(hashlib.sha256(english.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < SPLIT_PERCENT["valid"]:
        return "valid"
    if bucket < SPLIT_PERCENT["valid"] + SPLIT_PERCENT["test"]:
        return "test"
    return "train"


def _digest(splits: dict) -> str:
    digest = hashlib.sha256()
    for name in ("train", "valid", "test"):
        for english, german in splits[name]:
            digest.update(f"{name}\t{english}\t{german}\n".encode("utf-8"))
    return digest.hexdigest()


def _words_ok(text: str, min_words: int, max_words: int) -> bool:
    return min_words <= len(text.split()) <= max_words


def builtin_corpus(min_words: int = 3, max_words: int = 40, locale_dir: Path = LOCALE_DIR,
                   catalogues: dict[str, str] = PINNED_CATALOGUES) -> Corpus:
    """The pinned German catalogues of this machine as a cleaned, split corpus."""
    missing = [name for name in catalogues if not (Path(locale_dir) / f"{name}.mo").is_file()]
    if missing:
        packages = sorted({catalogues[name] for name in missing})
        raise DataError(f"{BUILTIN}: {len(missing)} pinned catalogue(s) missing from {locale_dir} "
                        f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): "
                        f"apt-get install {' '.join(packages)}")
    seen: set[str] = set()
    splits: dict[str, list] = {"train": [], "valid": [], "test": []}
    counts = {}
    for name in catalogues:
        kept = 0
        for english, german in read_catalogue(Path(locale_dir) / f"{name}.mo"):
            english, german = clean(english), clean(german)
            if not english or not german or english == german or english in seen:
                continue
            seen.add(english)
            if _words_ok(english, min_words, max_words) and _words_ok(german, min_words, max_words):
                splits[split_of(english)].append((english, german))
                kept += 1
        counts[name] = kept
    details = {"catalogues": counts, "min_words": min_words, "max_words": max_words}
    return Corpus(splits, BUILTIN, _digest(splits), details)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None


def folder_corpus(root: Path, min_words: int = 1, max_words: int = 250) -> Corpus:
    """``root/{train,valid,test}.{en,de}`` (line-aligned) or ``root/{split}.tsv``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root={root}: no such directory (parallel text: train.en/train.de, valid.*, test.*, "
                        "or train.tsv/valid.tsv/test.tsv)")
    splits = {}
    for name in ("train", "valid", "test"):
        en, de, tsv = root / f"{name}.en", root / f"{name}.de", root / f"{name}.tsv"
        if en.is_file() or de.is_file():
            if not (en.is_file() and de.is_file()):
                raise DataError(f"{root}: {en.name if not en.is_file() else de.name} is missing beside "
                                f"{de.name if not en.is_file() else en.name}")
            left, right = _read_lines(en), _read_lines(de)
            if len(left) != len(right):
                raise DataError(f"{root}: {en.name} has {len(left)} lines but {de.name} has {len(right)}")
            pairs = list(zip(left, right))
        elif tsv.is_file():
            pairs = []
            for number, line in enumerate(_read_lines(tsv), start=1):
                parts = line.split("\t")
                if len(parts) != 2:
                    raise DataError(f"{tsv}:{number}: expected 'english<TAB>german', found {len(parts)} field(s)")
                pairs.append((parts[0], parts[1]))
        else:
            raise DataError(f"{root}: no {name}.en/{name}.de or {name}.tsv")
        splits[name] = [(e.strip(), g.strip()) for e, g in pairs
                        if _words_ok(e, min_words, max_words) and _words_ok(g, min_words, max_words)]
        if not splits[name]:
            raise DataError(f"{root}: the {name} split has no sentence pair of {min_words}..{max_words} words")
    details = {"min_words": min_words, "max_words": max_words}
    return Corpus(splits, str(root.resolve()), _digest(splits), details)


# --- subwords ----------------------------------------------------------------------------

PAD, UNK, BOS, EOS = 0, 1, 2, 3


def cache_dir() -> Path:
    return Path(os.environ.get("KDLAB_CACHE") or Path.home() / ".cache" / "kdlab") / "tokenizers"


def tokenizer(corpus: Corpus, vocab_size: int, directory: Path | None = None, log=print):
    """The joint sentencepiece model of ``corpus`` (trained once, then read from the cache):
    ids 0 pad, 1 unk, 2 bos, 3 eos."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_file(corpus, vocab_size, directory, log)))


def tokenizer_file(corpus: Corpus, vocab_size: int, directory: Path | None = None, log=print) -> Path:
    """The cached sentencepiece model file of ``corpus`` (trained here the first time)."""
    try:
        import sentencepiece as spm
    except ImportError:
        raise DataError("translation needs sentencepiece: pip install 'kdlab[text]'") from None
    settings = {"corpus": corpus.sha256, "vocab_size": vocab_size, "model_type": "unigram",
                "character_coverage": 1.0, "threads": 1, "version": spm.__version__}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(directory or cache_dir())
    model = directory / f"spm-{key}.model"
    if not model.is_file():
        from filelock import FileLock

        directory.mkdir(parents=True, exist_ok=True)
        from ..runs import lock_file

        with FileLock(lock_file(directory / f"spm-{key}.lock")):
            if not model.is_file():  # another process may have trained it while we waited
                log(f"training a {vocab_size}-piece sentencepiece model on {len(corpus.splits['train']):,} pairs "
                    f"-> {model}")
                sentences = [s for pair in corpus.splits["train"] for s in pair]
                tmp = directory / f".spm-{key}.{os.getpid()}"
                try:
                    spm.SentencePieceTrainer.train(
                        sentence_iterator=iter(sentences), model_prefix=str(tmp), vocab_size=vocab_size,
                        model_type="unigram", character_coverage=1.0, pad_id=PAD, unk_id=UNK, bos_id=BOS,
                        eos_id=EOS, num_threads=1, minloglevel=2, input_sentence_size=0,
                        shuffle_input_sentence=False)
                except RuntimeError as err:
                    for leftover in directory.glob(f"{tmp.name}.*"):
                        leftover.unlink(missing_ok=True)
                    reason = str(err).strip().splitlines()[-1]
                    hint = ": lower data.vocab_size" if "vocab" in reason.lower() else ""
                    raise DataError(f"sentencepiece could not train {vocab_size} pieces on this corpus "
                                    f"({reason}){hint}") from None
                os.replace(f"{tmp}.vocab", directory / f"spm-{key}.vocab")
                os.replace(f"{tmp}.model", model)  # last: the model file's presence means complete
    return model


# --- token batches -----------------------------------------------------------------------

def token_batches(src_lengths, tgt_lengths, max_tokens: int, generator=None) -> list[list[int]]:
    """Batches of sentence indices under a token budget (tensor2tensor / fairseq style):
    sentences sorted by (target, source) length so a batch pads little, cut so that
    batch size × its longest side ≤ ``max_tokens``; the batch order is shuffled by
    ``generator`` (a torch.Generator; None keeps the sorted order, for evaluation), and
    ties in length are broken by index, so the batches are a function of the lengths,
    the budget and the generator's state."""
    import torch

    n = len(src_lengths)
    if n != len(tgt_lengths):
        raise ValueError("src_lengths and tgt_lengths differ in length")
    longest = max((max(s, t) for s, t in zip(src_lengths, tgt_lengths)), default=0)
    if longest > max_tokens:
        raise DataError(f"data.max_tokens={max_tokens}: a sentence has {longest} tokens; raise the budget or lower "
                        "data.max_words")
    order = sorted(range(n), key=lambda i: (tgt_lengths[i], src_lengths[i], i))
    batches, current, width = [], [], 0
    for i in order:
        side = max(src_lengths[i], tgt_lengths[i])
        if current and max(width, side) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, side)
    if current:
        batches.append(current)
    if generator is not None:
        batches = [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


# --- BLEU ----------------------------------------------------------------------------------

def corpus_bleu(hypotheses: list[str], references: list[str], lowercase: bool = True) -> tuple[float, str]:
    """(BLEU, sacrebleu's signature) of detokenized sentences: one reference each,
    uncased by default as Müller reports it, sacrebleu's standard 13a tokenization."""
    try:
        import sacrebleu
    except ImportError:
        raise DataError("BLEU needs sacrebleu: pip install 'kdlab[text]'") from None
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    metric = sacrebleu.metrics.BLEU(lowercase=lowercase)
    score = metric.corpus_score(hypotheses, [references])
    return score.score, str(metric.get_signature())
