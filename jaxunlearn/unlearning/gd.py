"""Fine-tuning on the retain set only (GD): forget by catastrophic forgetting. No gradient is ever
taken on a forget point."""
from __future__ import annotations

from flax import struct

from jaxunlearn.unlearning.finetune import SGDConfig, model_ce, retain_count, retain_sample, run_finetune


class GDConfig(SGDConfig):
    # SalUn / ℓ1-sparse code's fine-tuning (FT): lr 0.01, 10 epochs over the whole retain set, batch 256
    lr: float = 0.01
    epochs: int = struct.field(pytree_node=False, default=10)
    batch_size: int = struct.field(pytree_node=False, default=256)
    retain_per_epoch: int = struct.field(pytree_node=False, default=0)  # 0: the whole retain set


def finetune_retain(params, model_state, data, forget_idx, retain_idx, targets, key, config: GDConfig):
    """CE on a fresh retain sample each epoch; ``forget_idx`` and ``targets`` are unused."""
    r = retain_count(config.retain_per_epoch, retain_idx.shape[0])
    return run_finetune(params, model_state, config, lambda k: retain_sample(retain_idx, k, r), r,
                        lambda p, s, idx, k: model_ce(data, p, s, idx), key,
                        update_mask=data.update_mask)
