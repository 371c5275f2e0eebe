"""NegGrad+ (Kurmanji et al., 2023): β·CE(retain) − (1−β)·CE(forget) on paired batches."""
from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from jaxunlearn.unlearning.finetune import SGDConfig, model_ce, paired_batches, run_sgd


class NegGradPlusConfig(SGDConfig):
    # SCRUB code's NegGrad+ (CIFAR-10 VGG notebook): lr 1e-4, β 0.9999, 5 epochs, batches 128 / 128
    lr: float = 1e-4
    beta: float = 0.9999  # weight of the retain term
    epochs: int = struct.field(pytree_node=False, default=5)
    batch_size: int = struct.field(pytree_node=False, default=128)
    forget_batch_size: int = struct.field(pytree_node=False, default=128)
    retain_per_epoch: int = struct.field(pytree_node=False, default=0)  # 0: the whole retain set


def neggrad_plus(params, model_state, data, forget_idx, retain_idx, targets, key, config: NegGradPlusConfig):
    batches, steps, per_epoch = paired_batches(forget_idx, retain_idx, config.retain_per_epoch,
                                               config.batch_size, config.forget_batch_size)

    def loss(params, state, batch, k):
        retain, state = model_ce(data, params, state, batch["retain"])
        forget, state = model_ce(data, params, state, batch["forget"])
        return config.beta * retain - (1.0 - config.beta) * forget, state

    params, model_state, _ = run_sgd(params, model_state, config, batches, steps, loss, key,
                                     update_mask=data.update_mask)
    return params, model_state, jnp.float32(config.epochs * per_epoch)
