"""XLA compile options for each program of a training chunk, side by side in one run.

    python benchmarks/compile_options.py [--model mlp|cnn|resnet9] [--models 64] [--json FILE]
    python benchmarks/compile_options.py --model resnet9 --data-dir CIFAR --dtype bfloat16 --models 8 \\
        --programs epoch --isolate --json FILE          # on a GPU: the GPU option sets

For ``EnsembleFns``'s init (keys and init in one program), epoch and outputs programs, in the layout
``train`` uses (on CPU one device per core), this lowers each program once and compiles it under each
candidate option set of the backend (JAX's persistent cache off, so every compile is real), then times
a run of each executable (the best of 3, after one untimed run). It checks that every candidate gives
the default's bits for init (integer threefry draws) and reports the largest difference for the others.
The digits MLP and CNN use their recipes on the bundled digits; ``resnet9`` the ``cifar10-resnet9``
recipe on CIFAR-10 (``--data-dir``: the python archive folder), ``--width`` / ``--dtype`` overriding it.

CPU candidates are what ``init_compiler_options`` and ``outputs_compiler_options`` (training/ensemble.py)
were chosen from. GPU candidates are the levers on a ResNet-9 step (benchmarks/RESULTS.md, "ResNet-9 on
the GPU"): the epoch's ``lax.scan`` while loop recorded whole as a CUDA graph (command buffers with
WHILE and CONDITIONAL: no host round trip per step), while-loop double buffering, and lower autotuning
levels (compile time against kernel choice). XLA keeps autotuning results in the process, so on a GPU
only the first candidate's compile time is a cold one: ``--isolate`` compiles each candidate in a
process of its own, on the same device, one after the other.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from jaxunlearn.cpu_devices import use_one_cpu_device_per_core

CPU_CANDIDATES = {
    "default": {},
    "level0": {"xla_backend_optimization_level": 0},
    "older_emitters": {"xla_cpu_use_fusion_emitters": False},
    "level0+older_emitters": {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False},
    "level2": {"xla_backend_optimization_level": 2},
    "level2+older_emitters": {"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": False},
}
# XLA's command buffer types (CUDA graphs); WHILE and CONDITIONAL take the whole scan over steps into one graph
_GRAPH_TYPES = "FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,CONDITIONAL,WHILE"
GPU_CANDIDATES = {
    "default": {},
    "cuda_graph_while": {"xla_gpu_enable_command_buffer": _GRAPH_TYPES, "xla_gpu_graph_min_graph_size": 1},
    "no_command_buffers": {"xla_gpu_enable_command_buffer": ""},
    "while_double_buffering": {"xla_gpu_enable_while_loop_double_buffering": True},
    "autotune2": {"xla_gpu_autotune_level": 2},
    "autotune0": {"xla_gpu_autotune_level": 0},
}
PROGRAMS = ("init_models", "epoch", "outputs")


def candidates_for(backend: str) -> dict:
    return CPU_CANDIDATES if backend == "cpu" else GPU_CANDIDATES


def candidate_names(a, backend: str) -> list:
    """``--candidates`` (or all of the backend's), checked, the default first: it is the reference."""
    known = candidates_for(backend)
    unknown = sorted(set(a.candidates or ()) - set(known))
    if unknown:
        raise SystemExit(f"unknown candidate(s) {unknown} on {backend}; choose from {list(known)}")
    return sorted(a.candidates or list(known), key=lambda n: n != "default")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False)  # --isolate re-reads its own argv: flags spelt out
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn", "resnet9"])
    p.add_argument("--models", type=int, default=64)
    p.add_argument("--data-dir", default=None, help="resnet9: the CIFAR-10 python archive folder (default: tfds)")
    p.add_argument("--width", type=float, default=None, help="resnet9: the recipe's width, overridden")
    p.add_argument("--dtype", default=None, help="resnet9: the recipe's dtype, overridden (bfloat16 on a GPU)")
    p.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS)
    p.add_argument("--candidates", nargs="+", default=None, help="option sets by name (default: all of the backend's)")
    p.add_argument("--isolate", action="store_true", help="each candidate compiled in a process of its own")
    p.add_argument("--json", default=None)
    p.add_argument("--dump", default=None, help=argparse.SUPPRESS)  # --isolate's children save outputs here
    a = p.parse_args(argv)
    if a.models < 1:
        p.error(f"--models must be at least 1, got {a.models}")
    if a.model != "resnet9" and (a.data_dir or a.width or a.dtype):
        p.error("--data-dir, --width and --dtype are for --model resnet9")
    return a


def isolated(a, argv: list, names: list, dump: str, write) -> list:
    """Every candidate of ``names`` in a child process of its own (this script, ``--candidates NAME``), in
    order, their outputs saved in ``dump``; their rows, handed to ``write`` after each child (a timeout
    keeps what was measured). The children get the environment this process was started with."""
    rows = []
    child_args = argv
    for flag in ("--json", "--candidates", "--dump"):
        child_args = _without(child_args, flag)
    child_args = [x for x in child_args if x != "--isolate"]
    with tempfile.TemporaryDirectory(prefix="compile-options-") as tmp:
        for name in names:
            out = os.path.join(tmp, f"{name}.json")
            r = subprocess.run([sys.executable, os.path.abspath(__file__), *child_args, "--candidates", name,
                                "--json", out, "--dump", dump], env=CHILD_ENV)
            if r.returncode != 0:
                print(f"candidate {name}: the child process failed (exit {r.returncode}); its rows are missing",
                      flush=True)
                rows.append({"options": name, "error": f"exit {r.returncode}"})
            else:
                with open(out) as f:
                    rows += json.load(f)["rows"]
            write(rows)
    return rows


def _without(argv: list, flag: str) -> list:
    """argv less ``flag`` and the values after it (up to the next ``--`` option)."""
    out, skip = [], False
    for x in argv:
        if x == flag:
            skip = True
            continue
        if skip and not x.startswith("--"):
            continue
        skip = False
        out.append(x)
    return out


def chunk(a):
    """The chunk to time, its recipe and data set: the digits recipe of ``--model``, or ``cifar10-resnet9``
    on CIFAR-10."""
    from train_chunk import train_chunk

    from jaxunlearn.data import load_dataset, load_digits
    from jaxunlearn.training.recipe import load_recipe

    if a.model != "resnet9":
        recipe, d = load_recipe(f"digits-{a.model}"), load_digits()
    else:
        recipe, d = load_recipe("cifar10-resnet9"), load_dataset("cifar10", a.data_dir)
        recipe = recipe.replace(width=a.width or recipe.width, dtype=a.dtype or recipe.dtype)
    return train_chunk(recipe, d, a.models, 0), recipe, d


def leaves_of(out) -> list:
    import jax
    import numpy as np

    return [np.asarray(jax.random.key_data(v) if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) else v,
                       np.float64) for v in jax.tree.leaves(out)]


def max_diff(reference: list, leaves: list) -> float:
    import numpy as np

    return max((float(np.max(np.abs(r - v))) if r.size else 0.0 for r, v in zip(reference, leaves)), default=0.0)


def measure(a, dump: str | None) -> dict:
    """Compile and time each program under each candidate in this process. ``dump``: a folder to save each
    (program, candidate)'s outputs in (``--isolate`` compares them across processes)."""
    import jax
    import numpy as np

    from jaxunlearn.training.ensemble import EnsembleFns
    from jaxunlearn.training.subsets import steps_per_epoch

    jax.config.update("jax_compilation_cache_dir", None)
    candidates = candidates_for(jax.default_backend())
    names = candidate_names(a, jax.default_backend())
    c, recipe, d = chunk(a)
    setup = c.fns  # the states to run on, compiled apart: JAX would reuse that executable in memory
    fns = EnsembleFns(c.trainer, a.models, c.vmap_width, c.devices)
    ids, images, labels, m = c.ids, c.images, c.labels, c.masks
    states, keys = setup.init_models(np.int32(0), ids)
    all_images, all_labels = jax.device_put(d.all_images), jax.device_put(d.all_labels)
    model_steps = a.models * steps_per_epoch(np.asarray(m), recipe.batch_size)
    programs = {
        "init_models": (fns.init_models, lambda: (np.int32(0), ids)),
        "epoch": (fns.epoch, lambda: (jax.tree.map(lambda t: t.copy(), states), images, labels, m, keys, np.int32(0))),
        "outputs": (fns.outputs, lambda: (states.params, states.batch_stats, all_images, all_labels)),
    }
    rows = []
    for name in a.programs:
        program, args = programs[name]
        lowered = program.lower(*args())
        reference = None
        for cand in names:
            options = candidates[cand]
            try:
                t = time.perf_counter()
                compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
                compile_s = time.perf_counter() - t
                out = jax.block_until_ready(compiled(*args()))  # untimed
            except Exception as e:  # an option this XLA does not know, or a failed compile: say so, go on
                print(f"{name:12s} {cand:22s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                rows.append({"program": name, "options": cand, "error": f"{type(e).__name__}: {e}"[:2000]})
                continue
            runs = []
            for _ in range(3):
                x = args()
                t = time.perf_counter()
                out = jax.block_until_ready(compiled(*x))
                runs.append(time.perf_counter() - t)
            leaves = leaves_of(out)
            if dump:
                np.savez(os.path.join(dump, f"{name}.{cand}.npz"), *leaves)
            if cand == "default":
                reference = leaves
            row = {"program": name, "options": cand, "compile_s": compile_s, "run_s": min(runs),
                   "fusions": compiled.as_text().count("fusion("),
                   "max_abs_diff_vs_default": None if reference is None else max_diff(reference, leaves)}
            if name == "epoch":
                row["ms_per_model_step"] = 1e3 * min(runs) / model_steps
            rows.append(row)
            diff = row["max_abs_diff_vs_default"]
            print(f"{name:12s} {cand:22s} compile {compile_s:6.3f} s  run {min(runs):7.4f} s  "
                  f"fusions {row['fusions']:4d}  max |diff| {'–' if diff is None else f'{diff:.3g}'}", flush=True)
    return {"model": a.model, "models": a.models, "layout": c.layout, "model_steps_per_epoch": int(model_steps),
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "rows": rows}


def compare_dumps(rows: list, dump: str) -> None:
    """Each isolated row's largest difference from the default candidate's outputs (None without them)."""
    import numpy as np

    def leaves(row):
        with np.load(os.path.join(dump, f"{row['program']}.{row['options']}.npz")) as z:
            return [z[k] for k in z.files]

    ok = [r for r in rows if "error" not in r]
    reference = {r["program"]: leaves(r) for r in ok if r["options"] == "default"}
    for row in ok:
        ref = reference.get(row["program"])
        row["max_abs_diff_vs_default"] = None if ref is None else max_diff(ref, leaves(row))


def with_ratios(rows: list) -> list:
    """``run_vs_default`` / ``compile_vs_default``: each row's time ÷ the default's, same program."""
    base = {r["program"]: r for r in rows if r.get("options") == "default" and "error" not in r}
    for r in rows:
        b = base.get(r.get("program"))
        if b and "error" not in r:
            r["run_vs_default"] = r["run_s"] / b["run_s"]
            r["compile_vs_default"] = r["compile_s"] / b["compile_s"]
    return rows


CHILD_ENV = dict(os.environ)  # --isolate's children: the environment as this process found it


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    if a.isolate and a.dump is None:
        # this process only reads the device's kind: it must not take the GPU's memory from its children
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    use_one_cpu_device_per_core()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    def write(result):
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=2)

    if a.isolate and a.dump is None:  # a child (it has --dump) never isolates again
        import jax

        names = candidate_names(a, jax.default_backend())
        result = {"model": a.model, "models": a.models, "isolated": True, "backend": jax.default_backend(),
                  "device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}
        with tempfile.TemporaryDirectory(prefix="compile-options-dump-") as d:
            result["rows"] = isolated(a, argv, names, d, lambda rows: write({**result, "rows": rows}))
            compare_dumps(result["rows"], d)
    else:
        result = measure(a, a.dump)
    result["rows"] = with_ratios(result["rows"])
    for r in result["rows"] if a.dump is None else ():  # an --isolate child leaves the summary to its parent
        if "run_vs_default" in r:
            diff = r["max_abs_diff_vs_default"]
            print(f"{r['program']:12s} {r['options']:22s} run ×{r['run_vs_default']:.3f}  "
                  f"compile ×{r['compile_vs_default']:.3f} of the default's, outputs differ by at most "
                  f"{'–' if diff is None else f'{diff:.3g}'}", flush=True)
        elif "error" in r:
            print(f"{r.get('program', '-'):12s} {r['options']:22s} failed", flush=True)
    write(result)


if __name__ == "__main__":
    main()
