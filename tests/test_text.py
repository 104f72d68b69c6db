"""Parallel text: gettext catalogues as a corpus (tiny .mo files written here), cleaning,
the hash split, parallel-text folders, and the cached sentencepiece model."""

import struct
from pathlib import Path

import pytest

from kdlab.data.text import (BUILTIN, Corpus, builtin_corpus, clean, folder_corpus, read_catalogue, split_of,
                             tokenizer)
from kdlab.errors import DataError


def write_mo(path: Path, messages: dict) -> Path:
    """A GNU .mo file (format revision 0, no hash table), as msgfmt writes one. Keys:
    msgid, or (msgid, msgid_plural) with a list of forms; "" is the header."""
    entries = []
    for key, value in messages.items():
        if isinstance(key, tuple):
            entries.append(("\0".join(key).encode(), "\0".join(value).encode()))
        else:
            entries.append((key.encode(), value.encode()))
    entries.sort()
    n = len(entries)
    originals_at, translations_at = 28, 28 + 8 * n
    data_at = translations_at + 8 * n
    blob, originals, translations = b"", [], []
    for source, _ in entries:
        originals.append((len(source), data_at + len(blob)))
        blob += source + b"\0"
    for _, target in entries:
        translations.append((len(target), data_at + len(blob)))
        blob += target + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, n, originals_at, translations_at, 0, data_at)
    tables = b"".join(struct.pack("<2I", *p) for p in originals) + b"".join(struct.pack("<2I", *p) for p in translations)
    path.write_bytes(header + tables + blob)
    return path


HEADER = {"": "Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=2; plural=(n != 1);\n"}


def test_a_catalogue_reads_as_english_german_pairs(tmp_path):
    path = write_mo(tmp_path / "tool.mo", {
        **HEADER,
        "cannot open file %s for reading": "kann Datei %s nicht zum Lesen öffnen",
        ("%d file was removed", "%d files were removed"): ["%d Datei wurde entfernt", "%d Dateien wurden entfernt"],
        "menu\x04Open the file": "Die Datei öffnen",
        "untranslated message here": "",
    })
    pairs = sorted(read_catalogue(path))
    assert pairs == sorted([("cannot open file %s for reading", "kann Datei %s nicht zum Lesen öffnen"),
                            ("%d file was removed", "%d Datei wurde entfernt"),
                            ("Open the file", "Die Datei öffnen")])
    (tmp_path / "broken.mo").write_bytes(b"\x00" * 40)
    with pytest.raises(DataError, match="broken.mo: not a readable gettext catalogue"):
        read_catalogue(tmp_path / "broken.mo")


def test_cleaning_removes_placeholders_and_line_breaks():
    assert clean("cannot open %s:\n  %s (%d%%)") == "cannot open : (%)"
    assert clean("%1$s of %2$-10lu items, {0} left, %(name)s done") == "of items, left, done"
    assert clean("a\tb\n\nc  ") == "a b c"


def test_the_builtin_corpus_from_pinned_catalogues(tmp_path):
    locale = tmp_path / "LC_MESSAGES"
    locale.mkdir()
    write_mo(locale / "one.mo", {**HEADER, "the quick brown fox": "der schnelle braune Fuchs",
                                 "same words in both": "same words in both", "two words": "zwei Wörter",
                                 "print the %s file now": "jetzt die %s Datei drucken"})
    write_mo(locale / "two.mo", {**HEADER, "the quick brown fox": "ein schneller brauner Fuchs",
                                 "jumps over the lazy dog": "springt über den faulen Hund"})
    corpus = builtin_corpus(locale_dir=locale, catalogues={"one": "pkg-one", "two": "pkg-two"})
    pairs = [p for split in corpus.splits.values() for p in split]
    # untranslated and too short dropped; the first translation of a repeated source kept
    assert sorted(pairs) == sorted([("the quick brown fox", "der schnelle braune Fuchs"),
                                    ("print the file now", "jetzt die Datei drucken"),
                                    ("jumps over the lazy dog", "springt über den faulen Hund")])
    assert all(split_of(e) == name for name, split in corpus.splits.items() for e, _ in split)
    assert corpus.details["catalogues"] == {"one": 2, "two": 1} and len(corpus.sha256) == 64
    again = builtin_corpus(locale_dir=locale, catalogues={"one": "pkg-one", "two": "pkg-two"})
    assert again.sha256 == corpus.sha256
    with pytest.raises(DataError, match=r"missing .*three.*apt-get install pkg-three"):
        builtin_corpus(locale_dir=locale, catalogues={"one": "pkg-one", "three": "pkg-three"})


def test_the_split_depends_on_the_sentence_only():
    sentences = [f"sentence number {i}" for i in range(5000)]
    splits = [split_of(s) for s in sentences]
    share = {name: splits.count(name) / len(splits) for name in ("train", "valid", "test")}
    assert 0.05 < share["valid"] < 0.07 and 0.05 < share["test"] < 0.07
    assert [split_of(s) for s in reversed(sentences)] == splits[::-1]


@pytest.mark.skipif(not Path("/usr/share/locale/de/LC_MESSAGES/git.mo").is_file(), reason="no German catalogues")
def test_this_machines_catalogues():
    corpus = builtin_corpus()
    sizes = corpus.describe()["pairs"]
    assert corpus.source == BUILTIN and sizes["train"] > 15000 and sizes["valid"] > 800 and sizes["test"] > 800


def test_parallel_text_folders(tmp_path):
    for name in ("train", "valid", "test"):
        (tmp_path / f"{name}.en").write_text("a small house\nthe big tree\n")
        (tmp_path / f"{name}.de").write_text("ein kleines Haus\nder große Baum\n")
    corpus = folder_corpus(tmp_path)
    assert corpus.splits["train"] == [("a small house", "ein kleines Haus"), ("the big tree", "der große Baum")]
    (tmp_path / "test.de").write_text("nur eine Zeile\n")
    with pytest.raises(DataError, match="test.en has 2 lines but test.de has 1"):
        folder_corpus(tmp_path)
    for name in ("test.en", "test.de"):
        (tmp_path / name).unlink()
    (tmp_path / "test.tsv").write_text("one\tzwei\tdrei\n")
    with pytest.raises(DataError, match=r"test.tsv:1: expected 'english<TAB>german', found 3"):
        folder_corpus(tmp_path)
    with pytest.raises(DataError, match="no such directory"):
        folder_corpus(tmp_path / "nope")


def test_the_tokenizer_is_trained_once_per_corpus_and_cached(tmp_path):
    pytest.importorskip("sentencepiece")
    words = ["house", "tree", "small", "big", "the", "a", "garden", "river", "city", "green"]
    german = ["Haus", "Baum", "klein", "groß", "der", "ein", "Garten", "Fluss", "Stadt", "grün"]
    pairs = [(f"{words[i % 10]} {words[(i * 3) % 10]} {words[(i * 7) % 10]}",
              f"{german[i % 10]} {german[(i * 3) % 10]} {german[(i * 7) % 10]}") for i in range(300)]
    corpus = Corpus({"train": pairs, "valid": pairs[:5], "test": pairs[:5]}, "test", "c0ffee" * 10 + "abcd")
    messages = []
    first = tokenizer(corpus, 40, tmp_path, log=messages.append)
    assert len(messages) == 1 and first.get_piece_size() == 40
    assert (first.pad_id(), first.unk_id(), first.bos_id(), first.eos_id()) == (0, 1, 2, 3)
    ids = first.encode("the small garden")
    assert first.decode(ids) == "the small garden"
    second = tokenizer(corpus, 40, tmp_path, log=messages.append)
    assert len(messages) == 1 and second.encode("the small garden") == ids  # from the cache
    assert len(list(tmp_path.glob("spm-*.model"))) == 1 and not list(tmp_path.glob(".spm-*"))
    with pytest.raises(DataError, match="lower data.vocab_size"):
        tokenizer(corpus, 5000, tmp_path, log=messages.append)


def test_ci_installs_the_packages_of_the_pinned_catalogues():
    from kdlab.data.text import PINNED_CATALOGUES

    script = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    for name, package in PINNED_CATALOGUES.items():
        assert f"{name}:{package}" in script, f"{name}:{package} missing from .ci/run"


def test_token_batches_respect_the_budget_and_the_generator():
    import random

    import torch

    from kdlab.data.text import token_batches

    rng = random.Random(0)
    src = [rng.randint(1, 40) for _ in range(500)]
    tgt = [rng.randint(1, 40) for _ in range(500)]
    batches = token_batches(src, tgt, 256, torch.Generator().manual_seed(3))
    assert sorted(i for b in batches for i in b) == list(range(500))  # every sentence once
    assert all(len(b) * max(max(src[i], tgt[i]) for i in b) <= 256 for b in batches)
    assert batches == token_batches(src, tgt, 256, torch.Generator().manual_seed(3))
    assert batches != token_batches(src, tgt, 256, torch.Generator().manual_seed(4))
    in_order = token_batches(src, tgt, 256)  # evaluation: sorted by length, no shuffle
    assert sorted(map(tuple, in_order)) == sorted(map(tuple, batches))
    padded = sum(len(b) * max(tgt[i] for i in b) for b in in_order)
    assert padded < 1.2 * sum(tgt)  # sorted batches pad little
    with pytest.raises(DataError, match="data.max_tokens=30: a sentence has 40 tokens"):
        token_batches([40], [3], 30)


def test_bleu_is_sacrebleus_uncased_corpus_bleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    from kdlab.data.text import corpus_bleu

    hypotheses = ["Die Datei wurde nicht gefunden .", "Das ist ein kleiner Test", "kein Treffer hier"]
    references = ["die Datei wurde nicht gefunden.", "Das ist nur ein kleiner Test", "alles anders"]
    score, signature = corpus_bleu(hypotheses, references)
    assert score == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references], lowercase=True).score)
    assert score > sacrebleu.corpus_bleu(hypotheses, [references]).score  # casing counts when cased
    assert "case:lc" in signature and "tok:13a" in signature
    assert corpus_bleu(references, references)[0] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="3 hypotheses for 2 references"):
        corpus_bleu(hypotheses, references[:2])
