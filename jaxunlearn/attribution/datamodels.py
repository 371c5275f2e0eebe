"""Linear datamodels: ``output(x; S') ≈ w_x · 1[S'] + b_x``, fitted for all targets at once.

masks: bool|f32[M, n] (which training points each subset model saw);
outputs: f32[M, T] (T targets: e.g. every class logit and margin of every evaluation point).
Weights come back as f32[T, n] and biases as f32[T].
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.utils import all_finite, check_indices, is_integer

HIGHEST = lax.Precision.HIGHEST


class Datamodels(NamedTuple):
    weights: jax.Array  # f32[T, n]
    bias: jax.Array  # f32[T]
    lam: jax.Array  # f32[T], the regularisation chosen for each target

    def predict(self, masks):
        """masks: [M, n] -> f32[M, T]."""
        return jnp.dot(jnp.asarray(masks, jnp.float32), self.weights.T, precision=HIGHEST) + self.bias


def _check_models(m_masks: int, m_outputs: int, what: str) -> None:
    if m_masks != m_outputs:
        raise JaxUnlearnError(f"{what}: masks have {m_masks} models but outputs {m_outputs}")
    if m_masks < 2:
        raise JaxUnlearnError(f"{what}: need at least 2 models, got {m_masks}")


def _check_finite(outputs, what: str) -> None:
    if not all_finite(outputs):
        raise JaxUnlearnError(f"{what}: outputs contain NaN or inf")


@jax.jit
def _is_binary(x):
    return jnp.all((x == 0) | (x == 1))


def check_masks(masks, what: str = "datamodels"):
    """masks: bool|0/1 [M, n] -> f32[M, n]; anything else (NaN, 0.5, 2) is a clear error."""
    x = jnp.asarray(masks, jnp.float32)
    if x.ndim != 2:
        raise JaxUnlearnError(f"{what}: masks must be [models, points], got shape {tuple(x.shape)}")
    if not bool(_is_binary(x)):
        raise JaxUnlearnError(f"{what}: masks must be 0/1 (which points each model saw); they hold other values")
    return x


def check_fit_inputs(masks, outputs, what: str = "datamodels"):
    masks = check_masks(masks, what)
    outputs = jnp.asarray(outputs, jnp.float32)
    if outputs.ndim != 2:
        raise JaxUnlearnError(f"{what}: outputs must be [models, targets], got shape {tuple(outputs.shape)}")
    _check_models(masks.shape[0], outputs.shape[0], what)
    _check_finite(outputs, what)
    return masks, outputs


def _check_fit_settings(what: str, val_fraction: float | None = None, chunk: int | None = None,
                        iters: int | None = None, num_lambdas: int | None = None) -> None:
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise JaxUnlearnError(f"{what}: val_fraction must lie in (0, 1), got {val_fraction}")
    for name, v in (("chunk", chunk), ("iters", iters), ("num_lambdas", num_lambdas)):
        if v is not None and (not is_integer(v) or v < 1):
            raise JaxUnlearnError(f"{what}: {name} must be a positive integer, got {v!r}")


def _check_lambdas(lambdas):
    lams = np.asarray(lambdas, np.float64).ravel()
    if lams.size == 0 or not np.all(np.isfinite(lams)) or np.any(lams < 0):
        raise JaxUnlearnError(f"datamodels: lambdas must be finite numbers >= 0 (at least one), got {lams.tolist()}")
    return jnp.asarray(lams, jnp.float32)


def _center(x, y):
    xm, ym = x.mean(0), y.mean(0)
    return x - xm, y - ym, xm, ym


@jax.jit
def _factor(x):
    """The factorisation shared by every target and λ: W_λ = P diag(1/(s+λ)) (G y). x: [M, n] centred.

    Dual form (M <= n): eigh of X Xᵀ [M, M]; primal (M > n): eigh of Xᵀ X [n, n].
    Returns P f32[n, r], s f32[r], G f32[r, M] (so Q = G @ y for centred outputs y [M, T]).
    """
    m, n = x.shape
    if m <= n:
        s, u = jnp.linalg.eigh(jnp.dot(x, x.T, precision=HIGHEST))
        return jnp.dot(x.T, u, precision=HIGHEST), jnp.maximum(s, 0.0), u.T
    s, v = jnp.linalg.eigh(jnp.dot(x.T, x, precision=HIGHEST))
    return v, jnp.maximum(s, 0.0), jnp.dot(v.T, x.T, precision=HIGHEST)


def _spectral_factors(x, y):
    """P f32[n, r], s f32[r], Q f32[r, T] for centred x [M, n] and y [M, T]."""
    p, s, g = _factor(x)
    return p, s, jnp.dot(g, y, precision=HIGHEST)


@jax.jit
def _ridge_weights(p, s, q, lam):
    """lam: f32[T] -> W f32[T, n]."""
    return jnp.dot(p, q / (s[:, None] + lam[None, :]), precision=HIGHEST).T


@jax.jit
def _ridge_val_errors(p, s, q, xv, yv, lams):
    """Held-out squared error of every λ for every target: f32[L, T]."""
    r = jnp.dot(xv, p, precision=HIGHEST)  # [Mv, r]
    return lax.map(lambda lam: jnp.mean((jnp.dot(r, q / (s + lam)[:, None], precision=HIGHEST) - yv) ** 2, 0), lams)


@jax.jit
def _lambda_scale(x):
    return jnp.sum(x.var(0)) * x.shape[0] / min(x.shape)


def default_lambdas(masks, num: int = 13):
    """A log grid around the mean eigenvalue of the centred mask Gram matrix."""
    scale = float(_lambda_scale(jnp.asarray(masks, jnp.float32)))
    return jnp.asarray(scale * np.logspace(-4, 2, num), jnp.float32)


@jax.jit
def _heldout_factors(x, fit, val):
    """The factorisation of the fitting models x[fit] (centred on their mean) and the held-out
    models x[val] centred the same way: P, s, G as in :func:`_factor`, and xv f32[Mv, n]."""
    xm = x[fit].mean(0)
    p, s, g = _factor(x[fit] - xm)
    return p, s, g, x[val] - xm


@jax.jit
def _select_lambda(factors, y, fit, val, lams):
    """Per target, the λ of ``lams`` with the least held-out squared error: f32[T]."""
    p, s, g, xv = factors
    ym = y[fit].mean(0)
    q = jnp.dot(g, y[fit] - ym, precision=HIGHEST)
    return lams[jnp.argmin(_ridge_val_errors(p, s, q, xv, y[val] - ym, lams), axis=0)]


def _lambda_selector(x, lams, val_fraction: float, seed: int):
    """``select(y f32[M, T]) -> λ f32[T]``: per target, the candidate of ``lams`` with the least squared
    error on held-out models (a seeded ``val_fraction`` of the M models), fitted on the rest. The
    factorisation of the fitting models is computed once, here, and shared by every call."""
    if lams.size == 1:
        return lambda y: jnp.full((y.shape[1],), lams.reshape(()))
    m = x.shape[0]
    nv = max(1, int(round(val_fraction * m)))
    if m - nv < 2:
        raise JaxUnlearnError(f"datamodels: {m} models are too few to hold out {nv} for choosing λ")
    perm = np.random.default_rng(seed).permutation(m)
    fit, val = jnp.asarray(perm[nv:]), jnp.asarray(perm[:nv])
    factors = _heldout_factors(x, fit, val)
    return lambda y: _select_lambda(factors, y, fit, val, lams)


@jax.jit
def _ridge_fit(x, y, lam):
    """Ridge weights f32[T, n] and biases f32[T] of all M models at λ f32[T]."""
    xc, yc, xm, ym = _center(x, y)
    p, s, q = _spectral_factors(xc, yc)
    w = _ridge_weights(p, s, q, lam)
    return w, ym - jnp.dot(w, xm, precision=HIGHEST)


def fit_ridge(masks, outputs, lambdas=None, val_fraction: float = 0.1, seed: int = 0) -> Datamodels:
    """Ridge for every target at once; λ chosen per target on held-out models, then refit on all.

    masks: [M, n]; outputs: f32[M, T]. ``lambdas``: f32[L] candidates (default: a log grid).
    """
    x, y = check_fit_inputs(masks, outputs)
    _check_fit_settings("datamodels", val_fraction)
    lams = default_lambdas(x) if lambdas is None else _check_lambdas(lambdas)
    lam = _lambda_selector(x, lams, val_fraction, seed)(y)
    return Datamodels(*_ridge_fit(x, y, lam), lam)


def ridge_forget_effects(masks, outputs, forget_sets, lambdas=None, val_fraction: float = 0.1, seed: int = 0,
                         chunk: int = 8192):
    """Σ_{i∈F} w_{t,i} of the ridge datamodel of every target t, for each forget set F, without
    materialising the weights f32[T, n] (for CIFAR-10, 600,000 logit targets × 50,000 points would
    be 120 GB). Same λ selection as :func:`fit_ridge`; targets are processed ``chunk`` at a time.

    masks: [M, n]; outputs: f32[M, T] (a NumPy array or memmap: only one chunk is on the device at
    a time); forget_sets: list of int arrays. Returns (effects f32[S, T], lam f32[T]).
    """
    x = check_masks(masks)
    m, n = x.shape
    if np.ndim(outputs) != 2:
        raise JaxUnlearnError(f"datamodels: outputs must be [models, targets], got shape {np.shape(outputs)}")
    _check_models(m, np.shape(outputs)[0], "datamodels")
    _check_fit_settings("datamodels", val_fraction, chunk)
    ind = np.zeros((len(forget_sets), n), np.float32)
    for k, f in enumerate(forget_sets):
        ind[k, check_indices(f, n)] = 1.0
    lams = default_lambdas(x) if lambdas is None else _check_lambdas(lambdas)
    select = _lambda_selector(x, lams, val_fraction, seed)
    a, s_all, g_all = _summed_factors(x, jnp.asarray(ind))
    t_total = int(np.shape(outputs)[1])
    effects = np.zeros((len(forget_sets), t_total), np.float32)
    lam_out = np.zeros(t_total, np.float32)
    for start in range(0, t_total, chunk):
        y = jnp.asarray(np.asarray(outputs[:, start:start + chunk]), jnp.float32)
        _check_finite(y, "datamodels")
        lam = select(y)
        effects[:, start:start + chunk] = np.asarray(_effects(a, s_all, g_all, y, lam))
        lam_out[start:start + chunk] = np.asarray(lam)
    return effects, lam_out


@jax.jit
def _summed_factors(x, ind):
    """The factorisation of all M models with P's rows summed over each forget set: A f32[S, r]
    (A = ind P, ind f32[S, n] the sets' indicators), s f32[r], G f32[r, M]."""
    p, s, g = _factor(x - x.mean(0))
    return jnp.dot(ind, p, precision=HIGHEST), s, g


@jax.jit
def _effects(a, s, g, y, lam):
    """Σ_{i∈F} w_{t,i} = A diag(1/(s+λ_t)) G (y − ȳ), for each set and target: f32[S, T]."""
    q = jnp.dot(g, y - y.mean(0), precision=HIGHEST)
    return jnp.dot(a, q / (s[:, None] + lam[None, :]), precision=HIGHEST)


def _soft_threshold(w, t):
    return jnp.sign(w) * jnp.maximum(jnp.abs(w) - t, 0.0)


@jax.jit
def _fista(xc, yc, lam, w0, step, iters):
    """Minimise 1/(2M)||Xc Wᵀ - Yc||² + λ_t ||w_t||₁ for all targets t. w0: [T, n]; lam: f32[T]."""
    m = xc.shape[0]
    xty = jnp.dot(xc.T, yc, precision=HIGHEST).T / m  # [T, n]

    def grad(w):
        return jnp.dot(jnp.dot(w, xc.T, precision=HIGHEST), xc, precision=HIGHEST) / m - xty

    def body(_, carry):
        w, z, t = carry
        w_new = _soft_threshold(z - step * grad(z), step * lam[:, None])
        t_new = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
        return w_new, w_new + ((t - 1) / t_new) * (w_new - w), t_new

    w, _, _ = lax.fori_loop(0, iters, body, (w0, w0, jnp.float32(1.0)))
    return w


@jax.jit
def _lipschitz(xc):
    """Largest eigenvalue of XcᵀXc / M (30 power iterations): the Lipschitz constant of the lasso
    loss's gradient."""
    def body(_, v):
        v = jnp.dot(xc.T, jnp.dot(xc, v, precision=HIGHEST), precision=HIGHEST)
        return v / jnp.linalg.norm(v)

    v = lax.fori_loop(0, 30, body, jnp.ones((xc.shape[1],), xc.dtype) / np.sqrt(xc.shape[1]))
    return jnp.dot(v, jnp.dot(xc.T, jnp.dot(xc, v, precision=HIGHEST), precision=HIGHEST)) / xc.shape[0]


@jax.jit
def _lasso_path(x, y, ratios, iters):
    """The lasso of every target along λ_t = ratio · λmax_t for each of ``ratios`` f32[L] (largest
    first), each fit warm-started from the one before: weights f32[L, T, n], biases f32[L, T],
    λ f32[L, T]."""
    xc, yc, xm, ym = _center(x, y)
    lmax = jnp.max(jnp.abs(jnp.dot(xc.T, yc, precision=HIGHEST)), axis=0) / xc.shape[0]  # [T]
    step = 1.0 / _lipschitz(xc)

    def fit(w, ratio):
        w = _fista(xc, yc, lmax * ratio, w, step, iters)
        return w, (w, ym - jnp.dot(w, xm, precision=HIGHEST), lmax * ratio)

    return lax.scan(fit, jnp.zeros((y.shape[1], x.shape[1]), x.dtype), ratios)[1]


@jax.jit
def _fit_lasso(x, y, fit, val, ratios, iters):
    """The λ path fitted on models ``fit``, each target's λ picked by squared error on models ``val``,
    then the path re-run on all models: weights f32[T, n], biases f32[T], λ f32[T] at that pick."""
    ws, bs, _ = _lasso_path(x[fit], y[fit], ratios, iters)
    pred = jnp.einsum("vn,ltn->lvt", x[val], ws, precision=HIGHEST) + bs[:, None, :]
    best = jnp.argmin(jnp.mean((pred - y[val]) ** 2, axis=1), axis=0)  # [T]
    ws, bs, ls = _lasso_path(x, y, ratios, iters)
    t = jnp.arange(y.shape[1])
    return ws[best, t], bs[best, t], ls[best, t]


def fit_lasso(masks, outputs, num_lambdas: int = 8, iters: int = 200, val_fraction: float = 0.1,
              seed: int = 0) -> Datamodels:
    """Lasso along a decreasing λ path (warm starts, FISTA for all targets together); λ per target
    chosen on held-out models; the path is then re-run on all models up to each target's λ.
    One compiled program for the whole fit (it holds the path's weights, f32[num_lambdas, T, n])."""
    x, y = check_fit_inputs(masks, outputs)
    return _lasso(x, y, num_lambdas, iters, val_fraction, seed)


def _lasso(x, y, num_lambdas: int = 8, iters: int = 200, val_fraction: float = 0.1, seed: int = 0) -> Datamodels:
    """:func:`fit_lasso` of checked masks x f32[M, n] and outputs y f32[M, T]."""
    _check_fit_settings("lasso", val_fraction, iters=iters, num_lambdas=num_lambdas)
    m = x.shape[0]
    nv = max(1, int(round(val_fraction * m)))
    if m - nv < 2:
        raise JaxUnlearnError(f"lasso: {m} models are too few to hold out {nv} for choosing λ")
    perm = np.random.default_rng(seed).permutation(m)
    ratios = jnp.asarray(np.logspace(-0.3, -3, num_lambdas), jnp.float32)
    return Datamodels(*_fit_lasso(x, y, jnp.asarray(perm[nv:]), jnp.asarray(perm[:nv]), ratios,
                                  jnp.int32(iters)))


def lasso_forget_effect(masks, outputs, forget_idx, iters: int = 200, seed: int = 0, chunk: int = 2048,
                        **kw) -> np.ndarray:
    """Σ_{i∈F} w_{t,i} of the lasso datamodel (:func:`fit_lasso`) of every target t, ``chunk``
    targets at a time (the λ path of a chunk holds f32[num_lambdas, chunk, n]).

    Meant for the few targets where a forget set's effect is large, e.g. the forget points' own
    logits: there ridge's shrinkage of every weight under-predicts the effect several-fold, while
    the lasso keeps the few large weights nearly whole.

    masks: [M, n]; outputs: f32[M, T]; forget_idx: int[F]. Returns f32[T].
    """
    n = np.shape(masks)[1]
    f = check_indices(forget_idx, n)
    _check_fit_settings("lasso", chunk=chunk)
    t_total = int(np.shape(outputs)[1])
    x = check_masks(masks)  # once, not per chunk
    _check_models(x.shape[0], np.shape(outputs)[0], "lasso")
    out = np.zeros(t_total, np.float32)
    for start in range(0, t_total, chunk):
        y = jnp.asarray(np.asarray(outputs[:, start:start + chunk]), jnp.float32)
        _check_finite(y, "lasso")
        dm = _lasso(x, y, iters=iters, seed=seed, **kw)
        out[start:start + chunk] = np.asarray(dm.weights[:, f].sum(1))
    return out


def _ranks(a):
    """Ranks along axis 0 (ties broken by order). a: [M, T] -> f32[M, T]."""
    return jnp.argsort(jnp.argsort(a, axis=0), axis=0).astype(jnp.float32)


@jax.jit
def spearman(a, b):
    """Spearman correlation per column. a, b: f32[M, T] -> f32[T]."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    return (ra * rb).sum(0) / jnp.sqrt((ra * ra).sum(0) * (rb * rb).sum(0) + 1e-12)


@jax.jit
def _lds(weights, bias, x, y):
    return jnp.nanmean(spearman(jnp.dot(x, weights.T, precision=HIGHEST) + bias, y))


def lds(dm: Datamodels, masks, outputs):
    """Linear datamodeling score: mean over targets of the Spearman correlation, across held-out
    models, between predicted and actual outputs. masks: [M, n], outputs: f32[M, T] -> float."""
    x, y = check_fit_inputs(masks, outputs, "LDS")
    if dm.weights.shape != (y.shape[1], x.shape[1]):
        raise JaxUnlearnError(f"LDS: datamodels of {dm.weights.shape[0]} targets over {dm.weights.shape[1]} points, "
                              f"but masks cover {x.shape[1]} points and outputs {y.shape[1]} targets")
    return float(_lds(dm.weights, dm.bias, x, y))
