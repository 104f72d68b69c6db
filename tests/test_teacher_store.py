"""The FKD-style teacher store for streamed data: stored crops and logits equal the
online teacher's on the same crops, builds resume shard by shard, runs resume exactly."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import config_with, write_image_folder
from kdlab.config import TeacherConfig, TeacherStoreConfig, build_config
from kdlab.data import load_dataset
from kdlab.losses import distillation_loss
from kdlab.runs import read_metrics
from kdlab.teacher_store import TeacherStore
from kdlab.train import train
from kdlab.training.teachers import Teachers

pytest.importorskip("PIL")
TIME_KEYS = {"epoch_time_s", "images_per_s"}


def _config(root, out_dir, **extra):
    data = {"out_dir": str(out_dir), "threads": 1,
            "data": {"name": "imagefolder", "root": str(root), "image_size": 16, "val_size": 8, "loader_workers": 0},
            "model": {"name": "mlp-32"}, "optim": {"epochs": 3, "batch_size": 8, "lr": 0.02, "schedule": "cosine"}}
    return config_with(data, **extra)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    root = write_image_folder(tmp / "digits", train_per_class=10, val_per_class=3)
    teacher = train(_config(root, tmp / "runs", name="teacher", model={"name": "mlp-64"}, optim={"epochs": 2}),
                    progress=False, log=lambda *a: None)
    return root, teacher["run_dir"], tmp


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("float16", 2e-3)])
def test_stored_logits_equal_the_online_teachers_on_the_same_crops(setup, tmp_path, dtype, tolerance):
    root, teacher_dir, _ = setup
    data = load_dataset(_config(root, tmp_path).data)
    teachers = Teachers(TeacherConfig(runs=[str(teacher_dir)]), data)
    store = TeacherStore(teachers, data, TeacherStoreConfig(crops=3, dtype=dtype, shard_size=7), tmp_path,
                         log=lambda *a: None)
    store.build(batch_size=64, progress=False)
    generator = torch.Generator().manual_seed(0)
    crops_seen = set()
    for raw, y, index, crop, _ in data.epoch_batches(generator, 8, torch.device("cpu"), store):
        x = data.prepare(raw)
        online = teachers(x, bf16=False)
        stored = store.lookup(index, crop, x)
        scale = online.abs().max().item()
        assert torch.allclose(stored, online, rtol=tolerance, atol=tolerance * scale)
        student = torch.randn(len(y), data.num_classes)
        for kwargs in ({"kd": "kl", "tau": 4.0}, {"kd": "kl", "tau": float("inf")}, {"kd": "mse"}):
            a = distillation_loss(student, y, stored, alpha=1.0, **kwargs)
            b = distillation_loss(student, y, online, alpha=1.0, **kwargs)
            assert torch.allclose(a, b, rtol=10 * tolerance), kwargs
        crops_seen.update(crop.tolist())
    assert crops_seen == {0, 1, 2}
    data.close()


def test_a_build_resumes_at_the_missing_shard_and_is_reproducible(setup, tmp_path):
    root, teacher_dir, _ = setup
    data = load_dataset(_config(root, tmp_path).data)
    teachers = Teachers(TeacherConfig(runs=[str(teacher_dir)]), data)
    cfg = TeacherStoreConfig(crops=2, dtype="float32", shard_size=10)
    store = TeacherStore(teachers, data, cfg, tmp_path / "a", log=lambda *a: None)
    store.build(64, progress=False)
    shards = sorted(store.path.glob("shard-*.logits.npy"))
    assert len(shards) == 4  # 32 training images / 10
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    shards[2].unlink()
    shards[1].write_bytes(b"truncated")
    store.build(64, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (shards[0], shards[3])} == {p: stamps[p] for p in (shards[0], shards[3])}
    other = TeacherStore(teachers, data, cfg, tmp_path / "b", log=lambda *a: None)
    other.build(64, progress=False)
    for name in ("shard-00001.rows.npy", "shard-00001.logits.npy", "shard-00002.logits.npy"):
        assert np.array_equal(np.load(store.path / name), np.load(other.path / name))


def test_a_student_on_the_store_trains_and_resumes_exactly(setup, tmp_path):
    root, teacher_dir, _ = setup
    student = dict(name="student", loss={"alpha": 0.9, "tau": 4.0},
                   teacher={"runs": [teacher_dir], "store": {"crops": 4}})
    full = train(_config(root, tmp_path / "a", **student), progress=False, log=lambda *a: None)
    cfg = _config(root, tmp_path / "b", **student)
    assert train(cfg, progress=False, stop_after_epoch=1, log=lambda *a: None) is None
    resumed = train(cfg, progress=False, log=lambda *a: None)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rs]  # noqa: E731
    assert strip(read_metrics(full["run_dir"])) == strip(read_metrics(resumed["run_dir"]))
    assert len(list((tmp_path / "b" / ".teacher-store").glob("teacher-store-*/shard-*.logits.npy"))) == 1
    online = build_config({**cfg.model_dump(), "teacher": {"runs": [teacher_dir]}})
    assert online.run_hash() != cfg.run_hash()  # the store decides the crops: part of the identity
    assert build_config({**online.model_dump(), "teacher": {"runs": [teacher_dir], "store": {"crops": 0}}}).run_hash() \
        == online.run_hash()
    assert Path(resumed["run_dir"]).name.startswith("student-")


def test_a_top_k_store_keeps_the_k_largest_probabilities_and_spreads_the_rest(setup, tmp_path):
    root, teacher_dir, _ = setup
    data = load_dataset(_config(root, tmp_path).data)
    teachers = Teachers(TeacherConfig(runs=[str(teacher_dir)]), data)
    tau, k = 2.0, 2
    store = TeacherStore(teachers, data, TeacherStoreConfig(crops=2, dtype="float32", top_k=k), tmp_path,
                         log=lambda *a: None, tau=tau)
    store.build(64, progress=False)
    assert sorted(p.name.split(".")[1] for p in store.path.glob("shard-00000.*.npy")) == ["index", "probs", "rows"]
    for raw, y, index, crop, _ in data.epoch_batches(torch.Generator().manual_seed(1), 8, torch.device("cpu"), store):
        x = data.prepare(raw)
        p = torch.softmax(teachers(x, bf16=False).double() / tau, dim=-1)
        top, classes = p.topk(k, dim=-1)
        expected = ((1 - top.sum(-1, keepdim=True)) / (data.num_classes - k)).expand_as(p).clone()
        expected.scatter_(1, classes, top)
        got = torch.softmax(store.lookup(index, crop, x).double() / tau, dim=-1)
        assert torch.allclose(got, expected, atol=1e-6)
        student = torch.randn(len(y), data.num_classes)
        loss = distillation_loss(student, y, store.lookup(index, crop, x), alpha=1.0, kd="kl", tau=tau)
        manual = tau**2 * (expected * (expected.log() - torch.log_softmax(student.double() / tau, -1))).sum(-1).mean()
        assert torch.allclose(loss.double(), manual, rtol=1e-5)
    data.close()


def test_a_top_k_store_refuses_what_it_cannot_serve(setup, tmp_path, capsys):
    from kdlab.cli import main

    root, teacher_dir, _ = setup
    base = ["train", "--no-progress", "data.name=imagefolder", f"data.root={root}", "data.image_size=16",
            "data.val_size=8", "model.name=mlp-16", f"teacher.runs=[{teacher_dir}]", "teacher.store.crops=2",
            "loss.alpha=1", f"out_dir={tmp_path / 'o'}"]
    for extra, fragment in ((["teacher.store.top_k=2", "loss.kd=mse"], "finite τ only"),
                            (["teacher.store.top_k=2", "loss.tau=inf"], "finite τ only"),
                            (["teacher.store.top_k=4"], "below the 4 classes")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("kdlab: error: teacher.store.top_k") and fragment in err and err.count("\n") == 1
        assert not (tmp_path / "o").exists()


def test_crops_do_not_depend_on_the_sharding(setup, tmp_path):
    root, teacher_dir, _ = setup
    data = load_dataset(_config(root, tmp_path).data)
    teachers = Teachers(TeacherConfig(runs=[str(teacher_dir)]), data)
    stores = []
    for shard_size in (5, 13):
        store = TeacherStore(teachers, data, TeacherStoreConfig(crops=2, shard_size=shard_size), tmp_path / str(shard_size),
                             log=lambda *a: None)
        store.build(64, progress=False)
        stores.append(store)
    index, crop = torch.arange(32), torch.arange(32) % 2
    assert np.array_equal(stores[0].rows(index, crop), stores[1].rows(index, crop))
    assert torch.equal(stores[0].lookup(index, crop), stores[1].lookup(index, crop))


def test_skipped_images_with_a_store_and_in_the_final_evaluation(setup, tmp_path, capsys):
    import shutil

    root, teacher_dir, _ = setup
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    victims = sorted((broken / "train").glob("*/*"))[::9]  # a few training images (some held out for val)
    for victim in victims:
        victim.write_bytes(b"garbage")
    cfg = _config(broken, tmp_path / "runs", name="student", data={"on_bad_image": "skip"},
                  loss={"alpha": 0.5, "tau": 4.0}, teacher={"runs": [teacher_dir], "store": {"crops": 2}})
    result = train(cfg, progress=False, log=lambda *a: None)
    assert all(r["skipped_images"] >= 1 for r in read_metrics(result["run_dir"]))
    for split in ("train", "val"):
        with np.load(Path(result["run_dir"]) / f"eval_{split}.npz") as arrays:
            assert len(arrays["logits"]) == len(arrays["labels"]) == len(arrays["features"])
    assert "evaluated as black images" in capsys.readouterr().err


def test_a_store_copied_into_another_keys_place_or_a_directory_at_its_lock_is_refused(setup, tmp_path, capsys):
    """A store holds the key it was built for (store.json): one copied into another
    teacher's keyed folder is refused, not read as that teacher's logits; a directory where
    the store's lock file goes is a one-line error, not IsADirectoryError."""
    import shutil

    from kdlab.cli import main
    from kdlab.errors import DataError, RunError

    root, teacher_dir, _ = setup
    data = load_dataset(_config(root, tmp_path).data)
    teachers = Teachers(TeacherConfig(runs=[str(teacher_dir)]), data)
    quiet = {"log": lambda *a: None}
    built = TeacherStore(teachers, data, TeacherStoreConfig(crops=2, seed=0), tmp_path, **quiet)
    built.build(batch_size=64, progress=False)
    other = TeacherStore(teachers, data, TeacherStoreConfig(crops=2, seed=1), tmp_path, **quiet)  # another key
    assert other.key != built.key and not other.path.exists()
    shutil.copytree(built.path, other.path)
    with pytest.raises(DataError, match=f"records key '{built.key}'.*not '{other.key}'"):
        TeacherStore(teachers, data, TeacherStoreConfig(crops=2, seed=1), tmp_path, **quiet)
    shutil.rmtree(other.path)
    Path(str(other.path) + ".lock").mkdir()
    with pytest.raises(RunError, match=r"\.lock is a directory"):
        TeacherStore(teachers, data, TeacherStoreConfig(crops=2, seed=1), tmp_path, **quiet).build(64, False)
    data.close()
    # through the command line: a student whose store folder holds another key's store
    cfg = _config(root, tmp_path / "runs", name="student", loss={"alpha": 1.0},
                  teacher={"runs": [str(teacher_dir)], "store": {"crops": 2, "seed": 1,
                                                                 "dir": str(tmp_path / "stores")}})
    student_store = TeacherStore(teachers, load_dataset(cfg.data), cfg.teacher.store, tmp_path, **quiet)
    shutil.copytree(built.path, student_store.path)
    code = main(["train", "--no-progress", str(_yaml(cfg, tmp_path))])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kdlab: error: teacher store") and err.count("\n") == 1, err
    assert not cfg.run_dir().exists()


def _yaml(cfg, tmp_path) -> Path:
    path = tmp_path / "student.yaml"
    path.write_text(cfg.to_yaml())
    return path
