"""XLA CPU compile options for each program of a training chunk, side by side in one process.

    python benchmarks/compile_options.py [--model mlp|cnn] [--models 64] [--json FILE]

For ``EnsembleFns``'s init (keys and init in one program), epoch and outputs programs on the digits
data, in the layout ``train`` uses (one CPU device per core), this lowers each program once and
compiles it under each candidate option set (JAX's persistent cache off, so every compile is real),
then times a run of each executable (the best of 3, after one untimed run). It checks that every
candidate gives the default's bits for init (integer threefry draws) and reports the largest
difference for the others. This is what ``init_compiler_options`` and ``outputs_compiler_options``
(training/ensemble.py) were chosen from.
"""
from __future__ import annotations

import argparse
import json
import time

from jaxunlearn.cpu_devices import use_one_cpu_device_per_core

CANDIDATES = {
    "default": {},
    "level0": {"xla_backend_optimization_level": 0},
    "older_emitters": {"xla_cpu_use_fusion_emitters": False},
    "level0+older_emitters": {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--models", type=int, default=64)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    use_one_cpu_device_per_core()

    import jax
    import numpy as np

    from train_chunk import train_chunk

    from jaxunlearn.data import load_digits
    from jaxunlearn.training.ensemble import EnsembleFns
    from jaxunlearn.training.recipe import load_recipe

    jax.config.update("jax_compilation_cache_dir", None)
    d = load_digits()
    c = train_chunk(load_recipe(f"digits-{a.model}"), d, a.models, 0)
    setup = c.fns  # the states to run on, compiled apart: JAX would reuse that executable in memory
    fns = EnsembleFns(c.trainer, a.models, c.vmap_width, c.devices)
    ids, images, labels, m = c.ids, c.images, c.labels, c.masks
    states, keys = setup.init_models(np.int32(0), ids)
    all_images, all_labels = jax.device_put(d.all_images), jax.device_put(d.all_labels)
    programs = {
        "init_models": (fns.init_models, lambda: (np.int32(0), ids)),
        "epoch": (fns.epoch, lambda: (jax.tree.map(lambda t: t.copy(), states), images, labels, m, keys, np.int32(0))),
        "outputs": (fns.outputs, lambda: (states.params, states.batch_stats, all_images, all_labels)),
    }
    rows = []
    for name, (program, args) in programs.items():
        lowered = program.lower(*args())
        reference = None
        for cand, options in CANDIDATES.items():
            t = time.perf_counter()
            compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
            compile_s = time.perf_counter() - t
            out = jax.block_until_ready(compiled(*args()))  # untimed
            runs = []
            for _ in range(3):
                x = args()
                t = time.perf_counter()
                out = jax.block_until_ready(compiled(*x))
                runs.append(time.perf_counter() - t)
            leaves = [np.asarray(jax.random.key_data(v) if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) else v,
                                 np.float64) for v in jax.tree.leaves(out)]
            reference = reference or leaves
            diff = max(float(np.max(np.abs(r - v))) if r.size else 0.0 for r, v in zip(reference, leaves))
            rows.append({"program": name, "options": cand, "compile_s": compile_s, "run_s": min(runs),
                         "fusions": compiled.as_text().count("fusion("), "max_abs_diff_vs_default": diff})
            print(f"{name:12s} {cand:22s} compile {compile_s:6.3f} s  run {min(runs):7.4f} s  "
                  f"fusions {rows[-1]['fusions']:4d}  max |diff| {diff:.3g}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "models": a.models, "layout": c.layout,
                       "jax": jax.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
