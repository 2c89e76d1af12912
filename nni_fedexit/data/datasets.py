"""S2: image data, the server's search split, and the clients' partitions.

Everything is held as in-memory tensors: the data sets used here are small enough, and it lets
the search, the federated rounds and the tests slice by index without re-reading files.

Data roles: the server keeps a slice of the training set for the architecture search
(``search_train`` / ``search_val``), the rest is partitioned among the K edge clients, and the
official test set is used only for final numbers.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from nni_fedexit.checks import reason
from nni_fedexit.files import write_atomic

__all__ = [
    "DataError",
    "ImageData",
    "DataBundle",
    "DataRoles",
    "DATASETS",
    "FASHION_MNIST_SYSTEM_DIR",
    "load_dataset",
    "load_image_folder",
    "save_image_folder",
    "standardise",
    "split_roles",
    "partition",
    "partition_iid",
    "partition_dirichlet",
    "partition_shards",
    "label_skew",
]

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "digits")

_FMNIST_HELP = (
    "Get Fashion-MNIST one of these ways: `apt-get install dataset-fashion-mnist` (puts the IDX "
    f"files in {FASHION_MNIST_SYSTEM_DIR}; `make data` does it), pass data_dir= / --data-dir "
    "pointing at a folder with the four *-ubyte(.gz) files, or allow download=True where there "
    "is internet."
)


class DataError(RuntimeError):
    """A data set is missing, corrupt, or cannot be split as asked. ``key``: the argument (a
    setting of the same name) whose value makes it impossible, when one alone does."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key



@dataclass
class ImageData:
    """Images (N, C, H, W) as normalised float32 and labels (N,) as int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray | Sequence[int] | torch.Tensor) -> "ImageData":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageData(self.images[idx], self.labels[idx])


@dataclass
class DataBundle:
    """A data set's training and official test parts, with what a model needs to know of it."""

    name: str
    train: ImageData
    test: ImageData
    num_classes: int
    class_names: tuple[str, ...]
    source: str  # where it was read from, for reports
    #: per-channel mean and std of the training images in [0, 1]: every image is standardised with
    #: them (an edge device's own images too, see :func:`load_image_folder`)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def in_chans(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])


@dataclass
class DataRoles:
    """Indices into the training set: the server's search split and the clients' share."""

    search_train: np.ndarray
    search_val: np.ndarray
    clients: np.ndarray


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nni-fedexit"


def _find_fmnist_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (plain or gzipped), or None if any is missing."""
    found: dict[str, Path] = {}
    for sub in (folder, folder / "FashionMNIST" / "raw", folder / "raw"):
        for stem in FASHION_MNIST_FILES:
            for candidate in (sub / stem, sub / f"{stem}.gz"):
                if stem not in found and candidate.is_file():
                    found[stem] = candidate
    return found if len(found) == len(FASHION_MNIST_FILES) else None


def _stage_fmnist(files: dict[str, Path]) -> dict[str, Path]:
    """The IDX files, uncompressed (torchvision's IDX reader reads plain files).

    The Debian package ships gzipped files; they are decompressed once into the cache, keyed by
    the sources' sizes and mtimes so a replaced file is read afresh.
    """
    key = "-".join(f"{p.stat().st_size}.{int(p.stat().st_mtime)}" for p in files.values())
    raw = _cache_dir() / "fashion-mnist" / hashlib.sha1(key.encode()).hexdigest()[:12]
    raw.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    for stem, src in files.items():
        if src.suffix != ".gz":
            staged[stem] = src
            continue
        dst = staged[stem] = raw / stem
        if dst.is_file():
            continue
        def unzip(tmp: Path, src: Path = src) -> None:
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)

        try:
            write_atomic(dst, unzip)  # its own temporary file: concurrent trials filling the cache do not collide
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise DataError(f"Fashion-MNIST file {src} is corrupt or unreadable ({reason(err)}). {_FMNIST_HELP}") from err
    return staged


def _read_idx(path: Path, source: Path, expected: int) -> torch.Tensor:
    """One IDX file through torchvision's reader; a bad header or size names the source file."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    try:
        tensor = read_sn3_pascalvincent_tensor(str(path), strict=True)
    except Exception as err:  # torchvision asserts / raises RuntimeError on malformed files
        raise DataError(f"Fashion-MNIST file {source} is corrupt ({reason(err)}). {_FMNIST_HELP}") from err
    if tensor.shape[0] != expected:
        raise DataError(
            f"Fashion-MNIST file {source} holds {tensor.shape[0]} items, expected {expected}: it is "
            f"truncated or not Fashion-MNIST. {_FMNIST_HELP}"
        )
    return tensor


def standardise(images_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel."""
    shape = (1, len(mean), 1, 1)
    m = torch.tensor(list(mean), dtype=torch.float32).view(shape)
    s = torch.tensor(list(std), dtype=torch.float32).view(shape)
    return (images_u8.float().div_(255.0) - m) / s


def _normalise(train_u8: torch.Tensor, test_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """uint8 (N, C, H, W) -> float32 standardised with the training set's per-channel stats."""
    train = train_u8.float().div_(255.0)
    mean = tuple(float(v) for v in train.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in train.std(dim=(0, 2, 3)).clamp_min(1e-6))
    return standardise(train_u8, mean, std), standardise(test_u8, mean, std), {"mean": mean, "std": std}


def _load_fashion_mnist(data_dir: str | Path | None, download: bool) -> DataBundle:
    folders = [Path(data_dir)] if data_dir is not None else [FASHION_MNIST_SYSTEM_DIR, _cache_dir() / "download"]
    files = None
    for folder in folders:
        files = _find_fmnist_files(folder)
        if files is not None:
            source = str(folder)
            break
    if files is None:
        if not download:
            where = ", ".join(str(p) for p in folders)
            raise DataError(f"Fashion-MNIST IDX files not found in {where}. {_FMNIST_HELP}")
        from torchvision.datasets import FashionMNIST

        root = folders[-1] if data_dir is None else Path(data_dir)
        try:
            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
        except Exception as err:  # network errors come in many types
            raise DataError(f"Downloading Fashion-MNIST into {root} failed ({reason(err)}). {_FMNIST_HELP}") from err
        files = _find_fmnist_files(root)
        assert files is not None, f"torchvision downloaded Fashion-MNIST but not into {root}"
        source = f"torchvision download in {root}"
    plain = _stage_fmnist(files)
    sizes = {"train": 60000, "t10k": 10000}
    arrays = {
        stem: _read_idx(plain[stem], files[stem], sizes[stem.split("-")[0]]) for stem in FASHION_MNIST_FILES
    }
    for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        if int(arrays[stem].max()) > 9:
            raise DataError(f"Fashion-MNIST file {files[stem]} has labels above 9: it is corrupt. {_FMNIST_HELP}")
    x_train, x_test, stats = _normalise(
        arrays["train-images-idx3-ubyte"].unsqueeze(1), arrays["t10k-images-idx3-ubyte"].unsqueeze(1)
    )
    return DataBundle(
        "fashion-mnist",
        ImageData(x_train, arrays["train-labels-idx1-ubyte"].long()),
        ImageData(x_test, arrays["t10k-labels-idx1-ubyte"].long()),
        10,
        FASHION_MNIST_CLASSES,
        source,
        **stats,
    )


def _load_cifar(name: str, data_dir: str | Path | None, download: bool) -> DataBundle:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    root = Path(data_dir) if data_dir is not None else _cache_dir() / "download"
    parts = {}
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as err:
            raise DataError(
                f"{name} not found or corrupt under {root} ({reason(err)}). Put torchvision's "
                f"'{cls.base_folder}' folder (from {cls.filename}) there and pass data_dir={root}, "
                "or allow download=True where there is internet."
            ) from err
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        parts[train] = (images, torch.as_tensor(ds.targets, dtype=torch.long))
        class_names = tuple(ds.classes)
    x_train, x_test, stats = _normalise(parts[True][0], parts[False][0])
    return DataBundle(
        name, ImageData(x_train, parts[True][1]), ImageData(x_test, parts[False][1]),
        len(class_names), class_names, str(root), **stats,
    )


def _load_digits(test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """scikit-learn's bundled 8x8 digits (1,797 images): no official test set, so a seeded 20%."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    labels = torch.as_tensor(d.target, dtype=torch.long)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test_idx, train_idx = order[:n_test], order[n_test:]
    x_train, x_test, stats = _normalise(images[train_idx].round().to(torch.uint8), images[test_idx].round().to(torch.uint8))
    return DataBundle(
        "digits", ImageData(x_train, labels[train_idx]), ImageData(x_test, labels[test_idx]),
        10, tuple(str(i) for i in range(10)), "sklearn.datasets.load_digits", **stats,
    )


def load_dataset(name: str = "fashion-mnist", data_dir: str | Path | None = None, download: bool = False) -> DataBundle:
    """Load a data set by name: ``fashion-mnist``, ``cifar10``, ``cifar100`` or ``digits``.

    Fashion-MNIST is read from ``data_dir`` if given, else from the Debian package's folder
    (``/usr/share/datasets/fashion-mnist``), else downloaded by torchvision if ``download``.
    CIFAR loads through torchvision from ``data_dir``. Raises :class:`DataError` naming the
    path and the fix when files are missing or corrupt.
    """
    key = name.lower().replace("_", "-")
    if key in ("fashion-mnist", "fashionmnist", "fmnist"):
        return _load_fashion_mnist(data_dir, download)
    if key in ("cifar10", "cifar-10", "cifar100", "cifar-100"):
        return _load_cifar(key.replace("-", ""), data_dir, download)
    if key == "digits":
        return _load_digits()
    raise DataError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------
# An edge device's own images: one folder per class
# ---------------------------------------------------------------------------------------------


def _folder_label(name: str, class_names: Sequence[str]) -> int | None:
    if name in class_names:
        return list(class_names).index(name)
    if name.isdigit() and int(name) < len(class_names):
        return int(name)
    return None


def load_image_folder(
    folder: str | Path, class_names: Sequence[str], in_chans: int, image_size: int,
    mean: Sequence[float], std: Sequence[float],
) -> ImageData:
    """A device's labelled images from ``folder/<class>/<image>`` (torchvision's ImageFolder layout).

    ``<class>`` is the class index (``0``, ``1``, ...) or the data set's class name; images are
    taken in file-name order (across classes), converted to ``in_chans`` channels and ``image_size`` pixels and standardised with the data
    set's ``mean``/``std``, so they match what the server trains and validates on.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"data-dir {root} is not a folder: give a folder with one sub-folder per class")
    mode = "L" if in_chans == 1 else "RGB"
    files: list[tuple[str, int, Path]] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        label = _folder_label(sub.name, class_names)
        if label is None:
            raise DataError(f"data-dir {root}: sub-folder {sub.name!r} is no class; name class folders 0.."
                            f"{len(class_names) - 1} or {', '.join(map(repr, class_names))}")
        files += [(p.name, label, p) for p in sub.iterdir() if p.suffix.lower() in IMG_EXTENSIONS]
    images: list[np.ndarray] = []
    labels: list[int] = []
    for _, label, path in sorted(files):  # file-name order across classes: stable, and the writer's order
        images.append(_read_image(root, path, mode, image_size))
        labels.append(label)
    if not images:
        raise DataError(f"data-dir {root} holds no images (extensions {', '.join(IMG_EXTENSIONS)}) in class sub-folders")
    batch = torch.from_numpy(np.stack(images))
    batch = batch.unsqueeze(1) if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
    return ImageData(standardise(batch.contiguous(), mean, std), torch.tensor(labels, dtype=torch.long))


def _read_image(root: Path, path: Path, mode: str, image_size: int) -> np.ndarray:
    """One image of a device's folder as ``mode`` pixels of ``image_size`` squared; one that cannot be
    read, or that is larger than Pillow's decompression-bomb limit, is a DataError naming it."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that: refuse from the first
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            img = img.convert(mode)
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found.group(1)):,} pixels" if found else reason(err)
        limit = f"at most {Image.MAX_IMAGE_PIXELS:,} pixels" if Image.MAX_IMAGE_PIXELS else "smaller"
        raise DataError(f"data-dir {root}: image {path} is too large to read ({size}): resize it, e.g. to "
                        f"{image_size}x{image_size} as the network sees it; images must be {limit}") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # what Pillow raises on damaged or unknown files
        raise DataError(f"data-dir {root}: cannot read image {path} ({reason(err)}): replace or remove the file") from err


def save_image_folder(data: ImageData, folder: str | Path, mean: Sequence[float], std: Sequence[float]) -> Path:
    """Write standardised images as PNGs into ``folder/<class index>/`` (what :func:`load_image_folder` reads)."""
    from PIL import Image

    root = Path(folder)
    shape = (1, len(mean), 1, 1)
    m = torch.tensor(list(mean), dtype=torch.float32).view(shape)
    s = torch.tensor(list(std), dtype=torch.float32).view(shape)
    pixels = ((data.images * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)
    for i, (img, label) in enumerate(zip(pixels, data.labels.tolist())):
        sub = root / str(label)
        sub.mkdir(parents=True, exist_ok=True)
        array = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(sub / f"{i:06d}.png")
    return root


# ---------------------------------------------------------------------------------------------
# Roles and partitions
# ---------------------------------------------------------------------------------------------


def split_roles(
    n_train: int,
    server_fraction: float = 0.2,
    val_fraction: float = 0.2,
    seed: int = 0,
    server_max_samples: int | None = None,
) -> DataRoles:
    """Split training indices into the server's search train/val slice and the clients' share.

    ``server_fraction`` of the training set goes to the server (capped at ``server_max_samples``
    if given, so CPU runs can search on a small slice); ``val_fraction`` of that is validation.
    Every index lands in exactly one role.
    """
    if not 0.0 < server_fraction < 1.0:
        raise DataError(f"server_fraction must be in (0, 1), got {server_fraction}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n_train)
    n_server = int(round(n_train * server_fraction))
    if server_max_samples is not None:
        n_server = min(n_server, int(server_max_samples))
    n_val = int(round(n_server * val_fraction))
    if n_val < 1 or n_server - n_val < 1 or n_train - n_server < 1:
        raise DataError(
            f"cannot split {n_train} training samples with server_fraction={server_fraction}, "
            f"val_fraction={val_fraction}: a role would be empty; use more data or other fractions"
        )
    server = order[:n_server]
    return DataRoles(np.sort(server[n_val:]), np.sort(server[:n_val]), np.sort(order[n_server:]))


def _check_clients(n_samples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise DataError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > n_samples:
        raise DataError(
            f"{num_clients} clients but only {n_samples} samples to share: a client would be empty; "
            "use fewer clients or more data", key="num_clients"
        )


def partition_iid(labels: np.ndarray, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle and cut into ``num_clients`` near-equal parts."""
    labels = np.asarray(labels)
    _check_clients(len(labels), num_clients)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p) for p in np.array_split(order, num_clients)]


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0, min_size: int = 1, max_tries: int = 100
) -> list[np.ndarray]:
    """Label-skewed partition: each class is spread over clients by proportions ~ Dir(alpha).

    Small ``alpha`` gives each client few classes; large ``alpha`` approaches IID. Draws again
    (same seed stream) until every client holds at least ``min_size`` samples.
    """
    labels = np.asarray(labels)
    _check_clients(len(labels), num_clients)
    if not alpha > 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    sizes = np.zeros(num_clients, dtype=int)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        sizes = np.array([sum(len(c) for c in p) for p in parts])
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(p)) for p in parts]
    empty = [int(i) for i in np.flatnonzero(sizes < min_size)]
    raise DataError(
        f"dirichlet(alpha={alpha}) left client(s) {empty} with fewer than {min_size} samples "
        f"after {max_tries} draws ({len(labels)} samples, {num_clients} clients); "
        "raise alpha, use fewer clients, or more data"
    )


def partition_shards(labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int = 0) -> list[np.ndarray]:
    """Pathological non-IID: each client holds exactly ``classes_per_client`` classes.

    Classes are dealt round-robin over a seeded class order, so every class has an owner
    (which needs ``num_clients * classes_per_client >= #classes``); each class's samples are
    then cut evenly among the clients that own it.
    """
    labels = np.asarray(labels)
    _check_clients(len(labels), num_clients)
    classes = np.unique(labels)
    k = int(classes_per_client)
    if not 1 <= k <= len(classes):
        raise DataError(f"classes_per_client must be in 1..{len(classes)}, got {classes_per_client}")
    if num_clients * k < len(classes):
        raise DataError(
            f"shards: {num_clients} clients x {k} classes cannot cover {len(classes)} classes, so some "
            "samples would belong to no client; raise classes_per_client or num_clients"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    owners: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(k):
            owners[int(order[(client * k + j) % len(classes)])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, clients in owners.items():
        idx = rng.permutation(np.flatnonzero(labels == c))
        for client, chunk in zip(clients, np.array_split(idx, len(clients))):
            parts[client].append(chunk)
    out = [np.sort(np.concatenate(p)) if p else np.array([], dtype=int) for p in parts]
    empty = [i for i, p in enumerate(out) if len(p) == 0]
    if empty:
        raise DataError(f"shards left client(s) {empty} empty: too few samples per class for {num_clients} clients")
    return out


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    classes_per_client: int = 2,
) -> list[np.ndarray]:
    """Partition sample positions among clients by ``scheme``: ``iid``, ``dirichlet`` or ``shards``.

    Returns one sorted array of positions (into ``labels``) per client; every position is in
    exactly one client; the same seed gives the same partition.
    """
    if scheme == "iid":
        return partition_iid(labels, num_clients, seed)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_clients, alpha, seed)
    if scheme == "shards":
        return partition_shards(labels, num_clients, classes_per_client, seed)
    raise DataError(f"unknown partition scheme {scheme!r}: choose iid, dirichlet or shards")


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one.

    0 for a perfectly IID split; approaches 1 as clients hold disjoint classes.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    glob = np.array([(labels == c).mean() for c in classes])
    dists = []
    for p in parts:
        own = np.array([(labels[p] == c).mean() for c in classes])
        dists.append(0.5 * np.abs(own - glob).sum())
    return float(np.mean(dists))
