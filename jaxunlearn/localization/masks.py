"""Localization: which weights an unlearning method may change, as a pytree of bools like params.

Every mask function has one signature (per model; :func:`jaxunlearn.unlearning.unlearn_ensemble`
maps it over an ensemble like any method)::

    mask_fn(params, model_state, data, forget_idx, key, config) -> (mask, cost)

mask: pytree of bool like ``params``, exactly ``floor(config.mask_fraction · #weights)`` True;
cost: f32[] per-example gradient evaluations spent finding it (counted into the method's compute).

* ``del``: DEL (Torkzadehmahani et al., TMLR 2025), as the authors' ``generate_mask.py`` with
  ``critic_criteria=weighted_grad, granularity=channel``: per weight |θ ⊙ Σ_b ∇θ CE(b)| over the
  forget set shuffled and cut into full batches of 128, a short remainder dropped (their loader's
  ``shuffle=True, drop_last=True``; a forget set smaller than one batch, which gives them no batch at
  all, is one batch here), batch-mean CE, eval mode; a tensor of rank > 1 scores each output
  channel by the mean of its h = int(0.1 · C_out) largest entries (``mask_channel_reduce="topk"``,
  their ResNets) or by the mean of the whole row (``"mean"``, their ViT), and every weight of the
  channel gets that score; rank-1 tensors (biases, norm scales) are scored per weight; the globally
  top-scoring fraction (0.3) is kept.
* ``saliency``: SalUn's |Σ_i ∇θ CE(x_i)| over the forget set, per weight (no channel grouping).
* ``random``: channels chosen uniformly at random (every weight of a chosen output channel; rank-1
  tensors per weight), the same fraction.
* ``memorization``: DEL's score with each forget point's loss weighted by its memorization
  (``data.memorization``, Feldman-Zhang from the α-subset ensemble): the weights that carry the
  forget set's *memorized* points. Ours, not the paper's.
* ``whole``: every weight (the method unrestricted).

Layout note: flax keeps the output channel on the LAST axis of a kernel (Dense [in, out], Conv
[h, w, in, out]); torch keeps it first. "Output channel" here is flax's last axis, the same
channels the authors' ``view(shape[0], -1)`` groups in torch.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax import lax

from jaxunlearn.errors import JaxUnlearnError

CHANNEL_REDUCES = ("topk", "mean")


class MaskConfig(struct.PyTreeNode):
    """The localization fields every ``METHOD@MASK`` config and DEL carry (the DEL paper's defaults)."""

    mask_fraction: float = 0.3  # share of all weights in the mask (a traced leaf: one program for a grid)
    mask_batch_size: int = struct.field(pytree_node=False, default=128)  # forget batches for the scores
    mask_channel_topk: float = struct.field(pytree_node=False, default=0.1)  # h = int(this · C_out)
    mask_channel_reduce: str = struct.field(pytree_node=False, default="topk")  # "topk" (ResNet) | "mean" (ViT)


def forget_gradient(params, model_state, data, forget_idx, batch: int, per_batch_mean: bool = False,
                    point_weights=None):
    """Σ over forget batches of the gradient of CE (eval mode): pytree like params.

    per_batch_mean: each batch's CE is its mean (DEL: torch's default reduction, summed over
    batches; the last batch may be short); False: the sum over points (SalUn).
    point_weights: optional f32[n_train] multiplying each point's CE.
    """
    f = forget_idx.shape[0]
    b = min(batch, f)
    steps = -(-f // b)
    pos = jnp.arange(steps * b).reshape(steps, b)

    def body(acc, p):
        idx = forget_idx[jnp.minimum(p, f - 1)]
        w = (p < f).astype(jnp.float32)  # padding positions weigh nothing

        def loss(params):
            logits, _ = data.apply(params, model_state, data.images[idx], False)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, data.labels[idx])
            pw = w if point_weights is None else w * point_weights[idx]
            total = jnp.sum(pw * ce)
            return total / jnp.sum(w) if per_batch_mean else total

        return jax.tree.map(jnp.add, acc, jax.grad(loss)(params)), None

    grads, _ = lax.scan(body, jax.tree.map(jnp.zeros_like, params), pos)
    return grads


def channel_scores(score, reduce: str = "topk", topk_fraction: float = 0.1):
    """Every weight of an output channel (flax's last axis) gets its channel's score; rank <= 1
    tensors are returned as they are. score: f32[..., C_out] -> the same shape."""
    if score.ndim <= 1:
        return score
    c = score.shape[-1]
    rows = jnp.moveaxis(score, -1, 0).reshape(c, -1)
    if reduce == "mean":
        s = rows.mean(1)
    elif reduce == "topk":
        # the authors' h = int(0.1 · C_out) (of the output channels, not the row length), at least 1
        # and at most the row length (torch.topk would fail there)
        h = min(rows.shape[1], max(1, int(topk_fraction * c)))
        s = lax.top_k(rows, h)[0].mean(1)
    else:
        raise JaxUnlearnError(f"mask_channel_reduce must be one of {', '.join(CHANNEL_REDUCES)}, got {reduce!r}")
    return jnp.broadcast_to(s, score.shape)


def descending_ranks(flat):
    """Each entry's rank in descending order, ties broken by position (lower index first):
    f32[n] -> i32[n], 0 for the largest."""
    order = jnp.argsort(-flat, stable=True)
    return jnp.zeros(flat.shape[0], jnp.int32).at[order].set(jnp.arange(flat.shape[0], dtype=jnp.int32))


def top_fraction(scores, fraction, rounding: str = "floor"):
    """True for the globally top-scoring ``fraction`` of all entries of a pytree: exactly
    floor(fraction · n) of them, the product taken in float32 (``rounding="round"``: round), ties
    broken by position (the authors' ``int(len · fraction)``). ``fraction`` may be traced."""
    leaves, treedef = jax.tree.flatten(scores)
    flat = jnp.concatenate([jnp.ravel(x) for x in leaves])
    n = flat.shape[0]
    want = jnp.asarray(fraction, jnp.float32) * n
    k = jnp.round(want) if rounding == "round" else jnp.floor(want)  # f32 product: exact for n < 2**24 / 8
    keep = descending_ranks(flat) < k
    parts, start = [], 0
    for x in leaves:
        parts.append(keep[start:start + x.size].reshape(x.shape))
        start += x.size
    return jax.tree.unflatten(treedef, parts)


def _grouped(scores, config):
    return jax.tree.map(lambda s: channel_scores(s, config.mask_channel_reduce, config.mask_channel_topk), scores)


def full_batches(forget_idx, key, batch: int):
    """The forget points DEL's scores see: whole batches of ``batch``, the ``f mod batch`` left over
    dropped at random (``key``; None: the last ones in the given order), as torch's
    ``DataLoader(shuffle=True, drop_last=True)`` of the authors' code. A sum of equal-size batch means
    does not depend on which points share a batch, so only the choice of the dropped points is drawn.
    Fewer points than one batch are kept whole (their loader would give no batch). i32[f] -> i32[used]."""
    f = forget_idx.shape[0]
    drop = f % batch if f >= batch else 0
    if drop == 0:
        return forget_idx
    order = forget_idx if key is None else jax.random.permutation(key, forget_idx)
    return order[:f - drop]


def _criticality_mask(params, model_state, data, forget_idx, key, config, point_weights=None):
    """Top fraction of |θ ⊙ Σ_batches ∇θ CE| over the forget set's full batches (:func:`full_batches`),
    grouped by output channel. Cost: one gradient per point used."""
    idx = full_batches(forget_idx, key, config.mask_batch_size)
    g = forget_gradient(params, model_state, data, idx, config.mask_batch_size, per_batch_mean=True,
                        point_weights=point_weights)
    scores = jax.tree.map(lambda p, d: jnp.abs(p * d), params, g)
    return top_fraction(_grouped(scores, config), config.mask_fraction), jnp.float32(idx.shape[0])


def del_mask(params, model_state, data, forget_idx, key, config):
    """DEL's localization (see the module docstring). Cost: one gradient per forget point used."""
    return _criticality_mask(params, model_state, data, forget_idx, key, config)


def memorization_mask(params, model_state, data, forget_idx, key, config):
    """DEL's score with each forget point's CE weighted by its memorization (clipped at 0)."""
    if data.memorization is None:
        raise JaxUnlearnError("the memorization mask needs UnlearnData.memorization (f32[n_train], "
                              "jaxunlearn.metrics.memorization of a subset ensemble)")
    w = jnp.maximum(jnp.asarray(data.memorization, jnp.float32), 0.0)
    return _criticality_mask(params, model_state, data, forget_idx, key, config, point_weights=w)


def saliency_mask(params, model_state, data, forget_idx, key, config):
    """SalUn's |∇θ CE(forget)| per weight. Cost: one gradient per forget point."""
    g = forget_gradient(params, model_state, data, forget_idx, config.mask_batch_size)
    return top_fraction(jax.tree.map(jnp.abs, g), config.mask_fraction), jnp.float32(forget_idx.shape[0])


def random_mask(params, model_state, data, forget_idx, key, config):
    """Random output channels (rank-1 tensors: random weights), the same fraction. Cost: 0."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    scores = [jax.random.uniform(k, p.shape[-1:] if p.ndim > 1 else p.shape) for k, p in zip(keys, leaves)]
    scores = [jnp.broadcast_to(s, p.shape) for s, p in zip(scores, leaves)]
    return top_fraction(jax.tree.unflatten(treedef, scores), config.mask_fraction), jnp.float32(0.0)


def whole_mask(params, model_state, data, forget_idx, key, config):
    """Every weight. Cost: 0."""
    return jax.tree.map(lambda p: jnp.ones(p.shape, bool), params), jnp.float32(0.0)


MASKS: dict[str, Callable] = {"del": del_mask, "saliency": saliency_mask, "random": random_mask,
                              "memorization": memorization_mask, "whole": whole_mask}


def get_mask(name: str) -> Callable:
    if name not in MASKS:
        raise JaxUnlearnError(f"unknown mask {name!r}; choose from {', '.join(MASKS)}")
    return MASKS[name]


def mask_fraction_of(mask) -> jax.Array:
    """Share of True entries of a mask pytree (stacked or not): f32[]."""
    leaves = jax.tree.leaves(mask)
    return sum(jnp.sum(x) for x in leaves) / sum(x.size for x in leaves)
