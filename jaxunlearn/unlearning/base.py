"""The shared signature of every unlearning method, and how one is applied to a whole ensemble.

A method is a pure function for ONE model::

    method(params, model_state, data, forget_idx, retain_idx, targets, key, config)
        -> (params, model_state, cost)

params / model_state: one model's pytrees (model_state = BatchNorm statistics, maybe {});
data: :class:`UnlearnData` (training images/labels on device + the model's apply function);
forget_idx: i32[f], retain_idx: i32[r] (training indices); targets: f32[n_train, C] target
logits or None; key: PRNG key; config: the method's ``flax.struct`` config (float fields are
traced leaves, integer shape/length fields static). cost: f32[] per-example gradient
evaluations (a forward pass counts 1/3), so compute can be reported as a fraction of
re-training. :func:`unlearn_ensemble` maps a method over K models in one jit (vmapped groups, the
ensemble layout of training);
:func:`unlearn_grid` also vmaps it over a grid of configs that share their static fields.
"""
from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
from flax import struct

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.training.ensemble import map_models
from jaxunlearn.utils import check_indices


class UnlearnData(struct.PyTreeNode):
    images: jax.Array  # u8|f32[n_train, H, W, C]
    labels: jax.Array  # i32[n_train]
    apply: Callable = struct.field(pytree_node=False)  # (params, state, images, train) -> (logits, state)
    # (model_key) -> params: the training run's initial weights w_0, recomputed from a model's key
    # (e.g. ``lambda k: trainer.init(k).params``); only methods that need w_0 (single-gradient) use it,
    # and they then read the ``key`` they are given as that model's key
    init: Callable | None = struct.field(pytree_node=False, default=None)


FORWARD_COST = 1.0 / 3.0  # a forward pass is about a third of a forward+backward


def check_unlearn_inputs(params, data: UnlearnData, forget_idx, retain_idx, targets):
    forget_idx = jnp.asarray(forget_idx, jnp.int32)
    retain_idx = jnp.asarray(retain_idx, jnp.int32)
    n = data.labels.shape[0]
    chex.assert_rank([forget_idx, retain_idx], 1)
    check_indices(forget_idx, n, "forget set")  # empty, out of range or repeated: one clear error
    check_indices(retain_idx, n, "retain set")
    if targets is not None:
        k = jax.tree.leaves(params)[0].shape[0]
        if targets.shape[:2] != (k, n):
            raise JaxUnlearnError(f"targets must be [K={k}, n_train={n}, C], got {tuple(targets.shape)}")
        if not bool(jnp.all(jnp.isfinite(targets))):
            raise JaxUnlearnError("targets contain NaN or inf")
    return forget_idx, retain_idx


def unlearn_ensemble(method: Callable, params, model_state, data: UnlearnData, forget_idx, retain_idx,
                     targets, keys, config, vmap_width: int | None = None) -> tuple[Any, Any, jax.Array]:
    """Applies ``method`` to K stacked models in one jitted call.

    params / model_state: stacked over K; targets: f32[K, n_train, C] or None; keys: key[K].
    ``vmap_width``: models vmapped together, groups mapped one after another (the ensemble layout
    of training, :func:`jaxunlearn.training.ensemble.map_models`; None: all K vmapped; 1: one model
    at a time, the fast layout for conv nets on CPU and GPU, see benchmarks/RESULTS.md).
    Returns stacked params, model states and cost f32[K].
    """
    forget_idx, retain_idx = check_unlearn_inputs(params, data, forget_idx, retain_idx, targets)
    return _unlearn_jit(method, config, vmap_width, params, model_state, data, forget_idx, retain_idx, targets, keys)


def unlearn_grid(method: Callable, params, model_state, data: UnlearnData, forget_idx, retain_idx,
                 targets, keys, configs, vmap_width: int | None = None) -> list[tuple[Any, Any, jax.Array]]:
    """Applies ``method`` at every config of ``configs`` to all K models.

    Configs that share their static fields (epochs, batch sizes...) run as ONE compiled call,
    vmapped over the stacked float hyperparameters and over the K models. Returns, per config in
    the given order, (params, model_state, cost f32[K]) stacked over K.
    """
    forget_idx, retain_idx = check_unlearn_inputs(params, data, forget_idx, retain_idx, targets)
    groups: dict = {}
    for i, c in enumerate(configs):
        groups.setdefault(jax.tree.structure(c), []).append(i)
    out: list = [None] * len(configs)
    for idxs in groups.values():
        stacked = jax.tree.map(lambda *xs: jnp.asarray(xs, jnp.float32), *[configs[i] for i in idxs])
        p, s, c = _grid_jit(method, vmap_width, stacked, params, model_state, data, forget_idx, retain_idx, targets,
                            keys)
        for j, i in enumerate(idxs):
            out[i] = jax.tree.map(lambda t: t[j], (p, s, c))
    return out


def _unlearn_impl(method, config, vmap_width, params, model_state, data, forget_idx, retain_idx, targets, keys):
    def one(a):
        p, s, t, k = a
        return method(p, s, data, forget_idx, retain_idx, t, k, config)

    k = keys.shape[0]
    return map_models(one, (params, model_state, targets, keys), vmap_width or k, k)


def _grid_impl(method, vmap_width, configs, params, model_state, data, forget_idx, retain_idx, targets, keys):
    one = lambda c: _unlearn_impl(method, c, vmap_width, params, model_state, data, forget_idx, retain_idx,  # noqa: E731
                                  targets, keys)
    return jax.vmap(one)(configs)


_unlearn_jit = jax.jit(_unlearn_impl, static_argnums=(0, 2))
_grid_jit = jax.jit(_grid_impl, static_argnums=(0, 1))
