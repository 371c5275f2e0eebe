"""Turn any ``flax.linen`` classifier into the apply function every unlearning method takes.

Methods call ``apply(params, model_state, images, train) -> (logits f32[B, C], model_state)``
(see :mod:`jaxunlearn.unlearning.base`). :func:`flax_apply` builds it for a user's own module,
with or without BatchNorm, so methods run on their own parameter pytrees, no run folder needed.
"""
from __future__ import annotations

from typing import Callable

import flax.errors
import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxunlearn.errors import JaxUnlearnError


def flax_apply(module: nn.Module, train_kwarg: str | None = "train", preprocess: Callable | None = None,
               state_collection: str = "batch_stats", rng_collections: tuple[str, ...] = (),
               rng_seed: int = 0) -> Callable:
    """The method signature's apply function for ``module``.

    module: a ``flax.linen`` module mapping images f32[B, ...] to logits f32[B, C];
    train_kwarg: the keyword the module's ``__call__`` takes for training mode (None: it takes none);
    preprocess: optional ``images -> inputs`` (e.g. u8 -> normalised f32), applied inside the jit;
    state_collection: the mutable collection updated in training mode (BatchNorm's running statistics).
    ``model_state`` is that collection's pytree, or ``{}`` for a module without one.
    rng_collections: the random streams the module draws in training mode (``("dropout",)`` for
    ``nn.Dropout``). The shared method signature carries no key, so each training-mode call draws
    from ``rng_seed`` folded with the bits of its batch's sum: a fresh mask for every batch
    (models that see the same batch at the same step share it). Evaluation mode draws nothing.
    """

    def rngs(x):
        bits = jax.lax.bitcast_convert_type(jnp.sum(x.astype(jnp.float32)), jnp.uint32)
        key = jax.random.fold_in(jax.random.key(rng_seed), bits)
        return {c: jax.random.fold_in(key, i) for i, c in enumerate(rng_collections)}

    def apply(params, model_state, images, train):
        x = images if preprocess is None else preprocess(images)
        variables = {"params": params, **({state_collection: model_state} if model_state else {})}
        kwargs = {train_kwarg: train} if train_kwarg else {}
        if train and rng_collections:
            kwargs["rngs"] = rngs(x)
        try:
            if train and model_state:
                logits, new = module.apply(variables, x, mutable=[state_collection], **kwargs)
                return logits, new[state_collection]
            return module.apply(variables, x, **kwargs), model_state
        except flax.errors.InvalidRngError as e:
            raise JaxUnlearnError(f"{type(module).__name__} draws random numbers in training mode ({e}); give "
                                  "flax_apply(module, rng_collections=('dropout',)) (each batch then draws its own "
                                  "mask), or build the module with dropout off") from None
        except flax.errors.ScopeCollectionNotFound as e:
            raise JaxUnlearnError(f"{type(module).__name__}: {e}; if the module keeps its running statistics in "
                                  "another collection, give flax_apply(module, state_collection=NAME)") from None

    return apply
