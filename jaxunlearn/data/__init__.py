"""Data sets (host arrays), on-device augmentation and forget sets."""
from jaxunlearn.data.augment import augment, normalize
from jaxunlearn.data.datasets import Dataset, load_cifar10_archive, load_dataset, load_digits, make_dataset

__all__ = ["Dataset", "augment", "normalize", "load_dataset", "load_digits", "load_cifar10_archive", "make_dataset"]
