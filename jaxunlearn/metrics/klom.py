"""KLoM: KL divergence of margins between an oracle ensemble and an unlearned ensemble.

Per evaluation point, both sets of margins are clipped to ±clip, binned into ``bins`` equal bins
spanning the combined range of the two sets, and compared as histograms; bins empty in the
second distribution get ``eps`` mass where the first has mass (then both are renormalised, as
scipy.stats.entropy does). Vectorised over all points at once.

Two binnings (``binning=``):

* ``"inclusive"`` (default): every sample is counted; the pooled maximum falls in the last bin.
* ``"reference"``: data-unlearning-bench's ``compute_binned_KL_div`` exactly: bin edges from
  ``np.linspace(lo, hi, bins + 1)`` and ``np.digitize``, so samples *equal to the pooled maximum*
  fall past the last edge and are dropped (every such sample, e.g. all margins clipped at +clip),
  and the KL is taken in float64 as ``scipy.stats.entropy`` takes it. A point where the first set
  loses every sample this way has no distribution: NaN, as in the reference.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.utils import all_finite, check_indices, is_integer


@jax.jit
def _clipped_range(p_samples, q_samples, clip):
    """The clipped samples and their pooled range per point, as the reference computes them
    (float32; an empty range becomes [lo, lo + 1]). -> (p f32[Kp, P], q f32[Kq, P], lo f32[P], hi f32[P])."""
    p = jnp.clip(p_samples, -clip, clip)
    q = jnp.clip(q_samples, -clip, clip)
    lo = jnp.minimum(p.min(0), q.min(0))
    hi = jnp.maximum(p.max(0), q.max(0))
    return p, q, lo, jnp.where(lo >= hi, lo + 1.0, hi)


def _check_samples(p_samples, q_samples, bins, eps, clip, what: str = "KLoM", names=("oracle", "unlearned")):
    """Both sample sets f32[K, P] (K >= 1, the same P, finite) and the binning's settings; -> (p, q)."""
    p, q = jnp.asarray(p_samples, jnp.float32), jnp.asarray(q_samples, jnp.float32)
    if p.ndim != 2 or q.ndim != 2:
        raise JaxUnlearnError(f"{what}: margins must be [models, points], got {tuple(p.shape)} and {tuple(q.shape)}")
    if p.shape[0] < 1 or q.shape[0] < 1:
        raise JaxUnlearnError(f"{what}: need at least one model on each side, got {p.shape[0]} {names[0]} and "
                              f"{q.shape[0]} {names[1]} models")
    if p.shape[1] != q.shape[1]:
        raise JaxUnlearnError(f"{what}: {names[0]} margins cover {p.shape[1]} points, {names[1]} {q.shape[1]}")
    # inside jit / vmap (binned_kl is a per-point function a user may trace) only what is static is checked
    traced = lambda v: isinstance(v, jax.core.Tracer)  # noqa: E731
    if not (traced(p) or traced(q)) and not all_finite(p, q):
        raise JaxUnlearnError(f"{what}: margins contain NaN or inf")
    if not is_integer(bins) or bins < 1:
        raise JaxUnlearnError(f"{what}: bins must be a positive integer, got {bins!r}")
    for name, v in (("eps", eps), ("clip", clip)):
        if traced(v):
            continue
        a = np.asarray(v)
        if a.ndim or not (np.issubdtype(a.dtype, np.number) and np.isfinite(a) and a > 0):
            raise JaxUnlearnError(f"{what}: {name} must be a finite number > 0, got {v!r}")
    return p, q


def binned_kl(p_samples, q_samples, bins: int = 20, eps: float = 1e-5, clip: float = 100.0):
    """KL(P ‖ Q) per point from samples. p_samples: f32[Kp, P], q_samples: f32[Kq, P] -> f32[P]."""
    return _binned_kl(*_check_samples(p_samples, q_samples, bins, eps, clip, "binned KL", ("P", "Q")), bins, eps, clip)


@partial(jax.jit, static_argnames=("bins",))
def _binned_kl(p_samples, q_samples, bins: int, eps, clip):
    p, q, lo, hi = _clipped_range(p_samples, q_samples, clip)

    def hist(s):
        idx = jnp.clip(jnp.floor((s - lo) / (hi - lo) * bins).astype(jnp.int32), 0, bins - 1)  # right edge in last bin
        counts = jax.nn.one_hot(idx, bins, dtype=jnp.float32).sum(0)  # [P, bins]
        return counts / counts.sum(-1, keepdims=True)

    hp, hq = hist(p), hist(q)
    hq = jnp.where(hp > 0, jnp.maximum(hq, eps), hq)
    hq = hq / hq.sum(-1, keepdims=True)
    terms = jnp.where(hp > 0, hp * (jnp.log(hp) - jnp.log(jnp.where(hq > 0, hq, 1.0))), 0.0)
    return terms.sum(-1)


BINNINGS = ("inclusive", "reference")
DIRECTIONS = ("oracle||unlearned", "unlearned||oracle")


@partial(jax.jit, static_argnames=("bins",))
def _digitize_counts(p, q, edges, bins: int):
    """Per-point histogram counts the way ``np.digitize(x, edges)`` bins them: index = number of edges
    <= x, and only indices 1..bins are counted (a sample equal to the last edge is dropped).
    p: f32[Kp, P], q: f32[Kq, P], edges: f32[P, bins + 1] -> (i32[P, bins], i32[P, bins])."""
    def counts(s):
        idx = jax.vmap(lambda e, col: jnp.searchsorted(e, col, side="right"))(edges, s.T)  # [P, K]
        return jax.nn.one_hot(idx - 1, bins, dtype=jnp.int32).sum(1)  # index bins+1 -> no bin
    return counts(p), counts(q)


def _kl_from_counts(cp, cq, eps: float):
    """KL(P ‖ Q) per point from bin counts, as ``scipy.stats.entropy(p, max(q, eps) where p > 0)``
    computes it: float64, both renormalised. cp, cq: int[P, bins] -> f64[P] (NaN where P is empty)."""
    cp, cq = np.asarray(cp, np.float64), np.asarray(cq, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        hp = cp / cp.sum(-1, keepdims=True)
        tq = cq.sum(-1, keepdims=True)
        hq = np.where(tq > 0, cq / np.where(tq > 0, tq, 1.0), 0.0)
        hq = np.where(hp > 0, np.maximum(hq, eps), hq)
        hq = hq / hq.sum(-1, keepdims=True)
        terms = np.where(hp > 0, hp * (np.log(np.where(hp > 0, hp, 1.0)) - np.log(np.where(hq > 0, hq, 1.0))), 0.0)
    out = terms.sum(-1)
    return np.where(cp.sum(-1) > 0, out, np.nan)


def reference_binned_kl(p_samples, q_samples, bins: int = 20, eps: float = 1e-5, clip: float = 100.0):
    """KL(P ‖ Q) per point with data-unlearning-bench's binning (see module docstring).
    p_samples: f32[Kp, P], q_samples: f32[Kq, P] -> f64[P] (numpy)."""
    return _reference_binned_kl(*_check_samples(p_samples, q_samples, bins, eps, clip, "binned KL", ("P", "Q")),
                                bins, eps, clip)


def _reference_binned_kl(p_samples, q_samples, bins: int, eps, clip):
    p, q, lo, hi = _clipped_range(p_samples, q_samples, clip)
    # the edges exactly as np.linspace makes them from float32 ends (float32, last edge = hi)
    edges = np.linspace(np.asarray(lo), np.asarray(hi), bins + 1, axis=-1)
    cp, cq = _digitize_counts(p, q, jnp.asarray(edges), bins)
    return _kl_from_counts(cp, cq, eps)


def klom(oracle_margins, unlearned_margins, bins: int = 20, eps: float = 1e-5, clip: float = 100.0,
         direction: str = "oracle||unlearned", binning: str = "inclusive"):
    """KLoM per point. oracle_margins: f32[K1, P], unlearned_margins: f32[K2, P] -> f32[P]
    (f64[P] with ``binning="reference"``).

    ``direction``: "oracle||unlearned" (default, KL(oracle ‖ unlearned); what data-unlearning-bench's
    ``run.py`` computes, since it passes the oracle margins first to ``kl_from_margins(unlearned,
    oracle)``) or "unlearned||oracle" (what that function's own signature and EasyDUB's
    ``klom_from_margins`` compute). ``binning``: "inclusive" (default) or "reference" (the
    benchmark's ``np.digitize`` binning, which drops samples equal to the pooled maximum; module
    docstring).
    """
    o, u = _check_samples(oracle_margins, unlearned_margins, bins, eps, clip)
    if direction not in DIRECTIONS:
        raise JaxUnlearnError(f"KLoM: unknown direction {direction!r}; choose from {', '.join(DIRECTIONS)}")
    if binning not in BINNINGS:
        raise JaxUnlearnError(f"KLoM: unknown binning {binning!r}; choose from {', '.join(BINNINGS)}")
    first, second = (o, u) if direction == "oracle||unlearned" else (u, o)
    if binning == "reference":
        return _reference_binned_kl(first, second, bins, eps, clip)  # checked above, as klom's margins
    return _binned_kl(first, second, bins, eps, clip)


def klom_groups(forget_idx, n_train: int, n_test: int) -> dict:
    """The point groups KLoM is reported on, as indices into [train points, then test points]."""
    for name, v in (("n_train", n_train), ("n_test", n_test)):
        if not is_integer(v) or v < 0:
            raise JaxUnlearnError(f"KLoM groups: {name} must be an integer >= 0, got {v!r}")
    forget_idx = np.asarray(forget_idx)
    check_indices(forget_idx, n_train, "forget set")
    return {"forget": forget_idx, "retain": np.setdiff1d(np.arange(n_train), forget_idx),
            "val": n_train + np.arange(n_test)}


def klom_summary(per_point, groups: dict, q: float = 95.0) -> dict:
    """The q-th percentile of per-point KLoM in each named group of point indices, and their mean.

    per_point: f32[P]; groups: {"forget": idx, "retain": idx, "val": idx} -> {name: float, "mean": float}.
    """
    per_point = np.asarray(per_point)
    out = {name: float(np.percentile(per_point[np.asarray(idx)], q)) for name, idx in groups.items()}
    out["mean"] = float(np.mean(list(out.values())))
    return out


def klom_half_sample_spread(oracle_margins, unlearned_margins, groups: dict, draws: int = 50, seed: int = 0,
                            q: float = 95.0, **klom_kwargs) -> dict:
    """How far the KLoM summary's mean (:func:`klom_summary`) moves with which models were drawn.

    ``draws`` times, half of the oracle models and half of the unlearned models are drawn at random, without
    replacement, and scored as :func:`klom` and :func:`klom_summary` score the whole ensembles. This is
    half-sampling (McCarthy 1969). For a statistic that is a smooth function of means, the spread of half-sample
    values from one sample approximates the standard error of the full-sample value: the finite-population
    factor of drawing half makes up for the halved size. Unlike a bootstrap it repeats no model, and repeated
    margins would make a binned KL larger.

    Two cautions:
    - The half-sample *values* are not comparable with the full result. They lie well above it: with fewer
      models the histograms have more empty bins. ``half_mean`` shows how far. Compare ``sd``, not the values.
    - The binned KL is not smooth where bins are empty. Read ``sd`` as the scale of the noise at this
      ensemble size, not as an exact standard error.

    Two results scored against the same oracles differ by noise up to about 2·sqrt(2)·sd.

    oracle_margins: f32[K1, P], unlearned_margins: f32[K2, P] (K1, K2 >= 4); groups as for
    :func:`klom_summary`; ``klom_kwargs`` (bins, eps, clip, direction, binning) as for :func:`klom`.
    Returns {"klom": the full ensembles' summary mean, "sd", "half_mean", "min", "max": over the draws'
    summary means, "draws", "models": [K1 // 2, K2 // 2]}.
    """
    if not is_integer(draws) or draws < 2:
        raise JaxUnlearnError(f"KLoM half-sampling: draws must be an integer >= 2, got {draws!r}")
    full = klom_summary(klom(oracle_margins, unlearned_margins, **klom_kwargs), groups, q)["mean"]  # checks them
    o, u = jnp.asarray(oracle_margins, jnp.float32), jnp.asarray(unlearned_margins, jnp.float32)
    if o.shape[0] < 4 or u.shape[0] < 4:
        raise JaxUnlearnError(f"KLoM half-sampling: need at least 4 models on each side, got {o.shape[0]} oracle and "
                              f"{u.shape[0]} unlearned models")
    rng = np.random.default_rng(seed)
    ko, ku = o.shape[0] // 2, u.shape[0] // 2
    values = np.asarray([klom_summary(klom(o[np.sort(rng.permutation(o.shape[0])[:ko])],
                                           u[np.sort(rng.permutation(u.shape[0])[:ku])], **klom_kwargs), groups, q)["mean"]
                         for _ in range(draws)])
    return {"klom": full, "sd": float(values.std(ddof=1)), "half_mean": float(values.mean()), "min": float(values.min()),
            "max": float(values.max()), "draws": int(draws), "models": [ko, ku]}
