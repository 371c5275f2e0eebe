"""DM-Direct: predict oracle outputs with datamodels, no model update.

``out(x; S∖F) ≈ out(x; S) − Σ_{i∈F} w_{x,i}``: the full model's outputs minus the datamodel
weights of the forget points. As a method it returns predictions, not parameters.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.training.subsets import check_indices


def forget_effect(weights, forget_idx):
    """Σ_{i∈F} w_{x,i}. weights: f32[T, n_train] (or [P, C, n_train]) -> f32[T] (or [P, C])."""
    forget_idx = check_indices(forget_idx, weights.shape[-1])
    return jnp.take(weights, jnp.asarray(forget_idx), axis=-1).sum(-1)


@jax.jit
def _subtract(full_outputs, effect):
    return full_outputs - effect[None]


def dm_direct(full_outputs, weights, forget_idx):
    """Predicted oracle outputs. full_outputs: f32[K, P, C] (K models), weights: f32[P, C, n_train]
    -> f32[K, P, C]."""
    chex.assert_rank(full_outputs, 3)
    if full_outputs.shape[1:] != weights.shape[:2]:
        raise JaxUnlearnError(f"DM-Direct: outputs {full_outputs.shape[1:]} do not match datamodels "
                              f"{weights.shape[:2]}")
    return _subtract(jnp.asarray(full_outputs), forget_effect(weights, forget_idx))
