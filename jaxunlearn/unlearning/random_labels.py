"""Random labels: fine-tune on the forget set relabelled with uniformly random WRONG classes,
interleaved with correctly labelled retain batches. SalUn reuses this loss under a weight mask."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxunlearn.unlearning.finetune import SGDConfig, model_ce, paired_batches, run_sgd


class RandomLabelsConfig(SGDConfig):
    # SalUn code (its RL is SalUn without the mask): lr 0.013, 10 epochs, batch 256
    lr: float = 0.013
    epochs: int = struct.field(pytree_node=False, default=10)
    batch_size: int = struct.field(pytree_node=False, default=256)
    forget_batch_size: int = struct.field(pytree_node=False, default=256)
    retain_per_epoch: int = struct.field(pytree_node=False, default=0)  # 0: the whole retain set


def wrong_labels(key, labels, num_classes: int):
    """A uniformly random class different from each label. labels: i32[B] -> i32[B]."""
    return (labels + jax.random.randint(key, labels.shape, 1, num_classes)) % num_classes


def random_label_loss(data, num_classes: int):
    def loss(params, state, batch, k):
        f = batch["forget"]
        forget, state = model_ce(data, params, state, f, wrong_labels(k, data.labels[f], num_classes))
        retain, state = model_ce(data, params, state, batch["retain"])
        return forget + retain, state

    return loss


def num_classes_of(data, params, model_state) -> int:
    return jax.eval_shape(lambda p, s: data.apply(p, s, data.images[:1], False)[0], params, model_state).shape[-1]


def random_labels(params, model_state, data, forget_idx, retain_idx, targets, key, config: RandomLabelsConfig):
    """Random-label fine-tuning; only the weights in ``data.update_mask`` move (all when None)."""
    batches, steps, per_epoch = paired_batches(forget_idx, retain_idx, config.retain_per_epoch,
                                               config.batch_size, config.forget_batch_size)
    loss = random_label_loss(data, num_classes_of(data, params, model_state))
    params, model_state, _ = run_sgd(params, model_state, config, batches, steps, loss, key,
                                     update_mask=data.update_mask)
    return params, model_state, jnp.float32(config.epochs * per_epoch)
