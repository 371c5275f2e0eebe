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

from jaxunlearn.training.ensemble import EnsembleFns, model_keys, train_ensemble
from jaxunlearn.training.loop import make_jitted, train_one_by_one
from jaxunlearn.training.recipe import load_recipe
from jaxunlearn.training.step import make_trainer
from jaxunlearn.training.strategy import ensemble_layout
from jaxunlearn.training.subsets import random_subset_masks, steps_per_epoch


def synthetic_cifar(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t


# dense bf16 tensor-core peaks (TFLOP/s) for the fraction-of-peak column; --peak-tflops overrides
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def peak_tflops(device_kind: str, override: float | None):
    if override:
        return override
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_kind), None)


def matmul_flops(jaxpr) -> float:
    """FLOPs of the dot_general and conv_general_dilated ops of a (closed) jaxpr, sub-jaxprs included
    (scan bodies times their length). Backend-neutral: the same count on CPU and GPU."""
    total = 0.0
    for eqn in jaxpr.eqns:
        p = eqn.primitive.name
        if p == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]  # ((lhs, rhs) contracting, (lhs, rhs) batch)
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
        elif p == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # kernel; per output element: prod(kernel) / out features MACs
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / out_features
        mult = eqn.params.get("length", 1) if p == "scan" else 1
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    total += mult * matmul_flops(inner)
                elif hasattr(sub, "eqns"):
                    total += mult * matmul_flops(sub)
    return total


def step_flops(recipe, x, y, mean, std, spe) -> float:
    """Model FLOPs of one single-model train step, by the usual convention: 3 × the forward pass's
    matmul and convolution FLOPs (forward + two backward products), counted on the jaxpr of the
    plain-conv forward pass, so the count is the same on every backend."""
    tr = make_trainer(recipe, 10, x.shape[1:], mean, std, spe, "xla")
    state = jax.eval_shape(tr.init, jax.random.key(0))
    batch = jax.ShapeDtypeStruct((recipe.batch_size, *x.shape[1:]), x.dtype)
    forward = jax.make_jaxpr(lambda p, s, b: tr.apply_images(p, s, b, True))(state.params, state.batch_stats, batch)
    return 3.0 * matmul_flops(forward.jaxpr)


def time_ensemble(tr, X, Y, masks, ids, epochs, impl_width, devices) -> dict:
    """AOT-compiles one ensemble epoch (compile timed on its own), runs one epoch untimed (the first
    call's allocations and thread start-up would otherwise fall on whichever layout is timed first),
    then times ``epochs`` epochs, the models split across ``devices``."""
    m = int(masks.shape[0])
    fns = EnsembleFns(tr, m, impl_width, devices)
    keys = model_keys(0, ids, fns.models_sharding)
    mk = jax.device_put(np.asarray(masks), fns.models_sharding)
    t = time.perf_counter()
    states = jax.eval_shape(fns.init, keys)
    fns.init = fns.init.lower(keys).compile()
    fns.epoch = fns.epoch.lower(states, X, Y, mk, keys, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - t
    timed(lambda: train_ensemble(tr, X, Y, masks, ids, 0, 1, fns=fns)[0])  # warm-up: first-call costs untimed
    _, t_run = timed(lambda: train_ensemble(tr, X, Y, masks, ids, 0, epochs, fns=fns)[0])
    return {"compile_s": compile_s, "seconds": t_run, "models_per_s": m / t_run, "devices_used": len(fns.devices)}


def bench(args) -> dict:
    if args.dataset == "digits":
        from jaxunlearn.data import load_digits
        ds = load_digits()
        x, y, mean, std = ds.train_images, ds.train_labels, ds.mean, ds.std
    else:
        x, y = synthetic_cifar(args.n_train)
        mean, std = (125.0,) * 3, (63.0,) * 3
    base = load_recipe(args.recipe)
    recipe = base.with_epochs(args.epochs).replace(model=args.model, width=args.width,
                                                     batch_size=args.batch, dtype=args.dtype)
    m = args.models
    masks = random_subset_masks(len(y), m, 0.5, 0)
    spe = steps_per_epoch(masks, recipe.batch_size)
    X, Y = jnp.asarray(x), jnp.asarray(y)
    ids = np.arange(m)
    backend = jax.default_backend()
    local = jax.local_devices()
    devs, strat = ensemble_layout(recipe.model, m, local)  # as train_run lays out a chunk of m models
    nd = len(devs)
    impl = args.conv_impl or strat.conv_impl
    vw = args.vmap_width or strat.vmap_width
    device = str(jax.devices()[0].device_kind)
    res = {"backend": backend, "device": device, "model": recipe.model, "width": recipe.width,
           "dtype": recipe.dtype, "dataset": args.dataset, "n_train": int(len(y)), "models": m,
           "batch": recipe.batch_size, "epochs": recipe.epochs, "steps_per_epoch": spe,
           "conv_impl": impl, "vmap_width": vw, "devices": nd, "local_devices": len(local)}

    # (a) the ensemble engine, at the chosen strategy and any others asked for: IMPL:WIDTH[@DEVICES]
    def parse(s):
        layout, _, d = s.partition("@")
        return layout.split(":")[0], int(layout.split(":")[1]), int(d or nd)

    tried = [(impl, vw, nd)] + [parse(s) for s in args.strategies]
    strategies = {}
    for si, sw, sd in dict.fromkeys(tried):
        if not 1 <= sd <= len(local) or m % sd:
            raise SystemExit(f"strategy {si}:{sw}@{sd}: needs 1 <= devices <= {len(local)} dividing {m} models")
        tr = make_trainer(recipe, 10, x.shape[1:], mean, std, spe, si)
        name = f"{si}:{sw}@{sd}"
        strategies[name] = time_ensemble(tr, X, Y, masks, ids, recipe.epochs, sw, local[:sd])
        print(f"  ensemble {name}: {strategies[name]}", flush=True)
    chosen = strategies[f"{impl}:{vw}@{nd}"]
    res["strategies"] = strategies
    res["ensemble_compile_s"] = chosen["compile_s"]
    res["ensemble_s"] = chosen["seconds"]
    res["ensemble_models_per_s"] = chosen["models_per_s"]

    # (b) a Python loop over models around the jitted single-model epoch / step
    loops = {}
    impls = args.loop_impls if recipe.model != "mlp" else ["xla"]
    nl = min(m, args.loop_models)
    for li in impls:
        tr1 = make_trainer(recipe, 10, x.shape[1:], mean, std, spe, li)
        j = make_jitted(tr1)
        for mode in args.loop_modes:
            _, t_first = timed(lambda: train_one_by_one(tr1, X, Y, masks[:1], ids[:1], 0, 1, mode, j)[0])
            _, t_one = timed(lambda: train_one_by_one(tr1, X, Y, masks[:1], ids[:1], 0, 1, mode, j)[0])
            _, t = timed(lambda: train_one_by_one(tr1, X, Y, masks[:nl], ids[:nl], 0, recipe.epochs, mode, j))
            loops[f"{mode}/{li}"] = {"models_per_s": nl / t, "compile_s": max(0.0, t_first - t_one),
                                     "models_timed": nl}
            print(f"  loop {mode}/{li}: {loops[f'{mode}/{li}']}", flush=True)
    best = max(loops, key=lambda k: loops[k]["models_per_s"])
    res["loops"] = loops
    res["loop_best"] = best
    res["loop_models_per_s"] = loops[best]["models_per_s"]
    res["loop_compile_s"] = loops[best]["compile_s"]
    res["ratio"] = res["ensemble_models_per_s"] / res["loop_models_per_s"]

    # throughput in the units a user plans with: models/hour at the timed epochs, and
    # extrapolated to the recipe's full schedule (same steps per epoch, base.epochs epochs)
    res["models_per_hour"] = 3600 * res["ensemble_models_per_s"]
    res["recipe_epochs"] = base.epochs
    res["models_per_hour_full_recipe"] = res["models_per_hour"] * recipe.epochs / base.epochs
    flops = step_flops(recipe, X, Y, mean, std, spe)
    if flops:
        achieved = flops * spe * recipe.epochs * res["ensemble_models_per_s"]
        res["flops_per_model_step"] = flops
        res["achieved_tflops"] = achieved / 1e12
        peak = peak_tflops(device, args.peak_tflops)
        if peak:
            res["peak_bf16_tflops"] = peak
            res["fraction_of_bf16_peak"] = achieved / 1e12 / peak
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
    p.add_argument("--loop-impls", nargs="+", default=["xla", "im2col"],
                   help="conv formulations the loop baselines try (the faster one is the baseline)")
    p.add_argument("--strategies", nargs="*", default=[],
                   help="extra ensemble strategies to time, as IMPL:VMAP_WIDTH[@DEVICES] (e.g. xla:8 im2col:1@2; "
                        "VMAP_WIDTH is per device; DEVICES defaults to the chosen strategy's)")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="XLA CPU devices for this process (as the CLI gives one per core; default: JAX's own)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak, for fraction_of_bf16_peak")
    p.add_argument("--conv-impl", default=None)
    p.add_argument("--vmap-width", type=int, default=None)
    args = p.parse_args(argv)
    if args.cpu_devices:  # before JAX starts its backends
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    res = bench(args)
    print(json.dumps(res, indent=2))
    print(f"{res['model']} x{res['models']} on {res['backend']}: ensemble {res['ensemble_models_per_s']:.3f} models/s, "
          f"best loop ({res['loop_best']}) {res['loop_models_per_s']:.3f} models/s, ratio {res['ratio']:.2f}")
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
