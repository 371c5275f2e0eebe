"""Oracle Matching (OM) and Datamodel Matching (DMM).

Fine-tune a model so its logits match target logits (MSE) on the forget set plus a fresh random
sample of the retain set every epoch (Georgiev et al., "Attribute-to-Delete"). OM takes its
targets from oracle models; DMM from DM-Direct's predicted oracle logits. Same function: only the
targets differ.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from jaxunlearn.unlearning.finetune import SGDConfig, retain_sample, run_finetune


class MatchingConfig(SGDConfig):
    lr: float = 0.02
    # measured on digits: 8 epochs at lr 0.02 bring OM with oracle targets to the noise floor
    epochs: int = struct.field(pytree_node=False, default=8)
    retain_per_epoch: int = struct.field(pytree_node=False, default=256)  # fresh retain sample each epoch


def oracle_matching(params, model_state, data, forget_idx, retain_idx, targets, key, config: MatchingConfig):
    """targets: f32[n_train, C] logits to match. See :mod:`jaxunlearn.unlearning.base`."""
    r = min(config.retain_per_epoch, retain_idx.shape[0])

    def pool(k):
        return jnp.concatenate([forget_idx, retain_sample(retain_idx, k, r)])

    def loss(params, state, idx, k):
        logits, state = data.apply(params, state, data.images[idx], True)
        return jnp.mean((logits - targets[idx]) ** 2), state

    return run_finetune(params, model_state, config, pool, forget_idx.shape[0] + r, loss, key)


dmm = oracle_matching  # DMM = OM with DM-Direct targets
