"""Why an MLP ensemble is no faster on CPU than torch.func: the batched matmul, side by side.

    python benchmarks/cpu_matmul_probe.py [--json benchmarks/results/cpu_matmul_probe.json]

Times the matmuls of one digits-MLP ensemble step (vmap width 16: x f32[16, 64, 128] @ w f32[16, 128, 128],
and the forward / weight-gradient forms of every layer) as XLA compiles them on this machine's CPU, against
``torch.bmm`` on the same shapes with the same thread count (PyTorch optional: ``pip install -e .[peers]``),
plus one large square matmul for each as the machine's reachable rate. GFLOP/s, median of 5 timings of
``--reps`` calls each.
"""
from __future__ import annotations

import argparse
import statistics
import time

# (name, batch, m, k, n): the digits MLP's layers at vmap width 16, batch 64 (forward x @ W; weight grad x^T @ dy)
SHAPES = [("square 1024", 1, 1024, 1024, 1024), ("layer 2 fwd", 16, 64, 128, 128), ("layer 1 fwd", 16, 64, 64, 128),
          ("layer 2 wgrad", 16, 128, 64, 128), ("layer 3 fwd", 16, 64, 128, 10)]


def _rate(fn, flops: float, reps: int) -> float:
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t) / reps)
    return flops / statistics.median(times) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    rows = []
    for name, b, m, k, n in SHAPES:
        flops = 2.0 * b * m * k * n
        x, w = jnp.ones((b, m, k)), jnp.ones((b, k, n))
        f = jax.jit(lambda x, w: jnp.einsum("bmk,bkn->bmn", x, w))
        row = {"shape": name, "b_m_k_n": [b, m, k, n],
               "xla_gflops": _rate(lambda: f(x, w).block_until_ready(), flops, a.reps)}
        rows.append(row)
    try:
        import torch

        from jaxunlearn.cpu_devices import cpu_cores

        torch.set_num_threads(cpu_cores())
        for row in rows:
            b, m, k, n = row["b_m_k_n"]
            x, w = torch.ones(b, m, k), torch.ones(b, k, n)
            row["torch_gflops"] = _rate(lambda: torch.bmm(x, w), 2.0 * b * m * k * n, a.reps)
            row["torch_over_xla"] = row["torch_gflops"] / row["xla_gflops"]
        versions = {"torch": torch.__version__}
    except ImportError:
        versions = {"torch": None}
    for row in rows:
        print(f"{row['shape']:14s} {row['b_m_k_n']}: XLA {row['xla_gflops']:6.1f} GFLOP/s"
              + (f", torch.bmm {row['torch_gflops']:6.1f} ({row['torch_over_xla']:.2f}x)" if "torch_gflops" in row else ""))
    if a.json:
        from jaxunlearn.utils import write_json_atomic

        write_json_atomic(a.json, {"rows": rows, "jax": jax.__version__, **versions, "device": jax.devices()[0].device_kind})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
