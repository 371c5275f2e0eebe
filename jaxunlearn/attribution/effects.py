"""A forget set's summed effect on every class logit of every point, by any estimator.

DM-Direct predicts an oracle's logits as ``full − effect`` (Georgiev et al.), with
``effect[p, c] = Σ_{i∈F} w_{(p, c), i}`` for datamodel weights w of every logit target. Three
estimators of w, all fitted on the same subset-model ensemble:

- ``"influence"`` (the reference code's choice and our default): subsampling influence, a
  difference of means, soft-thresholded at ``threshold`` standard errors
  (:mod:`jaxunlearn.attribution.influence`; ``threshold=None`` picks it by held-out LDS);
- ``"ridge"``: ridge datamodels of every logit, λ per target on held-out models;
- ``"lasso"``: ridge for every logit, but the forget points' own |F|·C logits from lasso fits.

None of them materialises the [targets, n] weight matrix.
"""
from __future__ import annotations

import numpy as np

from jaxunlearn.attribution.datamodels import lasso_forget_effect, ridge_forget_effects
from jaxunlearn.attribution.influence import influence_forget_effects, select_influence_threshold
from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.utils import check_indices

ESTIMATORS = ("influence", "ridge", "lasso")


def check_estimator(estimator: str) -> str:
    if estimator not in ESTIMATORS:
        raise JaxUnlearnError(f"unknown forget-effect estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
    return estimator


def auto_threshold(masks, outputs, seed: int = 0, max_targets: int = 4096) -> tuple[float, dict]:
    """The influence soft-threshold with the best held-out LDS on (a seeded sample of at most
    ``max_targets`` of) the targets. outputs: f32[M, T]. Returns (threshold, {threshold: LDS})."""
    t = np.shape(outputs)[1]
    cols = np.arange(t) if t <= max_targets else np.sort(np.random.default_rng(seed).choice(t, max_targets, False))
    return select_influence_threshold(masks, np.asarray(outputs)[:, cols], seed=seed)


def forget_set_effects(masks, outputs, forget_sets, estimator: str = "influence", threshold: float | None = None,
                       seed: int = 0, lasso_iters: int = 50) -> np.ndarray:
    """Summed effect of each forget set on every output: f32[S, P, C].

    masks: bool[M, n] of the subset models; outputs: f32[M, P, C] their logits on P points, the
    n training points first (so the forget points' own rows are ``outputs[:, F]``); forget_sets:
    list of int arrays of training indices.
    """
    check_estimator(estimator)
    if np.ndim(outputs) != 3:
        raise JaxUnlearnError(f"forget effects: outputs must be [models, points, classes], got {np.shape(outputs)}")
    m, p, c = np.shape(outputs)
    if np.shape(masks)[0] != m:
        raise JaxUnlearnError(f"forget effects: masks have {np.shape(masks)[0]} models but outputs {m}")
    n = np.shape(masks)[1]
    if p < n:
        raise JaxUnlearnError(f"forget effects: outputs cover {p} points, fewer than the {n} training points")
    if not len(forget_sets):
        raise JaxUnlearnError("forget effects: no forget sets given")
    fsets = [check_indices(f, n, "forget set") for f in forget_sets]
    flat = np.asarray(outputs, np.float32).reshape(m, p * c)
    if estimator == "influence":
        if threshold is None:
            threshold, _ = auto_threshold(masks, flat, seed)
        eff = influence_forget_effects(masks, flat, fsets, threshold=threshold)
        return eff.reshape(len(fsets), p, c)
    eff, _ = ridge_forget_effects(masks, flat, fsets, seed=seed)
    eff = eff.reshape(len(fsets), p, c)
    if estimator == "lasso":  # the forget points' own logits: where ridge's shrinkage hurts most
        for k, f in enumerate(fsets):
            y = np.asarray(outputs[:, f], np.float32).reshape(m, len(f) * c)
            eff[k, f] = lasso_forget_effect(masks, y, f, iters=lasso_iters, seed=seed).reshape(len(f), c)
    return eff
