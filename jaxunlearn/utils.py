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


def is_integer(v) -> bool:
    """A Python or NumPy integer, not a bool (which Python counts as one)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_indices(idx, n: int, what: str = "forget set") -> np.ndarray:
    """int64[k] sorted unique indices in [0, n); raises on empty, out of range, or duplicates."""
    idx = np.asarray(idx)
    if idx.ndim != 1:
        raise JaxUnlearnError(f"{what} must be a 1-D array of indices, got shape {idx.shape}")
    if idx.size == 0:
        raise JaxUnlearnError(f"{what} is empty")
    if not np.issubdtype(idx.dtype, np.integer):
        raise JaxUnlearnError(f"{what} indices must be integers, got dtype {idx.dtype}")
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise JaxUnlearnError(f"{what} has indices out of range [0, {n}): {bad[:5].tolist()}")
    if np.unique(idx).size != idx.size:
        raise JaxUnlearnError(f"{what} has duplicate indices")
    return np.sort(idx.astype(np.int64))


def check_field_types(obj, what: str, skip=()) -> None:
    """Every field of dataclass ``obj`` holds a value of its default's kind (a JSON file or ``--set``
    may give "three" for an int): bool, int (not bool), float (an int is one too), str, or a tuple
    of those; fields whose default is None, and those named in ``skip``, take anything (their own
    checks follow)."""
    import dataclasses

    def ok(v, kind) -> bool:
        if kind is bool:
            return isinstance(v, (bool, np.bool_))
        if kind is int:
            return is_integer(v)
        if kind is float:
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        return isinstance(v, kind)

    for f in dataclasses.fields(obj):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        v = getattr(obj, f.name)
        if default is None or f.name in skip:
            continue
        if isinstance(default, tuple):
            kinds = {type(x) for x in default} or {str}
            kind = float if kinds <= {int, float} and float in kinds else kinds.pop() if len(kinds) == 1 else None
            good = isinstance(v, (tuple, list)) and (kind is None or all(ok(x, kind) for x in v))
            name = f"a list of {_KIND_NAMES.get(kind, 'value')}s" if kind else "a list"
        else:
            kind = type(default)
            good, name = ok(v, kind), ("an " if kind is int else "a ") + _KIND_NAMES.get(kind, kind.__name__)
        if not good:
            raise JaxUnlearnError(f"{what}: {f.name} must be {name}, got {v!r}")


_KIND_NAMES = {bool: "boolean (true or false)", int: "integer", float: "number", str: "string"}


def make_folder(path: str, what: str = "--out") -> str:
    """``os.makedirs(path, exist_ok=True)``, with a clear error where ``path`` (or a folder above it)
    is a file or cannot be created."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise JaxUnlearnError(f"{what} {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise JaxUnlearnError(f"cannot create {what} folder {path!r}: {e.strerror or e}") from None
    return path


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
