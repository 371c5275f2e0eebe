"""Fine-tuning on the retain set only (GD): forget by catastrophic forgetting. No gradient is ever
taken on a forget point."""
from __future__ import annotations

from flax import struct

from jaxunlearn.training.step import std_logit_penalty
from jaxunlearn.unlearning.finetune import SGDConfig, cross_entropy, model_ce, retain_count, retain_sample, run_finetune


class GDConfig(SGDConfig):
    # SalUn / ℓ1-sparse code's fine-tuning (FT): lr 0.01, 10 epochs over the whole retain set, batch 256
    lr: float = 0.01
    epochs: int = struct.field(pytree_node=False, default=10)
    batch_size: int = struct.field(pytree_node=False, default=256)
    retain_per_epoch: int = struct.field(pytree_node=False, default=0)  # 0: the whole retain set
    # Unrolling SGD's SD loss weight λ (CE + λ · Σ std(logits) / (B·C)); static, so at 0 the program is
    # exactly the plain-CE one
    std_loss: float = struct.field(pytree_node=False, default=0.0)


def finetune_retain(params, model_state, data, forget_idx, retain_idx, targets, key, config: GDConfig):
    """CE on a fresh retain sample each epoch; ``forget_idx`` and ``targets`` are unused."""
    r = retain_count(config.retain_per_epoch, retain_idx.shape[0])

    def loss(p, s, idx, k):
        if not config.std_loss:
            return model_ce(data, p, s, idx)
        logits, s = data.apply(p, s, data.images[idx], True)
        return cross_entropy(logits, data.labels[idx]) + config.std_loss * std_logit_penalty(logits), s

    return run_finetune(params, model_state, config, lambda k: retain_sample(retain_idx, k, r), r, loss, key,
                        update_mask=data.update_mask)
