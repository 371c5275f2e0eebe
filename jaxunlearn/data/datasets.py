"""Data sets as plain host arrays, moved to the device once per run.

Every data set is a :class:`Dataset` of uint8 (or float32) images ``[n, H, W, C]``
and int32 labels ``[n]``; normalisation and augmentation happen on the device,
inside the jitted training step.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import os
import pickle
import tarfile
from typing import Callable

import numpy as np

from jaxunlearn.errors import JaxUnlearnError


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification data set held on the host.

    train_images: u8|f32[n_train, H, W, C]; train_labels: i32[n_train]
    test_images:  u8|f32[n_test, H, W, C];  test_labels:  i32[n_test]
    mean, std: per-channel statistics in pixel units, used to normalise on device.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def n_train(self) -> int:
        return int(self.train_labels.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test_labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def all_images(self) -> np.ndarray:
        """Train points first, then test points: the order of ``margins.npy`` columns."""
        return np.concatenate([self.train_images, self.test_images])

    @property
    def all_labels(self) -> np.ndarray:
        return np.concatenate([self.train_labels, self.test_labels])

    def fingerprint(self) -> str:
        """A short hash of shapes and labels: detects a run resumed on other data."""
        h = hashlib.sha256()
        for a in (self.train_labels, self.test_labels):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(str((self.train_images.shape, self.test_images.shape)).encode())
        h.update(np.ascontiguousarray(self.train_images[:64]).tobytes())
        return h.hexdigest()[:16]


def make_dataset(name, train_images, train_labels, test_images, test_labels, num_classes) -> Dataset:
    """Validates arrays and computes per-channel mean/std from the training images."""
    if len(train_images) == 0:
        raise JaxUnlearnError(f"{name}: the training set is empty")
    for split, x, y in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        y = np.asarray(y)
        if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and
                                                         np.all(np.isfinite(y)) and np.all(y == np.round(y)))):
            raise JaxUnlearnError(f"{name}: {split} labels must be integers (class indices), got dtype {y.dtype}")
        if x.ndim != 4:
            raise JaxUnlearnError(f"{name}: {split} images must be [n, H, W, C], got shape {x.shape}")
        if y.shape != (x.shape[0],):
            raise JaxUnlearnError(f"{name}: {split} labels shape {y.shape} does not match {x.shape[0]} images")
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise JaxUnlearnError(f"{name}: {split} labels outside [0, {num_classes})")
        if x.dtype != np.uint8 and not np.all(np.isfinite(x)):
            raise JaxUnlearnError(f"{name}: {split} images contain NaN or inf")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise JaxUnlearnError(f"{name}: train and test image shapes differ")
    xf = train_images.astype(np.float64)
    mean = tuple(float(v) for v in xf.mean(axis=(0, 1, 2)))
    std = tuple(float(v) + 1e-6 for v in xf.std(axis=(0, 1, 2)))
    return Dataset(name, train_images, train_labels.astype(np.int32), test_images,
                   test_labels.astype(np.int32), int(num_classes), mean, std)


DIGITS_SPLIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_split.npy")


def _digits_csv() -> str:
    """Path of scikit-learn's bundled ``digits.csv.gz``, found without importing scikit-learn
    (its import costs about a second of every run's start-up)."""
    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            return path
    raise JaxUnlearnError("digits: scikit-learn's bundled digits.csv.gz was not found; "
                          "install scikit-learn (pip install scikit-learn)")


def load_digits(data_dir: str | None = None) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images), fixed stratified 1437/360 split.

    The split is ``sklearn.model_selection.train_test_split(test_size=360, random_state=0,
    stratify=labels)``, stored as its index order in ``digits_split.npy`` (tests check it still equals
    scikit-learn's), so it does not change with the scikit-learn version.
    """
    path = _digits_csv()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    if table.shape != (1797, 65):
        raise JaxUnlearnError(f"digits: expected a 1797 x 65 table in {path}, got {table.shape}")
    images = (table[:, :-1].reshape(-1, 8, 8) * 15).astype(np.uint8)[..., None]  # 0..16 -> 0..240, lossless
    labels = table[:, -1].astype(np.int32)
    order = np.load(DIGITS_SPLIT)
    train, test = order[:1437], order[1437:]
    return make_dataset("digits", images[train], labels[train], images[test], labels[test], 10)


CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _read_cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = pickle.loads(raw, encoding="bytes")
        data, labels = d[b"data"], d[b"labels"]
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad archive
        raise JaxUnlearnError(f"{where} is not a CIFAR-10 batch file ({e.__class__.__name__}: {e})") from None
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int32)
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise JaxUnlearnError(f"{where}: expected data [n, 3072] and n labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar10_archive(path: str) -> Dataset:
    """The official CIFAR-10 python archive: ``cifar-10-batches-py/`` (or its parent, or the .tar.gz).

    Train images are data_batch_1..5 in order, test images test_batch.
    """
    raw: dict[str, bytes] = {}
    if os.path.isfile(path) and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                base = os.path.basename(m.name)
                if base in CIFAR10_FILES and m.isfile():
                    raw[base] = tar.extractfile(m).read()  # type: ignore[union-attr]
    else:
        folder = path
        if os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
            folder = os.path.join(path, "cifar-10-batches-py")
        for f in CIFAR10_FILES:
            p = os.path.join(folder, f)
            if os.path.isfile(p):
                with open(p, "rb") as fh:
                    raw[f] = fh.read()
    missing = [f for f in CIFAR10_FILES if f not in raw]
    if missing:
        raise JaxUnlearnError(
            f"--data-dir {path!r} is not a CIFAR-10 python archive: missing {', '.join(missing)} "
            "(expected cifar-10-batches-py/ with data_batch_1..5 and test_batch)")
    parts = [_read_cifar_batch(raw[f], os.path.join(path, f)) for f in CIFAR10_FILES]
    xtr = np.concatenate([p[0] for p in parts[:5]])
    ytr = np.concatenate([p[1] for p in parts[:5]])
    return make_dataset("cifar10", xtr, ytr, parts[5][0], parts[5][1], 10)


TFDS_NAMES = {"cifar10": ("cifar10", 10), "cifar100": ("cifar100", 100), "svhn": ("svhn_cropped", 10)}


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
    """CIFAR-10/100 and SVHN through tensorflow-datasets (needs the `tfds` extra and, once, a network)."""
    try:
        import tensorflow_datasets as tfds  # type: ignore[import-not-found]
    except ImportError:
        raise JaxUnlearnError(
            f"data set {name!r} needs tensorflow-datasets: pip install 'jaxunlearn[tfds]'"
            + (" (or pass --data-dir with the CIFAR-10 python archive)" if name == "cifar10" else "")) from None
    tfds_name, num_classes = TFDS_NAMES[name]
    splits = tfds.as_numpy(tfds.load(tfds_name, split=["train", "test"], batch_size=-1,
                                     as_supervised=True, data_dir=data_dir))
    (xtr, ytr), (xte, yte) = splits
    return make_dataset(name, xtr.astype(np.uint8), ytr, xte.astype(np.uint8), yte, num_classes)


def _load_cifar10(data_dir: str | None) -> Dataset:
    if data_dir is not None:
        return load_cifar10_archive(data_dir)
    return load_tfds("cifar10")


LOADERS: dict[str, Callable[[str | None], Dataset]] = {
    "digits": load_digits,
    "cifar10": _load_cifar10,
    "cifar100": lambda d: load_tfds("cifar100", d),
    "svhn": lambda d: load_tfds("svhn", d),
}


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """Loads a data set by name: digits (embedded), cifar10 (archive at data_dir, or tfds), cifar100, svhn."""
    if name not in LOADERS:
        raise JaxUnlearnError(f"unknown data set {name!r}; choose one of {', '.join(LOADERS)}")
    if data_dir is not None and not os.path.exists(data_dir):
        raise JaxUnlearnError(f"--data-dir {data_dir!r} does not exist")
    return LOADERS[name](data_dir)
