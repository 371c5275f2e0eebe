import os

import jax
import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# Tests compare layouts of the same computation (ensemble vs loop, vmap vs scan): on a GPU,
# f32 matmuls and convs default to TF32, whose rounding would dominate those comparisons.
jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_MINI = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10-mini")


@pytest.fixture(scope="session")
def digits():
    from jaxunlearn.data import load_digits

    return load_digits()


@pytest.fixture(scope="session")
def cifar_mini_dir():
    path = os.environ.get("JAXUNLEARN_CIFAR10_MINI", CIFAR_MINI)
    if not os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
        pytest.skip(f"real CIFAR-10 slice not found at {path} (clone with ../shared/data/cifar10-mini, "
                    "or set JAXUNLEARN_CIFAR10_MINI)")
    return path


def pytest_collection_modifyitems(items):
    """The demo (the longest module) first, so that under `-n 2` the other worker runs the rest."""
    items.sort(key=lambda item: 0 if item.nodeid.startswith("tests/test_pipeline.py") else 1)
