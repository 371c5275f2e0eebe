"""Turn any ``flax.linen`` classifier into the apply function every unlearning method takes.

Methods call ``apply(params, model_state, images, train) -> (logits f32[B, C], model_state)``
(see :mod:`jaxunlearn.unlearning.base`). :func:`flax_apply` builds it for a user's own module,
with or without BatchNorm, so methods run on their own parameter pytrees, no run folder needed.
"""
from __future__ import annotations

from typing import Callable

from flax import linen as nn


def flax_apply(module: nn.Module, train_kwarg: str | None = "train", preprocess: Callable | None = None,
               state_collection: str = "batch_stats") -> Callable:
    """The method signature's apply function for ``module``.

    module: a ``flax.linen`` module mapping images f32[B, ...] to logits f32[B, C];
    train_kwarg: the keyword the module's ``__call__`` takes for training mode (None: it takes none);
    preprocess: optional ``images -> inputs`` (e.g. u8 -> normalised f32), applied inside the jit;
    state_collection: the mutable collection updated in training mode (BatchNorm's running statistics).
    ``model_state`` is that collection's pytree, or ``{}`` for a module without one.
    """

    def apply(params, model_state, images, train):
        x = images if preprocess is None else preprocess(images)
        variables = {"params": params, **({state_collection: model_state} if model_state else {})}
        kwargs = {train_kwarg: train} if train_kwarg else {}
        if train and model_state:
            logits, new = module.apply(variables, x, mutable=[state_collection], **kwargs)
            return logits, new[state_collection]
        return module.apply(variables, x, **kwargs), model_state

    return apply
