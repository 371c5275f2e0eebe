"""Ensemble engine vs looping the single-model jitted step, side by side in one process.

    python benchmarks/ensemble_throughput.py --json FILE [--model cnn --dataset digits ...]

Trains the same M models (same data, masks, keys and steps) (a) with the ensemble engine,
(b) with a Python loop over models calling the jitted single-model epoch (a scan), and
(c) with a Python loop over models and steps calling the jitted single-model train_step.
Compile time is excluded from throughput (timed once, reported separately). The loop
baselines use whichever conv formulation is faster for a single model (both measured).
``ratio`` = ensemble models/s over the faster loop's models/s.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.training.ensemble import EnsembleFns, train_ensemble
from jaxunlearn.training.loop import make_jitted, train_one_by_one
from jaxunlearn.training.recipe import RECIPES
from jaxunlearn.training.step import make_trainer
from jaxunlearn.training.strategy import default_strategy
from jaxunlearn.training.subsets import random_subset_masks, steps_per_epoch


def synthetic_cifar(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t


def bench(args) -> dict:
    if args.dataset == "digits":
        from jaxunlearn.data import load_digits
        ds = load_digits()
        x, y, mean, std = ds.train_images, ds.train_labels, ds.mean, ds.std
    else:
        x, y = synthetic_cifar(args.n_train)
        mean, std = (125.0,) * 3, (63.0,) * 3
    recipe = RECIPES[args.recipe].with_epochs(args.epochs).replace(model=args.model, width=args.width,
                                                                   batch_size=args.batch, dtype=args.dtype)
    m = args.models
    masks = random_subset_masks(len(y), m, 0.5, 0)
    spe = steps_per_epoch(masks, recipe.batch_size)
    X, Y = jnp.asarray(x), jnp.asarray(y)
    ids = np.arange(m)
    strat = default_strategy(recipe.model, jax.default_backend(), m)
    impl = args.conv_impl or strat.conv_impl
    vw = args.vmap_width or strat.vmap_width
    res = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "model": recipe.model,
           "width": recipe.width, "dataset": args.dataset, "models": m, "batch": recipe.batch_size,
           "epochs": recipe.epochs, "steps_per_epoch": spe, "conv_impl": impl, "vmap_width": vw}

    tr = make_trainer(recipe, 10, x.shape[1:], mean, std, spe, impl)
    fns = EnsembleFns(tr, m, vw)
    _, t_first = timed(lambda: train_ensemble(tr, X, Y, masks, ids, 0, 1, fns=fns)[0])
    _, t_one = timed(lambda: train_ensemble(tr, X, Y, masks, ids, 0, 1, fns=fns)[0])
    _, t_ens = timed(lambda: train_ensemble(tr, X, Y, masks, ids, 0, recipe.epochs, fns=fns)[0])
    res["ensemble_compile_s"] = max(0.0, t_first - t_one)
    res["ensemble_s"] = t_ens
    res["ensemble_models_per_s"] = m / t_ens

    loops = {}
    impls = ["xla", "im2col"] if recipe.model != "mlp" else ["xla"]
    for li in impls:
        tr1 = make_trainer(recipe, 10, x.shape[1:], mean, std, spe, li)
        j = make_jitted(tr1)
        for mode in args.loop_modes:
            _, t_first = timed(lambda: train_one_by_one(tr1, X, Y, masks[:1], ids[:1], 0, 1, mode, j)[0])
            _, t_one = timed(lambda: train_one_by_one(tr1, X, Y, masks[:1], ids[:1], 0, 1, mode, j)[0])
            nl = min(m, args.loop_models)
            _, t = timed(lambda: train_one_by_one(tr1, X, Y, masks[:nl], ids[:nl], 0, recipe.epochs, mode, j))
            loops[f"{mode}/{li}"] = {"models_per_s": nl / t, "compile_s": max(0.0, t_first - t_one),
                                     "models_timed": nl}
    best = max(loops, key=lambda k: loops[k]["models_per_s"])
    res["loops"] = loops
    res["loop_best"] = best
    res["loop_models_per_s"] = loops[best]["models_per_s"]
    res["loop_compile_s"] = loops[best]["compile_s"]
    res["ratio"] = res["ensemble_models_per_s"] / res["loop_models_per_s"]
    res["models_per_hour"] = 3600 * res["ensemble_models_per_s"]
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="write the result here")
    p.add_argument("--dataset", default="digits", choices=["digits", "cifar-shaped"])
    p.add_argument("--n-train", type=int, default=2048, help="points, for cifar-shaped synthetic data")
    p.add_argument("--recipe", default="digits-cnn")
    p.add_argument("--model", default="cnn")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--models", type=int, default=16)
    p.add_argument("--loop-models", type=int, default=4, help="models the loop baselines train (throughput is per model)")
    p.add_argument("--loop-modes", nargs="+", default=["per_epoch", "per_step"])
    p.add_argument("--conv-impl", default=None)
    p.add_argument("--vmap-width", type=int, default=None)
    args = p.parse_args(argv)
    res = bench(args)
    print(json.dumps(res, indent=2))
    print(f"{res['model']} x{res['models']} on {res['backend']}: ensemble {res['ensemble_models_per_s']:.3f} models/s, "
          f"best loop ({res['loop_best']}) {res['loop_models_per_s']:.3f} models/s, ratio {res['ratio']:.2f}")
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
