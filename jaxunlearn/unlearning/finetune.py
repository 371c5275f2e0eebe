"""The SGD core shared by every optimisation-based unlearning method.

A method describes one epoch of batches (``epoch_batches(key, epoch) -> pytree`` whose leaves
have a leading ``steps`` axis) and a loss (``loss(params, state, batch, key) -> (loss, state)``);
:func:`run_sgd` runs ``epochs`` epochs of SGD steps inside one ``lax.scan``.

Configs are ``flax.struct`` dataclasses: float hyperparameters (lr, weight decay, loss weights)
are pytree leaves, so one compiled program serves a whole grid of them (``vmap`` over stacked
configs, see :func:`jaxunlearn.unlearning.base.unlearn_grid`); integers that fix shapes or loop
lengths (epochs, batch sizes) are static fields.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax import lax


class SGDConfig(struct.PyTreeNode):
    lr: float = 0.01
    weight_decay: float = 5e-4
    epochs: int = struct.field(pytree_node=False, default=4)
    batch_size: int = struct.field(pytree_node=False, default=64)
    momentum: float = struct.field(pytree_node=False, default=0.9)


def sgd(cfg: SGDConfig, total_steps: int, schedule: Callable | None = None) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay; the lr follows ``schedule`` (default: a linear
    decay from ``cfg.lr`` to 0 over ``total_steps``)."""
    schedule = schedule or optax.linear_schedule(cfg.lr, 0.0, max(1, total_steps))
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(schedule, momentum=cfg.momentum or None))


def run_sgd(params, state, cfg: SGDConfig, epoch_batches: Callable, steps: int, loss: Callable, key,
            tx: optax.GradientTransformation | None = None, update_mask=None, epochs: int | None = None,
            opt_state=None):
    """``epochs`` (default ``cfg.epochs``) epochs of ``steps`` SGD steps. Returns (params, state, opt_state).

    ``update_mask``: optional pytree of bool arrays like params; where False a weight keeps its
    exact bits (the new value is selected, not added to, so -0.0 and NaN payloads survive too).
    """
    epochs = cfg.epochs if epochs is None else epochs
    tx = tx or sgd(cfg, steps * epochs)
    opt_state = tx.init(params) if opt_state is None else opt_state

    def step(carry, inp):
        params, state, opt_state = carry
        batch, k = inp
        (_, state), grads = jax.value_and_grad(loss, has_aux=True)(params, state, batch, k)
        updates, opt_state = tx.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        new = select_update(new, params, update_mask)
        return (new, state, opt_state), None

    def epoch(carry, inp):
        k, e = inp
        kb, ks = jax.random.split(k)
        carry, _ = lax.scan(step, carry, (epoch_batches(kb, e), jax.random.split(ks, steps)))
        return carry, None

    if epochs == 0:
        return params, state, opt_state
    (params, state, opt_state), _ = lax.scan(epoch, (params, state, opt_state),
                                             (jax.random.split(key, epochs), jnp.arange(epochs)))
    return params, state, opt_state


def index_batches(key, idx, steps: int, batch: int):
    """A shuffle of ``idx`` cut into ``steps`` batches, cycling when it runs out: i32[steps, batch]."""
    p = jax.random.permutation(key, idx)
    return p[jnp.arange(steps * batch) % idx.shape[0]].reshape(steps, batch)


def retain_count(retain_per_epoch: int, n_retain: int) -> int:
    """Retain points per epoch: ``retain_per_epoch`` (0: the whole retain set, as the papers' code)."""
    return n_retain if retain_per_epoch == 0 else min(retain_per_epoch, n_retain)


def retain_sample(retain_idx, key, size: int):
    """``size`` retain indices drawn without replacement: i32[size]."""
    return jax.random.permutation(key, retain_idx)[:size]


def steps_for(n: int, batch: int) -> int:
    return max(1, -(-n // batch))


def run_finetune(params, state, cfg, pool: Callable, pool_size: int, loss: Callable, key,
                 tx: optax.GradientTransformation | None = None, update_mask=None):
    """Single-stream fine-tuning: each epoch shuffles a fresh ``pool(key) -> i32[pool_size]`` into
    batches; ``loss(params, state, idx i32[B], key)``. Returns (params, state, examples f32[])."""
    steps = steps_for(pool_size, cfg.batch_size)

    def batches(k, _):
        kp, ks = jax.random.split(k)
        return index_batches(ks, pool(kp), steps, cfg.batch_size)

    params, state, _ = run_sgd(params, state, cfg, batches, steps, loss, key, tx, update_mask)
    return params, state, jnp.float32(cfg.epochs * steps * cfg.batch_size)


def paired_batches(forget_idx, retain_idx, retain_per_epoch: int, batch: int, forget_batch: int):
    """Two streams per step, for methods that mix a forget and a retain term: each epoch walks a
    fresh retain sample of ``retain_per_epoch`` points in batches of ``batch`` and cycles through
    the forget set in batches of ``forget_batch``. Returns (epoch_batches, steps, examples per epoch)."""
    r = retain_count(retain_per_epoch, retain_idx.shape[0])
    fb = min(forget_batch, forget_idx.shape[0])
    steps = steps_for(r, batch)

    def epoch_batches(k, _):
        kr, ks, kf = jax.random.split(k, 3)
        return {"retain": index_batches(ks, retain_sample(retain_idx, kr, r), steps, batch),
                "forget": index_batches(kf, forget_idx, steps, fb)}

    return epoch_batches, steps, steps * (batch + fb)


def select_update(new, old, mask):
    """``new`` where ``mask`` allows a change, else ``old``'s exact bits (selected, not blended, so
    -0.0 and NaN payloads survive); mask None: ``new``."""
    if mask is None:
        return new
    return jax.tree.map(lambda n, o, m: jnp.where(m, n, o), new, old, mask)


def both_masks(a, b):
    """The weights two update masks both allow (None allows every weight)."""
    if a is None or b is None:
        return b if a is None else a
    return jax.tree.map(jnp.logical_and, a, b)


def per_example_ce(logits, labels):
    """Softmax cross-entropy of each example. logits: f32[B, C], labels: i32[B] -> f32[B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy. logits: f32[B, C], labels: i32[B] -> f32[]."""
    return per_example_ce(logits, labels).mean()


def model_ce(data, params, state, idx, labels=None):
    """Training-mode cross-entropy of one model on training points ``idx``; (loss, new state)."""
    logits, state = data.apply(params, state, data.images[idx], True)
    return cross_entropy(logits, data.labels[idx] if labels is None else labels), state
