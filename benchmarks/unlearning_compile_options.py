"""XLA compile options for the unlearning programs (``unlearn_grid``), side by side in one run.

    python benchmarks/unlearning_compile_options.py [--model mlp|cnn] [--models 100] [--json FILE]

An unlearning method's program runs once per call, so on small inputs its compile is most of the call
(the digits demo: 61-73 s of XLA compile against 27 s of running its 22 method runs). This trains
``--models`` digits models of the recipe of ``--model`` on the whole training set, takes the demo's
``random:100`` forget set and each optimisation method with the demo's config
(``experiments/digits_demo.json``; target-matching methods get the models' own logits as targets: the
work is the same), lowers each method's program once and compiles it under each candidate option set
(JAX's persistent cache off, so every compile is real), then times one run of each executable (after
one untimed run). Per candidate it reports the largest difference from the default's parameters and,
``--subset-check``, model 0's largest difference between the program of all models and that of the
first two (models are unlearned independently: the default keeps it at rounding level).
What ``unlearning_compiler_options`` (training/ensemble.py) was chosen from. Without "default" among
``--candidates``, differences are from the first one. Level 0 does not pay (100 digits MLPs, the 10 methods,
2026-11-26, next to level 2 + older emitters: compile 8.2 s against 19.1 s, run 30.7 s against 12.3 s; level 1
ties level 2: 18.6 / 12.4 s).
"""
from __future__ import annotations

import argparse
import functools
import json
import time

CANDIDATES = {
    "default": {},
    "level2": {"xla_backend_optimization_level": 2},
    "level1": {"xla_backend_optimization_level": 1},
    "older_emitters": {"xla_cpu_use_fusion_emitters": False},
    "level2+older_emitters": {"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": False},
    "level1+older_emitters": {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False},
    "level0+older_emitters": {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False},
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--models", type=int, default=100)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    p.add_argument("--methods", nargs="+", default=None, help="default: every method that runs a program")
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--subset-check", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxunlearn.data import load_digits
    from jaxunlearn.data.forget_sets import make_forget_set
    from jaxunlearn.pipeline.demo import demo_config
    from jaxunlearn.training import EnsembleFns, load_recipe, make_trainer, train_ensemble
    from jaxunlearn.training.strategy import ensemble_layout
    from jaxunlearn.training.subsets import steps_per_epoch
    from jaxunlearn.unlearning import ALL_METHODS, UnlearnData, get_method
    from jaxunlearn.unlearning.base import _grid_impl, check_unlearn_inputs, model_devices

    jax.config.update("jax_compilation_cache_dir", None)
    d, k = load_digits(), a.models
    recipe = load_recipe(f"digits-{a.model}")
    recipe = recipe.with_epochs(a.epochs or recipe.epochs)
    masks = np.ones((k, d.n_train), bool)
    tr = make_trainer(recipe, 10, d.image_shape, d.mean, d.std, steps_per_epoch(masks, recipe.batch_size))
    fns = EnsembleFns(tr, k, k)
    images, labels = jnp.asarray(d.train_images), jnp.asarray(d.train_labels)
    states, _ = train_ensemble(tr, images, labels, masks, np.arange(k), 0, recipe.epochs, fns=fns)
    logits = fns.logits(states.params, states.batch_stats, images)
    data = UnlearnData(images, labels, tr.apply_images, init=lambda key: tuple(tr.init(key)[:2]),
                       memorization=jnp.zeros(d.n_train))
    forget = make_forget_set("random:100", d.train_labels, seed=0)
    retain = np.setdiff1d(np.arange(d.n_train), forget)
    keys = jax.random.split(jax.random.key(1), k)
    cfg = demo_config()
    methods = a.methods or [m for m in ALL_METHODS if m not in ("none", "dm-direct")]

    def lowered_for(method, n):
        m = get_method(method)
        conf = cfg.method_config(method)
        stacked = jax.tree.map(lambda x: jnp.asarray([x], jnp.float32), conf)
        p, s = jax.tree.map(lambda t: t[:n], (states.params, states.batch_stats))
        targets = logits[:n] if m.targets else None
        f, r = check_unlearn_inputs(p, data, forget, retain, targets, keys[:n], s)
        args = (stacked, p, s, data, f, r, targets, keys[:n])
        width = min(n, ensemble_layout(recipe.model, k, jax.local_devices()[:1])[1].vmap_width)  # the pipeline's
        devs = model_devices(jax.local_devices()[:1], n, width)
        return jax.jit(functools.partial(_grid_impl, m.fn, width, devs)).lower(*args), args

    rows = []
    for method in methods:
        lowered, args = lowered_for(method, k)
        small = lowered_for(method, 2) if a.subset_check else None
        reference = None
        for cand in sorted(a.candidates, key=lambda c: c != "default"):  # "default" first: the reference
            opts = CANDIDATES[cand]
            t = time.perf_counter()
            compiled = lowered.compile(compiler_options=opts) if opts else lowered.compile()
            compile_s = time.perf_counter() - t
            jax.block_until_ready(compiled(*args))
            t = time.perf_counter()
            out = jax.block_until_ready(compiled(*args))
            run_s = time.perf_counter() - t
            leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(out[:2])]
            reference = leaves if reference is None else reference  # the first candidate (default: "default")
            row = {"method": method, "options": cand, "compile_s": compile_s, "run_s": run_s,
                   "max_abs_diff_vs_default": max(float(np.abs(x - y).max()) for x, y in zip(leaves, reference))}
            if small is not None:
                c2 = small[0].compile(compiler_options=opts) if opts else small[0].compile()
                out2 = c2(*small[1])
                row["model0_diff_all_vs_two_models"] = max(
                    float(np.abs(np.asarray(x)[0, 0] - np.asarray(y)[0, 0]).max())
                    for x, y in zip(jax.tree.leaves(out[:2]), jax.tree.leaves(out2[:2])))
            rows.append(row)
            extra = f"  model 0, {k} vs 2 models {row['model0_diff_all_vs_two_models']:.3g}" if small else ""
            print(f"{method:16s} {cand:22s} compile {compile_s:6.3f} s  run {run_s:7.4f} s  "
                  f"max |diff| {row['max_abs_diff_vs_default']:.3g}{extra}", flush=True)
    totals = {c: {"compile_s": sum(r["compile_s"] for r in rows if r["options"] == c),
                  "run_s": sum(r["run_s"] for r in rows if r["options"] == c)} for c in a.candidates}
    for c, t in totals.items():
        print(f"total {c:22s} compile {t['compile_s']:7.2f} s  run {t['run_s']:7.2f} s", flush=True)
    res = {"model": a.model, "models": k, "methods": methods, "backend": jax.default_backend(),
           "jax": jax.__version__, "totals": totals, "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
