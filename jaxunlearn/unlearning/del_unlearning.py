"""DEL (Torkzadehmahani et al., TMLR 2025): reset the forget set's critical weights, then fine-tune.

As the authors' released ``unlearn.py`` (``unlearning_alg=reset+finetune``): the DEL mask
(:func:`jaxunlearn.localization.del_mask`, 30 % of the weights) is reset to a FRESH default
initialisation (a new draw, not the model's own init), then the model is fine-tuned in training mode
on the whole retain set with the masked weights and the whole classifier updated (their gradient mask
is set to ones for every ``fc`` / ``mlp_head`` parameter): SGD momentum 0.9, no weight decay, cosine
annealing per epoch to 0.01 · lr (``CosineAnnealingLR(T_max=epochs, eta_min=0.01 lr)``, stepped once
per epoch). CIFAR-10 / ResNet-18: lr 0.015, 30 epochs, batch 128 (the defaults); SVHN / ViT: lr 0.05.

The classifier (``train_head=1``, the default) is the top-level module of the params with the logits'
width C (``head=NAME`` names it where that is ambiguous; the order of a params dict cannot tell, since
JAX rebuilds dicts with sorted keys); ``train_head=0`` updates the masked weights only (the mask alone,
as an earlier version of their code could). Needs ``data.init`` (the model's initialiser).
Cost: one gradient per forget point (the mask) + the fine-tuning's examples.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.localization.masks import MaskConfig, del_mask
from jaxunlearn.unlearning.base import num_classes
from jaxunlearn.unlearning.finetune import (SGDConfig, both_masks, model_ce, retain_count, retain_sample, run_finetune,
                                            select_update, sgd, steps_for)


class DELConfig(SGDConfig, MaskConfig):
    lr: float = 0.015
    weight_decay: float = 0.0
    lr_floor: float = 0.01  # the cosine ends at lr_floor · lr
    epochs: int = struct.field(pytree_node=False, default=30)
    batch_size: int = struct.field(pytree_node=False, default=128)
    retain_per_epoch: int = struct.field(pytree_node=False, default=0)  # 0: the whole retain set
    train_head: int = struct.field(pytree_node=False, default=1)  # 1: the classifier is trained whole (theirs)
    head: str = struct.field(pytree_node=False, default="")  # the classifier's module ("": the one C wide)


def reset_to_fresh(params, mask, init, key):
    """Masked weights replaced by a fresh initialisation ``init(key)[0]``, the others kept (bits too)."""
    fresh, _ = init(key)
    return select_update(jax.tree.map(lambda f, p: f.astype(p.dtype), fresh, params), params, mask)


def classifier_module(params, num_classes: int, name: str = "") -> str:
    """The top-level module of ``params`` that is the classifier: ``name``, or else the only one with a
    leaf C = ``num_classes`` wide on its last axis (the head's kernel [D, C] and bias [C])."""
    if not isinstance(params, dict) or not params:
        raise JaxUnlearnError("train_head needs params as a dict of modules (flax's layout)")
    if name:
        if name not in params:
            raise JaxUnlearnError(f"train_head: no top-level module {name!r}; the params have {', '.join(params)}")
        return name
    found = [k for k, sub in params.items() if any(np.shape(x)[-1:] == (num_classes,) for x in jax.tree.leaves(sub))]
    if len(found) != 1:
        raise JaxUnlearnError(f"train_head: cannot tell the classifier by its {num_classes}-wide output among the "
                              f"top-level modules ({', '.join(found) or 'none is'}); name it with head=NAME")
    return found[0]


def with_head(mask, head: str):
    """``mask`` with every weight of top-level module ``head`` (the classifier) allowed."""
    return {**mask, head: jax.tree.map(jnp.ones_like, mask[head])}


def epoch_cosine(lr, floor_fraction, epochs: int, steps_per_epoch: int):
    """torch's CosineAnnealingLR stepped once per epoch, as an optax schedule over steps."""
    floor = floor_fraction * lr

    def schedule(step):
        e = jnp.minimum(step // steps_per_epoch, epochs)
        return floor + (lr - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * e / epochs))

    return schedule


def del_unlearning(params, model_state, data, forget_idx, retain_idx, targets, key, config: DELConfig):
    if data.init is None:
        raise JaxUnlearnError("del resets weights to a fresh initialisation: UnlearnData.init "
                              "((key) -> (params, model_state)) is needed")
    k_mask, k_init, k_tune = jax.random.split(key, 3)
    mask, mask_cost = del_mask(params, model_state, data, forget_idx, k_mask, config)
    params = reset_to_fresh(params, mask, data.init, k_init)
    if config.train_head:
        update = with_head(mask, classifier_module(params, num_classes(data, params, model_state), config.head))
    else:
        update = mask
    r = retain_count(config.retain_per_epoch, retain_idx.shape[0])
    steps = steps_for(r, config.batch_size)
    tx = sgd(config, config.epochs * steps, epoch_cosine(config.lr, config.lr_floor, config.epochs, steps))
    params, model_state, cost = run_finetune(params, model_state, config, lambda k: retain_sample(retain_idx, k, r),
                                             r, lambda p, s, idx, k: model_ce(data, p, s, idx), k_tune, tx,
                                             both_masks(update, data.update_mask))
    return params, model_state, cost + mask_cost
