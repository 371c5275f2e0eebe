"""One XLA CPU device per core: how the CLI runs ensembles on a CPU.

XLA's CPU client exposes one device, and on it the small batched matmuls and convolutions of an
ensemble step keep about one core busy (a vmapped digits-MLP matmul ran as fast pinned to one core
as on two). Split into one device per core, the models axis of a chunk is shared across them like
across GPUs (``training.ensemble.over_devices``), and each device's program runs on its own core:
digits MLP x64 2.1x, digits CNN x64 1.7x the models/s of one device on this 2-core machine
(``benchmarks/RESULTS.md``, "One CPU device per core").

The CLI calls :func:`use_one_cpu_device_per_core` before JAX starts. A library user does the same
in their own script (before any JAX operation), or sets ``JAX_NUM_CPU_DEVICES`` /
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, which this leaves alone.
"""
from __future__ import annotations

import os


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def use_one_cpu_device_per_core(cores: int | None = None) -> int | None:
    """Gives JAX's CPU backend one device per core (``cores``, default :func:`cpu_cores`).

    Returns the device count set, or None when it is left as it is: the user chose one already
    (``JAX_NUM_CPU_DEVICES``, ``XLA_FLAGS``' host-platform device count, or ``jax_num_cpu_devices``),
    there is one core, or JAX's backends are already running (the count is fixed at start-up).
    A GPU or TPU run is unaffected: the CPU devices only exist beside it.
    """
    import jax  # here, not at the top: cpu_cores() serves processes that never import JAX (benchmarks' peers)

    if ("JAX_NUM_CPU_DEVICES" in os.environ or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or jax.config.jax_num_cpu_devices >= 0):
        return None
    n = cpu_cores() if cores is None else int(cores)
    if n < 2:
        return None
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already initialised: too late to change, keep what runs
        return None
    return n
