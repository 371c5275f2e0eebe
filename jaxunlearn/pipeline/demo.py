"""``jaxunlearn demo``: the whole pipeline on the embedded digits data set (a few minutes on 2 CPU cores).

100 unlearned vs 100 oracle models per KLoM (the reference evaluation's count). OM and DMM run the
SGD option of the matching recipe here: on digits (|F| = 7 % of the training set, 5-step epochs at
the reference batch of 512) the reference Adam recipe moves too little per counted example; the
grids behind these values are in experiments/results/digits/.
"""
from __future__ import annotations

from jaxunlearn.pipeline.config import PipelineConfig
from jaxunlearn.pipeline.unlearn import run_pipeline

_SGD = {"optimizer": "sgd", "batch_size": 64, "forget_multiplier": 1, "retain_per_epoch": 256,
        "weight_decay": 5e-4, "lr_decay": 1.0}
DEMO_METHODS = {"oracle-matching": {**_SGD, "lr": 0.02, "epochs": 8}, "dmm": {**_SGD, "lr": 0.05, "epochs": 1}}
DEMO = PipelineConfig(epochs=8, datamodel_models=1500, full_models=200, forget_sets=("random:100", "cluster:40:3"),
                      method_overrides=DEMO_METHODS)
QUICK = PipelineConfig(epochs=8, datamodel_models=300, full_models=32, forget_sets=("random:100", "cluster:40:3"),
                       lasso_targets=20, method_overrides=DEMO_METHODS)


def run_demo(out: str, quick: bool = False, progress: bool = True) -> dict:
    return run_pipeline(QUICK if quick else DEMO, out, progress=progress)
