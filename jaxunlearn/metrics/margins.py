"""Margins: correct-class logit minus logsumexp of the other logits."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


@jax.jit
def margins_from_logits(logits, labels):
    """logits: f32[..., n, C], labels: i32[n] -> f32[..., n]."""
    chex.assert_rank(labels, 1)
    chex.assert_equal(logits.shape[-2], labels.shape[0])
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    correct = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    others = jax.nn.logsumexp(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return correct - others


@jax.jit
def accuracy_from_logits(logits, labels):
    """logits: f32[..., n, C], labels: i32[n] -> f32[...] (fraction correct)."""
    return jnp.mean(logits.argmax(-1) == labels, axis=-1)
