"""Formulations of one training epoch, side by side in one process: which one runs fastest on this device.

    python benchmarks/step_variants.py --model resnet9 --data-dir CIFAR --dtype bfloat16 --models 8 --json FILE
    python benchmarks/step_variants.py --model cnn --models 64 --json FILE         # digits CNN on this CPU

The epoch program of ``train``'s layout for ``--models`` models (``train_chunk.py``), built once per variant:

* ``fused_bn``: the library as it is (``ConvBN``'s BatchNorm + ReLU with the backward pass written out,
  ``layers.batch_norm_relu``);
* ``autodiff_bn``: ``nn.BatchNorm`` then ``nn.relu``, differentiated by JAX (the formulation before it);
* ``bn_mask_from_input``: the library's, with the backward pass's ReLU mask recomputed from the layer's input
  instead of read from its output (that pass then reads x and the output's gradient, not the output too);
* ``pool_first_max``: the library's, with ResNet-9's 2x2 and global max-pools' gradients sent to the first
  maximum of each window (PyTorch's choice) by one elementwise pass each (:func:`first_max_pools`), instead of
  split evenly among tied maxima, which costs autodiff a count of the ties (a reduction) before that pass;
* ``unrolled``: the library's, with the epoch's ``lax.scan`` over steps unrolled (no while loop per step);
* ``flat_optimizer`` / ``tree_optimizer``: the library's, with the optimizer run on the parameters raveled into
  one vector (``optax.flatten``: one fused update instead of one per parameter array; ``train``'s choice on a
  GPU) / on the parameter tree, one update per array (its choice on a CPU);
* ``xla_nchw``: the library's, with the convolutions in NCHW / OIHW layout (``layers.xla_nchw_conv``);
* ``xla``: the library's, with the strided convolutions as they are (``layers.xla_conv``) rather than ``train``'s
  choice (on a GPU ``xla_s2d``: stride 1 only).

Variants combine with ``+`` (``flat_optimizer+unrolled``).

Each is compiled and run for one untimed epoch; then every variant runs ``--epochs`` more epochs, one after
another in turn (epoch 1 of each, epoch 2 of each, ...), each timed to completion: the median per variant, and
``paired_speedup``, the median over epochs of the first variant's time over this one's from the same round (a
machine whose speed drifts, as this shared CPU's did by up to half within minutes, slows both alike). XLA keeps
autotuning results in the process, so only the first variant's compile is a cold one: compare run times, not
compile times. The persistent compile cache is switched off: its stored programs are keyed by the library's
source, which a variant swaps at run time. ``max_param_diff`` is the largest difference of the trained
parameters from the first variant's after every epoch's steps: SGD amplifies rounding along them, so it shows
how far the runs drifted apart, not whether a formulation is right (the tests check each against the one it
replaces).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

VARIANTS = ("fused_bn", "autodiff_bn", "bn_mask_from_input", "pool_first_max", "unrolled", "flat_optimizer",
            "tree_optimizer", "xla_nchw", "xla")
OPTIMIZERS = {"flat_optimizer": True, "tree_optimizer": False}  # the optimizer's formulation a variant asks for


@contextlib.contextmanager
def _variant(name: str):
    """The library's functions as the variant needs them, restored afterwards."""
    import flax.linen as nn

    from jaxunlearn.models import layers, nets

    saved = layers.BatchNormReLU, layers.batch_norm_relu, nets.max_pool_2x2, nets.global_max_pool
    parts = name.split("+")
    if "autodiff_bn" in parts:
        class AutodiffBatchNormReLU(nn.BatchNorm):  # the same variables as the library's layer
            def __call__(self, x):
                return nn.relu(nn.BatchNorm.__call__(self, x).astype(x.dtype))

        layers.BatchNormReLU = lambda use_running_average, name: AutodiffBatchNormReLU(
            use_running_average=use_running_average, momentum=0.9, epsilon=1e-5, name=name)
    if "bn_mask_from_input" in parts:
        layers.batch_norm_relu = _batch_norm_relu_mask_from_input()
    if "pool_first_max" in parts:
        nets.max_pool_2x2, nets.global_max_pool = first_max_pools()
    try:
        yield
    finally:
        layers.BatchNormReLU, layers.batch_norm_relu, nets.max_pool_2x2, nets.global_max_pool = saved


def _batch_norm_relu_mask_from_input():
    """``layers.batch_norm_relu`` (same forward, same contract) whose backward takes the ReLU's mask from the
    output recomputed from x, the batch statistics, scale and bias (the forward's own ``layers._normalize_relu``)
    instead of reading the stored output: the same mask, so the same gradient; the backward reads x and dy only."""
    import jax

    from jaxunlearn.models import layers

    def fwd(x, scale, bias, epsilon):
        (y, mean, var), (x, _, scale, mean, var) = layers._batch_norm_relu_fwd(x, scale, bias, epsilon)
        return (y, mean, var), (x, bias, scale, mean, var)

    def bwd(epsilon, residuals, cotangents):
        x, bias, scale, mean, var = residuals
        y = layers._normalize_relu(x, mean, var, scale, bias, epsilon)  # fused into the backward's passes over x
        return layers._batch_norm_relu_bwd(epsilon, (x, y, scale, mean, var), cotangents)

    f = jax.custom_vjp(lambda x, scale, bias, epsilon: fwd(x, scale, bias, epsilon)[0], nondiff_argnums=(3,))
    f.defvjp(fwd, bwd)
    return f


def first_max_pools():
    """``(max_pool_2x2, global_max_pool)`` with the same values as the library's, whose gradient goes to the
    first maximum of each window in row-major order, as PyTorch's ``max_pool2d`` and ``adaptive_max_pool2d``
    send it (the library's split it evenly among tied maxima). The 2x2 pool is written as the elementwise
    maximum of the window's four strided views, forward and backward (no reduction: the backward recomputes
    the maximum and its first position from x in the pass that writes dx); the global pool keeps the argmax
    (i32[B, C]) from its forward. Checked by hand (2026-11-27; torch is not a test dependency): on inputs with
    many ties, float32 and bfloat16, the gradients equal ``torch.nn.functional.max_pool2d``'s and
    ``adaptive_max_pool2d``'s exactly, and without ties they equal the library's; one ResNet-9 gradient step is
    the same to the bit. Measured slower on an H100 (0.974x, benchmarks/RESULTS.md): not adopted."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def corners(x):  # the four positions of every 2x2 window: 4 x T[B, H//2, W//2, C]
        b, h, w, c = x.shape
        v = x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
        return v[:, :, 0, :, 0], v[:, :, 0, :, 1], v[:, :, 1, :, 0], v[:, :, 1, :, 1]

    @jax.custom_vjp
    def max_pool_2x2(x):
        a, b, c, d = corners(x)
        return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))

    def pool_fwd(x):
        return max_pool_2x2(x), x

    def pool_bwd(x, dy):
        a, b, c, d = corners(x)
        m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
        ta = a == m
        tb = (b == m) & ~ta
        tc = (c == m) & ~(ta | tb)
        td = ~(ta | tb | tc)
        zero = jnp.zeros((), dy.dtype)
        row = lambda p, q: jnp.stack([jnp.where(p, dy, zero), jnp.where(q, dy, zero)], axis=3)  # noqa: E731
        n, h, w, ch = x.shape
        dx = jnp.stack([row(ta, tb), row(tc, td)], axis=2).reshape(n, h // 2 * 2, w // 2 * 2, ch)
        return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))).astype(x.dtype),)

    max_pool_2x2.defvjp(pool_fwd, pool_bwd)

    @jax.custom_vjp
    def global_max_pool(x):
        return jnp.max(x, axis=(1, 2))

    def global_fwd(x):
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        return jnp.max(flat, axis=1), (jnp.argmax(flat, axis=1).astype(jnp.int32), x.shape)

    def global_bwd(res, dy):
        idx, shape = res
        pos = lax.broadcasted_iota(jnp.int32, (shape[0], shape[1] * shape[2], shape[3]), 1)
        return (jnp.where(pos == idx[:, None, :], dy[:, None, :], jnp.zeros((), dy.dtype)).reshape(shape),)

    global_max_pool.defvjp(global_fwd, global_bwd)
    return max_pool_2x2, global_max_pool


def _unrolled(trainer, steps: int):
    """``trainer.run_epoch`` with its scan over steps unrolled."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def run_epoch(state, images, labels, mask, model_key, epoch):
        aug_key = jax.random.fold_in(model_key, 2)

        def body(state, idx):
            return trainer.train_step(state, images[idx], labels[idx], jax.random.fold_in(aug_key, state.step))

        state, metrics = lax.scan(body, state, trainer.batch_indices(mask, model_key, epoch), unroll=steps)
        return state, jax.tree.map(jnp.mean, metrics)

    return trainer._replace(run_epoch=run_epoch)


def variant_chunk(name: str, recipe, dataset, models: int, seed: int):
    """``train_chunk``'s chunk of ``models`` models with the variant's layout and optimizer (call it, and run the
    chunk's programs the first time, inside ``_variant(name)``)."""
    import numpy as np

    from train_chunk import train_chunk

    from jaxunlearn.training.ensemble import EnsembleFns
    from jaxunlearn.training.subsets import steps_per_epoch

    parts = name.split("+")
    flat = next((OPTIMIZERS[p] for p in parts if p in OPTIMIZERS), None)  # None: train's choice
    c = train_chunk(recipe, dataset, models, seed, next((p for p in parts if p in ("xla_nchw", "xla")), None), flat)
    if "unrolled" in parts:
        steps = steps_per_epoch(np.asarray(c.masks), recipe.batch_size)
        c.fns = EnsembleFns(_unrolled(c.trainer, steps), models, c.vmap_width, c.devices)
    return c


def check_variant(v: str, option: str = "--variants") -> None:
    if not v or any(part not in VARIANTS for part in v.split("+")):
        raise SystemExit(f"{option}: {v!r} is not one of {', '.join(VARIANTS)} (or several joined by +)")
    if len(set(v.split("+")) & set(OPTIMIZERS)) > 1:
        raise SystemExit(f"{option}: {v!r} asks for both optimizer formulations")


def build_variant(name: str, recipe, dataset, models: int, seed: int) -> SimpleNamespace:
    """The variant's epoch program for ``models`` models, compiled and run once (untimed): its chunk ``c``,
    the trained ``states`` and per-model ``keys``, and ``first`` (seconds of that first epoch, compile
    included). The program is fixed once compiled, so later epochs run it outside the variant's context."""
    import jax
    import numpy as np

    with _variant(name):
        c = variant_chunk(name, recipe, dataset, models, seed)
        states, keys = jax.block_until_ready(c.fns.init_models(np.int32(seed), c.ids))
        t = time.perf_counter()
        states, metrics = c.fns.epoch(states, c.images, c.labels, c.masks, keys, np.int32(0))
        jax.block_until_ready(states)
    return SimpleNamespace(c=c, states=states, keys=keys, metrics=metrics, first=time.perf_counter() - t, times=[])


def run_epoch(v: SimpleNamespace, epoch: int) -> None:
    """One more epoch of variant ``v``, timed to completion (appended to ``v.times``)."""
    import jax
    import numpy as np

    c = v.c
    t = time.perf_counter()
    v.states, v.metrics = c.fns.epoch(v.states, c.images, c.labels, c.masks, v.keys, np.int32(epoch))
    jax.block_until_ready(v.states)
    v.times.append(time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet9", choices=["cnn", "resnet9"])
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--data-dir", default=None, help="resnet9: the CIFAR-10 python archive folder")
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--dtype", default=None, help="override the recipe's dtype (bfloat16 on a GPU)")
    p.add_argument("--epochs", type=int, default=5, help="timed epochs after the untimed first one")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"of {', '.join(VARIANTS)}, or several joined by +")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    for v in a.variants:
        check_variant(v)

    import jax
    import numpy as np

    from jaxunlearn.cpu_devices import use_one_cpu_device_per_core

    use_one_cpu_device_per_core()
    from jaxunlearn.compile_cache import enable_compile_cache
    from jaxunlearn.data import load_dataset
    from jaxunlearn.training.recipe import RECIPES
    from jaxunlearn.utils import write_json_atomic

    recipe = RECIPES["cifar10-resnet9" if a.model == "resnet9" else "digits-cnn"]
    over = {k: v for k, v in (("width", a.width), ("dtype", a.dtype)) if v is not None}
    recipe = recipe.replace(**over) if over else recipe
    dataset = load_dataset("cifar10" if a.model == "resnet9" else "digits", a.data_dir)
    enable_compile_cache(None)  # every variant compiled here: none loads another's stored program
    built = {name: build_variant(name, recipe, dataset, a.models, a.seed) for name in a.variants}
    for e in range(1, a.epochs + 1):  # interleaved: a slow spell of the machine hits every variant alike
        for v in built.values():
            run_epoch(v, e)
    base = built[a.variants[0]]
    rows, ref = {}, jax.device_get(base.states.params)
    for name, v in built.items():
        params = jax.device_get(v.states.params)
        rows[name] = r = {
            "first_epoch_seconds": v.first, "epoch_seconds": v.times, "median_epoch_seconds": statistics.median(v.times),
            # the first variant's epoch over this one's, epoch by epoch (run back to back), then the median
            "paired_speedup": statistics.median(b / t for b, t in zip(base.times, v.times)),
            "layout": v.c.layout, "loss": float(np.mean(np.asarray(v.metrics["loss"]))),
            "max_param_diff": max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                                  for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(params)))}
        print(f"{name:15s} {r['median_epoch_seconds']:.4f} s/epoch ({r['paired_speedup']:.3f}x the first, paired)  "
              f"first epoch {r['first_epoch_seconds']:.1f} s  loss {r['loss']:.4f}  max param diff "
              f"{r['max_param_diff']:.2e}", flush=True)
    if a.json:
        write_json_atomic(a.json, {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                                   "model": a.model, "models": a.models, "recipe": recipe.to_dict(),
                                   "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
