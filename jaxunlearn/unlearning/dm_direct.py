"""DM-Direct: predict oracle outputs with datamodels, no model update.

``out(x; S∖F) ≈ out(x; S) − Σ_{i∈F} w_{x,i}``: the full model's outputs minus the summed
datamodel effects of the forget points, for every class logit of every point (the reference code
uses multiplier 1). As a method it returns predictions, not parameters; DMM fine-tunes a model
towards them.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.attribution.effects import forget_set_effects
from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.utils import all_finite, check_indices


def forget_effect(weights, forget_idx):
    """Σ_{i∈F} w_{x,i}. weights: f32[T, n_train] (or [P, C, n_train]) -> f32[T] (or [P, C])."""
    forget_idx = check_indices(forget_idx, weights.shape[-1])
    return jnp.take(weights, jnp.asarray(forget_idx), axis=-1).sum(-1)


@jax.jit
def _subtract(full_outputs, effect):
    return full_outputs - effect[None]


def _check_full(full_outputs, shape):
    chex.assert_rank(full_outputs, 3)
    if tuple(full_outputs.shape[1:]) != tuple(shape):
        raise JaxUnlearnError(f"DM-Direct: full-model outputs {tuple(full_outputs.shape[1:])} do not match the "
                              f"datamodels' [points, classes] {tuple(shape)}")
    if not all_finite(full_outputs):
        raise JaxUnlearnError("DM-Direct: full-model outputs contain NaN or inf")


def dm_direct(full_outputs, weights, forget_idx):
    """Predicted oracle outputs from materialised weights. full_outputs: f32[K, P, C] (K models),
    weights: f32[P, C, n_train] -> f32[K, P, C]."""
    full_outputs = jnp.asarray(full_outputs)
    _check_full(full_outputs, weights.shape[:2])
    return _subtract(full_outputs, forget_effect(weights, forget_idx))


def dm_direct_targets(masks, subset_outputs, full_outputs, forget_idx, estimator: str = "influence",
                      threshold: float | None = None, seed: int = 0):
    """DM-Direct's predicted oracle logits of K models, straight from arrays (no run folder).

    masks: bool[M, n_train] (which points each subset model trained on); subset_outputs:
    f32[M, P, C] (those models' logits on P points, the n_train training points first);
    full_outputs: f32[K, P, C] (the models to unlearn, trained on all n_train points);
    forget_idx: int[f] training indices. ``estimator``: "influence" (default; ``threshold=None``
    chooses its denoising by held-out LDS), "ridge" or "lasso". Returns f32[K, P, C]; its first
    n_train rows are DMM's targets.
    """
    full_outputs = jnp.asarray(full_outputs, jnp.float32)
    _check_full(full_outputs, np.shape(subset_outputs)[1:])
    effect = forget_set_effects(masks, subset_outputs, [forget_idx], estimator, threshold, seed)[0]
    return _subtract(full_outputs, jnp.asarray(effect))
