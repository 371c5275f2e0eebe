"""SalUn (Fan et al., ICLR 2024): random-label unlearning restricted to salient weights.

Saliency: |∂ CE(forget) / ∂θ| over the whole forget set (eval mode), summed over batches; the mask
keeps the top ``saliency_fraction`` of all weights (one global threshold, exact count). Then the
random-label fine-tune updates only masked weights: every other weight keeps its exact bits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxunlearn.localization.masks import forget_gradient, top_fraction
from jaxunlearn.unlearning.finetune import both_masks
from jaxunlearn.unlearning.random_labels import RandomLabelsConfig, random_labels


class SalUnConfig(RandomLabelsConfig):
    # SalUn code: lr 0.013 (README; earlier versions 0.1), 10 epochs, batch 256, top-50 % saliency mask
    saliency_fraction: float = struct.field(pytree_node=False, default=0.5)


def salun_mask(grads, fraction: float):
    """True for the top ``fraction`` of all weights by |grad| (exactly round(fraction * size))."""
    return top_fraction(jax.tree.map(jnp.abs, grads), fraction, rounding="round")


def salun(params, model_state, data, forget_idx, retain_idx, targets, key, config: SalUnConfig):
    grads = forget_gradient(params, model_state, data, forget_idx, config.batch_size)
    mask = salun_mask(grads, config.saliency_fraction)
    data = data.replace(update_mask=both_masks(mask, data.update_mask))  # with any mask the caller set
    params, model_state, cost = random_labels(params, model_state, data, forget_idx, retain_idx, targets, key, config)
    return params, model_state, cost + jnp.float32(forget_idx.shape[0])
