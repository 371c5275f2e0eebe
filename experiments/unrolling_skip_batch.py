"""Single-gradient unlearning in the authors' own setting: a fixed data order (no reshuffling), the
forget set F = the first batch, and the re-trained twin = the same run skipping that batch every
epoch (one step fewer per epoch; every other batch identical). `jaxunlearn unrolling` uses the
engine's twin instead (F's points removed from a reshuffled order, later batches shifted), where
the first-order correction is swamped; this script checks the method where it is derived.

    python experiments/unrolling_skip_batch.py --out experiments/results/unrolling_digits/skip_batch.json

K models (different inits, one shared order) per (λ, epochs), all in one jit per λ.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxunlearn.data import load_dataset
from jaxunlearn.metrics import verification_error
from jaxunlearn.training import RECIPES, make_trainer, model_keys
from jaxunlearn.unlearning import SingleGradientConfig, UnlearnData, single_gradient, unlearn_ensemble
from jaxunlearn.utils import write_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--std-losses", default="0,1,5,25")
    ap.add_argument("--pretrain-epochs", type=int, default=0,
                    help="w_0 = the model after this many epochs of pre-training (the authors' fine-tuning setting; "
                         "recomputed from the model key, fresh momentum for the fine-tuning), 0: the random init")
    args = ap.parse_args()
    ds = load_dataset("digits")
    b, k = args.batch, args.models
    steps = ds.n_train // b  # static shapes: the remainder is dropped (the authors' last batch is short)
    order = np.random.default_rng(0).permutation(ds.n_train)[:steps * b]
    forget = np.sort(order[:b])
    retain = np.setdiff1d(np.arange(ds.n_train), forget)
    full_batches = jnp.asarray(order.reshape(steps, b))
    twin_batches = full_batches[1:]
    pre_batches = jnp.asarray(np.random.default_rng(1).permutation(ds.n_train)[:steps * b].reshape(steps, b))
    images, labels = jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels)
    keys = model_keys(0, np.arange(k))
    rows = []
    for lam in (float(v) for v in args.std_losses.split(",")):
        recipe = RECIPES["digits-mlp"].replace(epochs=args.epochs, peak_lr=args.lr, peak_epoch=0.0, batch_size=b,
                                               nesterov=False, lr_schedule="constant", std_loss=lam).validate()
        tr = make_trainer(recipe, ds.num_classes, ds.image_shape, ds.mean, ds.std, steps)

        def start(key):
            """The fine-tuning's starting state: w_0 (pre-trained for --pretrain-epochs), fresh optimizer state."""
            s = tr.init(key)
            if args.pretrain_epochs:
                s = lax.scan(lambda s, _: (lax.scan(lambda s, idx: (tr.train_step(s, images[idx], labels[idx], key)[0],
                                                                    None), s, pre_batches)[0], None),
                             s, None, length=args.pretrain_epochs)[0]
            return tr.init(key)._replace(params=s.params, batch_stats=s.batch_stats)

        data = UnlearnData(images, labels, tr.apply_images, init=lambda kk: tuple(start(kk)[:2]))
        for m in range(1, args.epochs + 1):  # constant lr: the trainer is the same for every m

            @jax.jit
            def train_m(keys, m=m):
                def one(key):
                    s0 = start(key)

                    def run(batches):
                        def epoch(state, _):
                            return lax.scan(lambda s, idx: (tr.train_step(s, images[idx], labels[idx], key)[0], None),
                                            state, batches)[0], None
                        return lax.scan(epoch, s0, None, length=m)[0]
                    return run(full_batches), run(twin_batches)
                return jax.vmap(one)(keys)

            full, twin = train_m(keys)
            sg, _, _ = unlearn_ensemble(single_gradient, full.params, full.batch_stats, data, forget, retain, None,
                                        keys, SingleGradientConfig(lr=args.lr, std_loss=lam, epochs=m, batch_size=b))
            none = np.asarray(verification_error(full.params, twin.params))
            one = np.asarray(verification_error(sg, twin.params))
            rows.append({"std_loss": lam, "epochs": m, "none": none.tolist(), "single_gradient": one.tolist(),
                         "mean_none": float(none.mean()), "mean_single_gradient": float(one.mean()),
                         "fraction_lower": float(np.mean(one < none))})
            print(f"λ={lam:g} epochs={m}: verification error none {none.mean():.4f}, single-gradient "
                  f"{one.mean():.4f} (lower for {np.mean(one < none) * 100:.0f} % of models)", flush=True)
    write_json_atomic(args.out, {"setting": vars(args), "forget_idx": forget.tolist(), "rows": rows})


if __name__ == "__main__":
    main()
