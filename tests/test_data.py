import os
import pickle
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.data import augment, load_cifar10_archive, load_dataset, make_dataset
from jaxunlearn.errors import JaxUnlearnError


def test_digits_split_is_fixed_and_stratified(digits):
    assert digits.train_images.shape == (1437, 8, 8, 1) and digits.test_images.shape == (360, 8, 8, 1)
    assert digits.train_images.dtype == np.uint8 and digits.train_images.max() == 240
    assert np.bincount(digits.test_labels).min() >= 35  # stratified: every class in test
    again = load_dataset("digits")
    np.testing.assert_array_equal(again.train_labels, digits.train_labels)
    np.testing.assert_array_equal(again.test_images, digits.test_images)


def test_digits_equal_scikit_learns_own_loader_and_split(digits):
    """We read the bundled CSV and a stored split order without importing scikit-learn; the result must
    be bit-identical to its loader + train_test_split (what earlier versions called)."""
    from sklearn.datasets import load_digits as sk_load
    from sklearn.model_selection import train_test_split

    d = sk_load()
    images = (d.images * 15).astype(np.uint8)[..., None]
    xtr, xte, ytr, yte = train_test_split(images, d.target, test_size=360, random_state=0, stratify=d.target)
    for ours, theirs in ((digits.train_images, xtr), (digits.test_images, xte),
                         (digits.train_labels, ytr), (digits.test_labels, yte)):
        np.testing.assert_array_equal(ours, theirs)


def test_loading_digits_does_not_import_scikit_learn():
    import subprocess
    import sys

    code = "import sys; from jaxunlearn.data import load_dataset; load_dataset('digits'); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cifar10_archive_reads_real_slice(cifar_mini_dir):
    ds = load_cifar10_archive(cifar_mini_dir)
    assert ds.train_images.shape == (5085, 32, 32, 3) and ds.test_images.shape == (1017, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.num_classes == 10
    # Known facts about the official files: first training image is a frog (6), first test image a cat (3).
    assert ds.train_labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert ds.test_labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert ds.train_images[0, 0, 0].tolist() == [59, 62, 63]
    # Independent read of batch 2 (channel-major rows): row i of data_batch_2 is train index 1017 + i.
    with open(os.path.join(cifar_mini_dir, "cifar-10-batches-py", "data_batch_2"), "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    row = np.asarray(raw["data"][5])
    np.testing.assert_array_equal(ds.train_images[1017 + 5, :, :, 0].ravel(), row[:1024])
    np.testing.assert_array_equal(ds.train_images[1017 + 5, :, :, 2].ravel(), row[2048:])
    assert ds.train_labels[1017 + 5] == raw["labels"][5]
    assert 80 <= np.bincount(ds.test_labels).min()


def test_cifar10_tar_gz_equals_folder(cifar_mini_dir, tmp_path):
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(os.path.join(cifar_mini_dir, "cifar-10-batches-py"), arcname="cifar-10-batches-py")
    a, b = load_cifar10_archive(str(tar_path)), load_cifar10_archive(cifar_mini_dir)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)


def test_bad_data_inputs(tmp_path):
    with pytest.raises(JaxUnlearnError, match="unknown data set 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(JaxUnlearnError, match="not a CIFAR-10 python archive: missing data_batch_1"):
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(JaxUnlearnError, match="does not exist"):
        load_dataset("cifar10", str(tmp_path / "nope"))
    bad = tmp_path / "cifar-10-batches-py"
    bad.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (bad / f).write_bytes(b"not a pickle")
    with pytest.raises(JaxUnlearnError, match="is not a CIFAR-10 batch file"):
        load_dataset("cifar10", str(tmp_path))
    x, y = np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 1, 2, 3])
    with pytest.raises(JaxUnlearnError, match="train labels must be integers"):
        make_dataset("mine", x, y + 0.5, x, y, 10)  # no silent truncation of 0.5 to class 0
    with pytest.raises(JaxUnlearnError, match="the training set is empty"):
        make_dataset("mine", x[:0], y[:0], x, y, 10)
    assert make_dataset("mine", x, y.astype(np.float32), x, y, 10).train_labels.dtype == np.int32  # 0.0, 1.0: fine


def test_tfds_missing_gives_install_hint():
    pytest.importorskip("sklearn")
    try:
        import tensorflow_datasets  # noqa: F401
        pytest.skip("tensorflow-datasets is installed")
    except ImportError:
        pass
    with pytest.raises(JaxUnlearnError, match=r"needs tensorflow-datasets: pip install 'jaxunlearn\[tfds\]'"):
        load_dataset("svhn")


def test_augment_translates_and_flips_per_example():
    x = jnp.arange(2 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 1) + 1
    key = jax.random.key(3)
    y = augment(x, key, crop_pad=0, flip=True)
    for i in range(2):  # each example is either itself or its mirror image
        assert jnp.array_equal(y[i], x[i]) or jnp.array_equal(y[i], x[i, :, ::-1])
    flipped = np.array([[bool(jnp.array_equal(augment(x, jax.random.key(s), crop_pad=0, flip=True)[i], x[i, :, ::-1]))
                         for i in range(2)] for s in range(20)])
    assert flipped.any(0).all() and (~flipped).any(0).all()  # both outcomes happen for each example...
    assert (flipped[:, 0] != flipped[:, 1]).any()  # ...drawn per example, not once for the batch
    ys = jnp.stack([augment(x, jax.random.key(s), crop_pad=1) for s in range(20)])
    assert jnp.all(jnp.sum(ys == 0, axis=(2, 3, 4)) <= 7)  # at most one padded row + column
    assert len({tuple(np.asarray(y[0]).ravel()) for y in ys}) > 3  # different shifts per key
    assert jnp.array_equal(augment(x, key, 1, True), augment(x, key, 1, True))  # pure
