import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdlab.data
from kdlab.config import DataConfig
from kdlab.data import add_label_noise, check_data_source, get_augmentation, load_dataset
from kdlab.data import sources
from kdlab.data.sources import (FASHION_MNIST_DEBIAN_DIR, check_mnist1d_size, load_cifar_arrays, load_idx_arrays,
                                 read_idx)
from kdlab.errors import ConfigError, DataError

from conftest import write_cifar, write_cifar_batch, write_idx, write_idx_dataset


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


# --- malformed files: every one is a one-line DataError/ConfigError naming the file or key ---

IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


def _edit(name, change):
    """A breaker: rewrite ``root/name`` as ``change(its bytes)``."""
    def breaker(root):
        (root / name).write_bytes(change((root / name).read_bytes()))
    return breaker


def _replace_idx(name, array):
    """A breaker: ``root/name`` becomes a well-formed IDX file holding ``array``."""
    return lambda root: write_idx(root / name, array)


def _idx_header(code, dims):
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}i", *dims)


def _gzip_instead(name, change):
    """A breaker: ``root/name`` replaced by ``name.gz`` whose compressed bytes pass through ``change``."""
    def breaker(root):
        data = gzip.compress((root / name).read_bytes())
        (root / name).unlink()
        (root / f"{name}.gz").write_bytes(change(data))
    return breaker


def _flip_middle(data):
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]


def _cifar(name, data=None, labels=None, key=b"fine_labels"):
    """A breaker: ``root/name`` becomes a CIFAR-100 batch of 12 images with ``data``/``labels`` swapped in."""
    def breaker(root):
        rng = np.random.default_rng(1)
        write_cifar_batch(root / name,
                          rng.integers(0, 256, (12, 3072), dtype=np.uint8) if data is None else data,
                          [i % 100 for i in range(12)] if labels is None else labels, key)
    return breaker


def _delete(name):
    return lambda root: (root / name).unlink()


U8 = np.uint8
BROKEN = [
    # IDX (uncompressed valid set: 40 training, 20 test images of 28×28)
    pytest.param("mnist", _edit(IMAGES, lambda d: b"\x01\x02\x03\x04" + d[4:]), DataError,
                 [IMAGES, "bad magic number"], id="idx-bad-magic"),
    pytest.param("mnist", _edit(LABELS, lambda d: d[:2]), DataError,
                 [LABELS, "shorter than the 4-byte magic"], id="idx-shorter-than-magic"),
    pytest.param("mnist", _edit(IMAGES, lambda d: d[:9]), DataError,
                 [IMAGES, "header cut short", "need 12 bytes, only 5"], id="idx-header-cut-short"),
    pytest.param("mnist", _edit(IMAGES, lambda d: bytes([0, 0, 8, 0]) + d[16:]), DataError,
                 [IMAGES, "0 dimensions"], id="idx-ndim-0"),
    pytest.param("mnist", _edit(IMAGES, lambda d: _idx_header(8, (-40, 28, 28)) + d[16:]), DataError,
                 [IMAGES, "(-40, 28, 28)", "must be positive"], id="idx-negative-dim"),
    pytest.param("mnist", _edit(TEST_LABELS, lambda d: _idx_header(8, (0,))), DataError,
                 [TEST_LABELS, "(0,)", "must be positive"], id="idx-zero-dim"),
    pytest.param("mnist", _edit(IMAGES, lambda d: d[:-1]), DataError,
                 [IMAGES, "holds only 31,359", "truncated"], id="idx-body-short"),
    pytest.param("mnist", _edit(IMAGES, lambda d: d + bytes(10)), DataError,
                 [IMAGES, "holds 31,370", "trailing data"], id="idx-body-long"),
    pytest.param("mnist", _edit(IMAGES, lambda d: _idx_header(8, (2**31 - 1,) * 3) + d[16:]), DataError,
                 [IMAGES, "(2147483647, 2147483647, 2147483647)", "truncated"], id="idx-absurd-dims"),
    pytest.param("mnist", _edit(IMAGES, lambda d: bytes([0, 0, 0x42, 3]) + d[4:]), DataError,
                 [IMAGES, "unknown IDX data type 0x42"], id="idx-unknown-type"),
    pytest.param("mnist", _gzip_instead(TEST_IMAGES, lambda d: d[: len(d) // 2]), DataError,
                 [TEST_IMAGES + ".gz", "corrupt or truncated gzip", "EOFError"], id="gzip-truncated"),
    pytest.param("mnist", _gzip_instead(TEST_IMAGES, _flip_middle), DataError,
                 [TEST_IMAGES + ".gz", "corrupt or truncated gzip"], id="gzip-corrupt"),
    pytest.param("mnist", _gzip_instead(LABELS, lambda d: d[:-8] + bytes(4) + d[-4:]), DataError,
                 [LABELS + ".gz", "corrupt or truncated gzip", "CRC"], id="gzip-bad-crc"),
    pytest.param("mnist", _replace_idx(IMAGES, np.zeros((40, 784), U8)), DataError,
                 [IMAGES, "3 dimensions", "(40, 784)"], id="idx-images-2d"),
    pytest.param("mnist", _replace_idx(IMAGES, np.zeros((40, 28, 28), np.float32)), DataError,
                 [IMAGES, "unsigned bytes", "float32"], id="idx-images-float"),
    pytest.param("mnist", _replace_idx(LABELS, np.zeros((40, 1), U8)), DataError,
                 [LABELS, "1 dimension", "(40, 1)"], id="idx-labels-2d"),
    pytest.param("mnist", _replace_idx(LABELS, np.zeros(40, np.float32)), DataError,
                 [LABELS, "integers", "float32"], id="idx-labels-float"),
    pytest.param("mnist", _replace_idx(TEST_LABELS, np.zeros(19, U8)), DataError,
                 [TEST_IMAGES, "20 images", TEST_LABELS, "19 labels"], id="idx-label-count"),
    pytest.param("fashion-mnist", _replace_idx(TEST_LABELS, np.array([12] + [0] * 19, U8)), DataError,
                 ["fashion-mnist: test labels outside 0..9 (found 12)"], id="idx-test-labels-range"),
    pytest.param("mnist", _replace_idx(LABELS, np.array([0] * 39 + [10], U8)), DataError,
                 ["mnist: training labels outside 0..9 (found 10)"], id="idx-train-labels-range"),
    pytest.param("mnist", _replace_idx(TEST_IMAGES, np.zeros((20, 32, 32), U8)), DataError,
                 ["training inputs have shape (1, 28, 28) but test inputs (1, 32, 32)"], id="idx-sizes-differ"),
    pytest.param("mnist", _delete(TEST_LABELS), DataError,
                 ["missing dataset file(s)", TEST_LABELS], id="idx-missing-file"),
    # CIFAR-100 (valid set: 12 training, 12 test images)
    pytest.param("cifar100", _cifar("train", data=np.zeros((12, 3000), U8)), DataError,
                 ["cifar-100-python/train", "'data' has shape (12, 3000)", "3072"], id="cifar-data-not-3072"),
    pytest.param("cifar100", _cifar("train", data=np.zeros(5000, U8)), DataError,
                 ["cifar-100-python/train", "'data' has shape (5000,)"], id="cifar-data-flat"),
    pytest.param("cifar100", _cifar("train", data=np.full((12, 3072), 300)), DataError,
                 ["cifar-100-python/train", "bytes 0..255", "300"], id="cifar-data-not-bytes"),
    pytest.param("cifar100", _cifar("train", labels=list(range(11))), DataError,
                 ["cifar-100-python/train", "'fine_labels' holds 11 labels for 12 images"], id="cifar-label-count"),
    pytest.param("cifar100", _cifar("train", labels=[0.5] * 12), DataError,
                 ["cifar-100-python/train", "'fine_labels' must be a list of integers", "float64"],
                 id="cifar-labels-float"),
    pytest.param("cifar100", _cifar("test", labels=[3] * 11 + [100]), DataError,
                 ["cifar-100-python/test", "'fine_labels' outside 0..99 (found 100)"], id="cifar-test-labels-range"),
    pytest.param("cifar100", _cifar("test", labels=[0] * 12, key=b"labels"), DataError,
                 ["cifar-100-python/test", "without 'fine_labels'"], id="cifar-missing-key"),
    pytest.param("cifar100", _cifar("test", data=np.zeros((0, 3072), U8), labels=[]), DataError,
                 ["cifar100: the test split is empty"], id="cifar-empty-test"),
    pytest.param("cifar100", _edit("test", lambda d: d[: len(d) // 2]), DataError,
                 ["cifar-100-python/test", "not a readable CIFAR batch"], id="cifar-truncated-pickle"),
    pytest.param("cifar100", _delete("test"), DataError,
                 ["missing dataset file(s)", "cifar-100-python", ": test"], id="cifar-missing-file"),
]


def _valid_root(tmp_path, dataset):
    if dataset == "cifar100":
        return write_cifar(tmp_path / "cifar-100-python", 100, n_per_file=12)
    return write_idx_dataset(tmp_path / dataset, compress=False)


@pytest.mark.parametrize("dataset", ["mnist", "cifar100"])
def test_unbroken_roots_of_the_broken_cases_load(tmp_path, dataset):
    ds = load_dataset(DataConfig(name=dataset, root=str(_valid_root(tmp_path, dataset)), val_size=5))
    assert len(ds.train_y) + len(ds.val_y) == (40 if dataset == "mnist" else 12)


@pytest.mark.parametrize("dataset, breaker, error, fragments", BROKEN)
def test_broken_files_give_one_line_errors(tmp_path, dataset, breaker, error, fragments):
    root = _valid_root(tmp_path, dataset)
    breaker(root)
    with pytest.raises(error) as info:
        load_dataset(DataConfig(name=dataset, root=str(root), val_size=5))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# --- augmentations that do not fit the data: a ConfigError at load time ---


@pytest.mark.parametrize("augment", ["crop_flip", "shift2"])
def test_height_padding_on_mnist1d_is_a_config_error(augment):
    with pytest.raises(ConfigError) as info:
        load_dataset(DataConfig(name="mnist1d", num_samples=500, val_size=50, augment=augment))
    assert str(info.value) == (f"config key 'data.augment': {augment} pads images in height but mnist1d gives "
                               "1-D signals of shape (1, 40); use shift1d or none")


def test_shift1d_on_images_is_a_config_error(tmp_path):
    root = write_idx_dataset(tmp_path / "mnist")
    with pytest.raises(ConfigError, match=r"^config key 'data.augment': shift1d shifts 1-D signals but mnist "
                                          r"gives images of shape \(1, 28, 28\); use shift2, crop_flip or none$"):
        load_dataset(DataConfig(name="mnist", root=str(root), val_size=5, augment="shift1d"))


@pytest.mark.parametrize("name, shape, problem", [
    ("crop_flip", (3, 4, 4), "pads images by 4×4 pixels but digits gives images of only 4×4"),
    ("shift2", (1, 28, 2), "pads images by 2×2 pixels but digits gives images of only 28×2"),
    ("shift1d", (1, 4), "shifts by up to 4 positions but digits gives signals of length 4"),
    ("shift2", (28, 28), "pads images in height"),
    ("crop_flip", (3, 32, 32, 2), "needs images (C, H, W) or 1-D signals (C, L)"),
])
def test_augmentation_check_refuses(name, shape, problem):
    with pytest.raises(ConfigError, match="config key 'data.augment'") as info:
        get_augmentation(name).check(shape, "digits")
    assert problem in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name, shape", [
    ("crop_flip", (3, 32, 32)), ("crop_flip", (1, 8, 8)), ("shift2", (1, 28, 28)), ("shift1d", (1, 40)),
    ("shift1d", (1, 5)), ("none", (1, 40)), ("none", (3, 2, 2)), ("none", (7,)),
])
def test_augmentation_check_accepts(name, shape):
    get_augmentation(name).check(shape, "data")


# --- MNIST-1D size guard: refused before generating anything ---


def test_mnist1d_size_guard_refuses_before_generating(monkeypatch):
    import mnist1d.data

    def no_generation(*args, **kwargs):
        raise AssertionError("the guard must refuse before generating")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    expected = (r"^config key 'data.num_samples': 10,000,000 MNIST-1D examples would take ~2 h to generate "
                r"\(about 1,400/s here\); at most 1,000,000$")
    with pytest.raises(ConfigError, match=expected):
        load_dataset(DataConfig(name="mnist1d", num_samples=10_000_000))
    with pytest.raises(ConfigError, match=expected):
        check_data_source(DataConfig(name="mnist1d", num_samples=10_000_000))
    with pytest.raises(ConfigError, match=r"1,000,001 MNIST-1D examples would take ~12 min"):
        sources.load_mnist1d_arrays(sources.MNIST1D_MAX_SAMPLES + 1, seed=3)
    sources.check_mnist1d_size(sources.MNIST1D_MAX_SAMPLES)  # the limit itself is allowed
    check_data_source(DataConfig(name="mnist1d", num_samples=5000))


# --- check_data_source: what is missing, without reading anything ---


def test_check_data_source_unset_or_missing_root(tmp_path):
    with pytest.raises(DataError) as info:
        check_data_source(DataConfig(name="cifar100"))
    assert str(info.value) == ("cifar100: data.root is not set (a folder of the CIFAR-100 python pickles: train, "
                               "test); set it: `kdlab train ... data.root=/path/to/cifar-100-python`, or "
                               "`kdlab reproduce ... --set data.root=/path/to/cifar-100-python`")
    with pytest.raises(DataError, match=r"^mnist: data.root is not set \(a folder of the IDX files: "
                                        r"train-images-idx3-ubyte, .*each optionally .gz\); set it"):
        check_data_source(DataConfig(name="mnist"))
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=f"^cifar10: data directory {missing} does not exist "
                                        r"\(data.root must be a folder of the CIFAR-10 python pickles: "
                                        r"data_batch_1, .*, test_batch\)$"):
        check_data_source(DataConfig(name="cifar10", root=str(missing)))


def test_check_data_source_fashion_mnist_default(tmp_path, monkeypatch):
    monkeypatch.setattr(kdlab.data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist` or set data.root"):
        check_data_source(DataConfig(name="fashion-mnist"))
    monkeypatch.setattr(kdlab.data, "FASHION_MNIST_DEBIAN_DIR", write_idx_dataset(tmp_path / "debian"))
    check_data_source(DataConfig(name="fashion-mnist"))


def test_check_data_source_names_missing_files(tmp_path):
    root = write_cifar(tmp_path / "cifar-10-batches-py", 10)
    (root / "data_batch_3").unlink()
    (root / "test_batch").unlink()
    with pytest.raises(DataError) as info:
        check_data_source(DataConfig(name="cifar10", root=str(root)))
    assert str(info.value).startswith(f"cifar10: missing dataset file(s) in {root}: data_batch_3, test_batch (")
    # the loader, called directly, gives the same message from the same helper (less the dataset name)
    with pytest.raises(DataError) as direct:
        load_cifar_arrays(root, 10)
    assert "cifar10: " + str(direct.value) == str(info.value)


def test_check_data_source_does_not_read_files(tmp_path):
    cifar = tmp_path / "cifar-100-python"
    cifar.mkdir()
    for name in ("train", "test"):
        (cifar / name).write_bytes(b"garbage")  # present: the check passes; reading them would fail
    check_data_source(DataConfig(name="cifar100", root=str(cifar)))
    with pytest.raises(DataError, match="not a readable CIFAR batch"):
        load_dataset(DataConfig(name="cifar100", root=str(cifar)))
    idx = tmp_path / "mnist"
    idx.mkdir()
    for name in (IMAGES, LABELS, TEST_IMAGES + ".gz", TEST_LABELS + ".gz"):  # either spelling counts
        (idx / name).write_bytes(b"")
    check_data_source(DataConfig(name="mnist", root=str(idx)))


def test_check_data_source_builtin_datasets(monkeypatch):
    check_data_source(DataConfig(name="digits"))
    check_data_source(DataConfig(name="mnist1d"))
    monkeypatch.setitem(sources.OPTIONAL_PACKAGES, "digits", ("kdlab_no_such_module", "digits needs it"))
    with pytest.raises(DataError, match="^digits needs it$"):
        check_data_source(DataConfig(name="digits"))


def _mnist1d_from_cache_only(monkeypatch, num_samples: int, seed: int):
    """load_mnist1d_arrays with the in-process cache cleared and the generator made to fail:
    the arrays can only come from the disk cache."""
    import mnist1d.data

    def no_generation(args):
        raise AssertionError("generated again although cached")

    sources.load_mnist1d_arrays.cache_clear()
    with monkeypatch.context() as m:
        m.setattr(mnist1d.data, "make_dataset", no_generation)
        return sources.load_mnist1d_arrays(num_samples, seed=seed)


def test_mnist1d_is_cached_on_disk_and_a_bad_cache_file_is_regenerated(monkeypatch, tmp_path):
    """Generated once per (size, seed, versions), then read back identical by any process;
    a truncated cache file is generated again and replaced."""
    monkeypatch.setenv("KDLAB_CACHE", str(tmp_path))
    sources.load_mnist1d_arrays.cache_clear()
    first = sources.load_mnist1d_arrays(300, seed=7)
    (path,) = (tmp_path / "mnist1d").glob("n300-s7-*.npz")
    assert not list((tmp_path / "mnist1d").glob("*.tmp"))
    again = _mnist1d_from_cache_only(monkeypatch, 300, seed=7)
    for a, b in zip(first, again):
        assert a.dtype == b.dtype and np.array_equal(a, b)

    path.write_bytes(path.read_bytes()[:100])  # truncated
    sources.load_mnist1d_arrays.cache_clear()
    regenerated = sources.load_mnist1d_arrays(300, seed=7)
    for a, b in zip(first, regenerated):
        assert np.array_equal(a, b)
    assert sources._read_mnist1d_cache(path, 300) is not None  # replaced by a good file
    sources.load_mnist1d_arrays.cache_clear()


def test_mnist1d_extra_test_appends_held_out_signals_and_leaves_training_alone(tmp_path):
    """data.extra_test: the standard split first, then signals from the generator under another
    seed (none equal to a training signal); training data, normalisation and so the trained
    weights are the same as without it; the key is in the run hash only when set."""
    from kdlab.config import build_config
    from kdlab.runs import torch_load
    from kdlab.train import train

    plain, extra = DataConfig(name="mnist1d", num_samples=500), DataConfig(name="mnist1d", num_samples=500,
                                                                          extra_test=300)
    a, b = load_dataset(plain), load_dataset(extra)
    for key in ("train_x", "train_y", "val_x", "val_y", "mean", "std"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert len(a.test_y) == 100 and len(b.test_y) == 400
    assert torch.equal(b.test_x[:100], a.test_x) and torch.equal(b.test_y[:100], a.test_y)
    train_rows = {row.numpy().tobytes() for row in torch.cat([a.train_x, a.val_x])}
    assert not any(row.numpy().tobytes() in train_rows for row in b.test_x[100:])
    assert sorted(set(b.test_y[100:].tolist())) == list(range(10))  # all classes, as the generator draws them

    base = {"data": {"name": "mnist1d", "num_samples": 500}, "model": {"name": "mlp-16"},
            "optim": {"epochs": 2, "batch_size": 64}, "threads": 1}
    assert build_config(base).run_hash() == build_config({**base, "data": {**base["data"], "extra_test": 0}}).run_hash()
    runs = []
    for n in (0, 300):
        cfg = build_config({**base, "data": {**base["data"], "extra_test": n}, "out_dir": str(tmp_path / str(n))})
        runs.append(Path(train(cfg, progress=False, log=lambda *_: None)["run_dir"]))
    assert runs[0].name != runs[1].name  # the key hashes when set
    first, second = (torch_load(r / "model.pt") for r in runs)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with np.load(runs[1] / "eval_test.npz") as f:
        assert len(f["labels"]) == 400


def test_extra_test_is_for_mnist1d_only():
    with pytest.raises(ConfigError, match="data.extra_test.*MNIST-1D only"):
        check_data_source(DataConfig(name="digits", extra_test=10))


def test_mnist1d_extra_test_of_any_size_gives_that_many_signals(monkeypatch, tmp_path):
    """The generator makes whole tens (num_samples // 10 per class): data.extra_test asks it for
    the next whole ten and keeps the first extra_test signals (its train part, then its test
    part); none repeats a training or a standard test signal."""
    monkeypatch.setenv("KDLAB_CACHE", str(tmp_path))
    sources.load_mnist1d_arrays.cache_clear()
    plain = load_dataset(DataConfig(name="mnist1d", num_samples=100))
    seen = {row.numpy().tobytes() for row in torch.cat([plain.train_x, plain.val_x, plain.test_x])}
    for n in (1, 7, 13):
        data = load_dataset(DataConfig(name="mnist1d", num_samples=100, extra_test=n))
        assert len(data.test_x) == len(data.test_y) == 20 + n
        assert torch.equal(data.test_x[:20], plain.test_x) and torch.equal(data.train_x, plain.train_x)
        x, y, x_test, y_test = sources.load_mnist1d_arrays(-(-n // 10) * 10, seed=42 + 1_000_000)
        assert np.array_equal(data.test_x[20:].numpy(), np.concatenate([x, x_test])[:n])
        assert np.array_equal(data.test_y[20:].numpy(), np.concatenate([y, y_test])[:n])
        assert not any(row.numpy().tobytes() in seen for row in data.test_x[20:])
    sources.load_mnist1d_arrays.cache_clear()


def test_mnist1d_sizes_not_whole_tens_are_cached_and_under_ten_is_a_config_error(monkeypatch, tmp_path):
    """num_samples=55 gives the generator's 50 signals, read back from the disk cache (it was
    rejected as the wrong size and generated in every process); under 10 the generator has
    nothing to make: a ConfigError before it runs."""
    monkeypatch.setenv("KDLAB_CACHE", str(tmp_path))
    sources.load_mnist1d_arrays.cache_clear()
    first = sources.load_mnist1d_arrays(55, seed=3)
    assert len(first[0]) + len(first[2]) == 50
    again = _mnist1d_from_cache_only(monkeypatch, 55, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    sources.load_mnist1d_arrays.cache_clear()
    with pytest.raises(ConfigError, match=r"^config key 'data.num_samples': .*at least 10 \(got 9\)$"):
        check_data_source(DataConfig(name="mnist1d", num_samples=9))
    with pytest.raises(ConfigError, match=r"^config key 'data.extra_test': 1,000,010 MNIST-1D examples"):
        check_mnist1d_size(1_000_010, "data.extra_test")
