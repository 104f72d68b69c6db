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
