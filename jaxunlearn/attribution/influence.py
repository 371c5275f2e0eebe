"""Subsampling influence (Feldman & Zhang) for every target, as the Datamodel Matching code uses it.

From M models each trained on a random subset (masks x ∈ {0,1}^[M, n]) and their outputs
y f32[M, T], the influence of training point i on target t is a difference of means::

    infl[i, t] = mean{ y[m, t] : i ∈ S_m } − mean{ y[m, t] : i ∉ S_m } = (Dᵀ y)[i, t],
    D[m, i]    = x[m, i] / c_in[i] − (1 − x[m, i]) / c_out[i]

(c_in / c_out: how many models saw / did not see i). It is one matmul for all targets, unbiased
under independent α-subsets, and not shrunk the way ridge is. Its noise is large: the standard
error of infl[i, t] is σ_t·sqrt(1/c_in[i] + 1/c_out[i]) (σ_t: the spread of target t over
models), so the estimates are *denoised* by soft-thresholding each one at ``threshold`` times its
own standard error; :func:`select_influence_threshold` picks the multiple by held-out LDS.

A forget set's summed effect Σ_{i∈F} infl[i, t] never needs the [n, T] matrix: without
denoising it is a weighted sum of the models' outputs, (Σ_{i∈F} D[:, i])ᵀ y; with it, only the
|F| rows of the forget points are formed, a chunk of targets at a time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxunlearn.attribution.datamodels import (HIGHEST, Datamodels, _check_fit_settings, check_fit_inputs, check_masks,
                                              spearman)
from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.utils import all_finite, check_indices

# held-out LDS chooses among these multiples of each estimate's standard error (0 = raw estimates)
DEFAULT_THRESHOLDS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)


_column_sums = jax.jit(lambda x: x.sum(0))


def _counts(x, what: str):
    """c_in, c_out f32[n]; every point must be both in and out of some model."""
    m = x.shape[0]
    c_in = _column_sums(x)
    bad = np.flatnonzero((np.asarray(c_in) < 1) | (np.asarray(c_in) > m - 1))
    if bad.size:
        raise JaxUnlearnError(f"{what}: training point {int(bad[0])} is in {int(c_in[bad[0]])} of {m} models "
                              f"({bad.size} such points); subsampling influence needs every point both in and "
                              "out of some models (train subset models with alpha < 1)")
    return c_in, m - c_in


@jax.jit
def _design_and_scale(x, c_in, c_out):
    """D f32[M, n] with infl = Dᵀ y, and s f32[n]: the standard error of infl[i, t] is s[i]·σ_t."""
    return x / c_in - (1.0 - x) / c_out, jnp.sqrt(1.0 / c_in + 1.0 / c_out)


def _design(x):
    """:func:`_design_and_scale` of masks x f32[M, n], every point checked to be both in and out."""
    return _design_and_scale(x, *_counts(x, "influence"))


def _check_threshold(threshold) -> None:
    if not np.isfinite(threshold) or threshold < 0:
        raise JaxUnlearnError(f"influence: threshold must be a finite number >= 0, got {threshold}")


def _soft(w, t):
    return jnp.sign(w) * jnp.maximum(jnp.abs(w) - t, 0.0)


@jax.jit
def _influence_block(d, y, s, sigma, threshold):
    """Denoised influence of the points whose design columns are ``d`` f32[M, k]: f32[k, T]."""
    w = jnp.dot(d.T, y, precision=HIGHEST)
    return _soft(w, threshold * s[:, None] * sigma[None, :])


def influence_estimates(masks, outputs, threshold: float = 0.0) -> Datamodels:
    """Influence of every training point on every target, as linear datamodels.

    masks: bool|f32[M, n]; outputs: f32[M, T]. Returns weights f32[T, n] (weights[t, i] =
    denoised infl[i, t]), bias f32[T] (so that ``predict`` reproduces the mean output at the mean
    mask) and ``lam`` f32[T] = the threshold used. Materialises [T, n]: for a few targets or
    small n; forget-set sums go through :func:`influence_forget_effects`.
    """
    x, y = check_fit_inputs(masks, outputs, "influence")
    _check_threshold(threshold)
    d, s = _design(x)
    w = _influence_block(d, y - y.mean(0), s, y.std(0), jnp.float32(threshold)).T
    bias = y.mean(0) - jnp.dot(w, x.mean(0), precision=HIGHEST)
    return Datamodels(w, bias, jnp.full((y.shape[1],), threshold, jnp.float32))


def influence_forget_effects(masks, outputs, forget_sets, threshold: float = 0.0, chunk: int = 8192) -> np.ndarray:
    """Σ_{i∈F} infl[i, t] for every target t and each forget set F, without the [n, T] matrix.

    masks: [M, n]; outputs: f32[M, T] (NumPy array or memmap; one chunk of targets is on the
    device at a time); forget_sets: list of int arrays; threshold: soft-threshold multiple of
    each estimate's standard error (0: raw difference of means). Returns f32[S, T].
    """
    x = check_masks(masks, "influence")
    m, n = x.shape
    if np.ndim(outputs) != 2 or np.shape(outputs)[0] != m:
        raise JaxUnlearnError(f"influence: masks have {m} models but outputs have shape {np.shape(outputs)}")
    if not forget_sets:
        raise JaxUnlearnError("influence: no forget sets given")
    _check_threshold(threshold)
    _check_fit_settings("influence", chunk=chunk)
    fsets = [check_indices(f, n, "forget set") for f in forget_sets]
    d, s = _design(x)
    sets = [jnp.asarray(f) for f in fsets]
    a = jnp.stack([_summed_columns(d, f) for f in sets])  # [S, M]: the raw sums are a weighting of the models
    t_total = int(np.shape(outputs)[1])
    out = np.zeros((len(fsets), t_total), np.float32)
    for start in range(0, t_total, chunk):
        y = jnp.asarray(np.asarray(outputs[:, start:start + chunk]), jnp.float32)
        if not all_finite(y):
            raise JaxUnlearnError("influence: outputs contain NaN or inf")
        if threshold == 0:
            block = _raw_effects(a, y)
        else:
            block = jnp.stack([_denoised_effect(d, y, s, f, jnp.float32(threshold)) for f in sets])
        out[:, start:start + chunk] = np.asarray(block)
    return out


@jax.jit
def _summed_columns(d, f):
    """Σ_{i∈F} D[:, i]: f32[M]."""
    return d[:, f].sum(1)


@jax.jit
def _raw_effects(a, y):
    """(Σ_{i∈F} D[:, i])ᵀ (y − ȳ) for each set: f32[S, T]."""
    return jnp.dot(a, y - y.mean(0), precision=HIGHEST)


@jax.jit
def _denoised_effect(d, y, s, f, threshold):
    """Σ_{i∈F} of the denoised influence of the points F on every target: f32[T]."""
    yc = y - y.mean(0)
    return _influence_block(d[:, f], yc, s[f], yc.std(0), threshold).sum(0)


@jax.jit
def _lds_per_threshold(d, x_val, y, y_val, s, thresholds):
    """Spearman(pred, actual) on held-out models for each threshold: f32[L, T]. x_val: held-out masks
    centred on the fitting models' mean; y: the fitting models' outputs f32[M, T]."""
    yc = y - y.mean(0)
    w_raw = jnp.dot(d.T, yc, precision=HIGHEST)  # [n, T]
    sigma = yc.std(0)

    def one(tau):
        w = _soft(w_raw, tau * s[:, None] * sigma[None, :])
        return spearman(jnp.dot(x_val, w, precision=HIGHEST), y_val)

    return lax.map(one, thresholds)


def influence_lds(masks_fit, outputs_fit, masks_val, outputs_val, thresholds=DEFAULT_THRESHOLDS,
                  chunk: int = 4096) -> np.ndarray:
    """LDS of the denoised influence datamodels at each threshold: fitted on (masks_fit,
    outputs_fit f32[M, T]), scored by Spearman correlation on held-out (masks_val, outputs_val),
    averaged over targets. Targets go ``chunk`` at a time. Returns f32[L]."""
    x, y = check_fit_inputs(masks_fit, outputs_fit, "influence")
    xv, yv = check_fit_inputs(masks_val, outputs_val, "influence LDS")
    if x.shape[1] != xv.shape[1] or y.shape[1] != yv.shape[1]:
        raise JaxUnlearnError(f"influence LDS: fit data {x.shape}/{y.shape} and held-out data "
                              f"{xv.shape}/{yv.shape} do not match")
    _check_fit_settings("influence LDS", chunk=chunk)
    d, s = _design(x)
    taus = jnp.asarray(thresholds, jnp.float32)
    # predictions are centred on the fit means; Spearman is shift-invariant per target
    xv_c = _centred_on(xv, x)
    parts = [_lds_per_threshold(d, xv_c, y[:, i:i + chunk], yv[:, i:i + chunk], s, taus)
             for i in range(0, y.shape[1], chunk)]  # every chunk dispatched before the first is read back
    return np.nanmean(np.concatenate([np.asarray(p) for p in parts], axis=1), axis=1).astype(np.float32)


@jax.jit
def _centred_on(a, b):
    return a - b.mean(0)


def select_influence_threshold(masks, outputs, thresholds=DEFAULT_THRESHOLDS, val_fraction: float = 0.2,
                               seed: int = 0) -> tuple[float, dict]:
    """The soft-threshold multiple with the best held-out LDS: a seeded ``val_fraction`` of the M
    models is held out, the rest fit. Returns (threshold, {threshold: LDS})."""
    x, y = check_fit_inputs(masks, outputs, "influence")
    _check_fit_settings("influence", val_fraction)
    m = x.shape[0]
    nv = max(2, int(round(val_fraction * m)))
    if m - nv < 2:
        raise JaxUnlearnError(f"influence: {m} models are too few to hold out {nv} for choosing the threshold")
    perm = np.random.default_rng(seed).permutation(m)
    scores = influence_lds(x[perm[nv:]], y[perm[nv:]], x[perm[:nv]], y[perm[:nv]], thresholds)
    table = {float(t): float(v) for t, v in zip(thresholds, scores)}
    return float(thresholds[int(np.nanargmax(scores))]), table
