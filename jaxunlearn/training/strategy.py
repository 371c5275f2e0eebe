"""How an ensemble is laid out on a backend: conv formulation, vmap width and the optimizer's formulation.

The defaults come from ``benchmarks/ensemble_throughput.py`` (see benchmarks/RESULTS.md);
override them with ``--conv-impl`` / ``--vmap-width`` and measure on your machine.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Strategy:
    conv_impl: str  # one of jaxunlearn.models.CONV_IMPLS
    vmap_width: int  # models vmapped together inside one lax.map step
    # the optimizer on the parameters raveled into one vector (``optax.flatten``): the same values, one fused
    # update instead of one per parameter array (``make_trainer(flat_optimizer=...)``)
    flat_optimizer: bool = False


def split_devices(devices, n_models: int, vmap_width: int = 1) -> list:
    """The devices ``n_models`` models are split across: the most of ``devices`` (a prefix) among
    which the models divide evenly with a share of at least ``vmap_width`` each, so that every model
    runs in a vmap of the same width whatever the device count (and no device pads its share up)."""
    devices = list(devices)
    n = next(d for d in range(len(devices), 0, -1) if d == 1 or (n_models % d == 0 and n_models // d >= vmap_width))
    return devices[:n]


def ensemble_layout(model: str, n_models: int, devices) -> tuple[list, Strategy]:
    """The devices ``n_models`` models are split across (:func:`split_devices`) and the measured
    layout on each (:func:`default_strategy` for that many; its ``vmap_width`` is at most a share)."""
    devs = split_devices(devices, n_models)
    return devs, default_strategy(model, devs[0].platform, n_models, len(devs))


def default_strategy(model: str, backend: str, n_models: int, n_devices: int = 1) -> Strategy:
    """The measured layout for ``n_models`` models split across ``n_devices`` devices; ``vmap_width``
    is per device (at most its share of the models)."""
    share = max(1, n_models // n_devices)
    if backend == "cpu" and n_devices > 1:
        return _cpu_per_core(model, share)
    n_models = share
    if model == "mlp":
        # dense layers batch well; on CPU 16 at a time beat 512 at once (18.0 vs 12.9 models/s, digits)
        return Strategy("xla", min(n_models, 16) if backend == "cpu" else n_models)
    if backend == "cpu":
        # CPU, digits CNN x64 (cpu_digits_cnn_layouts.json): im2col beats every XLA conv formulation inside
        # the epoch scan (plain XLA convs: 9x slower there); 4-8 small CNNs vmapped into batched matmuls beat
        # one at a time by 10-20 %. ResNet-9 (width 0.25) fills the cores alone: width 2 = width 1.
        return Strategy(_cpu_conv(model), min(n_models, 4) if model == "cnn" else 1)
    # GPU: one model at a time with cuDNN convs, measured on an H100 (ResNet-9, 5.01 vs 2.98 model-epochs/s
    # for vmapping 8 into grouped convs; benchmarks/RESULTS.md), no strided convolution (layers.xla_s2d_conv),
    # the optimizer flattened (ResNet-9 bf16 epoch 1.013x on an H100 with this layout, the same bits; measured
    # for ResNet-9 only; on the CPU 0.98x for the digits CNN, so only here)
    return Strategy("xla_s2d", 1, flat_optimizer=True)


def _cpu_per_core(model: str, share: int) -> Strategy:
    """One XLA CPU device per core (``jaxunlearn.cpu_devices``), measured on this 2-core machine
    (``benchmarks/RESULTS.md``, "One CPU device per core"): each device's programs now run on a core
    of their own, and a single model's XLA convolution (with the canonical-layout backward) fills it
    better than im2col for the small digits CNN; ResNet-9 runs one model at a time in :func:`_cpu_conv`'s
    formulation; MLPs vmap 4 at a time per device (0.050 s/epoch for 64 digits MLPs, 8: 0.056, 16: 0.059)."""
    if model == "mlp":
        return Strategy("xla", min(share, 4))
    return Strategy("xla_canonical" if model == "cnn" else _cpu_conv(model), 1)


def _cpu_conv(model: str) -> str:
    """The conv formulation of a conv net on CPU. ResNet-9: Winograd (F(2x2, 3x3) on its layers of 32 or
    more input channels), measured side by side with im2col, one model per core (``ensemble_throughput.py``):
    width 1, batch 256, 0.167 vs 0.134 models/s (1.25x, ``cpu_resnet9_w1_b256_winograd.json``); width 0.25,
    0.454 vs 0.435 at batch 512 and 0.538 vs 0.526 at batch 128 (ties, ``cpu_resnet9_w025_*_winograd.json``),
    before its output transform became a matmul (with the first layer's narrow im2col backward at width 1, and
    Winograd from 32 channels at width 0.25), which gained another 1.26x (width 1) and 1.21x (width 0.25,
    ``cpu_resnet9_*_revisions.json``). The other nets keep im2col (not measured with it)."""
    return "winograd" if model == "resnet9" else "im2col"
