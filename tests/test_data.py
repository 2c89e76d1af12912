"""S2: data loading, the server's search split, and the client partitioners."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from nni_fedexit.data import (
    FASHION_MNIST_SYSTEM_DIR,
    DataError,
    label_skew,
    load_dataset,
    partition,
    split_roles,
)
from helpers import needs_fmnist

LABELS = np.random.default_rng(0).integers(0, 10, size=3000)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n, "a sample is in two clients or in none"
    assert np.array_equal(np.sort(joined), np.arange(n))
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize(
    "scheme,kwargs",
    [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("dirichlet", {"alpha": 100.0}), ("shards", {"classes_per_client": 2})],
)
def test_partition_covers_every_sample_exactly_once(scheme, kwargs):
    parts = partition(LABELS, 20, scheme, seed=1, **kwargs)
    assert len(parts) == 20
    _assert_exact_cover(parts, len(LABELS))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_is_seeded(scheme):
    a = partition(LABELS, 10, scheme, seed=7)
    b = partition(LABELS, 10, scheme, seed=7)
    c = partition(LABELS, 10, scheme, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    skews = [label_skew(LABELS, partition(LABELS, 10, "dirichlet", seed=0, alpha=a)) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert label_skew(LABELS, partition(LABELS, 10, "iid", seed=0)) < skews[0] + 0.05


def test_shards_give_each_client_exactly_k_classes():
    parts = partition(LABELS, 15, "shards", seed=0, classes_per_client=3)
    assert all(len(np.unique(LABELS[p])) == 3 for p in parts)


def test_partition_errors_name_the_problem():
    with pytest.raises(DataError, match="a client would be empty"):
        partition(LABELS[:5], 6, "iid")
    with pytest.raises(DataError, match=r"cannot cover 10 classes"):
        partition(LABELS, 3, "shards", classes_per_client=2)
    with pytest.raises(DataError, match=r"client\(s\) \[.*\] with fewer than 1 samples"):
        partition(LABELS[:40], 30, "dirichlet", alpha=0.01, seed=0)
    with pytest.raises(DataError, match="alpha must be > 0"):
        partition(LABELS, 3, "dirichlet", alpha=0)
    with pytest.raises(DataError, match="unknown partition scheme 'zipf'"):
        partition(LABELS, 3, "zipf")


def test_split_roles_is_disjoint_and_complete():
    roles = split_roles(1000, server_fraction=0.3, val_fraction=0.25, seed=0)
    assert (len(roles.search_train), len(roles.search_val), len(roles.clients)) == (225, 75, 700)
    _assert_exact_cover([roles.search_train, roles.search_val, roles.clients], 1000)
    capped = split_roles(1000, server_fraction=0.3, val_fraction=0.25, server_max_samples=100)
    assert len(capped.search_train) + len(capped.search_val) == 100 and len(capped.clients) == 900
    with pytest.raises(DataError, match="server_fraction"):
        split_roles(1000, server_fraction=1.0)
    with pytest.raises(DataError, match="a role would be empty"):
        split_roles(3, server_fraction=0.1)


def test_digits_loads_normalised():
    d = load_dataset("digits")
    assert d.train.images.shape[1:] == (1, 8, 8) and len(d.train) + len(d.test) == 1797
    assert abs(float(d.train.images.mean())) < 1e-3
    assert set(d.train.labels.tolist()) == set(range(10))


@needs_fmnist
def test_fashion_mnist_loads_from_the_debian_package(cache):
    d = load_dataset("fashion-mnist")
    assert d.source == str(FASHION_MNIST_SYSTEM_DIR)
    assert tuple(d.train.images.shape) == (60000, 1, 28, 28) and tuple(d.test.images.shape) == (10000, 1, 28, 28)
    assert np.bincount(d.train.labels.numpy()).tolist() == [6000] * 10
    assert abs(float(d.train.images.mean())) < 1e-3 and d.class_names[0] == "T-shirt/top"


def test_missing_fashion_mnist_names_the_path_and_the_fix(tmp_path, cache):
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert str(tmp_path) in str(err.value) and "apt-get install dataset-fashion-mnist" in str(err.value)


def _copy_fmnist(dst: Path) -> Path:
    dst.mkdir()
    for f in FASHION_MNIST_SYSTEM_DIR.glob("*.gz"):
        shutil.copy(f, dst / f.name)
    return dst


@needs_fmnist
def test_truncated_fashion_mnist_file_names_the_file(tmp_path, cache):
    folder = _copy_fmnist(tmp_path / "fm")
    target = folder / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:100_000])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz is corrupt"):
        load_dataset("fashion-mnist", data_dir=folder)


def test_garbage_idx_content_is_reported_as_corrupt(tmp_path, cache):
    folder = tmp_path / "fm"
    folder.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(folder / f"{stem}.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x03" + b"\x00" * 64)  # an IDX header promising no data
    with pytest.raises(DataError, match=r"file .*fm/train-images-idx3-ubyte.gz is corrupt"):
        load_dataset("fashion-mnist", data_dir=folder)


def test_missing_cifar_names_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_dataset("cifar10", data_dir=tmp_path)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown data set 'mnist3d'"):
        load_dataset("mnist3d")


def test_image_folder_round_trips_a_partition_and_checks_its_layout(tmp_path):
    """An edge device's own images (data-dir): what save_image_folder writes loads back exactly."""
    import torch
    from PIL import Image

    from nni_fedexit.data import load_image_folder, save_image_folder

    bundle = load_dataset("digits")
    part = bundle.train.subset(np.arange(40))
    folder = save_image_folder(part, tmp_path / "device", bundle.mean, bundle.std)
    assert sorted(p.name for p in folder.iterdir()) == sorted({str(int(y)) for y in part.labels})
    shape = (bundle.class_names, bundle.in_chans, bundle.image_size, bundle.mean, bundle.std)
    back = load_image_folder(folder, *shape)
    assert torch.equal(back.images, part.images) and torch.equal(back.labels, part.labels)

    # class folders may carry the class names; other images are converted and resized
    named = tmp_path / "named"
    (named / "7").mkdir(parents=True)
    Image.new("RGB", (16, 16), (255, 255, 255)).save(named / "7" / "white.jpg")
    white = load_image_folder(named, *shape)
    assert white.images.shape == (1, 1, 8, 8) and white.labels.tolist() == [7]
    assert torch.allclose(white.images, torch.full((1, 1, 8, 8), (1.0 - bundle.mean[0]) / bundle.std[0]))

    (named / "cat").mkdir()
    with pytest.raises(DataError, match="sub-folder 'cat' is no class"):
        load_image_folder(named, *shape)
    with pytest.raises(DataError, match="holds no images"):
        load_image_folder(tmp_path / "device" / "0", *shape)  # images but no class folders
    with pytest.raises(DataError, match="is not a folder"):
        load_image_folder(tmp_path / "nothing", *shape)


def test_bundles_keep_their_standardisation():
    bundle = load_dataset("digits")
    assert len(bundle.mean) == len(bundle.std) == bundle.in_chans == 1
    pixels = bundle.train.images * bundle.std[0] + bundle.mean[0]
    assert abs(float(pixels.mean()) - bundle.mean[0]) < 1e-4 and float(pixels.min()) >= -1e-5
