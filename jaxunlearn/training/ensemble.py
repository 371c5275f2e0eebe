"""Ensembles: the single-model functions of ``make_trainer`` mapped over stacked models.

``k`` models of a chunk are processed as ``lax.map`` over groups of ``vmap_width``
``vmap``ped models (``vmap_width >= k``: one plain ``vmap``; ``1``: a sequential map
inside jit; a short last group padded to the full width); with several local devices the
models axis is first split across them (``shard_map`` over a 1-D "models" mesh, data
replicated), each device running that layout on its share. One jitted call trains every
model of the chunk for one epoch; there is no Python loop over models or steps.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxunlearn.compile_cache import Program
from jaxunlearn.metrics.margins import margins_from_logits
from jaxunlearn.training.step import ModelState, Trainer, trainer_spec
from jaxunlearn.training.strategy import split_devices


def _pad_models(xs, pad: int):
    """Appends ``pad`` copies of the last model to every leaf of ``xs`` (stacked on axis 0)."""
    return jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), xs)


def map_models(fn: Callable, xs, vmap_width: int, n_models: int):
    """Applies single-model ``fn`` to every model in ``xs`` (stacked on axis 0): ``lax.map`` over groups
    of ``min(vmap_width, n_models)`` vmapped models. A short last group is padded with copies of the
    last model (dropped from the output), so every model runs in a vmap of the same width: the same
    program, and the same bits, whichever group or device it lands in."""
    w = max(1, min(vmap_width, n_models))
    pad = (-n_models) % w
    if pad:
        xs = _pad_models(xs, pad)
    out = jax.vmap(fn)(xs) if n_models + pad == w else lax.map(fn, xs, batch_size=w)
    return jax.tree.map(lambda a: a[:n_models], out) if pad else out


def model_key(seed, model_id) -> jax.Array:
    """Model ``model_id``'s key: fold_in(key(seed), model_id) (its init, data order and augmentation
    all derive from it)."""
    return jax.random.fold_in(jax.random.key(seed), model_id)


@jax.jit
def _model_keys(seed, model_ids):
    return jax.vmap(lambda i: model_key(seed, i))(model_ids)


def model_keys(seed: int, model_ids, sharding=None) -> jax.Array:
    """Per-model keys: fold_in(key(seed), global model index). model_ids: i32[k] -> key[k]
    (one compiled program per k; the ids go in as host uint32, so nothing else compiles).
    ``sharding``: where the ids (and so the keys) live, e.g. :attr:`EnsembleFns.models_sharding`."""
    ids = np.asarray(model_ids, np.uint32)
    return _model_keys(np.int32(seed), ids if sharding is None else jax.device_put(ids, sharding))


def models_mesh(devices) -> Mesh:
    """A 1-D mesh named "models" over ``devices``."""
    return Mesh(np.asarray(devices), ("models",))


def over_models(fn: Callable, n_models: int, vmap_width: int, replicated: tuple[int, ...] = ()):
    """Single-model ``fn`` mapped over the leading models axis of its arguments (:func:`map_models`, in
    vmaps of ``min(vmap_width, n_models)``); the arguments at positions ``replicated`` (data, scalars)
    go whole to every model."""
    def call(*args):
        mapped = tuple(a for i, a in enumerate(args) if i not in replicated)

        def one(model_args):
            it = iter(model_args)
            return fn(*(args[i] if i in replicated else next(it) for i in range(len(args))))

        return map_models(one, mapped, vmap_width, n_models)

    return call


def over_devices(fn: Callable, devices, n_models: int, vmap_width: int, replicated: tuple[int, ...] = ()):
    """``fn`` mapped over the leading models axis of its arguments, that axis split evenly across
    ``devices`` (each runs :func:`over_models` on its share); the arguments at positions ``replicated``
    go whole to every device.
    ``n_models`` must divide. Every model runs the program it would run on one device whenever the
    share is at least ``vmap_width`` (``strategy.split_devices`` picks such devices; then the bits are the
    same whatever the device count); a smaller share runs in a narrower vmap rather than padding
    each device up to the full width, which would multiply every device's work."""
    per_device = over_models(fn, n_models // len(devices), vmap_width, replicated)

    def call(*args):
        specs = tuple(P() if i in replicated else P("models") for i in range(len(args)))
        return jax.shard_map(per_device, mesh=models_mesh(devices), in_specs=specs, out_specs=P("models"),
                             check_vma=False)(*args)

    return call


def init_compiler_options(devices) -> dict | None:
    """Init runs once per chunk, so on CPU it is compiled without backend optimisation and with
    XLA's older fusion emitters: keys and init of 64 digits models compile in 2.6 s (MLP) / 2.0 s
    (CNN) by default, 0.52 / 0.65 s at level 0, 0.34 / 0.42 s with the older emitters too, with the
    same bits (``benchmarks/compile_options.py``; bit-identical values tested). Elsewhere the default
    (on GPU level 0 would also stop multiply-add contraction)."""
    if devices[0].platform != "cpu":
        return None
    return {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


# the largest inputs (values per example: 16x16 RGB) whose outputs and unlearning programs are compiled with the
# faster-compiling CPU options below; between the sizes measured (8x8x1 digits: they win; 32x32x3 CIFAR-10: they lose)
OLDER_EMITTERS_MAX_INPUT_SIZE = 16 * 16 * 3


def _small_cpu_inputs(devices, image_shape) -> bool:
    """On CPU, with inputs of a known shape of at most :data:`OLDER_EMITTERS_MAX_INPUT_SIZE` values per example."""
    return (devices[0].platform == "cpu" and image_shape is not None
            and int(np.prod(image_shape)) <= OLDER_EMITTERS_MAX_INPUT_SIZE)


def outputs_compiler_options(devices, image_shape=None) -> dict | None:
    """The outputs (logits, margins) run once per chunk. On CPU, for small inputs (``image_shape``: at most
    :data:`OLDER_EMITTERS_MAX_INPUT_SIZE` values per example), with XLA's older fusion emitters, which compile
    faster; elsewhere, and where the input shape is not known, the default. Measured (``benchmarks/compile_options.py
    --programs outputs``, compile then run, default vs older; benchmarks/RESULTS.md): 8x8 digits, 64 MLPs
    0.39 / 0.043 vs 0.35 / 0.063 s, 64 CNNs 0.72 / 1.34 vs 0.38 / 1.08 s (older: 0.6 s less); 32x32
    CIFAR-10, ResNet-9 width 0.25 x 4: 3.0 / 12.2 vs 1.3 / 15.1 s (1.1 s more), width 1 x 2: 2.3 / 33.6 vs
    1.4 / 40.2 s (5.8 s more). What the older emitters save is bounded by the compile time; what they
    cost grows with the models and points. Not the epoch, which runs many times: with them the MLP epoch
    ran 24 % slower (0.076 vs 0.062 s), and the CNN epoch's bits differ from the default's."""
    return {"xla_cpu_use_fusion_emitters": False} if _small_cpu_inputs(devices, image_shape) else None


# LLVM at optimisation level 2 (not 3) and XLA's older fusion emitters: programs that run once on small inputs
# compile in about half the time and run as fast (unlearning_compiler_options below; the tests' own checks too)
FAST_COMPILE_CPU_OPTIONS = {"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": False}


def unlearning_compiler_options(devices, image_shape=None) -> dict | None:
    """An unlearning method's program (``unlearning.unlearn_ensemble`` / ``unlearn_grid``) runs once per
    call, and on small inputs its compile is most of the call. On CPU, for inputs of at most
    :data:`OLDER_EMITTERS_MAX_INPUT_SIZE` values per example: LLVM at optimisation level 2 (not 3) and XLA's
    older fusion emitters; elsewhere, and where the input shape is not known, the default. Measured
    (``benchmarks/unlearning_compile_options.py``: the 10 optimisation methods with the digits demo's configs,
    compile / run, default vs both): 100 digits MLPs 25.7 / 11.0 s vs 14.4 / 10.7 s; 16 digits CNNs 60.4 /
    22.5 s vs 30.1 / 21.2 s (level 2 alone 21.3 and 45.7 s of compile, older emitters alone 25.9 and 45.8 s).
    The values differ from the default's by rounding, amplified along the SGD steps as any change of fusion
    does (model 0 of 16 CNNs against 2: 3.2e-3 by default, 2.4e-3 with these, for Oracle Matching)."""
    return dict(FAST_COMPILE_CPU_OPTIONS) if _small_cpu_inputs(devices, image_shape) else None


def margins_and_correct(logits, labels):
    """What a run keeps of logits f32[..., n, C] besides them: margins f32[..., n] and correct flags
    bool[..., n] (labels i32[n])."""
    return margins_from_logits(logits, labels), logits.argmax(-1) == labels


def _outputs(trainer: Trainer):
    """What a trained model's run keeps, computed where its logits are: (logits f32[n, C],
    margins f32[n], correct bool[n]) on images u8|f32[n, ...] with labels i32[n]."""
    def outputs(params, batch_stats, images, labels):
        logits = trainer.logits(params, batch_stats, images).astype(jnp.float32)
        return logits, *margins_and_correct(logits, labels)
    return outputs


def _init_models(trainer: Trainer):
    """(state, key) of model ``model_id``: its key and initial state in one program."""
    def init_model(seed, model_id):
        key = model_key(seed, model_id)
        return trainer.init(key), key
    return init_model


class EnsembleFns:
    """Jitted ensemble versions of a Trainer's functions, for a fixed chunk size and vmap width,
    the models axis split across ``devices`` (default: the first device only).

    ``init(keys)``, ``epoch(states, images, labels, masks, keys, epoch)``, ``logits(params, stats, images)``
    as the Trainer's; and two that save a program each at start-up: ``init_models(seed, model_ids)``
    -> (states, keys) (:func:`model_keys` and ``init`` in one), and ``outputs(params, stats, images,
    labels)`` -> (logits f32[k, n, C], margins f32[k, n], correct bool[k, n]). Each is a
    :class:`~jaxunlearn.compile_cache.Program`: with the persistent cache on and a Trainer from
    ``make_trainer``, a warm process loads them without tracing."""

    def __init__(self, trainer: Trainer, n_models: int, vmap_width: int, devices=None):
        self.trainer = trainer
        self.devices = split_devices(devices or jax.local_devices()[:1], n_models, vmap_width)
        # where per-model inputs (keys, masks) go straight from the host: already split as the programs
        # take them (a one-device array would be re-sliced across the devices by a compiled program);
        # None on one device: uncommitted, as before, so the results may still move to other devices
        multi = len(self.devices) > 1
        self.models_sharding = NamedSharding(models_mesh(self.devices), P("models")) if multi else None
        spec = trainer_spec(trainer)
        spec = spec and {**spec, "models": n_models, "vmap_width": vmap_width, "devices": [d.id for d in self.devices]}
        init_model, outputs = _init_models(trainer), _outputs(trainer)

        def program(name, single, replicated=(), **kw):
            """``single`` (one model's function) over the models axis of the arguments other than
            ``replicated``: split over the devices, each in this chunk's vmap layout."""
            fn = (over_devices(single, self.devices, n_models, vmap_width, replicated) if multi
                  else over_models(single, n_models, vmap_width, replicated))
            return Program(fn, name, spec and {**spec, "program": name}, devices=self.devices, **kw)

        self.init = program("init", trainer.init, compiler_options=init_compiler_options(self.devices))
        self.init_models = program("init_models", init_model, (0,),
                                   compiler_options=init_compiler_options(self.devices))
        # run_epoch(state, images, labels, mask, model_key, epoch): images, labels, epoch are shared
        self.epoch = program("epoch", trainer.run_epoch, (1, 2, 5), donate_argnums=0)
        self.logits = program("logits", trainer.logits, (2,))
        image_shape = spec["image_shape"] if spec else None  # a Trainer of make_trainer's: its inputs' shape
        self.outputs = program("outputs", outputs, (2, 3),
                               compiler_options=outputs_compiler_options(self.devices, image_shape))


def train_ensemble(trainer: Trainer, images, labels, masks, model_ids, seed: int, epochs: int,
                   vmap_width: int | None = None, on_epoch: Callable | None = None,
                   fns: EnsembleFns | None = None) -> tuple[ModelState, dict]:
    """Trains k models at once.

    images: u8|f32[n, H, W, C] and labels: i32[n] (device arrays, the training set);
    masks: bool[k, n] (each model's subset); model_ids: int[k] global indices (they fix
    each model's init and data order). Returns the stacked final states and metrics of the
    last epoch ({"loss": f32[k], "accuracy": f32[k]}).
    """
    k = int(np.shape(masks)[0])
    fns = fns or EnsembleFns(trainer, k, vmap_width or k)
    ids = np.asarray(model_ids, np.uint32)  # as model_keys takes them: the same keys
    masks = jax.device_put(np.asarray(masks), fns.models_sharding)  # not jnp.asarray: it compiles per shape
    states, keys = fns.init_models(np.int32(seed), jax.device_put(ids, fns.models_sharding))
    metrics = {}
    for e in range(epochs):
        states, metrics = fns.epoch(states, images, labels, masks, keys, np.int32(e))
        if on_epoch is not None:
            on_epoch(e, metrics)
    return states, metrics
