"""Zero-gradient class unlearning on DKVB heads (Shah et al., "Low Compute Unlearning via Sparse
Representations", TMLR 2025).

Both algorithms only mask key-value pairs (``key_mask`` True); values, keys and projections keep
their exact bits, and no gradient is evaluated. A masked pair is excluded from the nearest-key
search, so an input that selected it now selects its next-nearest unmasked key.

- :func:`dkvb_activations` (Algorithm 1, "unlearning via activations"): count how often each pair
  is selected by the forget class's training examples; mask the ``n_a`` most-selected pairs. By
  default ``n_a`` counts over all C·K pairs of the head (``per_codebook=False``); with
  ``per_codebook=True`` the ``n_a`` most-selected pairs of *every* codebook are masked (C·n_a pairs).
- :func:`dkvb_examples` (Algorithm 2, "unlearning via examples"): mask every pair selected by the
  first ``n_e`` examples of the forget class (the caller draws them in random order).

Only pairs selected at least once are ever masked. ``n_a`` / ``n_e`` are traced, so a whole sweep is
one vmapped call. Compute: forward passes of the head (one per forget example used, zero gradient
evaluations) and FLOPs (see :func:`unlearning_cost`).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.localization.masks import descending_ranks
from jaxunlearn.models.dkvb import DKVBHead, check_features, head_flops, pair_counts, select


def selection_counts(head: DKVBHead, features, weights=None, block: int = 512):
    """How often each pair is selected: features f32[N, D], weights f32[N] (default 1) -> f32[C, K]."""
    return pair_counts(select(head, features, block), head.key_mask.shape[1], weights)


def _top_mask(counts, n):
    """bool like counts: the ``n`` largest entries (ties: lower index first) among entries > 0."""
    flat = counts.reshape(-1)
    return ((descending_ranks(flat) < n) & (flat > 0)).reshape(counts.shape)


@partial(jax.jit, static_argnames=("per_codebook", "block"))
def _activations(head, features, n_a, per_codebook: bool, block: int):
    counts = selection_counts(head, features, None, block)
    new = jax.vmap(_top_mask, (0, None))(counts, n_a) if per_codebook else _top_mask(counts, n_a)
    return head.replace(key_mask=head.key_mask | new)


@partial(jax.jit, static_argnames=("block",))
def _examples(head, features, n_e, block: int):
    w = (jnp.arange(features.shape[0]) < n_e).astype(jnp.float32)
    return head.replace(key_mask=head.key_mask | (selection_counts(head, features, w, block) > 0))


def _check_n(n, name: str):
    n_arr = np.asarray(n)
    if not np.issubdtype(n_arr.dtype, np.integer) or n_arr.ndim != 0:
        raise JaxUnlearnError(f"{name} must be an integer, got {n!r}")
    if int(n_arr) <= 0:
        raise JaxUnlearnError(f"{name} must be >= 1, got {int(n_arr)}")


def unlearning_cost(head: DKVBHead, forward_passes: int) -> dict:
    """Compute of a masking algorithm: head forward passes, 0 gradient evaluations, FLOPs (head only)."""
    return {"forward_passes": int(forward_passes), "gradient_evaluations": 0,
            "head_flops": float(forward_passes) * head_flops(head)}


def dkvb_activations(head: DKVBHead, features_of_class, n_a: int, per_codebook: bool = False, block: int = 512):
    """Algorithm 1 on ONE head. features_of_class: f32[n_f, D] (the forget class's training
    features). Returns (masked head, cost dict): ``n_f`` forward passes, no gradient."""
    check_features(head, features_of_class, "forget-class features")
    _check_n(n_a, "N_a")
    masked = _activations(head, jnp.asarray(features_of_class, jnp.float32), jnp.int32(n_a), per_codebook, block)
    return masked, unlearning_cost(head, features_of_class.shape[0])


def dkvb_examples(head: DKVBHead, features_of_class, n_e: int, block: int = 512):
    """Algorithm 2 on ONE head: mask every pair selected by the first ``n_e`` rows of
    ``features_of_class`` f32[n_f, D] (n_e > n_f uses all of them). Returns (masked head, cost):
    min(n_e, n_f) forward passes, no gradient."""
    check_features(head, features_of_class, "forget-class features")
    _check_n(n_e, "N_e")
    masked = _examples(head, jnp.asarray(features_of_class, jnp.float32), jnp.int32(n_e), block)
    return masked, unlearning_cost(head, min(int(n_e), features_of_class.shape[0]))


@partial(jax.jit, static_argnames=("algorithm", "per_codebook", "block"))
def sweep_heads(heads: DKVBHead, features_of_class, ns, algorithm: str, per_codebook: bool = False,
                block: int = 512) -> DKVBHead:
    """Every N of ``ns`` (i32[G]) on every head of a stacked ensemble (S heads) in one call.
    Returns heads stacked [G, S, ...]. Inputs unchecked: validate with :func:`check_sweep` first."""
    def one(head, n):
        if algorithm == "activations":
            return _activations(head, features_of_class, n, per_codebook, block)
        return _examples(head, features_of_class, n, block)

    return jax.vmap(lambda n: jax.vmap(lambda h: one(h, n))(heads))(ns)


def check_sweep(heads: DKVBHead, features_of_class, ns, algorithm: str):
    if algorithm not in ("activations", "examples"):
        raise JaxUnlearnError(f"unknown DKVB unlearning algorithm {algorithm!r}; choose activations or examples")
    check_features(jax.tree.map(lambda x: x[0], heads), features_of_class, "forget-class features")
    if len(ns) == 0:
        raise JaxUnlearnError(f"no N given for the {algorithm} sweep")
    for n in ns:
        _check_n(n, "N_a" if algorithm == "activations" else "N_e")
