"""Which points each model trains on, and in which order: pure functions of (seed, model index).

A model's epoch order is ``argsort`` of per-point uniform keys drawn from
``fold_in(model_key, epoch)``, with points outside the model's subset pushed last. So
removing points F from a model's subset leaves the relative order of every other point
unchanged: "the same training run without F".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.utils import check_indices


def random_subset_masks(n: int, models: int, alpha: float, seed: int, first_model: int = 0) -> np.ndarray:
    """bool[models, n]: model m keeps exactly round(alpha * n) points, drawn from rng([seed, m])."""
    if not 0 < alpha <= 1:
        raise JaxUnlearnError(f"alpha must lie in (0, 1], got {alpha}")
    if models < 1:
        raise JaxUnlearnError(f"models must be >= 1, got {models}")
    size = max(1, int(round(alpha * n)))
    masks = np.zeros((models, n), dtype=bool)
    for i in range(models):
        if size == n:
            masks[i] = True
        else:
            masks[i, np.random.default_rng([seed, first_model + i]).choice(n, size, replace=False)] = True
    return masks


def retain_masks(n: int, models: int, forget_idx) -> np.ndarray:
    """bool[models, n]: every model trains on the retain set (all points but ``forget_idx``)."""
    forget_idx = check_indices(forget_idx, n)
    if forget_idx.size == n:
        raise JaxUnlearnError("forget set is the whole training set: nothing would be retained")
    mask = np.ones(n, dtype=bool)
    mask[forget_idx] = False
    return np.repeat(mask[None], models, axis=0)


def subset_batches(mask, key, batch_size: int, steps: int):
    """Batch indices of one epoch for one model: i32[steps, batch_size], all inside ``mask``.

    mask: bool[n]. The order is a random permutation of the model's subset; the last batch
    wraps around to the start of that permutation, so a batch never holds an outside point.
    """
    keys = jax.random.uniform(key, mask.shape)
    order = jnp.argsort(jnp.where(mask, keys, 2.0))
    size = jnp.maximum(mask.sum(), 1)
    pos = jnp.arange(steps * batch_size) % size
    return order[pos].reshape(steps, batch_size).astype(jnp.int32)


def steps_per_epoch(masks: np.ndarray, batch_size: int) -> int:
    """ceil(largest subset / batch): every model of a run takes the same number of steps."""
    return max(1, -(-int(masks.sum(axis=1).max()) // batch_size))
