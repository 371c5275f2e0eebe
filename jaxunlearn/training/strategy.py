"""How an ensemble is laid out on a backend: conv formulation and vmap width.

The defaults come from ``benchmarks/ensemble_throughput.py`` (see benchmarks/RESULTS.md);
override them with ``--conv-impl`` / ``--vmap-width`` and measure on your machine.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Strategy:
    conv_impl: str  # one of jaxunlearn.models.CONV_IMPLS
    vmap_width: int  # models vmapped together inside one lax.map step


def default_strategy(model: str, backend: str, n_models: int) -> Strategy:
    if model == "mlp":
        # dense layers batch well; on CPU 16 at a time beat 512 at once (18.0 vs 12.9 models/s, digits)
        return Strategy("xla", min(n_models, 16) if backend == "cpu" else n_models)
    if backend == "cpu":
        # CPU, digits CNN x64 (cpu_digits_cnn_layouts.json): im2col beats every XLA conv formulation inside
        # the epoch scan (plain XLA convs: 9x slower there); 4-8 small CNNs vmapped into batched matmuls beat
        # one at a time by 10-20 %. ResNet-9 (width 0.25) fills the cores alone: width 2 = width 1.
        return Strategy("im2col", min(n_models, 4) if model == "cnn" else 1)
    # GPU: one model at a time with cuDNN convs, measured on an H100 (ResNet-9, 5.01 vs 2.98 model-epochs/s
    # for vmapping 8 into grouped convs; benchmarks/RESULTS.md)
    return Strategy("xla", 1)
