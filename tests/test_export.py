"""``kdlab export``: a finished run as a folder to publish (kdlab/export.py). The folder loads
back with identical logits (through kdlab's loader, plain safetensors + build_model, and timm
for a ``timm:`` student), teaches a student exactly as the run does, and carries a model card
whose front matter is YAML with the Hub's keys. Bad input is one line, exit 2, nothing written."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

safetensors = pytest.importorskip("safetensors.torch", reason="kdlab export needs safetensors (kdlab[export])")

from conftest import write_image_folder  # noqa: E402
from kdlab import export_run, load_run  # noqa: E402
from kdlab.analysis.analyze import analyze_run  # noqa: E402
from kdlab.cli import main  # noqa: E402
from kdlab.config import build_config  # noqa: E402
from kdlab.data import load_dataset  # noqa: E402
from kdlab.models import build_model  # noqa: E402
from kdlab.runs import load_finished_model  # noqa: E402
from kdlab.train import train  # noqa: E402

TINY = {"threads": 1, "data": {"name": "digits", "val_size": 200},
        "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05, "schedule": "constant"}}


def _train(out: Path, **extra) -> Path:
    return Path(train(build_config({**TINY, "out_dir": str(out), **extra}), progress=False)["run_dir"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A digits teacher (analysed: calibration intervals) and a student distilled from it."""
    root = tmp_path_factory.mktemp("export")
    teacher = _train(root / "runs", name="teacher", model={"name": "mlp-32"})
    analyze_run(teacher, n_bootstrap=5, figures=False, log=lambda *a: None)
    student = _train(root / "runs", name="student", model={"name": "mlp-16"},
                     loss={"alpha": 1.0, "tau": 4.0}, teacher={"runs": [str(teacher)]})
    return {"root": root, "teacher": teacher, "student": student}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def test_an_export_loads_back_with_identical_logits(runs, tmp_path):
    out = export_run(runs["teacher"], tmp_path / "teacher-export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "config.yaml", "metrics.jsonl",
                                                     "model.safetensors", "result.json"]
    x = torch.randn(16, 1, 8, 8)
    expected = _logits(load_finished_model(runs["teacher"]), x)
    assert torch.equal(_logits(load_finished_model(out), x), expected)  # kdlab's loader (as a teacher)
    config = json.loads((out / "config.json").read_text())
    plain = build_model(config["architecture"], config["num_classes"],
                        input_shape=config["preprocessing"]["input_shape"])
    plain.load_state_dict(safetensors.load_file(str(out / "model.safetensors")))
    assert torch.equal(_logits(plain.eval(), x), expected)  # safetensors + build_model, no kdlab run involved
    run = load_run(out)
    assert run.finished and run.config == load_run(runs["teacher"]).config and run.final["test_acc"] > 0
    assert torch.equal(_logits(run.model(), x), expected)
    assert config["label_names"] == [str(k) for k in range(10)] and config["kdlab"]["hash"] in runs["teacher"].name

    # config.json says exactly what the run did to a raw input
    data = load_dataset(run.config.data)
    prep = config["preprocessing"]
    raw = data.test_x[:32]
    by_hand = (raw.float() / prep["divide_by"] - torch.tensor(prep["mean"]).view(1, -1, 1, 1)) \
        / torch.tensor(prep["std"]).view(1, -1, 1, 1)
    assert prep["divide_by"] == 255.0 and raw.dtype == torch.uint8
    assert torch.equal(by_hand, data.prepare(raw))


def test_the_model_card_has_hub_front_matter_and_the_runs_story(runs, tmp_path):
    card = (export_run(runs["teacher"], tmp_path / "t") / "README.md").read_text()
    matter = _front_matter(card)
    assert {"library_name", "tags", "datasets", "metrics", "model-index"} <= set(matter)
    assert matter["library_name"] == "kdlab" and matter["datasets"] == ["digits"]
    assert {"kdlab", "ce", "digits", "image-classification"} <= set(matter["tags"])
    assert matter["metrics"] == ["accuracy", "nll", "ece", "brier"]
    (result,) = matter["model-index"][0]["results"]
    assert result["task"]["type"] == "image-classification" and result["dataset"]["split"] == "test"
    accuracy = json.loads((runs["teacher"] / "result.json").read_text())["final"]["test_acc"]
    assert result["metrics"][0] == {"type": "accuracy", "name": "Test accuracy", "value": round(accuracy, 4)}
    for heading in ("## Data", "## Objective", "## Teacher", "## Schedule", "## Accuracy", "## Calibration",
                    "## Provenance", "## How to load"):
        assert heading in card
    assert "| ECE (15 bins) |" in card and "95% interval" in card  # kdlab analyze ran on the teacher
    assert runs["teacher"].name in card and "git commit" in card

    student_card = (export_run(runs["student"], tmp_path / "s") / "README.md").read_text()
    matter = _front_matter(student_card)
    assert {"knowledge-distillation", "kl-tau-4-alpha-1"} <= set(matter["tags"])
    assert f"`{runs['teacher'].name}`" in student_card and "mlp-32" in student_card  # the teacher, described
    assert f"kdlab analyze {runs['student']}" in student_card  # no analysis yet: how to get the intervals
    hub = pytest.importorskip("huggingface_hub")
    parsed = hub.ModelCard(student_card)
    assert parsed.data.library_name == "kdlab" and parsed.data.eval_results[0].metric_type == "accuracy"


def test_an_export_teaches_a_student_exactly_as_the_run_does(runs, tmp_path):
    exported = export_run(runs["teacher"], tmp_path / "exports" / runs["teacher"].name)
    student = {"name": "student", "model": {"name": "mlp-16"}, "loss": {"alpha": 1.0, "tau": 4.0}}
    from_export = _train(tmp_path / "a", **student, teacher={"runs": [str(exported)]})
    from_run = _train(tmp_path / "b", **student, teacher={"runs": [str(runs["teacher"])]})
    assert from_export.name == from_run.name  # the teacher enters the hash by its folder's name
    final = lambda run: json.loads((run / "result.json").read_text())["final"]  # noqa: E731
    assert final(from_export) == final(from_run)
    a, b = (torch.load(run / "model.pt", weights_only=True) for run in (from_export, from_run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_timm_student_exports_for_timm(tmp_path):
    timm = pytest.importorskip("timm", reason="timm not installed (kdlab[timm])")
    folder = write_image_folder(tmp_path / "images", train_per_class=6, val_per_class=3, size=36)
    run = _train(tmp_path / "runs", name="timm", model={"name": "timm:test_resnet"},
                 data={"name": "imagefolder", "root": str(folder), "image_size": 32, "eval_resize": 36,
                       "val_size": 4, "loader_workers": 0, "decoder": "pillow"},
                 optim={"epochs": 1, "batch_size": 8, "lr": 0.01, "schedule": "constant"})
    out = export_run(run, tmp_path / "export")
    x = torch.randn(4, 3, 32, 32)
    expected = _logits(load_finished_model(run), x)
    net = timm.create_model("test_resnet", num_classes=4)  # plain timm, timm's keys
    net.load_state_dict(safetensors.load_file(str(out / "model.safetensors")))
    assert torch.equal(_logits(net.eval(), x), expected)
    assert torch.equal(_logits(load_finished_model(out), x), expected)  # and kdlab's loader (no net. prefix)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 4
    assert config["label_names"] == [f"class_{k:02d}" for k in range(4)]
    pretrained = config["pretrained_cfg"]
    assert pretrained["input_size"] == [3, 32, 32] and pretrained["mean"] == [0.485, 0.456, 0.406]
    assert math.floor(32 / pretrained["crop_pct"]) == 36 and pretrained["interpolation"] == "bilinear"  # timm's resize
    if "local-dir" in getattr(timm.models._factory, "_MODEL_SOURCES", ()):  # timm reads the folder itself
        local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert torch.equal(_logits(local, x), expected)
        assert tuple(local.pretrained_cfg["input_size"]) == (3, 32, 32)
    assert _front_matter((out / "README.md").read_text())["library_name"] == "timm"


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_bad_input_is_one_line_exit_2_and_writes_nothing(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    unfinished = tmp_path / "student-unfinished"
    unfinished.mkdir()
    shutil.copy(runs["teacher"] / "config.yaml", unfinished / "config.yaml")
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("x")
    teacher = str(runs["teacher"])
    cases = [
        (["export", str(unfinished)], "not finished"),
        (["export", str(tmp_path / "empty")], "not a kdlab run dir"),
        (["export", str(tmp_path / "no-such-run")], "not a folder"),
        (["export", teacher, "--out", "taken"], "not empty"),
        (["export", teacher, "--out", "taken", "--force"], "holds no kdlab export"),
        (["export", teacher, "--out", "afile"], "is a file"),
        (["export", teacher, "--out", teacher], "the run dir itself"),
    ]
    before, runs_before = _tree(tmp_path), _tree(runs["root"])
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kdlab: error:") and fragment in lines[0], (argv, captured.err)
        assert _tree(tmp_path) == before and _tree(runs["root"]) == runs_before, argv

    # the default folder, then --force over that earlier export
    assert main(["export", teacher]) == 0
    out = Path("exports") / runs["teacher"].name
    assert f"hf upload USER/REPO {out} ." in capsys.readouterr().out
    assert main(["export", teacher]) == 2 and "--force" in capsys.readouterr().err
    assert main(["export", teacher, "--force"]) == 0
    assert sorted(p.name for p in Path("exports").iterdir()) == [runs["teacher"].name]  # no temporaries left


def test_a_failure_while_writing_leaves_nothing(runs, tmp_path, monkeypatch):
    import kdlab.export

    def fail(path, text):
        raise OSError("disk full")

    monkeypatch.setattr(kdlab.export, "atomic_write_text", fail)  # README.md, after the weights and config.json
    with pytest.raises(OSError, match="disk full"):
        export_run(runs["teacher"], tmp_path / "new" / "deeper" / "export")
    assert list(tmp_path.iterdir()) == []  # no export, no temporary folder, no parent folders made for it
