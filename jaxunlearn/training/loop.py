"""The obvious alternative to the ensemble engine: one model at a time.

Two baselines, both reusing the same single-model functions (so they train the same models):
``per_step``: a Python loop over models and steps calling the jitted ``train_step``;
``per_epoch``: a Python loop over models calling the jitted single-model ``run_epoch`` (a scan).
Used by the throughput benchmark and by tests as the reference single-model trainer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxunlearn.training.ensemble import model_keys
from jaxunlearn.training.step import Trainer


def train_one_by_one(trainer: Trainer, images, labels, masks, model_ids, seed: int, epochs: int,
                     mode: str = "per_epoch", jitted: dict | None = None):
    """Returns a list of final single-model states, one per model, trained sequentially."""
    j = jitted if jitted is not None else make_jitted(trainer)
    states = []
    for key, mask in zip(model_keys(seed, model_ids), jnp.asarray(masks)):
        state = j["init"](key)
        aug_key = jax.random.fold_in(key, 2)
        for e in range(epochs):
            if mode == "per_epoch":
                state, _ = j["epoch"](state, images, labels, mask, key, jnp.int32(e))
            else:
                for idx in j["batches"](mask, key, jnp.int32(e)):
                    state, _ = j["step"](state, images[idx], labels[idx], jax.random.fold_in(aug_key, state.step))
        states.append(state)
    return states


def make_jitted(trainer: Trainer) -> dict:
    return {"init": jax.jit(trainer.init), "epoch": jax.jit(trainer.run_epoch),
            "batches": jax.jit(trainer.batch_indices), "step": jax.jit(trainer.train_step)}
