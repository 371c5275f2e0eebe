"""How an ensemble is laid out on a backend: conv formulation and vmap width.

The defaults come from ``benchmarks/ensemble_throughput.py`` (see benchmarks/RESULTS.md);
override them with ``--conv-impl`` / ``--vmap-width`` and measure on your machine.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Strategy:
    conv_impl: str  # "im2col" or "xla"
    vmap_width: int  # models vmapped together inside one lax.map step


def default_strategy(model: str, backend: str, n_models: int) -> Strategy:
    if model == "mlp":
        # dense layers batch well; on CPU 16 at a time beat 512 at once (18.0 vs 12.9 models/s, digits)
        return Strategy("xla", min(n_models, 16) if backend == "cpu" else n_models)
    if backend == "cpu":
        # CPU: a vmapped XLA conv becomes a grouped conv, ~16x slower than im2col (digits CNN);
        # one model at a time inside jit beats a wide vmap for conv nets.
        return Strategy("im2col", 1)
    # GPU: one model at a time with cuDNN convs, measured on an H100 (ResNet-9, 5.01 vs 2.98 model-epochs/s
    # for vmapping 8 into grouped convs; benchmarks/RESULTS.md)
    return Strategy("xla", 1)
