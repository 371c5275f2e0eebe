"""Feldman-Zhang memorization from a subset ensemble, and the DEL paper's accuracy-gap metrics."""
from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.utils import all_finite

ACCURACY_GROUPS = ("forget", "retain", "test")


def memorization(masks, outputs, labels=None):
    """mem(i) = P[model correct on i | i in its subset] − P[correct | i not in it], f32[n].

    masks: bool[M, n] (model m trained on point i); outputs: bool[M, n] (correct), f32[M, n, C]
    logits with ``labels`` i32[n] (correct = argmax), or f32[M, n] margins, correct where > 0 (with
    jaxunlearn's margins, correct logit − logsumexp of the others, that is p(correct) > 1/2, a
    stricter test than the argmax: pass logits for Feldman-Zhang's accuracy). Straight from an
    α-subset ensemble (no extra training). A point that every model (or no model) saw has no
    estimate: one clear error.
    """
    masks = jnp.asarray(masks)
    out = jnp.asarray(outputs)
    chex.assert_rank(masks, 2)
    if out.ndim == 3:
        if labels is None:
            raise JaxUnlearnError("memorization from logits needs the labels")
        labels = jnp.asarray(labels)
        if labels.shape != out.shape[1:2]:
            raise JaxUnlearnError(f"labels {tuple(labels.shape)} do not match logits {tuple(out.shape)}")
        correct = out.argmax(-1) == labels[None]
    elif out.ndim == 2:
        correct = out if out.dtype == jnp.bool_ else out > 0
    else:
        raise JaxUnlearnError(f"outputs must be correctness/margins [M, n] or logits [M, n, C], got {tuple(out.shape)}")
    if correct.shape != masks.shape:
        raise JaxUnlearnError(f"outputs cover {tuple(correct.shape)} (models, points); masks {tuple(masks.shape)}")
    if not all_finite(out):
        raise JaxUnlearnError("memorization: the outputs contain NaN or inf")
    m = masks.astype(jnp.float32)
    c = correct.astype(jnp.float32)
    n_in, n_out = m.sum(0), (1.0 - m).sum(0)
    if bool(jnp.any(n_in == 0)) or bool(jnp.any(n_out == 0)):
        bad = int(jnp.argmax((n_in == 0) | (n_out == 0)))
        raise JaxUnlearnError(f"memorization: point {bad} was in every subset or in none; use an α-subset ensemble")
    return (m * c).sum(0) / n_in - ((1.0 - m) * c).sum(0) / n_out


def accuracy_gaps(unlearned: dict, oracle: dict) -> dict:
    """|acc_unlearned − acc_oracle| per group (forget, retain, test), accuracies in [0, 1]."""
    return {g: abs(float(unlearned[g]) - float(oracle[g])) for g in ACCURACY_GROUPS}


def tug_of_war(unlearned: dict, oracle: dict) -> float:
    """ToW (the RUM paper, used by DEL): Π over forget, retain, test of (1 − |acc_u − acc_o|),
    accuracies in [0, 1]; 1 = the oracle's accuracies exactly."""
    return float(np.prod([1.0 - v for v in accuracy_gaps(unlearned, oracle).values()]))
