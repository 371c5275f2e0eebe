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

from jaxunlearn.training.step import ModelState, Trainer
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


@jax.jit
def _model_keys(seed, model_ids):
    root = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(root, i))(model_ids)


def model_keys(seed: int, model_ids, sharding=None) -> jax.Array:
    """Per-model keys: fold_in(key(seed), global model index). model_ids: i32[k] -> key[k]
    (one compiled program per k; the ids go in as host uint32, so nothing else compiles).
    ``sharding``: where the ids (and so the keys) live, e.g. :attr:`EnsembleFns.models_sharding`."""
    ids = np.asarray(model_ids, np.uint32)
    return _model_keys(np.int32(seed), ids if sharding is None else jax.device_put(ids, sharding))


def models_mesh(devices) -> Mesh:
    """A 1-D mesh named "models" over ``devices``."""
    return Mesh(np.asarray(devices), ("models",))


def over_devices(fn: Callable, devices, n_models: int, vmap_width: int, replicated: tuple[int, ...] = ()):
    """``fn`` mapped over the leading models axis of its arguments, that axis split evenly across
    ``devices`` (each runs :func:`map_models` on its share, in vmaps of ``min(vmap_width, share)``
    models); the arguments at positions ``replicated`` (data, scalars) go whole to every device.
    ``n_models`` must divide. Every model runs the program it would run on one device whenever the
    share is at least ``vmap_width`` (``strategy.split_devices`` picks such devices; then the bits are the
    same whatever the device count); a smaller share runs in a narrower vmap rather than padding
    each device up to the full width, which would multiply every device's work."""
    local = n_models // len(devices)

    def per_device(*args):
        mapped = tuple(a for i, a in enumerate(args) if i not in replicated)

        def one(model_args):
            it = iter(model_args)
            return fn(*(args[i] if i in replicated else next(it) for i in range(len(args))))

        return map_models(one, mapped, vmap_width, local)

    def call(*args):
        specs = tuple(P() if i in replicated else P("models") for i in range(len(args)))
        return jax.shard_map(per_device, mesh=models_mesh(devices), in_specs=specs, out_specs=P("models"),
                             check_vma=False)(*args)

    return call


def init_compiler_options(devices) -> dict | None:
    """Init runs once per chunk, so on CPU it is compiled without backend optimisation: its threefry
    draws took 2.7 s of XLA CPU compiling for 64 digits CNNs, 0.4 s this way, with bit-identical values
    (tested). Elsewhere the default (on GPU level 0 would also stop multiply-add contraction)."""
    return {"xla_backend_optimization_level": 0} if devices[0].platform == "cpu" else None


class EnsembleFns:
    """Jitted ensemble versions of a Trainer's functions, for a fixed chunk size and vmap width,
    the models axis split across ``devices`` (default: the first device only)."""

    def __init__(self, trainer: Trainer, n_models: int, vmap_width: int, devices=None):
        self.trainer = trainer
        self.devices = split_devices(devices or jax.local_devices()[:1], n_models, vmap_width)
        # where per-model inputs (keys, masks) go straight from the host: already split as the programs
        # take them (a one-device array would be re-sliced across the devices by a compiled program);
        # None on one device: uncommitted, as before, so the results may still move to other devices
        self.models_sharding = NamedSharding(models_mesh(self.devices), P("models")) if len(self.devices) > 1 else None
        if len(self.devices) > 1:
            over = lambda fn, replicated=(): over_devices(fn, self.devices, n_models, vmap_width, replicated)  # noqa: E731
            self.init = jax.jit(over(trainer.init), compiler_options=init_compiler_options(self.devices))
            # run_epoch(state, images, labels, mask, model_key, epoch): images, labels, epoch are shared
            self.epoch = jax.jit(over(trainer.run_epoch, (1, 2, 5)), donate_argnums=0)
            self.logits = jax.jit(over(trainer.logits, (2,)))
            return
        mm = lambda fn, xs: map_models(fn, xs, vmap_width, n_models)  # noqa: E731

        self.init = jax.jit(lambda keys: mm(trainer.init, keys), compiler_options=init_compiler_options(self.devices))

        def epoch(states, images, labels, masks, keys, epoch):
            return mm(lambda a: trainer.run_epoch(a[0], images, labels, a[1], a[2], epoch), (states, masks, keys))

        self.epoch = jax.jit(epoch, donate_argnums=0)
        self.logits = jax.jit(lambda params, stats, images: mm(
            lambda a: trainer.logits(a[0], a[1], images), (params, stats)))


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
    keys = model_keys(seed, model_ids, fns.models_sharding)
    masks = jax.device_put(np.asarray(masks), fns.models_sharding)  # not jnp.asarray: it compiles per shape
    states = fns.init(keys)
    metrics = {}
    for e in range(epochs):
        states, metrics = fns.epoch(states, images, labels, masks, keys, np.int32(e))
        if on_epoch is not None:
            on_epoch(e, metrics)
    return states, metrics
