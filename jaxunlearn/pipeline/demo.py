"""``jaxunlearn demo``: the whole pipeline on the embedded digits data set (< 5 min on 2 CPU cores)."""
from __future__ import annotations

from jaxunlearn.pipeline.config import PipelineConfig
from jaxunlearn.pipeline.unlearn import run_pipeline

DEMO = PipelineConfig(epochs=8, datamodel_models=1500, full_models=128, forget_sets=("random:100", "cluster:40:3"))
QUICK = PipelineConfig(epochs=8, datamodel_models=300, full_models=32, forget_sets=("random:100", "cluster:40:3"),
                       lasso_targets=20)


def run_demo(out: str, quick: bool = False, progress: bool = True) -> dict:
    return run_pipeline(QUICK if quick else DEMO, out, progress=progress)
