"""Datamodel fitting: our jitted ridge (all targets, one shared factorisation) vs scikit-learn.

    python benchmarks/datamodels.py --json FILE [--models 1000 --points 1437 --targets 2000]

Same masks and targets for both, in one process: fit time (compile excluded, reported
separately) and the LDS of each on held-out models. scikit-learn is handed the λ we chose for
each target (favourable to it: it does no search), fitting all targets sharing a λ at once.
Lasso is compared on a few targets (sklearn: one coordinate-descent fit per target).
With --synthetic-large (GPU): ridge for 5,000 models x 50,000 points x 10,000 targets.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.attribution import fit_lasso, fit_ridge, lds


def timed(fn):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t


def planted(m, n, t, seed=0, noise=1.0, sparsity=0.05):
    """Masks at alpha=0.5 and outputs from a sparse linear model plus noise (like real datamodels)."""
    rng = np.random.default_rng(seed)
    x = (rng.random((m, n)) < 0.5).astype(np.float32)
    w = (rng.normal(size=(t, n)) * (rng.random((t, n)) < sparsity)).astype(np.float32)
    y = x @ w.T + noise * rng.normal(size=(m, t)).astype(np.float32)
    return x, y


def bench(args) -> dict:
    from sklearn.linear_model import Lasso, Ridge

    m_fit = int(0.8 * args.models)
    x, y = planted(args.models, args.points, args.targets, noise=args.noise)
    xf, yf, xh, yh = x[:m_fit], y[:m_fit], x[m_fit:], y[m_fit:]
    res = {"backend": jax.default_backend(), "models": args.models, "points": args.points, "targets": args.targets}
    _, t_first = timed(lambda: fit_ridge(xf, yf).weights)
    dm, t_ours = timed(lambda: fit_ridge(xf, yf))
    res.update(ours_ridge_s=t_ours, ours_compile_s=max(0.0, t_first - t_ours), ours_ridge_lds=lds(dm, xh, yh))

    lam = np.asarray(dm.lam)
    t = time.perf_counter()
    w_sk = np.zeros((args.targets, args.points), np.float32)
    b_sk = np.zeros(args.targets, np.float32)
    for val in np.unique(lam):  # one sklearn fit per distinct λ, all targets sharing it at once
        cols = np.flatnonzero(lam == val)
        r = Ridge(alpha=float(val)).fit(xf, yf[:, cols])
        w_sk[cols], b_sk[cols] = r.coef_, r.intercept_
    t_sk = time.perf_counter() - t
    sk = dm._replace(weights=jnp.asarray(w_sk), bias=jnp.asarray(b_sk))
    res.update(sklearn_ridge_s=t_sk, sklearn_ridge_lds=lds(sk, xh, yh), ridge_speedup=t_sk / t_ours,
               max_weight_diff=float(jnp.abs(dm.weights - sk.weights).max()))

    k = args.lasso_targets
    _, t_first = timed(lambda: fit_lasso(xf, yf[:, :k]).weights)
    dl, t_l = timed(lambda: fit_lasso(xf, yf[:, :k]))
    lam_l = np.asarray(dl.lam)
    t = time.perf_counter()
    wl = np.stack([Lasso(alpha=float(lam_l[i]), max_iter=5000).fit(xf, yf[:, i]).coef_ for i in range(k)])
    t_skl = time.perf_counter() - t
    bl = yf[:, :k].mean(0) - wl @ xf.mean(0)
    skl = dl._replace(weights=jnp.asarray(wl, jnp.float32), bias=jnp.asarray(bl, jnp.float32))
    res.update(lasso_targets=k, ours_lasso_s=t_l, ours_lasso_lds=lds(dl, xh, yh[:, :k]), sklearn_lasso_s=t_skl,
               sklearn_lasso_lds=lds(skl, xh, yh[:, :k]), lasso_speedup=t_skl / t_l,
               note="our lasso time includes λ selection on a path of 8 values; sklearn fits only the chosen λ")
    return res


def bench_large(args) -> dict:
    """Synthetic 5,000 models x 50,000 points x 10,000 targets: ridge with λ selection (GPU)."""
    m, n, t = args.large_models, args.large_points, args.large_targets
    key = jax.random.key(0)
    x = jax.random.bernoulli(key, 0.5, (m, n)).astype(jnp.float32)
    y = jax.random.normal(jax.random.key(1), (m, t))
    _, t_first = timed(lambda: fit_ridge(x, y).weights)
    _, t_fit = timed(lambda: fit_ridge(x, y).weights)
    return {"models": m, "points": n, "targets": t, "ridge_s": t_fit, "compile_s": max(0.0, t_first - t_fit),
            "device": str(jax.devices()[0].device_kind)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--models", type=int, default=1000)
    p.add_argument("--points", type=int, default=1437)
    p.add_argument("--targets", type=int, default=2000)
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--lasso-targets", type=int, default=10)
    p.add_argument("--synthetic-large", action="store_true", help="also 5000 x 50000 x 10000 (needs a GPU)")
    p.add_argument("--large-models", type=int, default=5000)
    p.add_argument("--large-points", type=int, default=50000)
    p.add_argument("--large-targets", type=int, default=10000)
    args = p.parse_args(argv)
    res = bench(args)
    if args.synthetic_large:
        res["large"] = bench_large(args)
    print(json.dumps(res, indent=2))
    print(f"ridge: ours {res['ours_ridge_s']:.2f}s (LDS {res['ours_ridge_lds']:.3f}) vs sklearn "
          f"{res['sklearn_ridge_s']:.2f}s (LDS {res['sklearn_ridge_lds']:.3f}): {res['ridge_speedup']:.1f}x; "
          f"lasso ({res['lasso_targets']} targets): ours {res['ours_lasso_s']:.2f}s vs sklearn "
          f"{res['sklearn_lasso_s']:.2f}s: {res['lasso_speedup']:.1f}x")
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
