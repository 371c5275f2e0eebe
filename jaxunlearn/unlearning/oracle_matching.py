"""Oracle Matching (OM) and Datamodel Matching (DMM), as the Attribute-to-Delete code does them.

Fine-tune a model in training mode so that its logits match target logits (MSE over every class
logit of a batch) on the forget set, repeated ``forget_multiplier`` times, plus a pool of
``retain_multiplier · |F|`` retain points drawn ONCE from ``pool_seed`` (the same pool for every
model of an ensemble), shuffled each epoch. OM takes its targets from oracle models; DMM from
DM-Direct's predicted oracle logits (retain points are matched to their predicted logits too).

Reference recipe (the library defaults): Adam, no weight decay, batch 512, lr decayed ×0.95 per
epoch; OM lr 1e-3, 10 epochs, forget ×1, retain 5·|F|; DMM lr 1e-4, 4 epochs, forget ×5,
retain 20·|F|. ``optimizer="sgd"`` with ``retain_per_epoch > 0`` gives the earlier recipe (SGD
with momentum, linear decay to 0, a fresh retain sample of that size every epoch).

Deviation: batches have a static shape, so an epoch whose pool does not divide by the batch
size wraps around to the start of its shuffle instead of ending on a short batch (the cost
counts the wrapped examples).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.unlearning.finetune import SGDConfig, retain_sample, run_finetune, sgd, steps_for

OPTIMIZERS = ("adam", "sgd")


class MatchingConfig(SGDConfig):
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_decay: float = 0.95  # multiplies the lr after every epoch (Adam recipe)
    epochs: int = struct.field(pytree_node=False, default=4)
    batch_size: int = struct.field(pytree_node=False, default=512)
    forget_multiplier: int = struct.field(pytree_node=False, default=5)  # copies of F per epoch
    retain_multiplier: float = struct.field(pytree_node=False, default=20.0)  # fixed pool of this × |F| points
    pool_seed: int = struct.field(pytree_node=False, default=42)  # the fixed pool: same for every model
    retain_per_epoch: int = struct.field(pytree_node=False, default=0)  # > 0: a fresh sample every epoch instead
    optimizer: str = struct.field(pytree_node=False, default="adam")  # "adam" or "sgd"


class OracleMatchingConfig(MatchingConfig):
    lr: float = 1e-3
    epochs: int = struct.field(pytree_node=False, default=10)
    forget_multiplier: int = struct.field(pytree_node=False, default=1)
    retain_multiplier: float = struct.field(pytree_node=False, default=5.0)


class DMMConfig(MatchingConfig):
    pass  # the MatchingConfig defaults are DMM's


def retain_pool_size(config: MatchingConfig, forget_size: int, retain_size: int) -> int:
    """How many retain points one epoch matches (the reference's ``int(retain_multiplier * |F|)``, rounded down)."""
    want = config.retain_per_epoch if config.retain_per_epoch > 0 else int(config.retain_multiplier * forget_size)
    return min(want, retain_size)


def fixed_retain_pool(retain_idx, forget_size: int, config: MatchingConfig):
    """The retain points every model matches: i32[r], drawn once from ``config.pool_seed``."""
    r = retain_pool_size(config, forget_size, retain_idx.shape[0])
    return retain_sample(retain_idx, jax.random.key(config.pool_seed), r)


def matching_optimizer(config: MatchingConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    if config.optimizer == "sgd":
        return sgd(config, steps_per_epoch * config.epochs)
    schedule = lambda step: config.lr * config.lr_decay ** (step // steps_per_epoch)  # noqa: E731
    return optax.chain(optax.add_decayed_weights(config.weight_decay), optax.adam(schedule))


def oracle_matching(params, model_state, data, forget_idx, retain_idx, targets, key, config: MatchingConfig):
    """targets: f32[n_train, C] logits to match. See :mod:`jaxunlearn.unlearning.base`."""
    if config.optimizer not in OPTIMIZERS:
        raise JaxUnlearnError(f"matching: optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")
    if targets is None:
        raise JaxUnlearnError("Oracle Matching / DMM need targets f32[K, n_train, C]: oracle logits (OM) or "
                              "DM-Direct's predicted logits (DMM, e.g. dm_direct_targets)")
    forget = jnp.tile(forget_idx, max(1, config.forget_multiplier))
    r = retain_pool_size(config, forget_idx.shape[0], retain_idx.shape[0])
    if config.retain_per_epoch > 0:
        pool = lambda k: jnp.concatenate([forget, retain_sample(retain_idx, k, r)])  # noqa: E731
    else:
        fixed = jnp.concatenate([forget, fixed_retain_pool(retain_idx, forget_idx.shape[0], config)])
        pool = lambda k: fixed  # noqa: E731

    def loss(params, state, idx, k):
        logits, state = data.apply(params, state, data.images[idx], True)
        return jnp.mean((logits - targets[idx]) ** 2), state

    size = forget.shape[0] + r
    tx = matching_optimizer(config, steps_for(size, config.batch_size))
    return run_finetune(params, model_state, config, pool, size, loss, key, tx, data.update_mask)


dmm = oracle_matching  # DMM = OM with DM-Direct targets
