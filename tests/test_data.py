import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlab.config import DataConfig
from kdlab.data import add_label_noise, get_augmentation, load_dataset
from kdlab.data.sources import FASHION_MNIST_DEBIAN_DIR, load_cifar_arrays, load_idx_arrays, read_idx
from kdlab.errors import DataError

from conftest import write_cifar, write_idx, write_idx_dataset


def test_view_counts():
    assert get_augmentation("crop_flip").num_views == 162
    assert get_augmentation("shift2").num_views == 25
    assert get_augmentation("shift1d").num_views == 9
    assert get_augmentation("none").num_views == 1


def test_crop_flip_views_equal_per_image_reference():
    aug = get_augmentation("crop_flip")
    x = torch.randint(0, 256, (aug.num_views, 3, 32, 32), dtype=torch.uint8)
    views = torch.arange(aug.num_views)
    out = aug.apply(x, views)
    padded = F.pad(x, (4, 4, 4, 4))
    dy, dx, flip = aug.decode(views)
    for i in range(aug.num_views):
        ref = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)
    # the centred, unflipped view is the image itself
    centre = torch.tensor([(4 * 9 + 4) * 2])
    assert torch.equal(aug.apply(x[:1], centre), x[:1])


def test_shifts_and_1d():
    shift = get_augmentation("shift2")
    x = torch.rand(25, 1, 28, 28)
    out = shift.apply(x, torch.arange(25))
    assert out.shape == x.shape and torch.equal(out[12], x[12])  # view 12 = no shift
    one_d = get_augmentation("shift1d")
    sig = torch.rand(9, 1, 40)
    out = one_d.apply(sig, torch.arange(9))
    assert out.shape == sig.shape
    assert torch.equal(out[0, :, 4:], sig[0, :, :36]) and torch.equal(out[8, :, :36], sig[8, :, 4:])


def test_sampling_is_seeded():
    aug = get_augmentation("crop_flip")
    a = aug.sample(100, torch.Generator().manual_seed(3))
    b = aug.sample(100, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 162


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    root = write_idx_dataset(tmp_path / "mnist", compress=compress)
    train_x, train_y, test_x, test_y = load_idx_arrays(root)
    assert train_x.shape == (40, 1, 28, 28) and train_x.dtype == np.uint8
    assert test_y.tolist() == [i % 10 for i in range(20)]
    ds = load_dataset(DataConfig(name="mnist", root=str(root), val_size=10))
    assert len(ds.train_y) == 30 and len(ds.val_y) == 10 and len(ds.test_y) == 20
    assert ds.augmentation.name == "shift2"


def test_idx_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="magic"):
        read_idx(bad)
    short = tmp_path / "short"
    write_idx(short, np.zeros((4, 2, 2), np.uint8))
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(short)
    with pytest.raises(DataError, match="missing dataset file"):
        load_idx_arrays(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path / "nope")))


def test_cifar_pickles(cifar10_dir, cifar100_dir):
    train_x, train_y, test_x, _ = load_cifar_arrays(cifar10_dir, 10)
    assert train_x.shape == (60, 3, 32, 32) and test_x.shape == (12, 3, 32, 32)
    ds = load_dataset(DataConfig(name="cifar100", root=str(cifar100_dir), val_size=10))
    assert ds.num_classes == 100 and ds.input_shape == (3, 32, 32) and len(ds.train_y) == 50
    assert ds.augmentation.num_views == 162
    x = ds.prepare(ds.train_x)
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/kdlab-pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    root = tmp_path / "cifar-100-python"
    write_cifar(root, 100)
    with open(root / "train", "wb") as handle:
        pickle.dump({b"data": _Evil()}, handle, protocol=2)
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_cifar_arrays(root, 100)
    assert not os.path.exists("/tmp/kdlab-pwned")
    (root / "test").write_bytes(b"not a pickle")
    (root / "train").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable CIFAR batch"):
        load_cifar_arrays(root, 100)


def test_digits_split_is_seeded_and_checked():
    a = load_dataset(DataConfig(name="digits", val_size=200, split_seed=1))
    b = load_dataset(DataConfig(name="digits", val_size=200, split_seed=1))
    assert torch.equal(a.val_x, b.val_x) and len(a.val_y) == 200 and len(a.test_y) == 297
    assert len(a.train_y) + 200 + 297 == 1797
    with pytest.raises(DataError, match="val_size"):
        load_dataset(DataConfig(name="digits", val_size=5000))


def test_mnist1d_is_generated_locally(monkeypatch):
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d must not download")

    monkeypatch.setattr(requests, "get", no_network)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    ds = load_dataset(DataConfig(name="mnist1d", num_samples=500, val_size=50))
    assert np.array_equal(np.random.get_state()[1], before)  # numpy's global RNG untouched
    assert ds.input_shape == (1, 40) and len(ds.train_y) == 350 and len(ds.test_y) == 100
    assert ds.augmentation.name == "shift1d"


def test_symmetric_noise_flips_exactly_the_fraction():
    labels = np.arange(1000) % 10
    noisy, flipped = add_label_noise(labels, 10, 0.4, "symmetric", seed=0)
    assert len(flipped) == 400 and (noisy != labels).sum() == 400
    assert np.array_equal(np.flatnonzero(noisy != labels), flipped)
    again, _ = add_label_noise(labels, 10, 0.4, "symmetric", seed=0)
    assert np.array_equal(noisy, again)
    asym, idx = add_label_noise(labels, 10, 0.2, "asymmetric", seed=0)
    assert np.array_equal(asym[idx], (labels[idx] + 1) % 10)


def test_label_noise_in_dataset_keeps_validation_clean():
    ds = load_dataset(DataConfig(name="digits", val_size=200, label_noise=0.5))
    assert len(ds.noisy_indices) == round(0.5 * len(ds.train_y))
    assert (ds.train_y != ds.clean_train_y).sum().item() == len(ds.noisy_indices)


@pytest.mark.skipif(not FASHION_MNIST_DEBIAN_DIR.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_fashion_mnist_found_automatically():
    ds = load_dataset(DataConfig(name="fashion-mnist"))
    assert len(ds.train_y) == 50000 and len(ds.val_y) == 10000 and len(ds.test_y) == 10000
    assert ds.input_shape == (1, 28, 28) and ds.train_x.dtype == torch.uint8
