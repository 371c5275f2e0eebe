"""SCRUB (Kurmanji et al., NeurIPS 2023, "Towards Unbounded Machine Unlearning").

Student = the model, teacher = a frozen copy of the original model. Each of the first
``max_steps`` epochs runs a max pass over the forget set (maximise KL(teacher ‖ student)), then
every epoch runs a min pass over a fresh retain sample (minimise kl_weight·KL + ce_weight·CE). One
optimizer state and one linearly decaying lr schedule span all passes. KL uses temperature T and
is scaled by T² (Hinton et al.), as in the reference implementation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from jaxunlearn.unlearning.base import FORWARD_COST
from jaxunlearn.unlearning.finetune import (SGDConfig, cross_entropy, index_batches, retain_count, retain_sample,
                                            run_sgd, sgd, steps_for)


class SCRUBConfig(SGDConfig):
    # SCRUB code (large-scale CIFAR-10 notebook): SGD 0.9 / 5e-4, lr 5e-4, msteps 2 of 3 epochs,
    # retain KL weight (its α) 0.001, CE weight (its γ) 0.99, T 4, forget / retain batches 512 / 256
    lr: float = 5e-4
    kl_weight: float = 0.001  # weight of KL(teacher ‖ student) on retain in the min-step
    ce_weight: float = 0.99  # weight of CE on retain in the min-step
    temperature: float = 4.0
    epochs: int = struct.field(pytree_node=False, default=3)  # min passes (total epochs)
    max_steps: int = struct.field(pytree_node=False, default=2)  # epochs that start with a max pass
    batch_size: int = struct.field(pytree_node=False, default=256)
    forget_batch_size: int = struct.field(pytree_node=False, default=512)
    retain_per_epoch: int = struct.field(pytree_node=False, default=0)  # 0: the whole retain set


def distill_kl(student_logits, teacher_logits, temperature):
    """KL(teacher ‖ student) at temperature T, times T², batch mean. logits: f32[B, C] -> f32[]."""
    t = jax.nn.log_softmax(teacher_logits / temperature)
    s = jax.nn.log_softmax(student_logits / temperature)
    return jnp.mean(jnp.sum(jnp.exp(t) * (t - s), -1)) * temperature ** 2


def scrub_losses(data, teacher_params, teacher_state, config: SCRUBConfig):
    """(min_loss, max_loss), each ``(params, state, idx, key) -> (loss, state)``."""
    def kl_and_logits(params, state, idx):
        teacher = lax.stop_gradient(data.apply(teacher_params, teacher_state, data.images[idx], False)[0])
        logits, state = data.apply(params, state, data.images[idx], True)
        return distill_kl(logits, teacher, config.temperature), logits, state

    def min_loss(params, state, idx, k):
        kl, logits, state = kl_and_logits(params, state, idx)
        return config.kl_weight * kl + config.ce_weight * cross_entropy(logits, data.labels[idx]), state

    def max_loss(params, state, idx, k):
        kl, _, state = kl_and_logits(params, state, idx)
        return -kl, state

    return min_loss, max_loss


def retain_batches(retain_idx, size: int, batch: int):
    steps = steps_for(size, batch)

    def batches(k, _):
        kr, ks = jax.random.split(k)
        return index_batches(ks, retain_sample(retain_idx, kr, size), steps, batch)

    return batches, steps


def scrub(params, model_state, data, forget_idx, retain_idx, targets, key, config: SCRUBConfig):
    max_steps = min(config.max_steps, config.epochs)  # as the reference: epochs 0..max_steps-1 start with a max pass
    min_loss, max_loss = scrub_losses(data, params, model_state, config)
    r = retain_count(config.retain_per_epoch, retain_idx.shape[0])
    min_batches, steps_r = retain_batches(retain_idx, r, config.batch_size)
    fb = min(config.forget_batch_size, forget_idx.shape[0])
    steps_f = steps_for(forget_idx.shape[0], fb)
    tx = sgd(config, config.epochs * steps_r + max_steps * steps_f)
    cost = (1.0 + FORWARD_COST) * (config.epochs * steps_r * config.batch_size + max_steps * steps_f * fb)
    if max_steps == 0:
        p, s, _ = run_sgd(params, model_state, config, min_batches, steps_r, min_loss, key, tx,
                          update_mask=data.update_mask)
        return p, s, jnp.float32(cost)

    def max_then_min(carry, k):
        p, s, o = carry
        k_max, k_min = jax.random.split(k)
        p, s, o = run_sgd(p, s, config, lambda kb, e: index_batches(kb, forget_idx, steps_f, fb), steps_f,
                          max_loss, k_max, tx, epochs=1, opt_state=o, update_mask=data.update_mask)
        p, s, o = run_sgd(p, s, config, min_batches, steps_r, min_loss, k_min, tx, epochs=1, opt_state=o,
                          update_mask=data.update_mask)
        return (p, s, o), None

    k_first, k_rest = jax.random.split(key)
    (p, s, o), _ = lax.scan(max_then_min, (params, model_state, tx.init(params)),
                            jax.random.split(k_first, max_steps))
    p, s, _ = run_sgd(p, s, config, min_batches, steps_r, min_loss, k_rest, tx,
                      epochs=config.epochs - max_steps, opt_state=o, update_mask=data.update_mask)
    return p, s, jnp.float32(cost)
