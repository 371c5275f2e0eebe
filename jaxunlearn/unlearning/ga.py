"""Gradient ascent (GA): maximise the cross-entropy of the forget set, nothing else."""
from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from jaxunlearn.unlearning.finetune import SGDConfig, index_batches, model_ce, run_sgd, steps_for


class GAConfig(SGDConfig):
    # SalUn / ℓ1-sparse code's CIFAR-10 GA: SGD (momentum 0.9, weight decay 5e-4), lr 1e-4, 5 epochs, batch 256
    lr: float = 1e-4
    epochs: int = struct.field(pytree_node=False, default=5)
    batch_size: int = struct.field(pytree_node=False, default=256)


def gradient_ascent(params, model_state, data, forget_idx, retain_idx, targets, key, config: GAConfig):
    """Ascends CE on forget batches; ``retain_idx`` and ``targets`` are unused."""
    b = min(config.batch_size, forget_idx.shape[0])
    steps = steps_for(forget_idx.shape[0], b)

    def loss(params, state, idx, k):
        ce, state = model_ce(data, params, state, idx)
        return -ce, state

    params, model_state, _ = run_sgd(params, model_state, config,
                                     lambda k, e: index_batches(k, forget_idx, steps, b), steps, loss, key,
                                     update_mask=data.update_mask)
    return params, model_state, jnp.float32(config.epochs * steps * b)
