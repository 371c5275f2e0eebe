"""ℓ1-sparse unlearning (Jia et al., NeurIPS 2023, "Model Sparsity Can Simplify Machine
Unlearning"): fine-tune on the retain set with CE + γ_t·‖θ‖₁, γ_t decaying linearly from γ to 0."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxunlearn.unlearning.finetune import (SGDConfig, index_batches, model_ce, retain_count, retain_sample, run_sgd,
                                            steps_for)


class L1SparseConfig(SGDConfig):
    # ℓ1-sparse code (Jia et al.): FT with an ℓ1 term, lr 0.01, 10 epochs, batch 256; its README leaves γ
    # open, 1e-4 is what published runs of it use
    lr: float = 0.01
    l1: float = 1e-4  # γ, the initial weight of ‖θ‖₁
    epochs: int = struct.field(pytree_node=False, default=10)
    batch_size: int = struct.field(pytree_node=False, default=256)
    retain_per_epoch: int = struct.field(pytree_node=False, default=0)  # 0: the whole retain set


def l1_norm(params):
    return sum(jnp.abs(p).sum() for p in jax.tree.leaves(params))


def l1_sparse(params, model_state, data, forget_idx, retain_idx, targets, key, config: L1SparseConfig):
    r = retain_count(config.retain_per_epoch, retain_idx.shape[0])
    steps = steps_for(r, config.batch_size)
    total = config.epochs * steps

    def batches(k, e):
        kr, ks = jax.random.split(k)
        return {"idx": index_batches(ks, retain_sample(retain_idx, kr, r), steps, config.batch_size),
                "t": e * steps + jnp.arange(steps)}

    def loss(params, state, batch, k):
        ce, state = model_ce(data, params, state, batch["idx"])
        gamma = config.l1 * (1.0 - batch["t"] / total)
        return ce + gamma * l1_norm(params), state

    params, model_state, _ = run_sgd(params, model_state, config, batches, steps, loss, key,
                                     update_mask=data.update_mask)
    return params, model_state, jnp.float32(total * config.batch_size)
