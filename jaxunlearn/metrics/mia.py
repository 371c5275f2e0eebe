"""Membership inference against unlearning: an ensemble likelihood-ratio attack (LiRA, Carlini et
al. 2022, used for unlearning as U-LiRA by Hayes et al. 2024).

Per forget point, Gaussians are fitted to the margins of reference models that trained on it
("in": full models) and that did not ("out": oracle models). A target model's margin m at that
point scores ``log N(m; μ_in, σ_in) − log N(m; μ_out, σ_out)``. The attack is asked to tell
unlearned models (positives) from held-out oracle models (negatives; models never trained on the
points and not used to fit the Gaussians), pooled over (model, forget point) pairs. Perfect
unlearning is indistinguishable from the oracle: AUC 0.5, TPR at 1 % FPR ≈ 0.01.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.errors import JaxUnlearnError


@jax.jit
def lira_scores(target, in_margins, out_margins, min_std: float = 1e-3):
    """target: f32[Kt, P], in_margins: f32[Ki, P], out_margins: f32[Ko, P] -> f32[Kt, P] log-LR."""
    def logpdf(x, ref):
        mu, sd = ref.mean(0), jnp.maximum(ref.std(0), min_std)
        return -0.5 * ((x - mu) / sd) ** 2 - jnp.log(sd)

    return logpdf(target, in_margins) - logpdf(target, out_margins)


def roc_auc(pos, neg) -> float:
    """P(score_pos > score_neg) + ½ P(tie) (Mann–Whitney), from 1-D score arrays."""
    pos, neg = np.asarray(pos, np.float64).ravel(), np.asarray(neg, np.float64).ravel()
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - 0.5 * (counts - 1))[inverse]  # 1-based ranks, ties averaged
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def tpr_at_fpr(pos, neg, fpr: float = 0.01) -> float:
    """Fraction of positives scoring above the threshold that lets ``fpr`` of negatives through."""
    neg = np.sort(np.asarray(neg, np.float64).ravel())
    k = int(np.floor(fpr * len(neg)))
    thr = neg[len(neg) - 1 - k] if k < len(neg) else -np.inf
    return float(np.mean(np.asarray(pos).ravel() > thr))


def mia(target_margins, heldout_margins, in_margins, out_margins, points) -> dict:
    """The attack on ``points`` (e.g. the forget set).

    target_margins: f32[Kt, N] (models under test), heldout_margins: f32[Kh, N] (oracles not in
    ``out_margins``), in_margins: f32[Ki, N], out_margins: f32[Ko, N]; points: int[p].
    Returns {"auc", "tpr_at_1pct_fpr"}.
    """
    arrs = [np.asarray(a, np.float32) for a in (target_margins, heldout_margins, in_margins, out_margins)]
    n = arrs[0].shape[-1] if arrs[0].ndim else 0
    if any(a.ndim != 2 or a.shape[1] != n for a in arrs):
        raise JaxUnlearnError(f"MIA: every margins array must be [models, {n}] (the same points), got "
                              f"{[a.shape for a in arrs]}")
    points = np.asarray(points)
    if points.size == 0:
        raise JaxUnlearnError("MIA: no points to attack")
    if points.min() < 0 or points.max() >= arrs[0].shape[1]:
        raise JaxUnlearnError(f"MIA: points out of range [0, {arrs[0].shape[1]})")
    if min(a.shape[0] for a in arrs[2:]) < 2:
        raise JaxUnlearnError("MIA: need at least 2 reference models in and out")
    if not all(np.isfinite(a[:, points]).all() for a in arrs):
        raise JaxUnlearnError("MIA: margins contain NaN or inf")
    t, h, i, o = (jnp.asarray(a[:, points]) for a in arrs)
    pos, neg = np.asarray(lira_scores(t, i, o)), np.asarray(lira_scores(h, i, o))
    return {"auc": roc_auc(pos, neg), "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg, 0.01)}
