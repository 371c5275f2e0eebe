"""Each ResNet-9 convolution alone, forward + backward, under each CPU formulation, side by side in one run.

    python benchmarks/conv_layer_probe.py [--width 0.25] [--batch 512] [--min-channels 64] [--json FILE]

The question it answered: would Winograd's minimal filtering, F(2x2, 3x3), make our CPU ResNet-9 step
cheaper (yes, where a layer's channels are wide; ``winograd_conv`` is ResNet-9's CPU default since)? It does 2.25x fewer multiplications than a 3x3 convolution, but its input and output
transforms move data, and on this CPU data movement, not the dots, is most of the im2col step
(benchmarks/RESULTS.md, "ResNet-9 on the CPU"). For every convolution of the ResNet-9 at ``--width``
(its input shape at batch ``--batch``), this times the gradient of a loss through it, as the training
step computes it, inside a 4-step ``lax.scan`` (XLA's CPU backend compiles loop bodies differently,
see ``canonical_conv``), for ``im2col``, ``xla_canonical`` and, for the 3x3 stride-1
layers and the 5x5 stride-2 one, ``winograd`` (``models/layers.py: winograd_conv``, checked against
``lax.conv`` before timing).
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxunlearn.models.layers import WINOGRAD_MIN_CHANNELS, canonical_conv, im2col_conv, winograd_conv, xla_conv

def resnet9_convs(width: float) -> list:
    """(name, input size, c_in, c_out, kernel, stride, padding) of every ResNet-9 convolution (models/nets.py)."""
    c = lambda n: max(1, int(round(n * width)))  # noqa: E731
    return [("prep", 32, 3, c(64), 3, 1, 1), ("layer1 5x5/2", 32, c(64), c(128), 5, 2, 2),
            ("res1a", 16, c(128), c(128), 3, 1, 1), ("res1b", 16, c(128), c(128), 3, 1, 1),
            ("layer2", 16, c(128), c(256), 3, 1, 1), ("res2a", 8, c(256), c(256), 3, 1, 1),
            ("res2b", 8, c(256), c(256), 3, 1, 1), ("layer3 valid", 8, c(256), c(128), 3, 1, 0)]


def check_winograd(key) -> float:
    """Largest difference of winograd_conv's output and gradients from lax.conv's (relative to the largest
    value), 3x3 stride 1 and 5x5 stride 2, over odd and even sizes."""
    worst = 0.0
    cases = [(2, 8, 8, 3, 5, 1), (2, 7, 9, 4, 6, 1), (3, 8, 8, 4, 4, 0), (2, 5, 6, 2, 3, 0)]
    for i, ((b, h, w, c, f, p), (k, s)) in enumerate((case, ks) for case in cases for ks in ((3, 1), (5, 2))):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        x, kern = jax.random.normal(k1, (b, h + 4, w + 4, c)), jax.random.normal(k2, (k, k, c, f))
        dy = jax.random.normal(k3, xla_conv(x, kern, s, p).shape)
        wino = partial(winograd_conv, min_channels=1)  # Winograd itself at these few channels, not im2col
        ref = jax.value_and_grad(lambda x, kern: jnp.sum(xla_conv(x, kern, s, p) * dy), (0, 1))(x, kern)
        got = jax.value_and_grad(lambda x, kern: jnp.sum(wino(x, kern, s, p) * dy), (0, 1))(x, kern)
        worst = max(worst, *(float(jnp.max(jnp.abs(r - g)) / (1 + jnp.max(jnp.abs(r))))
                             for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got))))
    return worst


def time_layer(conv, x, kernel, stride: int, padding: int, repeats: int = 3) -> float:
    """Seconds per training step of dloss/d(x, kernel) through ``conv``, inside a 4-step scan. The input is an
    argument of the program, as a layer's input is in training: closed over, it would be a constant, and XLA
    would fold whatever depends on it alone (im2col's patches, Winograd's input transform) at compile time."""
    def run(k, x):
        def body(k, _):
            gk, gx = jax.grad(lambda k, x: jnp.sum(conv(x, k, stride, padding) ** 2), (0, 1))(k, x)
            return k - 1e-6 * gk + 1e-9 * jnp.sum(gx), None
        return lax.scan(body, k, None, length=4)[0]

    run = jax.jit(run)
    jax.block_until_ready(run(kernel, x))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(run(kernel, x))
        best = min(best, (time.perf_counter() - t) / 4)
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--min-channels", type=int, default=WINOGRAD_MIN_CHANNELS,
                   help="winograd_conv's threshold (below it, im2col); 1: Winograd on every 3x3 / 5x5-stride-2 layer")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    key = jax.random.PRNGKey(0)
    err = check_winograd(key)
    print(f"winograd_conv vs lax.conv, values and gradients: largest relative difference {err:.2e}")
    if err > 1e-5:
        raise SystemExit("winograd_conv does not match lax.conv: the timings below would be of a wrong convolution")
    rows, totals = [], {}
    for name, hw, c_in, c_out, k, s, pad in resnet9_convs(a.width):
        x = jax.random.normal(key, (a.batch, hw, hw, c_in))
        kernel = 0.1 * jax.random.normal(key, (k, k, c_in, c_out))
        impls = {"im2col": im2col_conv, "xla_canonical": canonical_conv}
        if (k, s) in ((3, 1), (5, 2)):  # where winograd_conv is not im2col
            impls["winograd"] = partial(winograd_conv, min_channels=a.min_channels)
        secs = {impl: time_layer(fn, x, kernel, s, pad) for impl, fn in impls.items()}
        best = min(secs, key=secs.get)
        totals["im2col"] = totals.get("im2col", 0.0) + secs["im2col"]
        totals["winograd_conv"] = totals.get("winograd_conv", 0.0) + secs.get("winograd", secs["im2col"])
        totals["best per layer"] = totals.get("best per layer", 0.0) + secs[best]
        rows.append({"layer": name, "input": [a.batch, hw, hw, c_in], "c_out": c_out, "kernel": k, "stride": s,
                     "padding": pad, "seconds": secs, "best": best})
        print(f"{name:14s} {hw:2d}x{hw:<2d} {c_in:4d}->{c_out:<4d} " + "  ".join(f"{i} {t:.4f}" for i, t in secs.items())
              + f"   best: {best}", flush=True)
    print("all layers, s per step: " + ", ".join(f"{k} {v:.4f}" for k, v in totals.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"width": a.width, "batch": a.batch, "winograd_min_channels": a.min_channels,
                       "backend": jax.default_backend(), "jax": jax.__version__,
                       "winograd_max_rel_diff": err, "layers": rows, "totals": totals}, f, indent=2)


if __name__ == "__main__":
    main()
