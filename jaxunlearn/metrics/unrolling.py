"""Unrolling SGD (Thudi, Deza, Chandrasekaran, Papernot, EuroS&P 2022): verification error, the
Hessian's top eigenvalue, and the unlearning-error proxy, for whole stacked ensembles.

Every function takes parameter pytrees stacked over a leading models axis K and returns one value
per model. Parameters only: BatchNorm running statistics live in ``model_state`` (``batch_stats``),
not in ``params``, so they are excluded exactly as the authors' code excludes buffers (it flattens
``model.parameters()``).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxunlearn.errors import JaxUnlearnError

# PyHessian's power-iteration defaults, used by the authors' code (``hessian(...).eigenvalues()``)
HESSIAN_ITERS = 100
HESSIAN_TOL = 1e-3
HESSIAN_POINTS = 512  # the authors' code: the first 512 training points, one batch


def _leading(params) -> int:
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise JaxUnlearnError("parameter pytree has no arrays")
    k = leaves[0].shape[0] if leaves[0].ndim else None
    if k is None or any(x.ndim == 0 or x.shape[0] != k for x in leaves):
        raise JaxUnlearnError("parameters must be stacked over a leading models axis of the same size in every leaf")
    return k


def check_same_structure(params_a, params_b, what: str = "models") -> int:
    """Raises one clear error unless both pytrees have the same structure and leaf shapes; returns K."""
    ta, tb = jax.tree.structure(params_a), jax.tree.structure(params_b)
    if ta != tb:
        raise JaxUnlearnError(f"{what} have different parameter structures: {ta} vs {tb}")
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        if a.shape != b.shape:
            raise JaxUnlearnError(f"{what} have different parameter shapes: {a.shape} vs {b.shape}")
    return _leading(params_a)


def _sq_dist(a, b) -> jax.Array:
    """Σ over every leaf of (a - b)², per model: f32[K]."""
    return sum(jnp.sum(jnp.square((x.astype(jnp.float32) - y.astype(jnp.float32)).reshape(x.shape[0], -1)), axis=1)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@jax.jit
def _dist(a, b):
    return jnp.sqrt(_sq_dist(a, b))


def verification_error(params_a, params_b) -> jax.Array:
    """‖w_a − w_b‖₂ over all trainable weights, per model.

    params_a, params_b: parameter pytrees stacked over K models (same structure and shapes; pass
    ``params``, not the BatchNorm ``batch_stats``). Returns f32[K]. The verification error of an
    unlearned model is this distance to the model re-trained without the forget set from the same
    initial weights and the same data order."""
    check_same_structure(params_a, params_b)
    return _dist(params_a, params_b)


def _tree_dot(a, b):
    return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _normalize(v):
    norm = jnp.sqrt(_tree_dot(v, v))
    return jax.tree.map(lambda x: x / (norm + 1e-6), v)  # PyHessian's normalization adds 1e-6 too


def power_iteration(loss_fn: Callable, params, state, batch, key, iters: int = HESSIAN_ITERS,
                    tol: float = HESSIAN_TOL) -> jax.Array:
    """The Hessian eigenvalue of largest magnitude of ``loss_fn(params, state, batch)`` in ``params``,
    for ONE model: f32[]. Hessian-vector products are forward-over-reverse (``jax.jvp`` of
    ``jax.grad``); iteration stops after ``iters`` products or when the estimate changes by less
    than ``tol`` relatively (PyHessian's rule), inside one ``lax.while_loop``."""
    grad = lambda p: jax.grad(loss_fn)(p, state, batch)  # noqa: E731
    leaves, treedef = jax.tree.flatten(params)
    ks = jax.random.split(key, len(leaves))
    v = _normalize(jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
                                                for k, x in zip(ks, leaves)]))

    def body(c):
        i, v, lam, _ = c
        hv = jax.jvp(grad, (params,), (v,))[1]
        new = _tree_dot(hv, v)
        done = (i > 0) & (jnp.abs(new - lam) / (jnp.abs(lam) + 1e-6) < tol)
        return i + 1, _normalize(hv), new, done

    init = (jnp.int32(0), v, jnp.float32(0.0), jnp.bool_(False))
    _, _, lam, _ = lax.while_loop(lambda c: (c[0] < iters) & ~c[3], body, init)
    return lam


def top_hessian_eigenvalue(loss_fn: Callable, params, batch, *, state=None, key=None, iters: int = HESSIAN_ITERS,
                           tol: float = HESSIAN_TOL) -> jax.Array:
    """Top Hessian eigenvalue (largest magnitude) of the loss at each of K stacked models: f32[K].

    loss_fn(params, state, batch) -> f32[] for one model; params (and ``state``, e.g. BatchNorm
    statistics, or None) stacked over K; batch shared by every model (e.g. the authors' 512
    training points). One jit, vmapped over the models."""
    k = _leading(params)
    if iters < 1:
        raise JaxUnlearnError(f"power iteration needs iters >= 1, got {iters}")
    if not tol >= 0:
        raise JaxUnlearnError(f"power iteration tol must be >= 0, got {tol}")
    keys = jax.random.split(jax.random.key(0) if key is None else key, k)
    return _top_eig_jit(loss_fn, int(iters), float(tol), params, state, batch, keys)


def _top_eig(loss_fn, iters, tol, params, state, batch, keys):
    one = lambda p, s, kk: power_iteration(loss_fn, p, s, batch, kk, iters, tol)  # noqa: E731
    return jax.vmap(one, in_axes=(0, None if state is None else 0, 0))(params, state, keys)


_top_eig_jit = jax.jit(_top_eig, static_argnums=(0, 1, 2))


def unlearning_error(lr: float, t, params_t, params_0, top_eigenvalue) -> jax.Array:
    """The unlearning-error proxy e = (η² / 2) · t · ‖w_t − w_0‖₂ · σ, σ = √(top Hessian eigenvalue at w_t).

    lr: η; t: the step count (the authors' code uses the 0-based index of the last step taken,
    steps − 1, see README); params_t, params_0: stacked over K; top_eigenvalue: f32[K] (a negative
    estimate gives σ = 0). Returns f32[K]."""
    check_same_structure(params_t, params_0, "w_t and w_0")
    if not (lr >= 0 and jnp.isfinite(lr)):
        raise JaxUnlearnError(f"learning rate must be a finite number >= 0, got {lr}")
    if not jnp.all(jnp.asarray(t) >= 0):
        raise JaxUnlearnError(f"step count t must be >= 0, got {t}")
    sigma = jnp.sqrt(jnp.maximum(jnp.asarray(top_eigenvalue, jnp.float32), 0.0))
    return 0.5 * lr * lr * jnp.asarray(t, jnp.float32) * _dist(params_t, params_0) * sigma
