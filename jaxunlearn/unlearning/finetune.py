"""The fine-tuning core shared by the optimisation-based methods.

Each epoch draws a pool of training indices (``pool(key) -> i32[pool_size]``), shuffles it and
runs ``steps`` SGD steps on ``loss(params, state, idx, key) -> (loss, state)`` inside one scan.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax


@dataclasses.dataclass(frozen=True)
class SGDConfig:
    epochs: int = 4
    lr: float = 0.01
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4


def sgd(cfg, total_steps: int) -> optax.GradientTransformation:
    """SGD with momentum, coupled weight decay and a linear decay of the lr to 0."""
    schedule = optax.linear_schedule(cfg.lr, 0.0, max(1, total_steps))
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(schedule, momentum=cfg.momentum or None))


def run_finetune(params, state, cfg, pool: Callable, pool_size: int, loss: Callable, key,
                 tx: optax.GradientTransformation | None = None, update_mask=None):
    """Returns (params, state, examples_seen f32[]).

    ``update_mask``: optional pytree of bools like params; False leaves are never changed.
    """
    steps = max(1, -(-pool_size // cfg.batch_size))
    tx = tx or sgd(cfg, steps * cfg.epochs)
    opt_state = tx.init(params)

    def step(carry, inp):
        params, state, opt_state = carry
        idx, k = inp
        (_, state), grads = jax.value_and_grad(loss, has_aux=True)(params, state, idx, k)
        updates, opt_state = tx.update(grads, opt_state, params)
        if update_mask is not None:
            updates = jax.tree.map(lambda u, m: jnp.where(m, u, 0.0), updates, update_mask)
        return (optax.apply_updates(params, updates), state, opt_state), None

    def epoch(carry, k):
        kp, ks, kl = jax.random.split(k, 3)
        p = jax.random.permutation(ks, pool(kp))
        batches = p[jnp.arange(steps * cfg.batch_size) % pool_size].reshape(steps, cfg.batch_size)
        carry, _ = lax.scan(step, carry, (batches, jax.random.split(kl, steps)))
        return carry, None

    (params, state, _), _ = lax.scan(epoch, (params, state, opt_state), jax.random.split(key, cfg.epochs))
    return params, state, jnp.float32(cfg.epochs * steps * cfg.batch_size)


def retain_sample(retain_idx, key, size: int):
    """``size`` retain indices drawn without replacement: i32[size]."""
    return jax.random.permutation(key, retain_idx)[:size]
