"""The timm model family (``model.name: timm:<name>``) and plain weights files.

timm needs a torchvision that loads beside the installed torch; the Makefile's one venv
has torch 2.14.1 + torchvision 0.29.1 and timm, so CI runs these with the rest; they are
skipped where timm is not installed.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm", reason="timm not installed (pip install 'kdlab[timm]' with a torchvision matching torch)")
torchvision = pytest.importorskip("torchvision")

from conftest import write_image_folder  # noqa: E402
from kdlab.cli import main  # noqa: E402
from kdlab.config import build_config  # noqa: E402
from kdlab.data import load_dataset  # noqa: E402
from kdlab.errors import ConfigError, RunError  # noqa: E402
from kdlab.models import build_model, check_model, classifier_key  # noqa: E402
from kdlab.recipes import expand, load_recipe  # noqa: E402
from kdlab.train import train  # noqa: E402
from kdlab.training.evaluate import predict_split  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images") / "digits", train_per_class=10, val_per_class=4,
                              size=40)


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("inception_v4", 96), ("vit_tiny_patch16_224", 224),
                                       ("convnext_atto", 64), ("efficientnet_b0", 64)])
def test_logits_and_penultimate_features_are_timms_own(name, size):
    torch.manual_seed(0)
    model = build_model(f"timm:{name}", 7).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits, features = model(x, return_features=True)
        assert torch.equal(logits, model.net(x))  # the classifier on timm's pre-logits is timm's forward
        assert features.shape == (2, model.feature_dim)
    head = classifier_key(model)
    state = model.state_dict()
    assert state[f"{head}.weight"].shape == (7, model.feature_dim) and f"{head}.bias" in state
    assert check_model(f"timm:{name}", 7, (3, size, size)) == sum(p.numel() for p in model.parameters())


def test_bad_timm_names_and_heads_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown timm model 'resnet_nope'"):
        build_config({"model": {"name": "timm:resnet_nope"}})
    with pytest.raises(ConfigError, match="not one linear layer"):
        build_config({"model": {"name": "timm:deit_tiny_distilled_patch16_224"}})
    assert build_config({"model": {"name": "timm:resnet50"}}).model.name == "timm:resnet50"


def test_torchvision_checkpoint_teaches_as_a_plain_weights_file(folder, tmp_path):
    """Kim Table 5's teacher is torchvision's ResNet-152 checkpoint: a torchvision state
    dict loads into timm's ResNet unchanged, and the run's teacher logits are
    torchvision's own outputs on the evaluation view."""
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(num_classes=4).eval()
    weights = tmp_path / "resnet18-torchvision.pth"
    torch.save(reference.state_dict(), weights)
    cfg = build_config({"out_dir": str(tmp_path / "runs"), "threads": 1,
                        "data": {"name": "imagefolder", "root": str(folder), "image_size": 32, "eval_resize": 36,
                                 "val_size": 8, "loader_workers": 0},
                        "model": {"name": "timm:resnet18"},
                        "optim": {"epochs": 1, "batch_size": 8, "lr": 0.01, "schedule": "constant"},
                        "loss": {"alpha": 0.5, "tau": 4.0},
                        "teacher": {"weights": [{"model": "timm:resnet18", "path": str(weights)}]}})
    result = train(cfg, progress=False)
    run_dir = Path(result["run_dir"])
    data = load_dataset(cfg.data)
    class Torchvision(torch.nn.Module):  # torchvision's own forward, under predict_split's call convention
        def __init__(self):
            super().__init__()
            self.net = reference

        def forward(self, x, return_features=False):
            return (self.net(x), x.flatten(1)) if return_features else self.net(x)

    expected = predict_split(Torchvision(), data, "test", 16)
    stored = torch.from_numpy(np.load(run_dir / "eval_test.npz")["teacher_logits"])
    torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-5)
    meta = json.loads((run_dir / "meta.json").read_text())
    (entry,) = meta["weight_files"]
    assert entry["model"] == "timm:resnet18" and len(entry["sha256"]) == 64
    # the template analysis finds timm's classifier (net.fc) in model.pt
    assert main(["analyze", str(run_dir), "--bootstrap", "5"]) == 0
    report = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    assert report["projection"]["classes"] == [0, 1, 2]

    # a student initialised from a plain file: the same first-layer weights (lr ~ 0)
    init = build_config({**cfg.model_dump(mode="json"), "teacher": None,
                         "loss": {"alpha": 0.0}, "optim": {"epochs": 1, "batch_size": 8, "lr": 1e-12,
                                                           "schedule": "constant"},
                         "model": {"name": "timm:resnet18", "pretrained_path": str(weights)}})
    run_dir = Path(train(init, progress=False)["run_dir"])
    trained = torch.load(run_dir / "model.pt", weights_only=True)
    torch.testing.assert_close(trained["net.conv1.weight"], reference.state_dict()["conv1.weight"])
    assert "model.pretrained_path" in json.loads((run_dir / "meta.json").read_text())["weight_files"][0]


def test_weights_that_do_not_fit_fail_before_anything_is_written(folder, tmp_path):
    weights = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(num_classes=4).state_dict(), weights)
    data = {"out_dir": str(tmp_path / "runs"), "data": {"name": "imagefolder", "root": str(folder),
                                                          "image_size": 32, "val_size": 8, "loader_workers": 0},
            "optim": {"epochs": 1}}
    with pytest.raises(RunError, match=r"model.pretrained_path: .*resnet34.pth does not fit the model"):
        train(build_config({**data, "model": {"name": "timm:resnet18", "pretrained_path": str(weights)}}),
              progress=False)
    with pytest.raises(RunError, match=r"teacher.weights.0: .*does not fit"):
        train(build_config({**data, "model": {"name": "timm:resnet18"}, "loss": {"alpha": 1.0},
                            "teacher": {"weights": [{"model": "timm:resnet18", "path": str(weights)}]}}),
              progress=False)
    assert not (tmp_path / "runs").exists()


def test_models_lists_the_timm_family(capsys):
    assert main(["models", "--timm", "resnet1*"]) == 0
    out = capsys.readouterr().out.split()
    assert "timm:resnet18" in out and "timm:resnet152" in out
    assert main(["models"]) == 0
    assert "timm:inception_v4" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["kim-table5", "muller-imagenet"])
def test_imagenet_recipes_expand_at_paper_scale(recipe, tmp_path):
    runs = expand(load_recipe(recipe), "paper", tmp_path)
    assert runs and all(r.config.model.name.startswith("timm:") for r in runs)
