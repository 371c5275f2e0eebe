"""``jaxunlearn demo``: the main job on the embedded digits data set."""
from __future__ import annotations

import os
import time

from jaxunlearn.data import load_digits
from jaxunlearn.training import RECIPES, RunConfig, train_run


def run_demo(out: str, quick: bool = False, progress: bool = True) -> dict:
    from jaxunlearn.cli import Progress

    ds = load_digits()
    models = 32 if quick else 256
    cfg = RunConfig(dataset="digits", models=models, recipe=RECIPES["digits-mlp"], seed=0, alpha=0.5)
    t = time.time()
    bar = Progress(models, "datamodel ensemble", progress)
    try:
        summary = train_run(cfg, ds, os.path.join(out, "datamodels"), progress=bar)
    finally:
        bar.close()
    print(f"digits: {summary['models']} subset models (alpha=0.5), mean test accuracy "
          f"{100 * summary['mean_test_accuracy']:.2f}%, {time.time() - t:.1f}s")
    return summary
