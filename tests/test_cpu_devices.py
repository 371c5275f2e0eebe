"""One XLA CPU device per core (the CLI's default on a CPU), and how models are split across devices."""
import json
import os
import subprocess
import sys

from jaxunlearn.cpu_devices import cpu_cores
from jaxunlearn.training.strategy import default_strategy, split_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import jax
from jaxunlearn.cpu_devices import use_one_cpu_device_per_core
n = use_one_cpu_device_per_core()
print(n, len(jax.devices()), use_one_cpu_device_per_core())
"""


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _probe(**extra):
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=_clean_env(**extra), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


def test_one_cpu_device_per_core_unless_the_user_chose():
    cores = cpu_cores()
    assert cores == len(os.sched_getaffinity(0))  # the cores this process may run on
    # a second call, with JAX running, changes nothing
    assert _probe() == ([str(cores), str(cores), "None"] if cores > 1 else ["None", "1", "None"])
    assert _probe(JAX_NUM_CPU_DEVICES="1") == ["None", "1", "None"]
    assert _probe(XLA_FLAGS="--xla_force_host_platform_device_count=3") == ["None", "3", "None"]


def test_the_cli_trains_across_the_cores(tmp_path):
    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "jaxunlearn", "train", "--dataset", "digits", "--models", "4",
                        "--epochs", "1", "--no-progress", "--no-compile-cache", "--out", out], cwd=REPO,
                       env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["devices"] == len(split_devices(range(cpu_cores()), 4))  # 2 on a 2-core machine
    if len(os.sched_getaffinity(0)) == 2:  # CI's machine: the figure the comment promises, not the code's
        assert cfg["devices"] == 2
    assert cfg["vmap_width_resolved"] == 4 // cfg["devices"]  # the MLP: a device's whole share at once


def test_split_devices_keeps_each_share_at_least_the_vmap_width():
    devs = ["d0", "d1", "d2", "d3"]
    assert split_devices(devs, 8) == devs
    assert split_devices(devs, 8, 2) == devs
    assert split_devices(devs, 8, 4) == devs[:2]  # 4 devices would leave 2 models each, below the width
    assert split_devices(devs, 6) == devs[:3]  # 6 models do not divide among 4
    assert split_devices(devs, 5) == devs[:1]
    assert split_devices(devs, 2, 2) == devs[:1]
    assert split_devices(devs[:1], 7, 16) == devs[:1]


def test_default_layout_per_device_count():
    assert default_strategy("mlp", "cpu", 64).vmap_width == 16
    assert default_strategy("mlp", "cpu", 64, 2).vmap_width == 4  # per device
    assert default_strategy("mlp", "gpu", 64, 2).vmap_width == 32  # a GPU vmaps its whole share
    assert default_strategy("cnn", "cpu", 64).conv_impl == "im2col"
    assert (default_strategy("cnn", "cpu", 64, 2).conv_impl, default_strategy("cnn", "cpu", 64, 2).vmap_width) == \
        ("xla_canonical", 1)
    assert default_strategy("resnet9", "cpu", 8, 2).conv_impl == "winograd"
    assert default_strategy("resnet9", "cpu", 8).conv_impl == "winograd"
    assert default_strategy("resnet18", "cpu", 8, 2).conv_impl == "im2col"
    assert default_strategy("resnet9", "gpu", 8, 2).conv_impl == "xla_s2d"
    # the optimizer on one raveled vector: conv nets on a GPU only
    assert default_strategy("resnet9", "gpu", 8).flat_optimizer and default_strategy("cnn", "gpu", 8).flat_optimizer
    assert not any(default_strategy(m, b, 8, d).flat_optimizer for m in ("mlp", "cnn", "resnet9") for b, d in
                   (("cpu", 1), ("cpu", 2)))
    assert not default_strategy("mlp", "gpu", 8).flat_optimizer


def test_ensemble_layout_clips_the_width_to_a_share():
    import jax

    from jaxunlearn.training.strategy import Strategy, ensemble_layout

    cpu = jax.devices("cpu")[:1]  # the CPU layout, on a GPU host too
    devs, strat = ensemble_layout("mlp", 64, cpu)
    assert devs == cpu and strat == Strategy("xla", 16)
    assert ensemble_layout("cnn", 3, cpu)[1] == Strategy("im2col", 3)


def test_an_odd_ensemble_is_padded_onto_every_core(tmp_path):
    """5 digits CNNs on 2 CPU devices: one chunk of 6 (one padded copy), split across both, in the
    per-core layout measured for 2 devices; 5 models come out."""
    import numpy as np

    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "jaxunlearn", "train", "--dataset", "digits", "--model", "cnn",
                        "--models", "5", "--epochs", "1", "--no-progress", "--no-compile-cache", "--out", out],
                       cwd=REPO, env=_clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.load(open(os.path.join(out, "config.json")))
    per_core = default_strategy("cnn", "cpu", 6, 2)
    assert (cfg["chunk_resolved"], cfg["devices"], cfg["conv_impl"], cfg["vmap_width_resolved"]) == \
        (6, 2, per_core.conv_impl, per_core.vmap_width)
    assert np.load(os.path.join(out, "margins.npy")).shape == (5, 1797)
