"""Single-gradient unlearning (Unrolling SGD, Thudi et al. 2022): add back, to first order, what the
SGD steps on the forget points took away.

    w_u = w_t + m · η · (|F| / B) · ∇ L̄(w_0; F)

L̄(w_0; F): the training loss (cross-entropy, plus the SD loss term when the run used one) averaged
over the forget points, its gradient taken at the run's *initial* weights w_0, in training mode
(BatchNorm on batch statistics), as the authors' code does; m: epochs the points were seen; η: the
training learning rate; B: the training batch size. In the authors' code F is exactly one training
batch (|F| = B), so the update is their ``w + (ep + 1) · lr · ∇L_batch(w_0)``; with |F| ≠ B each
forget point's SGD contribution is η/B per epoch, hence the |F|/B factor (``batch_size = 0``: B = |F|,
their setting). BatchNorm statistics are left as they are (their code copies w_t's buffers).

w_0 is never stored: the method calls ``data.init(key)[0]`` (:class:`~jaxunlearn.unlearning.base.UnlearnData`)
and so must be given each model's own key, the one the trainer initialised it from.
Cost: one gradient evaluation per forget point.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.training.step import std_logit_penalty
from jaxunlearn.unlearning.finetune import cross_entropy, select_update


class SingleGradientConfig(struct.PyTreeNode):
    # the authors' code: lr 0.1 (their --lr default), one fine-tuning epoch, F one batch of 32
    lr: float = 0.1  # η of the training run
    std_loss: float = 0.0  # λ of the SD loss the run trained with (their code takes the gradient of that loss)
    # integers, but only multipliers (no shape depends on them): traced leaves, so one compiled program
    # serves every m and B
    epochs: int = 1  # m: epochs the forget points were seen
    batch_size: int = 0  # B of the run; 0: B = |F| (their setting)


def single_gradient(params, model_state, data, forget_idx, retain_idx, targets, key, config: SingleGradientConfig):
    """One model; ``key`` must be the model's key (w_0 = ``data.init(key)[0]``); ``retain_idx`` and
    ``targets`` are unused."""
    if data.init is None:
        raise JaxUnlearnError("single-gradient needs the training run's initial weights: give UnlearnData an "
                              "init (model key -> (params, model_state)) and each model's own key (see `jaxunlearn unrolling`)")
    w0 = data.init(key)[0]
    if jax.tree.structure(w0) != jax.tree.structure(params):
        raise JaxUnlearnError("single-gradient: data.init(key) does not build parameters shaped like the model's")
    f = forget_idx.shape[0]
    b = jnp.where(config.batch_size > 0, config.batch_size, f)

    def loss(p):
        logits, _ = data.apply(p, model_state, data.images[forget_idx], True)
        return cross_entropy(logits, data.labels[forget_idx]) + config.std_loss * std_logit_penalty(logits)

    g = jax.grad(loss)(w0)
    scale = config.epochs * config.lr * (f / b)
    new = jax.tree.map(lambda w, gi: (w + scale * gi).astype(w.dtype), params, g)
    return select_update(new, params, data.update_mask), model_state, jnp.float32(f)
