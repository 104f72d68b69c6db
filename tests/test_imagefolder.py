"""Image folders streamed from disk: views drawn by the run's generator, the same batches
whatever the loader's worker count, a SIGKILLed run resumed exactly, unreadable images."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import config_with, write_image_folder
from kdlab.cli import main
from kdlab.config import build_config
from kdlab.data import load_dataset
from kdlab.data.imagefolder import ATTEMPTS, VIEW_PARAMS, centre_box, crop_box
from kdlab.errors import DataError
from kdlab.runs import read_metrics
from kdlab.train import train

pytest.importorskip("PIL")
TIME_KEYS = {"epoch_time_s", "images_per_s"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images") / "digits", train_per_class=15, val_per_class=5)


def _config(root, out_dir, workers=2, **extra):
    data = {"out_dir": str(out_dir), "threads": 1,
            "data": {"name": "imagefolder", "root": str(root), "image_size": 16, "val_size": 12,
                     "loader_workers": workers},
            "model": {"name": "mlp-32"}, "optim": {"epochs": 4, "batch_size": 8, "lr": 0.02, "schedule": "cosine"}}
    return config_with(data, **extra)


def test_crop_boxes_follow_random_resized_crop():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        width, height = int(rng.integers(8, 400)), int(rng.integers(8, 400))
        row = rng.random(VIEW_PARAMS)
        (left, top, right, bottom), flip = crop_box(width, height, row)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= width and 0 <= top < bottom <= height and flip == (row[-1] < 0.5)
        fallback = all(  # no attempt fits: the centre crop of the clamped aspect ratio
            not (0 < round(math.sqrt(width * height * (0.08 + 0.92 * row[2 * a]) * math.exp(
                math.log(3 / 4) + math.log(16 / 9) * row[2 * a + 1]))) <= width) or
            not (0 < round(math.sqrt(width * height * (0.08 + 0.92 * row[2 * a]) / math.exp(
                math.log(3 / 4) + math.log(16 / 9) * row[2 * a + 1]))) <= height) for a in range(ATTEMPTS))
        if not fallback:  # the box of the first attempt that fits: area and aspect within range
            assert 0.08 * width * height * 0.8 <= w * h <= width * height
            assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
    assert centre_box(400, 300, 256, 224) == (200 - 131.25, 150 - 131.25, 200 + 131.25, 150 + 131.25)


def test_batches_depend_on_the_generator_not_on_the_worker_count(folder, tmp_path):
    batches = {}
    for workers in (0, 2):
        data = load_dataset(_config(folder, tmp_path, workers).data)
        assert data.input_shape == (3, 16, 16) and data.num_classes == 4 and len(data.train_y) == 48
        generator = torch.Generator().manual_seed(7)
        batches[workers] = list(data.epoch_batches(generator, 8, torch.device("cpu")))
        evals = list(data.eval_batches("test", 8, torch.device("cpu")))
        data.close()
        assert sum(len(b) for b in evals) == 20 and evals[0].dtype == torch.uint8
    for (x0, y0, i0, v0, s0), (x2, y2, i2, v2, s2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2) and torch.equal(i0, i2) and torch.equal(v0, v2)
        assert x0.shape[1:] == (3, 16, 16) and v0.shape[1] == VIEW_PARAMS and s0 == s2 == 0
    default = load_dataset(_config(folder, tmp_path, None).data)  # data.loader_workers unset
    assert default.loader_workers == min(4, os.cpu_count())
    x_a = torch.cat([b[0] for b in batches[0]])
    data = load_dataset(_config(folder, tmp_path, 0).data)
    x_b = torch.cat([b[0] for b in data.epoch_batches(torch.Generator().manual_seed(8), 8, torch.device("cpu"))])
    assert not torch.equal(x_a, x_b)  # another seed: other order and crops


def _start(config_path: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, "-m", "kdlab", "train", str(config_path), "--no-progress"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_sigkilled_imagefolder_run_with_two_loader_workers_resumes_exactly(folder, tmp_path):
    reference = train(_config(folder, tmp_path / "ref", workers=0), progress=False, log=lambda *a: None)
    cfg = _config(folder, tmp_path / "run", workers=2)
    config_path = tmp_path / "c.yaml"
    config_path.write_text(cfg.to_yaml())
    process = _start(config_path, tmp_path)
    metrics = cfg.run_dir() / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count('"train_loss"') >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (cfg.run_dir() / "result.json").exists()
    resumed = _start(config_path, tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming after epoch" in out
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rs]  # noqa: E731
    assert strip(read_metrics(cfg.run_dir())) == strip(read_metrics(reference["run_dir"]))
    a = torch.load(cfg.run_dir() / "model.pt", weights_only=True)
    b = torch.load(Path(reference["run_dir"]) / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with np.load(cfg.run_dir() / "eval_test.npz") as test:
        assert test["logits"].shape == (20, 4) and test["features"].shape == (20, 32)


def test_a_student_with_an_online_teacher_on_streamed_crops(folder, tmp_path):
    teacher = train(_config(folder, tmp_path, workers=0, name="teacher", optim={"epochs": 2}),
                    progress=False, log=lambda *a: None)
    student = _config(folder, tmp_path, workers=0, name="student", optim={"epochs": 2},
                      loss={"alpha": 0.5, "tau": 4.0}, teacher={"runs": [teacher["run_dir"]]})
    result = train(student, progress=False, log=lambda *a: None)
    assert "test_agreement" in result["final"] and math.isfinite(result["final"]["train_loss"])
    with pytest.raises(Exception, match="unbounded: use teacher.store.crops=M"):
        train(_config(folder, tmp_path, workers=0, name="cached", loss={"alpha": 1.0},
                      teacher={"runs": [teacher["run_dir"]], "cache": {"mode": "lazy"}}), progress=False)


def test_an_unreadable_image_is_one_line_or_skipped_and_counted(folder, tmp_path, capsys):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(folder, root)
    victim = sorted((root / "train" / "class_01").iterdir())[3]
    victim.write_bytes(b"not an image at all")
    out = tmp_path / "out"
    argv = ["train", "--no-progress", "data.name=imagefolder", f"data.root={root}", "data.image_size=16",
            "data.val_size=12", "data.loader_workers=2", "model.name=mlp-16", "optim.epochs=2", "optim.batch_size=8",
            f"out_dir={out}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdlab: error: unreadable image") and victim.name in err and err.count("\n") == 1
    assert not out.exists()  # failed in its first epoch: nothing left
    assert main(argv + ["data.on_bad_image=skip"]) == 0
    (run_dir,) = out.iterdir()
    records = read_metrics(run_dir)
    assert all(r["skipped_images"] == 1 for r in records)  # the victim is in the training split, every epoch


def test_imagefolder_bad_input(folder, tmp_path, capsys):
    cases = [
        (["data.name=imagefolder"], "data.root is not set"),
        (["data.name=imagefolder", f"data.root={tmp_path}"], "is not a directory"),
        (["data.name=imagefolder", f"data.root={folder}", "data.augment=crop_flip"], "data.augment"),
        (["data.name=imagefolder", f"data.root={folder}", "data.eval_resize=8"], "eval_resize"),
        (["data.name=imagefolder", f"data.root={folder}", "data.crop_scale=[0.5,0.1]"], "crop_scale"),
        (["data.name=imagefolder", f"data.root={folder}", "mutual_information.every_steps=5"], "streamed"),
        (["data.name=imagefolder", f"data.root={folder}", "data.image_size=16", "model.name=cnn1d-8"], "model.name"),
    ]
    for overrides, fragment in cases:
        assert main(["train", "--no-progress", f"out_dir={tmp_path / 'o'}", *overrides]) == 2, overrides
        err = capsys.readouterr().err
        assert err.startswith("kdlab: error:") and fragment in err and err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()


def test_new_data_keys_leave_existing_run_hashes_alone():
    cfg = build_config({"data": {"name": "digits"}})
    assert cfg.run_hash() == build_config({"data": {"name": "digits", "loader_workers": 3}}).run_hash()
    assert cfg.run_hash() != build_config({"data": {"name": "digits", "image_size": 32}}).run_hash()
    assert json.loads(cfg.model_dump_json())["data"]["image_size"] == 224


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist not installed")
def test_builtin_fashion_mnist_folder_is_made_once_from_the_idx_files(tmp_path, monkeypatch):
    from kdlab.data.imagefolder import builtin_root

    monkeypatch.setenv("KDLAB_CACHE", str(tmp_path / "cache"))
    root = builtin_root("builtin:fashion-mnist:3")
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert classes[0] == "00-t-shirt" and classes[-1] == "09-ankle-boot" and len(classes) == 10
    assert all(len(list((root / "train" / c).iterdir())) == 3 for c in classes)
    assert sum(len(list((root / "val" / c).iterdir())) for c in classes) == 10000
    stamp = (root / "train").stat().st_mtime_ns
    assert builtin_root("builtin:fashion-mnist:3") == root and (root / "train").stat().st_mtime_ns == stamp
    data = load_dataset(build_config({"data": {"name": "imagefolder", "root": "builtin:fashion-mnist:3",
                                               "image_size": 28, "val_size": 5, "loader_workers": 0}}).data)
    assert data.num_classes == 10 and len(data.train_y) == 25 and len(data.split_labels("test")) == 10000
    x = next(data.eval_batches("test", 4, torch.device("cpu")))
    assert x.shape == (4, 3, 28, 28) and bool((x[:, 0] == x[:, 1]).all())  # grayscale as RGB
    with pytest.raises(DataError, match="builtin:fashion-mnist"):
        builtin_root("builtin:cifar")


def test_projections_name_classes_by_their_folders(folder, tmp_path, capsys):
    run_dir = Path(train(_config(folder, tmp_path, workers=0, optim={"epochs": 2}), progress=False,
                         log=lambda *a: None)["run_dir"])
    assert json.loads((run_dir / "result.json").read_text())["class_names"] == [f"class_{k:02d}" for k in range(4)]
    assert main(["analyze", str(run_dir), "--classes", "class_00,class_01,class_03", "--classes", "2,0,1",
                 "--bootstrap", "5"]) == 0
    report = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    assert [p["classes"] for p in report["projections"]] == [[0, 1, 3], [2, 0, 1]]
    assert report["projections"][1]["class_names"] == ["class_02", "class_00", "class_01"]
    assert report["projection"] == report["projections"][0]
    assert (run_dir / "analysis" / "projection.png").is_file() and (run_dir / "analysis" / "projection_2.png").is_file()
    capsys.readouterr()
    assert main(["analyze", str(run_dir), "--classes", "class_00,tench,class_01", "--out", str(tmp_path / "x")]) == 2
    assert "no class named 'tench'" in capsys.readouterr().err and not (tmp_path / "x").exists()


def _format_matrix(folder: Path) -> dict:
    """One small image per 8-bit format and mode a folder may hold, written by Pillow."""
    from PIL import Image

    yy, xx = np.mgrid[0:61, 0:83]  # smooth content, as photographs (not noise)
    rgb = Image.fromarray(np.stack([np.sin(xx / 7 + c) * np.cos(yy / 9) * 120 + 128 for c in range(3)], -1).astype(np.uint8))
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, image, kwargs in (
            ("rgb.jpg", rgb, {"quality": 90}), ("gray.jpg", rgb.convert("L"), {}), ("cmyk.jpg", rgb.convert("CMYK"), {}),
            ("progressive.jpg", rgb, {"progressive": True}), ("rgb.png", rgb, {}), ("rgba.png", rgb.convert("RGBA"), {}),
            ("gray.png", rgb.convert("L"), {}), ("gray-alpha.png", rgb.convert("LA"), {}),
            ("palette.png", rgb.convert("P"), {}), ("1-bit.png", rgb.convert("1"), {}),
            ("png-named.jpg", rgb, {"format": "PNG"})):
        image.save(folder / name, **kwargs)
        files[name] = str(folder / name)
    return files


def test_both_decoders_give_the_same_pixels_and_nearly_the_same_views(tmp_path):
    """TorchCodec and Pillow decode every 8-bit format to identical RGB pixels; their
    training views (same integer box) differ at the crop's edges (Pillow's box resize reads
    pixels just outside the box), the evaluation views also by the box's rounding: close,
    not equal, hence the hash."""
    from PIL import Image
    from torchcodec.decoders import decode_image

    from kdlab.data.imagefolder import _view_pillow, _view_torchcodec

    rows = np.random.default_rng(1).random((4, VIEW_PARAMS))
    for name, path in _format_matrix(tmp_path).items():
        with Image.open(path) as image:
            pillow = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
        assert torch.equal(decode_image(path, mode="RGB"), pillow), name
        for row in list(rows) + [None]:
            a, b = (view(path, row, 16, 18, (0.08, 1.0), (3 / 4, 4 / 3)) for view in (_view_torchcodec, _view_pillow))
            assert a.shape == b.shape == (3, 16, 16) and a.dtype == b.dtype == torch.uint8
            difference = (a.int() - b.int()).abs().float()
            assert difference.mean() < (1 if row is not None else 8), (name, difference.mean())


def test_a_16_bit_png_is_scaled_to_8_bits_by_torchcodec(tmp_path):
    from PIL import Image

    from kdlab.data.imagefolder import _view_torchcodec

    levels = np.tile(np.arange(0, 256, 16, dtype=np.uint16), (16, 1))
    Image.fromarray(levels * 257).save(tmp_path / "deep.png")  # 16-bit grayscale, full range
    view = _view_torchcodec(str(tmp_path / "deep.png"), None, 16, 16, (0.08, 1.0), (3 / 4, 4 / 3))
    assert torch.equal(view[0], torch.from_numpy(levels.astype(np.uint8)))  # (Pillow would clip all but 0 to 255)


@pytest.mark.parametrize("decoder", ["torchcodec", "pillow"])
def test_an_unreadable_image_names_its_file_in_one_line_under_either_decoder(tmp_path, decoder):
    from kdlab.data.imagefolder import _Images

    good = _format_matrix(tmp_path / "good")["rgb.jpg"]
    jpeg = Path(good).read_bytes()
    bad = {"text.jpg": b"not an image at all", "truncated.jpg": jpeg[: len(jpeg) // 3], "empty.png": b""}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    paths = [str(tmp_path / name) for name in bad] + [str(tmp_path / "gone.png")]
    labels = {"train": np.zeros(len(paths), np.int64)}
    row = np.random.default_rng(0).random(VIEW_PARAMS)
    strict = _Images({"train": paths}, labels, 16, 18, (0.08, 1.0), (3 / 4, 4 / 3), False, decoder)
    for index, path in enumerate(paths):
        with pytest.raises(DataError) as caught:
            strict[("train", index, row)]
        message = str(caught.value)
        assert message.startswith(f"unreadable image {path} (") and "\n" not in message and len(message) - len(path) < 150, message
        assert "data.on_bad_image=skip" in message and ".cpp" not in message
    lenient = _Images({"train": paths}, labels, 16, 18, (0.08, 1.0), (3 / 4, 4 / 3), True, decoder)
    image, _, _, readable, dropped = lenient[("train", 1, row)]
    assert not readable and dropped and int(image.sum()) == 0  # a training view: left out of its batch
    assert lenient[("train", 1, None)][4] is False  # an evaluation view: kept, black


def test_the_decoder_is_in_the_run_hash_and_the_store_key_only_for_image_folders(folder):
    from types import SimpleNamespace

    from kdlab.teacher_store import store_key

    def imagefolder(**data):
        return build_config({"data": {"name": "imagefolder", "root": "/x", "image_size": 16, **data},
                             "model": {"name": "mlp-32"}})

    assert imagefolder(decoder="pillow").run_hash() == "482b7d75"  # as before the decoder was a choice
    assert imagefolder().run_hash() != "482b7d75" and imagefolder().data.decoder == "torchcodec"
    digits = build_config({"data": {"name": "digits"}}).run_hash()
    assert build_config({"data": {"name": "digits", "decoder": "pillow"}}).run_hash() == digits
    teachers = SimpleNamespace(models=[torch.nn.Linear(3, 2)])
    store = SimpleNamespace(crops=2, seed=0, dtype="float16", top_k=None, shard_size=64)
    keys = {decoder: store_key(teachers, load_dataset(imagefolder(root=str(folder), decoder=decoder, val_size=12).data),
                               store, False) for decoder in ("torchcodec", "pillow")}
    assert keys["torchcodec"] != keys["pillow"]


def test_a_torchcodec_that_does_not_import_is_one_line_naming_pillow(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # as an uninstalled or mismatched build
    argv = ["train", "--no-progress", "data.name=imagefolder", f"data.root={folder}", "data.image_size=16",
            "data.val_size=12", "model.name=mlp-16", "optim.epochs=1", f"out_dir={tmp_path / 'out'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdlab: error: data.decoder=torchcodec: torchcodec does not import") and err.count("\n") == 1
    assert "data.decoder=pillow" in err and not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert main(argv + ["data.decoder=pillow", "data.loader_workers=0"]) == 0
