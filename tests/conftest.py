import importlib.util
import os
import shutil
import tempfile

import jax
import pytest

from jaxunlearn.training.ensemble import FAST_COMPILE_CPU_OPTIONS  # imports jax only: no backend started yet

# Compiling is about half of the suite's CPU time. Without a GPU plugin (and unless XLA_FLAGS is set already), the
# suite's programs (the library's too, in-process and in the CLI subprocesses that inherit XLA_FLAGS or take
# xla_flags() below) compile as the library compiles its unlearning programs on small inputs,
# training.ensemble.FAST_COMPILE_CPU_OPTIONS: LLVM level 2 instead of XLA's default 3, and XLA's older fusion
# emitters. Measured on the 2-core machine, test_models, _training, _localization and _unrolling (-n 2) back to
# back: 285.6 -> 235.0 CPU-s, 147 -> 122 s (level 2 alone: 247.2 CPU-s, and its whole-suite run showed no gain,
# against 12 % fewer CPU-s with both, in runs an hour apart on a machine whose speed drifts by 10 %). The older
# emitters slow the README example alone (64.9 -> 82.7 s against level 2 alone) and win elsewhere. A program
# given its own options keeps those (EnsembleFns.init's level 0; the outputs program's emitters, at level 2
# here). What users compile is checked where it matters: default_jit (below) compiles a reference with XLA's
# defaults, and the compile-cache tests run their CLI subprocesses under them (the jaxlib bug they guard
# against is one of XLA's defaults); `jaxunlearn demo` and benchmarks/ run the defaults. (Not with a GPU: the
# level applies to its kernels too.)
_GPU_PLUGIN = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
_FAST_COMPILE_FLAGS = [] if _GPU_PLUGIN else [f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE_CPU_OPTIONS.items()]
os.environ.setdefault("XLA_FLAGS", " ".join(["--xla_force_host_platform_device_count=1", *_FAST_COMPILE_FLAGS]))
# CLI calls (in-process and in subprocesses) share one compilation cache per test session, never the user's:
# the runs of one configuration that many tests make (resume, workers, layouts) compile it once. Tests of the
# cache itself give their own folders. The controller (or the only process) removes it at the end.
# (pytest-xdist's workers inherit the controller's environment, so all of them get its folder.)
_CACHE_OWNER = "JAXUNLEARN_CACHE_DIR" not in os.environ
if _CACHE_OWNER:
    os.environ["JAXUNLEARN_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxunlearn-tests-compile-cache-")
# Tests compare layouts of the same computation (ensemble vs loop, vmap vs scan): on a GPU,
# f32 matmuls and convs default to TF32, whose rounding would dominate those comparisons.
jax.config.update("jax_default_matmul_precision", "highest")

# The tests' own jitted checks (a formulation against lax.conv, a model's logits under another conv, a Hessian
# against its explicit form) run once on a few inputs, so compiling is nearly all their time: on CPU they compile
# as the library's unlearning programs on small inputs do (training.ensemble.FAST_COMPILE_CPU_OPTIONS: LLVM
# level 2, XLA's older fusion emitters). ResNet-18 w0.125's init and three applies: 6.5 s against 25.8 s by
# default. (Level 0 compiles faster still but sums without vectorising: ResNet-9's BatchNorm gradients then
# drift 6e-3 from lax.conv's.) The library's programs keep their own options.
def _cpu_jit(fn, cpu_options: dict, **kw):
    """``jax.jit`` compiled with ``cpu_options`` on CPU, XLA's defaults elsewhere."""
    return jax.jit(fn, compiler_options=cpu_options if jax.default_backend() == "cpu" else None, **kw)


def check_jit(fn, **kw):
    """``jax.jit`` for a test's own check: ``FAST_COMPILE_CPU_OPTIONS`` on CPU, the default elsewhere."""
    return _cpu_jit(fn, FAST_COMPILE_CPU_OPTIONS, **kw)


XLA_CPU_DEFAULTS = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


def default_jit(fn, **kw):
    """``jax.jit`` compiled as users compile it, XLA's own CPU defaults (the suite's XLA_FLAGS set others)."""
    return _cpu_jit(fn, XLA_CPU_DEFAULTS, **kw)


def xla_flags(devices: int) -> str:
    """This suite's XLA_FLAGS with ``devices`` host-platform devices (for a CLI subprocess that must compile as
    the suite does, e.g. to be compared bit for bit with an in-process run)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    return " ".join([f"--xla_force_host_platform_device_count={devices}", *flags])


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_MINI = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10-mini")


@pytest.fixture(scope="session")
def digits():
    from jaxunlearn.data import load_digits

    return load_digits()


@pytest.fixture(scope="session")
def cifar_mini_dir():
    path = os.environ.get("JAXUNLEARN_CIFAR10_MINI", CIFAR_MINI)
    if not os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
        pytest.skip(f"real CIFAR-10 slice not found at {path} (clone with ../shared/data/cifar10-mini, "
                    "or set JAXUNLEARN_CIFAR10_MINI)")
    return path


# the slowest modules first (by their measured durations): under `-n 2 --dist loadfile` one worker
# takes the demo while the other works through the rest, and the short modules fill in at the end
SLOWEST_FIRST = ["test_pipeline", "test_readme_example", "test_scale_out", "test_training", "test_run",
                 "test_localization", "test_baselines", "test_dkvb", "test_unrolling", "test_compile_cache", "test_models",
                 "test_unlearning", "test_attribution"]


def pytest_sessionfinish(session):
    if _CACHE_OWNER:
        shutil.rmtree(os.environ["JAXUNLEARN_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


@pytest.fixture(scope="session")
def train_mlps(digits):
    """make(k, epochs) -> (trainer, EnsembleFns, states, UnlearnData, logits f32[k, n_train, C]): k
    digits MLPs on the whole training set, and the data every unlearning method takes."""
    import jax.numpy as jnp
    import numpy as np

    from jaxunlearn.training import RECIPES, EnsembleFns, make_trainer, train_ensemble
    from jaxunlearn.training.subsets import steps_per_epoch
    from jaxunlearn.unlearning import UnlearnData

    def make(k: int, epochs: int):
        recipe = RECIPES["digits-mlp"].with_epochs(epochs)
        masks = np.ones((k, digits.n_train), bool)
        tr = make_trainer(recipe, 10, digits.image_shape, digits.mean, digits.std, steps_per_epoch(masks, 64))
        fns = EnsembleFns(tr, k, k)
        states, _ = train_ensemble(tr, jnp.asarray(digits.train_images), jnp.asarray(digits.train_labels), masks,
                                   np.arange(k), 0, recipe.epochs, fns=fns)
        data = UnlearnData(jnp.asarray(digits.train_images, jnp.float32), jnp.asarray(digits.train_labels),
                           tr.apply_images, init=lambda key: tuple(tr.init(key)[:2]))
        return tr, fns, states, data, fns.logits(states.params, states.batch_stats, jnp.asarray(digits.train_images))

    return make
