"""One chunk of an ensemble laid out as ``jaxunlearn train`` lays it out, for the benchmarks that time or
profile its programs (``peer_torch.py``, ``step_profile.py``, ``compile_options.py``).

    from train_chunk import train_chunk   # a benchmark script's own folder is on sys.path
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax
import numpy as np

from jaxunlearn.training.ensemble import EnsembleFns
from jaxunlearn.training.step import make_trainer
from jaxunlearn.training.strategy import ensemble_layout
from jaxunlearn.training.subsets import random_subset_masks, steps_per_epoch


def train_chunk(recipe, dataset, n_models: int, seed: int, conv_impl: str | None = None,
                flat_optimizer: bool | None = None) -> SimpleNamespace:
    """``n_models`` α = 0.5 models of ``recipe`` on ``dataset``: the layout ``train`` picks for a chunk of
    them on this machine's devices (``ensemble_layout``; ``conv_impl`` overrides its conv formulation, as
    ``train --conv-impl`` does; ``flat_optimizer`` its optimizer's formulation), its :class:`EnsembleFns`, and
    the chunk's inputs on the devices: ``images`` u8[n, ...], ``labels`` i32[n], ``masks`` bool[k, n] and ``ids``
    u32[k] (for ``fns.init_models(seed, ids)``), the per-model ones split as the programs take them."""
    masks = random_subset_masks(dataset.n_train, n_models, 0.5, seed)
    devices, strat = ensemble_layout(recipe.model, n_models, jax.local_devices())
    strat = strat if conv_impl is None else dataclasses.replace(strat, conv_impl=conv_impl)
    strat = strat if flat_optimizer is None else dataclasses.replace(strat, flat_optimizer=flat_optimizer)
    trainer = make_trainer(recipe, dataset.num_classes, dataset.image_shape, dataset.mean, dataset.std,
                           steps_per_epoch(masks, recipe.batch_size), strat.conv_impl,
                           flat_optimizer=strat.flat_optimizer)
    fns = EnsembleFns(trainer, n_models, strat.vmap_width, devices)
    sharding = fns.models_sharding
    return SimpleNamespace(
        fns=fns, trainer=trainer, devices=devices, vmap_width=strat.vmap_width,
        layout=f"{strat.conv_impl}:{strat.vmap_width}@{len(devices)}{' flat' if strat.flat_optimizer else ''}",
        images=jax.device_put(dataset.train_images), labels=jax.device_put(dataset.train_labels),
        masks=jax.device_put(masks, sharding), ids=jax.device_put(np.arange(n_models, dtype=np.uint32), sharding))
