"""Unlearning compute vs re-training, measured side by side in one process.

    python benchmarks/unlearning_cost.py --json FILE [--dataset digits --recipe digits-cnn --models 16]

Trains K full models from scratch with the recipe (the re-training baseline), then runs every
unlearning method on those K models with the pipeline's configs (the demo's, or ``--config``).
Each jitted call runs twice: the first pays the compile, the second is timed; compile time is
reported separately. ``wall_fraction`` = unlearning seconds / re-training seconds (both compiled,
both for all K models, both in the ensemble layout the pipeline uses); ``counted_fraction`` is the
pipeline's counted compute (per-example gradient evaluations) for comparison. OM and DMM are
timed with the full models' own logits as targets: the work does not depend on the values.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.data import load_dataset
from jaxunlearn.data.forget_sets import make_forget_set
from jaxunlearn.pipeline.config import PipelineConfig
from jaxunlearn.pipeline.demo import demo_config
from jaxunlearn.training.ensemble import EnsembleFns, train_ensemble
from jaxunlearn.training.recipe import load_recipe
from jaxunlearn.training.step import make_trainer
from jaxunlearn.training.strategy import default_strategy
from jaxunlearn.training.subsets import steps_per_epoch
from jaxunlearn.unlearning import UnlearnData, get_method, unlearn_ensemble
from jaxunlearn.utils import write_json_atomic


def twice(fn):
    """(result, first-call seconds, second-call seconds), each blocked until ready."""
    times = []
    for _ in range(2):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return out, times[0], times[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--recipe", default="digits-cnn")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--models", type=int, default=16, help="K models unlearned (and re-trained) at once")
    ap.add_argument("--forget", default="random:100")
    ap.add_argument("--config", default=None, help="pipeline .json whose method settings to use (default: the demo)")
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)

    cfg = PipelineConfig.from_json(args.config) if args.config else demo_config()
    ds = load_dataset(args.dataset, args.data_dir)
    recipe = load_recipe(args.recipe).with_epochs(args.epochs)
    k = args.models
    masks = np.ones((k, ds.n_train), bool)
    spe = steps_per_epoch(masks, recipe.batch_size)
    strat = default_strategy(recipe.model, jax.default_backend(), k)
    trainer = make_trainer(recipe, ds.num_classes, ds.image_shape, ds.mean, ds.std, spe, strat.conv_impl,
                           flat_optimizer=strat.flat_optimizer)
    images, labels = jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels)
    fns = EnsembleFns(trainer, k, strat.vmap_width)
    (states, _), first, train_s = twice(lambda: train_ensemble(trainer, images, labels, masks, np.arange(k), 0,
                                                               recipe.epochs, fns=fns))
    train_examples = recipe.epochs * spe * recipe.batch_size
    print(f"re-training {k} {recipe.model} models ({recipe.epochs} epochs): {train_s:.2f} s "
          f"(+{first - train_s:.2f} s compile) on {jax.default_backend()}")

    forget = make_forget_set(args.forget, ds.train_labels, seed=cfg.seed)
    retain = np.setdiff1d(np.arange(ds.n_train), forget)
    data = UnlearnData(images, labels, trainer.apply_images, init=lambda key: tuple(trainer.init(key)[:2]))  # DEL
    own = fns.logits(states.params, states.batch_stats, images)
    keys = jax.random.split(jax.random.key(1), k)
    rows = []
    for name in args.methods or [m for m in cfg.methods if m not in ("none", "dm-direct")]:
        m = get_method(name)
        config = cfg.method_config(name)
        run = lambda: unlearn_ensemble(m.fn, states.params, states.batch_stats, data, forget, retain,  # noqa: E731
                                       own if m.targets else None, keys, config, strat.vmap_width)
        (_, _, cost), first, secs = twice(run)
        row = {"method": name, "unlearn_seconds": secs, "compile_seconds": first - secs,
               "wall_fraction": secs / train_s, "counted_fraction": float(np.mean(cost)) / train_examples}
        rows.append(row)
        print(f"  {name:<16}{secs:8.3f} s  wall {100 * row['wall_fraction']:6.2f} %  counted "
              f"{100 * row['counted_fraction']:6.2f} %  (compile {row['compile_seconds']:.1f} s)")
    out = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "dataset": args.dataset,
           "recipe": recipe.to_dict(), "models": k, "forget_set": args.forget, "forget_size": int(len(forget)),
           "layout": {"conv_impl": strat.conv_impl, "vmap_width": strat.vmap_width},
           "retrain_seconds": train_s, "retrain_compile_seconds": first - train_s, "methods": rows,
           "note": "DM-Direct costs no gradient step: its targets come from the amortised datamodel ensemble"}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_json_atomic(args.json, out)
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
