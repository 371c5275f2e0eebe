"""SalUn (Fan et al., ICLR 2024): random-label unlearning restricted to salient weights.

Saliency: |∂ CE(forget) / ∂θ| over the whole forget set (eval mode), summed over batches; the mask
keeps the top ``saliency_fraction`` of all weights (one global threshold, exact count). Then the
random-label fine-tune updates only masked weights: every other weight keeps its exact bits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from jaxunlearn.unlearning.finetune import per_example_ce, steps_for
from jaxunlearn.unlearning.random_labels import RandomLabelsConfig, run_random_labels


class SalUnConfig(RandomLabelsConfig):
    # SalUn code: lr 0.013 (README; earlier versions 0.1), 10 epochs, batch 256, top-50 % saliency mask
    saliency_fraction: float = struct.field(pytree_node=False, default=0.5)


def forget_gradient(params, model_state, data, forget_idx, batch: int):
    """Σ over the forget set of ∂CE/∂θ (eval mode), in batches of ``batch``: pytree like params."""
    f = forget_idx.shape[0]
    b = min(batch, f)
    steps = steps_for(f, b)
    pos = jnp.arange(steps * b).reshape(steps, b)

    def body(acc, p):
        idx = forget_idx[jnp.minimum(p, f - 1)]
        w = (p < f).astype(jnp.float32)  # padding positions weigh nothing

        def loss(params):
            logits, _ = data.apply(params, model_state, data.images[idx], False)
            return jnp.sum(w * per_example_ce(logits, data.labels[idx]))

        return jax.tree.map(jnp.add, acc, jax.grad(loss)(params)), None

    grads, _ = lax.scan(body, jax.tree.map(jnp.zeros_like, params), pos)
    return grads


def saliency_mask(grads, fraction: float):
    """True for the top ``fraction`` of all weights by |grad| (exactly round(fraction * size))."""
    leaves, treedef = jax.tree.flatten(grads)
    flat = jnp.concatenate([jnp.abs(g).ravel() for g in leaves])
    k = int(round(fraction * flat.size))
    keep = jnp.zeros(flat.shape, bool).at[jnp.argsort(-flat)[:k]].set(True)
    parts, start = [], 0
    for g in leaves:
        parts.append(keep[start:start + g.size].reshape(g.shape))
        start += g.size
    return jax.tree.unflatten(treedef, parts)


def salun(params, model_state, data, forget_idx, retain_idx, targets, key, config: SalUnConfig):
    grads = forget_gradient(params, model_state, data, forget_idx, config.batch_size)
    mask = saliency_mask(grads, config.saliency_fraction)
    params, model_state, cost = run_random_labels(params, model_state, data, forget_idx, retain_idx, key,
                                                  config, update_mask=mask)
    return params, model_state, cost + jnp.float32(forget_idx.shape[0])
