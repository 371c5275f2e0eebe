"""Margins: correct-class logit minus logsumexp of the other logits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.errors import JaxUnlearnError


def margins_from_logits(logits, labels):
    """logits: f32[..., n, C], labels: i32[n] -> f32[..., n]. Concrete labels are checked to be
    class indices of the logits (inside a traced function they cannot be, and are not)."""
    if np.ndim(labels) != 1 or np.ndim(logits) < 2 or np.shape(logits)[-2] != np.shape(labels)[0]:
        raise JaxUnlearnError(f"margins: logits must be [..., n, C] and labels [n], got {np.shape(logits)} and "
                              f"{np.shape(labels)}")
    if not isinstance(labels, jax.core.Tracer):
        lab = np.asarray(labels)
        if lab.size and (not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0 or lab.max() >= np.shape(logits)[-1]):
            raise JaxUnlearnError(f"margins: labels must be integers in [0, {np.shape(logits)[-1]}) (the logits' "
                                  f"classes), got dtype {lab.dtype}, range {lab.min()}..{lab.max()}")
    return _margins(logits, labels)


@jax.jit
def _margins(logits, labels):
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    correct = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    others = jax.nn.logsumexp(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return correct - others


@jax.jit
def accuracy_from_logits(logits, labels):
    """logits: f32[..., n, C], labels: i32[n] -> f32[...] (fraction correct)."""
    return jnp.mean(logits.argmax(-1) == labels, axis=-1)
