"""``jaxunlearn demo``: the whole pipeline on the embedded digits data set (a few minutes on 2 CPU cores).

Its config is ``experiments/digits_demo.json`` (every value tuned on digits lives there; the library
defaults are the papers'). 100 unlearned vs 100 oracle models per KLoM, the reference evaluation's
count; ``--quick`` shrinks the ensembles for tests.
"""
from __future__ import annotations

import os

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.pipeline.config import PipelineConfig
from jaxunlearn.pipeline.unlearn import run_pipeline

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "experiments", "digits_demo.json")
QUICK_SETTINGS = ("datamodel_models=300", "full_models=32", "lasso_targets=20")


def demo_config(quick: bool = False) -> PipelineConfig:
    """The demo's experiment config (``--quick``: smaller ensembles)."""
    if not os.path.isfile(DEMO_CONFIG):
        raise JaxUnlearnError(f"the demo's config {DEMO_CONFIG} is missing: run from a clone of the repository "
                              "(pip install -e .), or use `jaxunlearn pipeline --config FILE`")
    cfg = PipelineConfig.from_json(DEMO_CONFIG)
    return cfg.with_overrides(QUICK_SETTINGS) if quick else cfg


def run_demo(out: str, quick: bool = False, progress: bool = True) -> dict:
    return run_pipeline(demo_config(quick), out, progress=progress)
