"""Translation through the one training loop (data.name=translation): a tiny parallel-text
folder, a tiny Transformer, Adam with the inverse-square-root schedule; what the run dir
keeps (token calibration arrays, translations, BLEU), exact resume within an epoch,
word-level distillation from a translation teacher, and the errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sentencepiece")
pytest.importorskip("sacrebleu")

from conftest import config_with  # noqa: E402
from kdlab.config import build_config  # noqa: E402
from kdlab.errors import ConfigError, DataError  # noqa: E402
from kdlab.runs import read_metrics  # noqa: E402
from kdlab.train import train  # noqa: E402

QUIET = {"progress": False, "log": lambda *a: None}
TIME_KEYS = {"epoch_time_s", "tokens_per_s"}
ENGLISH = "zero one two three four five six seven eight nine".split()
GERMAN = "null eins zwei drei vier fünf sechs sieben acht neun".split()


def write_corpus(root: Path, sizes=(240, 30, 30), seed=0) -> Path:
    """Numbers spelled out, English -> German, 3-7 words a sentence: a real (if easy) task."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), sizes):
        rows = [rng.integers(0, 10, rng.integers(3, 8)) for _ in range(n)]
        (root / f"{split}.en").write_text("".join(" ".join(ENGLISH[k] for k in r) + "\n" for r in rows))
        (root / f"{split}.de").write_text("".join(" ".join(GERMAN[k] for k in r) + "\n" for r in rows))
    return root


@pytest.fixture(autouse=True)
def _tokenizer_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE", str(tmp_path / "cache"))


def _config(tmp_path, **extra):
    base = {"out_dir": str(tmp_path / "runs"), "threads": 1, "name": "mt",
            "data": {"name": "translation", "root": str(write_corpus(tmp_path / "text")), "vocab_size": 40,
                     "max_tokens": 160, "calibration_tokens": 120},
            "model": {"name": "transformer-1-16-2"},
            "optim": {"optimizer": "adam", "lr": 0.01, "schedule": "inverse_sqrt", "warmup_steps": 10, "epochs": 2,
                      "weight_decay": 0.0},
            "loss": {"smoothing": 0.1}, "decode": {"beam": 2}}
    return config_with(base, **extra)


def test_a_translation_run_keeps_calibration_tokens_translations_and_bleu(tmp_path):
    result = train(_config(tmp_path, decode={"beam": 2, "temperatures": [0.5, 1.0, 2.0],
                                              "temperature_sentences": 12}), **QUIET)
    run = Path(result["run_dir"])
    corpus = result["corpus"]
    assert corpus["pairs"] == {"train": 240, "valid": 30, "test": 30} and corpus["vocab_size"] == 40
    assert result["tokens_per_s"] > 0 and result["num_classes"] == 40
    epochs = read_metrics(run, "epochs")
    assert [m["epoch"] for m in epochs] == [1, 2]
    assert {"val_acc", "val_nll", "test_acc", "test_nll", "tokens_per_s"} <= set(epochs[-1])
    # inverse sqrt: lr · min(step / 10, sqrt(10 / step)) at the epoch's last step
    steps = corpus["steps_per_epoch"]
    assert steps > 10 and [m["lr"] for m in epochs] == pytest.approx([0.01 * (10 / steps) ** 0.5,
                                                                       0.01 * (10 / (2 * steps)) ** 0.5])

    val = np.load(run / "eval_val_tokens.npz")
    n = len(val["labels"])
    assert n >= 120 and val["features"].shape == (n, 16) and val["top5_ids"].shape == (n, 5)
    assert np.all((val["confidence"] > 0) & (val["confidence"] <= 1))
    assert np.all(val["label_logprob"] <= val["top5_logprob"][:, 0] + 1e-5)
    assert np.array_equal(val["correct"], val["top5_ids"][:, 0] == val["labels"])
    # every target token of whole sentences, EOS (id 3) closing each
    ends = np.flatnonzero(np.diff(val["sentence"]))
    assert np.all(val["labels"][ends] == 3) and val["labels"][-1] == 3
    calibration = result["token_calibration"]
    assert calibration["tokens"] == n and calibration["nll_ts"] <= calibration["nll"] + 1e-9
    grid = calibration["grid"]
    assert len(grid["temperature"]) == len(grid["ece"]) == len(grid["nll"])
    assert np.load(run / "eval_train_tokens.npz")["labels"].shape[0] >= n

    bleu = result["bleu"]
    assert {"val_greedy", "test_greedy", "test_beam2"} <= set(bleu) and "case:lc" in bleu["signature"]
    for key, split in (("val_greedy", "valid"), ("test_greedy", "test"), ("test_beam2", "test")):
        name = f"translations_{key.split('_')[0]}_{key.split('_')[1]}.txt"
        lines = (run / name).read_text().splitlines()
        assert len(lines) == corpus["pairs"][split] and 0 <= bleu[key]["bleu"] <= 100
        references = (run / f"references_{key.split('_')[0]}.txt").read_text().splitlines()
        assert len(references) == len(lines) and all(r.split()[0] in GERMAN for r in references)
    curve = result["bleu_temperature"]
    assert curve["temperature"] == [0.5, 1.0, 2.0] and curve["sentences"] == 12 and curve["beam"] == 2
    assert len(curve["bleu"]) == 3 and all(0 <= b <= 100 for b in curve["bleu"])
    config = json.loads(json.dumps(result))  # plain JSON
    assert config["model"] == "transformer-1-16-2"


def test_resume_within_an_epoch_is_exact(tmp_path):
    whole = Path(train(_config(tmp_path / "a"), **QUIET)["run_dir"])
    cfg = _config(tmp_path / "b", checkpoint_every_steps=4)
    assert train(cfg, stop_after_step=6, **QUIET) is None
    assert torch.load(cfg.run_dir() / "checkpoint.pt", weights_only=True)["step_in_epoch"] == 8
    cut = Path(train(cfg, **QUIET)["run_dir"])
    strip = lambda run: [{k: v for k, v in m.items() if k not in TIME_KEYS}  # noqa: E731
                         for m in read_metrics(run, "all")]
    assert strip(whole) == strip(cut)
    x, y = (torch.load(d / "model.pt", weights_only=True) for d in (whole, cut))
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert (whole / "translations_test_beam2.txt").read_text() == (cut / "translations_test_beam2.txt").read_text()


def test_word_level_distillation_from_a_translation_teacher(tmp_path):
    teacher = train(_config(tmp_path, name="teacher"), **QUIET)["run_dir"]
    student = train(_config(tmp_path, name="student", loss={"alpha": 1.0, "kd": "kl", "tau": float("inf")},
                            teacher={"runs": [teacher]}, model={"name": "transformer-1-8-2"}), **QUIET)
    final = student["final"]
    assert 0 <= final["test_agreement"] <= 1 and final["test_logit_distance"] > 0
    # a teacher of another corpus (same vocabulary size) or vocabulary is refused before anything is written
    other = _config(tmp_path, name="other", teacher={"runs": [teacher]}, loss={"alpha": 0.5},
                    data={"root": str(write_corpus(tmp_path / "other-text", seed=1))})
    with pytest.raises(ConfigError, match="another corpus or vocabulary"):
        train(other, **QUIET)
    assert not other.run_dir().exists()
    with pytest.raises(ConfigError, match="predicts 40 classes but the dataset has 30"):
        train(_config(tmp_path, name="other", teacher={"runs": [teacher]}, loss={"alpha": 0.5},
                      data={"vocab_size": 30}), **QUIET)


def test_translation_config_and_data_errors(tmp_path):
    with pytest.raises(ConfigError, match="transformer-\\* model"):
        build_config({"data": {"name": "translation"}, "model": {"name": "wrn-16-2"}})
    with pytest.raises(ConfigError, match="needs data.name=translation"):
        build_config({"model": {"name": "transformer-2-64-4"}})
    with pytest.raises(ConfigError, match="runs its teacher online"):
        build_config({"data": {"name": "translation"}, "model": {"name": "transformer-2-64-4"},
                      "loss": {"alpha": 1.0}, "teacher": {"runs": ["x"], "cache": {"mode": "lazy"}}})
    with pytest.raises(ConfigError, match="inverse_sqrt needs optim.warmup_steps"):
        build_config({"optim": {"schedule": "inverse_sqrt"}})
    cfg = _config(tmp_path, data={"root": str(tmp_path / "nowhere")})
    with pytest.raises(DataError, match="no such directory"):
        train(cfg, **QUIET)
    # the image hash is unchanged by the translation keys
    assert build_config({}).run_hash() == "9ca01ceb"


def test_analyze_a_translation_run(tmp_path):
    from kdlab.analysis.analyze import analyze_run

    run = Path(train(_config(tmp_path), **QUIET)["run_dir"])
    report = analyze_run(run, n_bootstrap=20, log=lambda *a: None)
    ts = report["temperature_scaling"]
    assert report["kind"] == "translation" and ts["nll_after"] <= ts["nll_before"] + 1e-6
    cal = report["calibration_val_tokens"]
    assert cal["ece"]["low"] <= cal["ece"]["value"] <= cal["ece"]["high"]
    proj = report["projection"]
    assert len(proj["classes"]) == 3 and set(proj["tightness"]) == {"train", "val"}
    assert all(name.startswith("▁") and name[1:].isalpha() for name in proj["class_names"])  # whole words
    for key in ("reliability", "temperature_curve", "projection"):
        assert Path(report["figures"][key]).is_file()
    # tokens by piece name
    names = proj["class_names"]
    again = analyze_run(run, classes=names[::-1], n_bootstrap=5, figures=False, log=lambda *a: None)
    assert again["projection"]["class_names"] == names[::-1]
    with pytest.raises(Exception, match="no piece"):
        analyze_run(run, classes=["▁nope", names[0], names[1]], n_bootstrap=5, figures=False, log=lambda *a: None)


def _cli(argv, capsys) -> tuple[int, str, str]:
    from kdlab.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as err:  # argparse's errors (one line too)
        code = err.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdlab: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_translate_decodes_a_finished_run_again_without_training(tmp_path, capsys):
    cfg = _config(tmp_path)
    result = train(cfg, **QUIET)
    run = Path(result["run_dir"])
    assert result["decode"] == {"beam": 2, "alpha": 0.6, "extra_length": 50, "temperatures": [],
                                "temperature_sentences": None}
    kept = {name: (run / name).read_bytes() for name in ("result.json", "model.pt", "metrics.jsonl", "config.yaml",
                                                         "translations_test_beam2.txt", "eval_val_tokens.npz")}
    files = sorted(p.name for p in run.iterdir())

    # the run's own settings again: the very translations and BLEU the run wrote
    code, out, err = _cli(["translate", str(run), "--beam", "2", "--no-progress"], capsys)
    assert code == 0, err
    same = run / "decode" / "test-beam2-alpha0.6-extra50"
    assert (same / "translations_test_beam2.txt").read_bytes() == kept["translations_test_beam2.txt"]
    scored = json.loads((same / "bleu.json").read_text())
    assert scored["bleu"] == pytest.approx(result["bleu"]["test_beam2"]["bleu"]) and "BLEU (beam2)" in out
    assert scored["run_hash"] == cfg.run_hash() and scored["signature"] == result["bleu"]["signature"]

    # another beam, a length penalty and the BLEU-against-T curve: new files beside the run's own
    code, out, err = _cli(["translate", str(run), "--beam", "3", "--alpha", "1", "--temperatures", "0.5,2",
                           "--temperature-sentences", "10", "--no-progress"], capsys)
    assert code == 0, err
    other = run / "decode" / "test-beam3-alpha1-extra50-T0.5_2-first10"
    lines = (other / "translations_test_beam3.txt").read_text().splitlines()
    assert len(lines) == 30
    scored = json.loads((other / "bleu.json").read_text())
    assert 0 <= scored["bleu"] <= 100 and scored["sentences"] == 30 and scored["kind"] == "beam3"
    assert scored["decode"] == {"beam": 3, "alpha": 1.0, "extra_length": 50, "temperatures": [0.5, 2.0],
                                "temperature_sentences": 10}
    curve = scored["bleu_temperature"]
    assert curve["temperature"] == [0.5, 2.0] and curve["sentences"] == 10 and len(curve["bleu"]) == 2
    assert "against T" in out
    # greedy, on validation
    code, out, err = _cli(["translate", str(run), "--beam", "0", "--split", "val", "--no-progress"], capsys)
    assert code == 0, err
    assert (run / "decode" / "test-beam2-alpha0.6-extra50").is_dir()
    greedy = run / "decode" / "val-greedy-extra50" / "translations_val_greedy.txt"
    assert greedy.read_bytes() == (run / "translations_val_greedy.txt").read_bytes()

    # nothing of the run changed, and nothing trained: the same files, byte for byte
    assert {name: (run / name).read_bytes() for name in kept} == kept
    assert sorted(p.name for p in run.iterdir()) == sorted(files + ["decode"])
    # decoding is not part of the hash: other decode settings name the same (finished) run
    again = _config(tmp_path, decode={"beam": 5, "alpha": 1.0, "extra_length": 20, "temperatures": [1.5]})
    assert again.run_hash() == cfg.run_hash() and again.run_dir() == run
    assert train(again, **QUIET) == json.loads(kept["result.json"])
    assert (run / "metrics.jsonl").read_bytes() == kept["metrics.jsonl"]

    # bad input on a finished run: one line, exit 2, nothing written
    for argv, needles in (
            (["--beam", "-1"], ["--beam", "-1"]),
            (["--temperatures", "0,1"], ["--temperatures", "> 0"]),
            (["--temperatures", "1,x"], ["--temperatures", "1,x"]),
            (["--beam", "1", "--temperatures", "1"], ["needs beam search"]),
            (["--alpha", "-0.5"], ["--alpha"]),
            (["--extra-length", "0"], ["--extra-length"]),
            (["--temperature-sentences", "0", "--temperatures", "1"], ["--temperature-sentences"]),
            (["--device", "tpu"], ["--device"]),
            (["--split", "train"], ["--split"]),
            (["--beam", "two"], ["--beam"]),
            (["--beam", "100000", "--memory-limit-gb", "1"], ["--beam 100000", "GB", "limit is 1 GB"])):
        code, out, err = _cli(["translate", str(run), "--no-progress", *argv], capsys)
        _one_error_line(code, err, *needles)
    assert sorted(p.name for p in (run / "decode").iterdir()) == [
        "test-beam2-alpha0.6-extra50", "test-beam3-alpha1-extra50-T0.5_2-first10", "val-greedy-extra50"]


def test_a_beam_search_too_big_for_memory_is_refused_before_training(tmp_path, capsys):
    cfg = _config(tmp_path)
    path = tmp_path / "mt.yaml"
    path.write_text(cfg.to_yaml())
    code, out, err = _cli(["train", str(path), "decode.beam=100000", "memory_limit_gb=16", "--no-progress"], capsys)
    _one_error_line(code, err, "decode.beam=100000 beam search", "test sentences × 100,000 beams × 40 pieces",
                    "limit is 16 GB")
    assert not (tmp_path / "runs").exists()
    # the estimate grows with the beam and the vocabulary, and a beam of 2 is far below it
    from kdlab.data import load_dataset
    from kdlab.translate import beam_search_bytes, decoder_size

    data = load_dataset(cfg.data)
    size = decoder_size(cfg.model.name, data.num_classes)
    small, where = beam_search_bytes(data, "test", 2, 50, size)
    big, _ = beam_search_bytes(data, "test", 100000, 50, size)
    assert where["split"] == "test" and where["steps"] <= max(len(s) for s in data.src["test"]) + 50
    assert 16e9 < big and small < 50e6 and big > 40000 * small


def test_translate_refuses_what_is_not_a_finished_translation_run(tmp_path, capsys):
    code, out, err = _cli(["translate", str(tmp_path / "nowhere")], capsys)
    _one_error_line(code, err, "does not exist")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    code, out, err = _cli(["translate", str(unfinished)], capsys)
    _one_error_line(code, err, "no config.yaml")
    (unfinished / "config.yaml").write_text(_config(tmp_path).to_yaml())
    code, out, err = _cli(["translate", str(unfinished), "--beam", "2"], capsys)
    _one_error_line(code, err, "not finished")
    images = tmp_path / "images"
    images.mkdir()
    (images / "config.yaml").write_text(build_config({}).to_yaml())
    (images / "result.json").write_text("{}")
    code, out, err = _cli(["translate", str(images)], capsys)
    _one_error_line(code, err, "decodes translation runs")
    assert sorted(p.name for p in unfinished.iterdir()) == ["config.yaml"]
    assert sorted(p.name for p in images.iterdir()) == ["config.yaml", "result.json"]
