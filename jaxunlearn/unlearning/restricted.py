"""``METHOD@MASK``: any registered method with its updates restricted to a localization mask.

The mask (:mod:`jaxunlearn.localization`) is computed per model from that model's weights and
forget set, then the method runs unchanged with ``data.update_mask`` set: every SGD step keeps
the weights outside the mask at their exact bits (the DEL paper's pairing of its mask with
fine-tune, NegGrad+, random labels, gradient ascent, ℓ1-sparse...). The config is the method's
config plus :class:`~jaxunlearn.localization.MaskConfig`'s fields; the counted compute includes
computing the mask.
"""
from __future__ import annotations

import functools

import jax

from jaxunlearn.localization.masks import MaskConfig, get_mask
from jaxunlearn.unlearning.finetune import both_masks


def restrict(method, mask_fn):
    """``method`` (shared signature) restricted to ``mask_fn``'s mask; same signature."""

    def restricted(params, model_state, data, forget_idx, retain_idx, targets, key, config):
        k_mask, k_method = jax.random.split(key)
        mask, mask_cost = mask_fn(params, model_state, data, forget_idx, k_mask, config)
        data = data.replace(update_mask=both_masks(mask, data.update_mask))
        params, model_state, cost = method(params, model_state, data, forget_idx, retain_idx, targets, k_method,
                                           config)
        return params, model_state, cost + mask_cost

    return restricted


@functools.cache
def restricted_config(config_cls: type, mask_name: str) -> type:
    """The method's config class extended with the mask fields (one class per pair, so the jit
    cache and ``unlearn_grid``'s grouping see the same type every time)."""
    get_mask(mask_name)
    name = f"{config_cls.__name__}At{mask_name.title()}"
    return type(name, (config_cls, MaskConfig), {"__module__": __name__, "__qualname__": name})


@functools.cache
def restricted_fn(method, mask_name: str):
    return restrict(method, get_mask(mask_name))
