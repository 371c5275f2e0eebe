"""Small helpers shared across the library: input validation and atomic file writes."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.errors import JaxUnlearnError


@jax.jit
def _device_all_finite(arrays):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays]))


def all_finite(*arrays) -> bool:
    """Whether every value of every array is finite (no NaN or inf). NumPy arrays are checked on the
    host; device arrays where they are, in one compiled program (not one per primitive and shape)."""
    host = [a for a in arrays if not isinstance(a, jax.Array)]
    device = [a for a in arrays if isinstance(a, jax.Array)]
    if not all(np.isfinite(np.asarray(a)).all() for a in host):
        return False
    return not device or bool(_device_all_finite(device))


def check_indices(idx, n: int, what: str = "forget set") -> np.ndarray:
    """int64[k] sorted unique indices in [0, n); raises on empty, out of range, or duplicates."""
    idx = np.asarray(idx)
    if idx.ndim != 1 or idx.size == 0:
        raise JaxUnlearnError(f"{what} is empty")
    if not np.issubdtype(idx.dtype, np.integer):
        raise JaxUnlearnError(f"{what} indices must be integers, got dtype {idx.dtype}")
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise JaxUnlearnError(f"{what} has indices out of range [0, {n}): {bad[:5].tolist()}")
    if np.unique(idx).size != idx.size:
        raise JaxUnlearnError(f"{what} has duplicate indices")
    return np.sort(idx.astype(np.int64))


def _private_tmp(path: str) -> str:
    """A temporary name beside ``path`` that no concurrent writer shares."""
    return f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


def write_json_atomic(path: str, obj) -> None:
    """Writes ``path`` whole or not at all (a temporary file renamed into place)."""
    tmp = _private_tmp(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def save_npy_atomic(path: str, array) -> None:
    """``np.save`` to ``path``, whole or not at all."""
    tmp = _private_tmp(path) + ".npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def save_npz_atomic(path: str, arrays: dict) -> None:
    """``np.savez`` of ``arrays`` (name -> array) to ``path``, whole or not at all."""
    tmp = _private_tmp(path) + ".npz"
    np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)


def save_figure_atomic(fig, path: str, dpi: int = 110) -> None:
    """A matplotlib figure saved as ``path`` (PNG), whole or not at all, then closed."""
    import matplotlib.pyplot as plt

    tmp = _private_tmp(path) + ".png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
